"""The model's vocabulary size from the config and the tokenizer."""

from __future__ import annotations

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
