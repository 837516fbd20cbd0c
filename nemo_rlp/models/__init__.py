"""Model providers: a config in, a megatron-core model (and the handle over it) out."""

from __future__ import annotations

import dataclasses

import torch

from nemo_rlp.config import ConfigError, ModelConfig


def padded_vocab_size(cfg: ModelConfig, tokenizer_vocab: int, tensor_parallel: int) -> int:
    """The model's vocabulary: explicit, or the tokenizer's padded so every TP shard is equal."""
    if cfg.vocab_size is not None:
        if cfg.vocab_size < tokenizer_vocab:
            raise ConfigError(
                f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({tokenizer_vocab} tokens, markers included); set model.vocab_size >= "
                f"{tokenizer_vocab} or null to derive it"
            )
        if cfg.vocab_size % tensor_parallel:
            raise ConfigError(
                f"model.vocab_size={cfg.vocab_size} is not divisible by "
                f"parallel.tensor_model_parallel_size={tensor_parallel}"
            )
        return cfg.vocab_size
    multiple = cfg.make_vocab_size_divisible_by * tensor_parallel
    return -(-tokenizer_vocab // multiple) * multiple


def build_model(cfg: ModelConfig, vocab_size: int, tensor_parallel: int, device: torch.device,
                sequence_parallel: bool = False):
    """Dispatch on `model.arch`: one provider per architecture, nothing else changes.
    `sequence_parallel`: megatron's sequence parallelism in training (`parallel.sequence_parallel`)."""
    if cfg.arch == "gpt":
        from nemo_rlp.models.gpt import build_gpt

        return build_gpt(cfg, vocab_size, tensor_parallel, device, sequence_parallel)
    if cfg.arch == "hybrid":
        from nemo_rlp.models.hybrid import build_hybrid

        return build_hybrid(cfg, vocab_size, tensor_parallel, device, sequence_parallel)
    raise ConfigError(f"model.arch={cfg.arch!r} is not allowed: one of 'gpt', 'hybrid'")


def build_teacher_model(cfg: ModelConfig, vocab_size: int, tensor_parallel: int, device: torch.device):
    """The EMA teacher's model: the policy's architecture and sharding, in fp32 whatever the
    policy's dtype (nemo_rlp.ema keeps phi in fp32).

    It is built from an fp32 config, not cast after a bf16 build: megatron casts activations to the
    config's dtype inside the layers (attention probabilities, Mamba mixer inputs, pipeline
    buffers), so an fp32 copy of a bf16-config model fails with a dtype mismatch in its forward."""
    return build_model(dataclasses.replace(cfg, params_dtype="fp32"), vocab_size, tensor_parallel, device)
