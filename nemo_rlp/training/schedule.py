"""Which kind of batch an optimizer step takes: NTP warm-up steps, then repeating cycles."""

from __future__ import annotations

from nemo_rlp.config import ScheduleConfig

NTP = "ntp"
RLP = "rlp"


def step_kind(step: int, schedule: ScheduleConfig) -> str:
    """`ntp_warmup_steps` NTP steps, then cycles of `ntp_per_cycle` NTP and `rlp_per_cycle` RLP."""
    if step < schedule.ntp_warmup_steps:
        return NTP
    position = (step - schedule.ntp_warmup_steps) % (schedule.ntp_per_cycle + schedule.rlp_per_cycle)
    return NTP if position < schedule.ntp_per_cycle else RLP
