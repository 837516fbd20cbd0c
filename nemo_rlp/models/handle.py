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
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        # attention_mask=None: megatron applies its causal mask. Rows are right-padded, so padding
        # sits after every real token and cannot be attended to by them.
        return self.module(tokens, positions, None)

    def token_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p(tokens[:, j+1] | tokens[:, :j+1]) for every j: [b, s-1], fp32, differentiable."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logits = self._logits(tokens[:, :-1]).float()
        # megatron's cross-entropy is sequence-first and shard-aware: no full-vocab gather needed.
        nll = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(), tokens[:, 1:].t().contiguous())
        return -nll.t()

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

    def train(self, mode: bool = True) -> "ModelHandle":
        self.module.train(mode)
        return self

    def eval(self) -> "ModelHandle":
        return self.train(False)
