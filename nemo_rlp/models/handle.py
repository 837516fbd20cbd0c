"""The model handle: the one interface that rollouts, scoring and training use to call a model.

It hides how a megatron-core language model is called (position ids, vocabulary-sharded logits,
pipeline stages, wrappers such as DDP) behind the questions a caller asks: the log-prob of given next
tokens, and the full next-token distribution at each row's end, with or without a cache. What
differs between architectures (which layers keep which cache state) it asks the model's
architecture spec (`nemo_rlp.models.spec`); a new architecture does not change this handle.

Under pipeline parallelism only the last stage sees logits; the no-grad answers are broadcast to
every stage of the replica, so all stages run the same sampler and see the same numbers. (Training
does not come through here: it runs megatron's schedules, `nemo_rlp.training.steps`.)
"""

from __future__ import annotations

import contextlib

import torch

from nemo_rlp.models.cache_ops import cached_forward
from nemo_rlp.models.row_cache import RowCache, row_cached_logits
from nemo_rlp.models.spec import architecture_of
from nemo_rlp.parallel import pipeline


class ModelHandle:
    def __init__(self, module: torch.nn.Module):
        # `module` may be megatron's DDP wrapper; calling it forwards to the language model.
        self.module = module

    @property
    def language_model(self) -> torch.nn.Module:
        return _unwrap(self.module)

    def _logits(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, **kwargs):
        """Vocabulary-sharded logits [b, s, V/TP] for right-padded rows starting at position 0, on
        the last pipeline stage (None on the others)."""
        positions = positions_like(tokens) if positions is None else positions
        # attention_mask=None: megatron applies its causal mask. Rows are right-padded, so padding
        # sits after every real token and cannot be attended to by them.
        with sequence_parallel_off(self.language_model):
            return pipeline.forward(self.module, self.language_model, tokens, positions, **kwargs)

    def token_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p(tokens[:, j+1] | tokens[:, :j+1]) for every j: [b, s-1], fp32. Differentiable
        without pipeline parallelism; with it, no-grad and the same on every stage."""
        if pipeline.size() == 1:
            return next_token_logprobs(self._logits(tokens[:, :-1]), tokens)
        if torch.is_grad_enabled():
            raise RuntimeError("token_logprobs with gradients under pipeline parallelism: train through "
                               "nemo_rlp.training.steps.run_schedule instead")
        logits = self._logits(tokens[:, :-1])
        logprobs = None if logits is None else next_token_logprobs(logits, tokens)
        return pipeline.broadcast_from_last_stage(logprobs, (tokens.shape[0], tokens.shape[1] - 1), torch.float32)

    @torch.no_grad()
    def next_token_logits(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [b, V] for the token after each row's last real token."""
        logits = self._logits(tokens)
        last = None
        if logits is not None:
            last = _full_vocab(logits[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1])
        return self._share(last, tokens.shape[0])

    # ---------------------------------------------------------------------------------------------
    # Cached decoding. The cache is megatron-core's StaticInferenceContext: attention layers keep
    # their keys and values in it, recurrent layers (Mamba) their states.
    # ---------------------------------------------------------------------------------------------

    def new_cache(self, max_batch: int, max_sequence: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        return StaticInferenceContext(max_batch_size=max_batch, max_sequence_length=max_sequence)

    def new_row_cache(self, max_batch: int, max_sequence: int, device: torch.device):
        """A per-row cache (`nemo_rlp.models.row_cache.RowCache`): every row has its own length."""
        return RowCache(self.language_model, max_batch, max_sequence, device)

    @torch.no_grad()
    def cached_logits(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """Feed `tokens` [b, s] at the cache's current offset; full-vocab logits [b, V] for the
        token after the last one, fp32, identical on every tensor-parallel rank.

        With a `RowCache` the offset is each row's own length (a decode step feeds its first b
        rows), or 0 after `cache.prefill_into(rows)` (a prefill of one context into those rows), and
        the logits are this tensor-parallel rank's vocabulary shard [b, V/TP] (the whole vocabulary
        at TP=1), on the last pipeline stage only (None on the others): the `rows` sampler decides on
        the shards (nemo_rlp.rollout.vocab_shard) and sends each row's token and log-probs, not
        [b, V], to the other stages."""
        if isinstance(cache, RowCache):
            return row_cached_logits(self.language_model, tokens, cache)
        offset = cache.sequence_len_offset
        positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        positions = positions.unsqueeze(0).expand_as(tokens)
        if offset > 0:
            cache.enable_decode_mode()
        with cached_forward(self.language_model, fresh=offset == 0):
            logits = self._logits(tokens, positions, inference_context=cache, runtime_gather_output=True)
        cache.increment_sequence_len_offset(tokens.shape[1])
        return self._share(None if logits is None else logits[:, -1].float(), tokens.shape[0])

    def _share(self, logits: torch.Tensor | None, rows: int) -> torch.Tensor:
        """The last stage's full-vocabulary logits [rows, V] on every pipeline stage.

        Broadcasting [rows, V] per decoding step is fine for tests and small vocabularies; at B*G =
        8192 rows x 131k vocabulary it is 4 GB per step. The lockstep modes still do; the `rows` path
        samples on the last stage and broadcasts each row's token and log-probs only."""
        return pipeline.broadcast_from_last_stage(logits, (rows, self.language_model.vocab_size), torch.float32)

    @torch.no_grad()
    def select_cache_rows(self, cache, index: torch.Tensor) -> int:
        """Make cache row i a copy of row index[i]: repeat a prefilled context G times
        (index = [0,0,..,1,1,..]) or drop finished rows. len(index) may differ from the batch
        the cache was filled with, up to the cache's max_batch_size. Returns the bytes copied.
        Which layers keep which state is the architecture's (`CacheOps.select_rows`)."""
        model = self.language_model
        return architecture_of(model).cache.select_rows(model, cache, index)

    def train(self, mode: bool = True) -> "ModelHandle":
        self.module.train(mode)
        return self

    def eval(self) -> "ModelHandle":
        return self.train(False)


@contextlib.contextmanager
def sequence_parallel_off(language_model: torch.nn.Module):
    """Run a model trained with sequence parallelism without it (rollouts, scoring), as megatron's
    own inference does (text_generation_controller.py): a decoding step feeds one token per row,
    which cannot be split over tensor-parallel ranks."""
    if not getattr(language_model.config, "sequence_parallel", False):
        yield
        return
    from megatron.core.transformer.utils import set_model_to_sequence_parallel

    set_model_to_sequence_parallel(language_model, set_to=False)
    try:
        yield
    finally:
        set_model_to_sequence_parallel(language_model, set_to=True)


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


def labelled_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 log-probs [..] of `labels` [..] under vocabulary-sharded logits [.., V/TP]."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return -vocab_parallel_cross_entropy(logits.float().contiguous(), labels.contiguous())


def _full_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Gather vocabulary shards [.., V/TP] -> fp32 [.., V]: every tensor-parallel rank gets the whole
    distribution, so all sample the same token."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits.float())


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The language model inside wrappers (megatron DDP, Float16Module) that keep it in `.module`."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module

