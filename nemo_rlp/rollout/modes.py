"""The rollout modes, named once: the sampler dispatches on them and the config validates
`rlp.rollout_mode` against them. This module imports nothing, so the config can read it before
torch or megatron-core is imported."""

LOCKSTEP_MODES = ("recompute", "cache", "shared_prefill")
MODES = LOCKSTEP_MODES + ("rows",)  # the modes that run anywhere (the CPU tests run them all)
# megatron's dynamic engine (nemo_rlp.rollout.dynamic_engine): GPU with flash-attn only, not yet run.
GPU_MODES = ("dynamic",)
