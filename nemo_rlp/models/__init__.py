"""Model providers: a config in, a megatron-core model (and the handle over it) out.

Each architecture is a family module that registers an `ArchitectureSpec` (`nemo_rlp.models.spec`):
`gpt/` (megatron's GPTModel) and `hybrid/` (megatron's MambaModel). Importing this package registers
both, so the registry is complete wherever any part of the package is imported; `build_model` builds
whatever `model.arch` names. Nothing here imports `nemo_rlp.config` (which imports the registry to
validate `model.arch`); the vocabulary size is `nemo_rlp.models.vocab`.
"""

from __future__ import annotations

import dataclasses

import torch

from nemo_rlp.models import gpt, hybrid  # noqa: F401  (registers the built-in families)
from nemo_rlp.models.common import use_transformer_engine
from nemo_rlp.models.spec import ARCHITECTURE_ATTRIBUTE, ModelConfigLike, get_architecture


def build_model(cfg: ModelConfigLike, vocab_size: int, tensor_parallel: int, device: torch.device,
                sequence_parallel: bool = False):
    """The provider of `model.arch` (its registered spec's `build`), with the architecture's
    Transformer Engine layer specs when TE is usable and its local ones otherwise. The model
    remembers its architecture, so the handle, the rollout caches and packing find the spec from the
    module. `sequence_parallel`: megatron's sequence parallelism in training (`parallel.sequence_parallel`)."""
    spec = get_architecture(cfg.arch)
    use_te = spec.te_layer_spec is not None and use_transformer_engine()
    layer_spec = spec.te_layer_spec if use_te else spec.local_layer_spec
    model = spec.build(cfg, vocab_size, tensor_parallel, device, sequence_parallel, layer_spec)
    setattr(model, ARCHITECTURE_ATTRIBUTE, spec.name)
    return model


def build_teacher_model(cfg: ModelConfigLike, vocab_size: int, tensor_parallel: int, device: torch.device):
    """The EMA teacher's model: the policy's architecture and sharding, in fp32 whatever the
    policy's dtype (nemo_rlp.ema keeps phi in fp32).

    It is built from an fp32 config, not cast after a bf16 build: megatron casts activations to the
    config's dtype inside the layers (attention probabilities, Mamba mixer inputs, pipeline
    buffers), so an fp32 copy of a bf16-config model fails with a dtype mismatch in its forward."""
    return build_model(dataclasses.replace(cfg, params_dtype="fp32"), vocab_size, tensor_parallel, device)
