"""The model wrapper: the trained policy (megatron DDP + optimizer + learning-rate schedule) and
its EMA teacher.

The teacher is a second model of the same architecture and the same sharding, held in fp32, whose
parameters are the EMA φ. It is seeded from the policy lazily, at the first RLP batch (docs/design.md
section 1, step 9), and moved towards the policy after every optimizer step once seeded.

An update is skipped, leaving the weights, the optimizer state, the schedule and the teacher as they
were, when the step's loss or rewards or any gradient is not finite (megatron's fp32 and bf16
optimizers do not check; its fp16 one does, through loss scaling). Every rank takes the same
decision: the check is one all-reduce over all ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from nemo_rlp.config import ConfigError, RunConfig, lr_cooldown_updates, lr_decay_steps
from nemo_rlp.ema import EMATeacher
from nemo_rlp.models import build_model, build_teacher_model
from nemo_rlp.models.handle import ModelHandle
from nemo_rlp.parallel.cpu_platform import cuda_available
from nemo_rlp.parallel.distributed import ParallelLayout

if TYPE_CHECKING:
    from torch.distributed.checkpoint.stateful import Stateful

# The EMA teacher's sharded keys in a checkpoint (recipes/import_checkpoint.py writes the same).
TEACHER_PREFIX = "ema_teacher."


@dataclass
class StepResult:
    """What one optimizer step did (`PolicyWithTeacher.optimizer_step`)."""

    updated: bool
    grad_norm: float
    skip_reason: Optional[str] = None  # why the update was skipped (None: it was not)


def nonfinite_metrics(metrics: dict | None, guarded: Iterable[str]) -> list[str]:
    """`name=value` for each of the `guarded` metrics (a loss's `guarded_metrics`: its loss and
    rewards, by exact name) whose value is not finite. A guarded name that `metrics` lacks raises
    KeyError naming it: a renamed metric must not switch the guard off without a word."""
    metrics = metrics or {}
    names = sorted(set(guarded))
    missing = [name for name in names if name not in metrics]
    if missing:
        raise KeyError(
            f"the non-finite guard watches {missing}, which the step's metrics lack (they have {sorted(metrics)}): "
            "a loss's `guarded_metrics` must name metrics that it reports (nemo_rlp/training/losses.py)"
        )
    return [f"{name}={metrics[name]}" for name in names if not math.isfinite(float(metrics[name]))]


def build_lr_scheduler(optimizer, cfg: RunConfig):
    """megatron-core's `OptimizerParamScheduler` for `cfg.trainer`, counted in optimizer updates, with
    the lr annealed linearly to 0 over the run's last updates (`trainer.lr_cooldown_fraction`). The
    config's values win over a checkpoint's (override); a checkpoint restores only the progress,
    `num_steps`, from which the anneal is recomputed."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    total_updates, cooldown_updates = lr_cooldown_updates(cfg)

    class CooldownScheduler(OptimizerParamScheduler):
        def get_lr(self, param_group: dict) -> float:
            # The lr of update num_steps + 1: the last update gets 1/cooldown_updates of the schedule.
            lr = super().get_lr(param_group)
            left = total_updates - self.num_steps
            return lr * max(left, 0) / cooldown_updates if cooldown_updates and left < cooldown_updates else lr

    t = cfg.trainer
    decay_steps = lr_decay_steps(cfg)
    return CooldownScheduler(
        optimizer,
        init_lr=t.lr_warmup_init,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


class PolicyWithTeacher:
    def __init__(self, cfg: RunConfig, vocab_size: int, layout: ParallelLayout):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        tp = layout.tensor_parallel
        distributed_optimizer = cfg.parallel.distributed_optimizer
        if distributed_optimizer and not cuda_available():
            raise ConfigError(
                "parallel.distributed_optimizer=true needs CUDA: megatron-core's DistributedOptimizer "
                "requires torch.cuda parameters (distrib_optimizer.py:420 in 0.16.1); set it false on CPU"
            )
        language_model = build_model(cfg.model, vocab_size, tp, layout.device, cfg.parallel.sequence_parallel)
        self.ddp = DistributedDataParallel(
            language_model.config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distributed_optimizer
            ),
            language_model,
        )
        self.language_model = language_model
        # The schedules finalise gradients (DP all-reduce, tied-embedding and layernorm reductions)
        # at the end of every forward-backward pass.
        from megatron.core.distributed import finalize_model_grads

        language_model.config.finalize_model_grads_func = finalize_model_grads
        t = cfg.trainer
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=t.lr,
                weight_decay=t.weight_decay,
                adam_beta1=t.adam_beta1,
                adam_beta2=t.adam_beta2,
                adam_eps=t.adam_eps,
                min_lr=t.min_lr,
                clip_grad=t.clip_grad,
                bf16=cfg.model.params_dtype == "bf16",
                use_distributed_optimizer=distributed_optimizer,
            ),
            [self.ddp],
        )
        self.scheduler = build_lr_scheduler(self.optimizer, cfg)
        teacher_model = build_teacher_model(cfg.model, vocab_size, tp, layout.device)
        self.ema = EMATeacher(teacher_model, decay=cfg.rlp.ema_decay)
        self.policy = ModelHandle(self.ddp)
        self.teacher = ModelHandle(teacher_model)

    def seed_teacher(self) -> bool:
        """Called at every RLP batch; seeds φ ← θ the first time only."""
        return self.ema.maybe_seed(self.language_model)

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def optimizer_step(self, metrics: dict | None, *, guarded: Sequence[str], grad_scale: float = 1.0) -> StepResult:
        """Step the optimizer on the finalised gradients, then the learning-rate schedule and the
        EMA; or skip all three when one of the `guarded` metrics (the step's losses' `guarded_metrics`,
        among its reduced `metrics`) or the gradients are not finite. `grad_scale` multiplies the
        gradients first (before clipping and Adam)."""
        reason = self._nonfinite(metrics, guarded)
        if reason is not None:
            return StepResult(updated=False, grad_norm=float("nan"), skip_reason=reason)
        if grad_scale != 1.0:
            grads = [p.main_grad for p in self.language_model.parameters() if getattr(p, "main_grad", None) is not None]
            torch._foreach_mul_(grads, grad_scale)
        updated, grad_norm, _ = self.optimizer.step()
        if not updated:  # megatron's fp16 loss scaling found inf/nan in the gradients
            return StepResult(updated=False, grad_norm=float("nan"), skip_reason="the optimizer found inf/nan")
        self.scheduler.step(increment=1)
        self.ema.update(self.language_model)
        return StepResult(updated=True, grad_norm=float(grad_norm or 0.0))

    @torch.no_grad()
    def _nonfinite(self, metrics: dict | None, guarded: Sequence[str]) -> Optional[str]:
        """Why this update must be skipped, the same answer on every rank; None if it must not."""
        bad_metrics = nonfinite_metrics(metrics, guarded)
        grads = [p.main_grad for p in self.language_model.parameters() if getattr(p, "main_grad", None) is not None]
        squares = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else None)
        if grads:
            norms = torch._foreach_norm(grads)
            squares = torch.stack([n.double() for n in norms]).square().sum()
        # [ranks with bad metrics, sum of squared gradient norms]: inf/nan anywhere makes it non-finite.
        flags = torch.stack([torch.tensor(float(bool(bad_metrics)), dtype=torch.float64, device=squares.device), squares])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flags)
        flags = flags.cpu()
        if flags[0] > 0:
            return "non-finite " + (", ".join(bad_metrics) if bad_metrics else "loss or rewards on another rank")
        if not math.isfinite(float(flags[1])):
            return f"non-finite gradients (sum of squared norms {float(flags[1])})"
        return None

    # --------------------------------------------------------------------------------------------
    # Checkpointing (nemo_rlp.training.checkpoint): sharded tensors, and small Stateful components
    # --------------------------------------------------------------------------------------------

    def sharded_state_dict(self, is_loading: bool = False) -> dict:
        """The tensors, as megatron-core dist_checkpointing sharded state dicts: the policy, the EMA
        teacher in fp32 (sharded keys prefixed `ema_teacher.`) and the optimizer."""
        from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

        policy = self.language_model.sharded_state_dict()
        teacher = self.ema.teacher.sharded_state_dict()
        add_prefix_for_sharding(teacher, TEACHER_PREFIX)
        optimizer = self.optimizer.sharded_state_dict(policy, is_loading=is_loading)
        return {"model": policy, "ema_teacher": teacher, "optimizer": optimizer}

    def load_sharded_state_dict(self, loaded: dict) -> None:
        """Restore what `dist_checkpointing.load` read for `sharded_state_dict(is_loading=True)`."""
        self.language_model.load_state_dict(loaded["model"])
        self.ema.teacher.load_state_dict(loaded["ema_teacher"])
        self.optimizer.load_state_dict(loaded["optimizer"])

    def stateful_components(self) -> dict[str, Stateful]:
        """The small state beside the tensors, by its key in a checkpoint's common part: the
        learning-rate schedule's progress and the EMA teacher's counters."""
        return {"scheduler": self.scheduler, "ema": self.ema}

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def parameters(self):
        return self.language_model.parameters()
