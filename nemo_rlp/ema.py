"""The EMA teacher pbar_phi: the no-think baseline of RLP (docs/design.md section 1, steps 3 and 9).

Plain torch, no megatron import (docs/design.md section 2).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMATeacher"]

log = logging.getLogger("nemo_rlp")


class EMATeacher:
    """Exponential moving average ``phi <- tau*phi + (1-tau)*theta`` of the policy's parameters.

    The teacher scores ``S_ema = log pbar_phi(x_t | x_<t)`` (docs/design.md section 1, step 3) and is
    updated after every optimizer step with tau = 0.999 (step 9). It is seeded with phi <- theta
    lazily, by :meth:`maybe_seed` at the first RLP batch, not at construction: a checkpoint loaded
    into the policy after construction must be what the teacher starts from (step 9).

    phi is kept in fp32 whatever the policy's dtype: with tau = 0.999 each update moves phi by 1e-3
    of the gap to theta, below half a bf16 ulp for most values, so a bf16 EMA would round most
    updates away and stall.

    Policy and teacher parameters are paired by name (``named_parameters``) and every operation is
    elementwise, so under tensor or pipeline parallelism each rank's teacher is sharded exactly like
    its own policy and the update needs no communication. Parameters that several ranks hold copies
    of (e.g. tied embeddings across pipeline stages) stay identical across ranks, because every rank
    applies the same deterministic update to the same theta.

    Only parameters are averaged; buffers (e.g. rotary frequencies) are whatever the teacher module
    was built with, as for any module of the same architecture.
    """

    def __init__(self, teacher: nn.Module, decay: float = 0.999) -> None:
        """Take ownership of ``teacher``: a module of the same architecture as the policy.

        The module is converted to fp32, frozen (``requires_grad=False``) and put in eval mode.
        """
        self.decay = _checked_decay(decay)
        self.teacher = teacher.float().requires_grad_(False).eval()
        self.initialized = False
        self.num_updates = 0

    # ----------------------------------------------------------------------------------------------
    # Seeding and updating (step 9)
    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def maybe_seed(self, policy: nn.Module) -> bool:
        """Seed ``phi <- theta`` (upcast to fp32) on the first call; later calls do nothing.

        Returns True if it seeded now. Called at the first RLP batch (step 9).
        """
        if self.initialized:
            return False
        teacher_params, policy_params = self._paired_params(policy)
        for phi, theta in zip(teacher_params, policy_params):
            phi.copy_(theta)  # copy_ converts dtype and device
        self.initialized = True
        return True

    @torch.no_grad()
    def update(self, policy: nn.Module) -> bool:
        """One EMA step ``phi <- tau*phi + (1-tau)*theta`` in fp32 (step 9).

        A no-op returning False until :meth:`maybe_seed` has run (averaging toward an unseeded,
        randomly initialised phi would be meaningless); returns True after updating.
        """
        if not self.initialized:
            return False
        teacher_params, policy_params = self._paired_params(policy)
        theta_fp32 = [
            theta.to(device=phi.device, dtype=torch.float32)
            for phi, theta in zip(teacher_params, policy_params)
        ]
        # lerp_(end, w) = phi + w*(theta - phi) = tau*phi + (1-tau)*theta with w = 1 - tau;
        # the foreach form updates all parameters in a few fused kernels instead of one per tensor.
        torch._foreach_lerp_(teacher_params, theta_fp32, 1.0 - self.decay)
        self.num_updates += 1
        return True

    # ----------------------------------------------------------------------------------------------
    # Checkpointing
    # ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The counters: ``{'decay', 'initialized', 'num_updates'}`` (plain Python values).

        The parameters phi are not in it: they are the ``teacher`` module's tensors, which a
        checkpoint saves sharded like the policy's (``nemo_rlp.training.checkpoint``), or
        ``teacher.state_dict()`` in plain torch.
        """
        return {"decay": self.decay, "initialized": self.initialized, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters of :meth:`state_dict` (the parameters are the teacher module's).

        The decay is a hyper-parameter of this run, not progress: like a learning-rate schedule
        whose config overrides a checkpoint's, this teacher keeps its own and warns when the saved
        one differs. Nothing is modified if a key is missing.
        """
        for key in ("decay", "initialized", "num_updates"):
            if key not in state:
                raise ValueError(f"EMATeacher state: missing key '{key}'")
        if float(state["decay"]) != self.decay:
            log.warning("rlp.ema_decay: the checkpoint used %s, this run uses %s", state["decay"], self.decay)
        self.initialized = bool(state["initialized"])
        self.num_updates = int(state["num_updates"])

    # ----------------------------------------------------------------------------------------------
    # Pairing teacher and policy parameters by name
    # ----------------------------------------------------------------------------------------------

    def _paired_params(self, policy: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """(teacher params, policy params) in the same order, matched by name and shape."""
        teacher_named = dict(self.teacher.named_parameters())
        policy_named = dict(policy.named_parameters())
        _check_same_names(teacher_named, policy_named, "teacher", "policy")
        teacher_params, policy_params = [], []
        for name, phi in teacher_named.items():
            theta = policy_named[name]
            if phi.shape != theta.shape:
                raise ValueError(
                    f"parameter '{name}': teacher shape {tuple(phi.shape)} "
                    f"!= policy shape {tuple(theta.shape)}"
                )
            teacher_params.append(phi)
            policy_params.append(theta.detach())
        return teacher_params, policy_params


def _checked_decay(decay: float) -> float:
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be in (0, 1), got {decay}")
    return float(decay)


def _check_same_names(a: dict[str, Any], b: dict[str, Any], a_name: str, b_name: str) -> None:
    """Raise naming the first parameter that only one side has."""
    only_a = [name for name in a if name not in b]
    only_b = [name for name in b if name not in a]
    for first_side, other_side, only in ((a_name, b_name, only_a), (b_name, a_name, only_b)):
        if only:
            raise ValueError(
                f"parameter '{only[0]}' is in the {first_side} but not in the {other_side} (all such: {only})"
            )
