"""The model handle: the one interface that rollouts, scoring and training use to call a model.

It hides how a megatron-core language model is called (position ids, vocabulary-sharded logits,
wrappers such as DDP) behind three questions a caller asks: the log-prob of given next tokens, the
full next-token distribution at each row's end, and the NTP loss. A new architecture is a new
provider in `nemo_rlp.models`; this handle does not change.
"""

from __future__ import annotations

import torch


class ModelHandle:
    def __init__(self, module: torch.nn.Module):
        # `module` may be megatron's DDP wrapper; calling it forwards to the language model.
        self.module = module

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Vocabulary-sharded logits [b, s, V/TP] for right-padded rows starting at position 0."""
        positions = positions_like(tokens)
        # attention_mask=None: megatron applies its causal mask. Rows are right-padded, so padding
        # sits after every real token and cannot be attended to by them.
        return self.module(tokens, positions, None)

    def token_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p(tokens[:, j+1] | tokens[:, :j+1]) for every j: [b, s-1], fp32, differentiable."""
        return next_token_logprobs(self._logits(tokens[:, :-1]), tokens)

    @torch.no_grad()
    def next_token_logits(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [b, V] for the token after each row's last real token."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        logits = self._logits(tokens)
        last = logits[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]
        # Every tensor-parallel rank gets the whole distribution, so all sample the same token.
        return gather_from_tensor_model_parallel_region(last.float())

    def ntp_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over a [b, s+1] batch (inputs tokens[:, :-1])."""
        return -self.token_logprobs(tokens).mean()

    # ---------------------------------------------------------------------------------------------
    # Cached decoding. The cache is megatron-core's StaticInferenceContext: attention layers keep
    # their keys and values in it, Mamba layers their conv and SSM states.
    # ---------------------------------------------------------------------------------------------

    def new_cache(self, max_batch: int, max_sequence: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        return StaticInferenceContext(max_batch_size=max_batch, max_sequence_length=max_sequence)

    @torch.no_grad()
    def cached_logits(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """Feed `tokens` [b, s] at the cache's current offset; full-vocab logits [b, V] for the
        token after the last one, fp32, identical on every tensor-parallel rank."""
        offset = cache.sequence_len_offset
        positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        positions = positions.unsqueeze(0).expand_as(tokens)
        if offset > 0:
            cache.enable_decode_mode()
        logits = self.module(tokens, positions, None, inference_context=cache, runtime_gather_output=True)
        cache.increment_sequence_len_offset(tokens.shape[1])
        return logits[:, -1].float()

    @torch.no_grad()
    def select_cache_rows(self, cache, index: torch.Tensor) -> None:
        """Make cache row i a copy of row index[i]: repeat a prefilled context G times
        (index = [0,0,..,1,1,..]) or drop finished rows. len(index) may differ from the batch
        the cache was filled with, up to the cache's max_batch_size."""
        from megatron.core.transformer.attention import Attention

        lm = _unwrap(self.module)
        for module in lm.modules():
            if isinstance(module, Attention) and module.layer_number in cache.key_value_memory_dict:
                key, value = cache.key_value_memory_dict[module.layer_number]
                # [max_sequence, max_batch, ...]: rows beyond len(index) are left as they are.
                rows = len(index)
                key[:, :rows] = key[:, index]
                value[:, :rows] = value[:, index]
            elif _is_mamba_mixer(module) and module.layer_number in cache.key_value_memory_dict:
                conv_state, ssm_state = cache.key_value_memory_dict[module.layer_number]
                # Mamba states are sized to the live batch, and megatron re-zeroes them when the
                # batch size changes: store the selected rows and tell the mixer their size.
                cache.key_value_memory_dict[module.layer_number] = (
                    conv_state[index].contiguous(),
                    ssm_state[index].contiguous(),
                )
                module.cached_batch_size = len(index)

    def train(self, mode: bool = True) -> "ModelHandle":
        self.module.train(mode)
        return self

    def eval(self) -> "ModelHandle":
        return self.train(False)


def positions_like(tokens: torch.Tensor) -> torch.Tensor:
    """Position ids 0..s-1 for right-padded rows that start at position 0."""
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def next_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """From vocabulary-sharded logits [b, s-1, V/TP] of inputs tokens[:, :-1]: the fp32 log-prob of
    each next token, [b, s-1]. megatron's cross-entropy is sequence-first and shard-aware, so no
    full-vocabulary gather is needed."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    nll = vocab_parallel_cross_entropy(
        logits.float().transpose(0, 1).contiguous(), tokens[:, 1:].t().contiguous()
    )
    return -nll.t()


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The language model inside wrappers (megatron DDP, Float16Module) that keep it in `.module`."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def _is_mamba_mixer(module: torch.nn.Module) -> bool:
    # Duck-typed: importing megatron's MambaMixer needs triton (or the CPU kernels' stand-ins),
    # which a pure-attention model should not require.
    return hasattr(module, "cached_batch_size") and hasattr(module, "mamba_state_shapes_per_request")
