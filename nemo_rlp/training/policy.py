"""The model wrapper: the trained policy (megatron DDP + optimizer) and its EMA teacher.

The teacher is a second model of the same architecture and the same sharding, held in fp32, whose
parameters are the EMA φ. It is seeded from the policy lazily, at the first RLP batch (DESIGN.md
section 1, step 9), and moved towards the policy after every optimizer step once seeded.
"""

from __future__ import annotations

from dataclasses import dataclass


from nemo_rlp.config import RunConfig
from nemo_rlp.ema import EMATeacher
from nemo_rlp.models import build_model
from nemo_rlp.models.handle import ModelHandle
from nemo_rlp.parallel.distributed import ParallelLayout


@dataclass
class StepResult:
    updated: bool
    grad_norm: float


class PolicyWithTeacher:
    def __init__(self, cfg: RunConfig, vocab_size: int, layout: ParallelLayout):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        tp = layout.tensor_parallel
        language_model = build_model(cfg.model, vocab_size, tp, layout.device)
        self.ddp = DistributedDataParallel(
            language_model.config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
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
                clip_grad=t.clip_grad,
                bf16=cfg.model.params_dtype == "bf16",
                use_distributed_optimizer=False,
            ),
            [self.ddp],
        )
        teacher_model = build_model(cfg.model, vocab_size, tp, layout.device).float()
        self.ema = EMATeacher(teacher_model, decay=cfg.rlp.ema_decay)
        self.policy = ModelHandle(self.ddp)
        self.teacher = ModelHandle(teacher_model)

    def seed_teacher(self) -> bool:
        """Called at every RLP batch; seeds φ ← θ the first time only."""
        return self.ema.maybe_seed(self.language_model)

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def optimizer_step(self) -> StepResult:
        """Step the optimizer on the finalised gradients, then move the EMA."""
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.ema.update(self.language_model)
        return StepResult(updated=bool(updated), grad_norm=float(grad_norm or 0.0))

    def parameters(self):
        return self.language_model.parameters()
