"""Throughput in the logs: tokens/s, an RLP step's time split, MFU with a configured peak
(nemo_rlp.training.metrics.throughput), and the FLOP accounting it shares with the plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_rlp.config import ConfigError, load_config
from nemo_rlp.models.vocab import padded_vocab_size
from nemo_rlp.planning import count_parameters, extra_forward_tokens, model_flops, rollout_tokens
from nemo_rlp.training.loop import Trainer
from nemo_rlp.training.metrics import throughput

from tests.tiny_run import TINY_RUN

# Two NTP steps, then one NTP and one RLP step.
SHORT = [*TINY_RUN, "trainer.steps=4", "trainer.schedule.ntp_warmup_steps=2", "checkpoint.resume=never"]
RLP_KEYS = ("thought_tokens", "trained_tokens", "forward_tokens", "thought_tokens_per_s", "trained_tokens_per_s",
            "time_teacher_s", "time_rollout_s", "time_update_s", "tflops_per_device")
NTP_KEYS = ("trained_tokens", "tokens_per_s", "tflops_per_device")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_logs_throughput_and_mfu_with_a_peak(tmp_path, caplog):
    cfg = load_config([*SHORT, "logging.peak_tflops=0.5"])
    with caplog.at_level("INFO", logger="nemo_rlp"):
        Trainer(cfg, tmp_path).train()
    records = _records(tmp_path)
    assert [r["kind"] for r in records] == ["ntp", "ntp", "ntp", "rlp"]
    for r in records:
        keys = RLP_KEYS if r["kind"] == "rlp" else NTP_KEYS
        for key in (*keys, "mfu"):
            assert r[key] > 0, (key, r)
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.5)
    ntp, rlp = records[0], records[-1]
    assert ntp["trained_tokens"] == 4 * 32  # trainer.ntp_batch_size x data.ntp_seq_len
    assert ntp["tokens_per_s"] == pytest.approx(ntp["trained_tokens"] / ntp["step_seconds"])
    assert rlp["time_teacher_s"] + rlp["time_rollout_s"] + rlp["time_update_s"] <= rlp["step_seconds"]
    # 4 contexts x G=3 thoughts of 1..6 tokens each.
    assert 12 <= rlp["thought_tokens"] <= 12 * 6
    lines = [m for m in caplog.messages if m.startswith("step ")]
    assert "tok/s" in lines[0] and "MFU" in lines[0]
    assert "think" in lines[-1] and "teacher/rollout/update" in lines[-1] and "MFU" in lines[-1]


def test_no_peak_no_mfu(tmp_path):
    cfg = load_config(SHORT)
    trainer = Trainer(cfg, tmp_path)
    # N from the live model is the plan's N (one process: the whole model).
    vocab = padded_vocab_size(cfg.model, trainer.tokenizer.vocab_size, 1)
    assert trainer.matmul_parameters == count_parameters(cfg.model, vocab).matmul
    trainer.train()
    records = _records(tmp_path)
    assert all("mfu" not in r and r["tflops_per_device"] > 0 for r in records)
    assert records[-1]["thought_tokens_per_s"] > 0 and records[0]["tokens_per_s"] > 0


def test_throughput_arithmetic():
    """MFU is the plan's FLOPs (6N per trained, 2N per forward-only token) of a device's
    data-parallel share, per second, over the peak."""
    rlp = {"thought_tokens": 600.0, "trained_tokens": 4000.0, "forward_tokens": 2000.0,
           "time_teacher_s": 0.5, "time_rollout_s": 2.0, "time_update_s": 1.0}
    out = throughput(rlp, seconds=4.0, matmul_parameters=1000, data_parallel=2, peak_tflops=1e-6)
    assert out["thought_tokens_per_s"] == 300.0 and out["trained_tokens_per_s"] == 4000.0
    flops = 1000 * (2 * 1000 + 6 * 2000)
    assert out["tflops_per_device"] == pytest.approx(flops / 4.0 / 1e12)
    assert out["mfu"] == pytest.approx(flops / 4.0 / 1e6)
    assert model_flops(1000, 1000, 2000) == flops
    assert "mfu" not in throughput({"trained_tokens": 10.0}, 1.0, 5, 1, None)


def test_rollout_token_counts_match_the_plans_worst_case():
    c, L, G, B = 8, 4, 3, 2
    assert rollout_tokens("shared_prefill", G, [c + 1] * B, [L] * (B * G)) == (B * (c + 1), B * G * (L + 1))
    assert rollout_tokens("cache", G, [c + 1] * B, [L] * (B * G)) == (B * G * (c + 1), B * G * (L + 1))
    recompute = B * G * sum(c + 1 + i for i in range(L + 1))
    assert rollout_tokens("recompute", G, [c + 1] * B, [L] * (B * G)) == (recompute, 0)
    cfg = load_config(["rlp.num_minibatches=2", "rlp.contexts_per_step=4"]).rlp
    assert extra_forward_tokens(cfg, 100) == 50


def test_peak_tflops_must_be_positive():
    with pytest.raises(ConfigError, match="logging.peak_tflops"):
        load_config(["logging.peak_tflops=0"])
