"""Packed training rows: a microbatch's rows laid end to end without padding (megatron's `thd`
packed-sequence format), and their log-probs put back in the padded layout the losses read.

Thought rows differ in length (contexts of 8..2048 tokens, thoughts of 1..L): right-padded to the
longest row of a microbatch, most of a web-like microbatch is padding. Packed, the model sees only
real tokens: one sequence of all rows' tokens, shape [1, T], with `PackedSeqParams(qkv_format="thd",
cu_seqlens_q=[0, n_0, n_0+n_1, ...])` telling every layer where each row starts:
- attention attends within each row only (TE/flash varlen kernels on GPU; on CPU
  `nemo_rlp.models.attention.SDPAttention`, one row at a time), and RoPE restarts at each row;
- Mamba mixers reset their conv and SSM state at each row (megatron's `seq_idx`; on CPU the
  pure-torch kernels honour it, `nemo_rlp.models.mamba_cpu_kernels`);
- MLPs and norms are per token anyway.
Every real token therefore sees exactly what it sees in its padded row, and the loss and gradients
equal the padded computation (tests/unit/test_packing.py, to 1e-5 on both tiny models).

Two kinds of padding remain, both small and both invisible to real tokens: in hybrid models every
row starts at a multiple of the Mamba SSD chunk size (`pack_alignment`: the chunked scan then cuts a
row into the same chunks, and rounds the same, wherever the row sits in the pack, so a row's result
does not depend on its neighbours), and the pack ends at a multiple of the tensor-parallel size
under sequence parallelism (which splits the sequence dimension), as one more sequence that no loss
reads.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from nemo_rlp.models.spec import architecture_of


# (first version, first version not covered, PackedSeqParams needs `total_tokens` for the Mamba seq_idx)
PACKED_TOTAL_TOKENS_BY_VERSION = (
    ("0.16", "0.17", False),
    ("0.17", "0.20", True),
)


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # long [1, T]: every row's inputs (its tokens but the last), end to end
    position_ids: torch.Tensor  # long [1, T]: position within its own row
    labels: torch.Tensor  # long [n]: the next token of each of the n real (or scored) inputs
    row: torch.Tensor  # long [n]: which row each real input belongs to
    position: torch.Tensor  # long [n]: its position in that row
    where: torch.Tensor  # long [n]: its place in the pack
    cu_seqlens: torch.Tensor  # int32 [rows + 1 (+1 with end padding)]: boundaries in the pack
    max_seqlen: int
    contiguous: bool  # the real inputs fill the front of the pack (no row alignment, no selection)
    selected: bool  # `row`, `position`, `where`, `labels` are the scored inputs only (see `logits_at`)

    def packed_seq_params(self):
        from megatron.core.packed_seq_params import PackedSeqParams

        from nemo_rlp.megatron_version import rows_for

        # The Mamba mixer's per-token sequence index (`seq_idx`, its state resets): megatron-core
        # 0.16 derives it from cu_seqlens in the mixer; from 0.17 the mixer reads
        # `PackedSeqParams.seq_idx`, which the dataclass computes only when given `total_tokens`
        # (without it, Mamba states run on across rows, silently).
        extra = {"total_tokens": self.input_ids.shape[1]} if any(rows_for(PACKED_TOTAL_TOKENS_BY_VERSION)) else {}
        return PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
            max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen, **extra,
        )

    def real_tokens(self, packed: torch.Tensor) -> torch.Tensor:
        if self.selected:  # the model computed these entries only (`logits_at`)
            return packed
        """The entries [n, ...] of a pack-shaped tensor [T, ...] at the real inputs (a view when they
        fill the front of the pack, in order: no row was padded for alignment)."""
        return packed[: len(self.where)] if self.contiguous else packed[self.where]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def pack_rows(tokens: torch.Tensor, lengths: torch.Tensor, multiple: int = 1, pad: int = 0, align: int = 1,
              scored: Optional[torch.Tensor] = None) -> PackedRows:
    """Pack right-padded rows `tokens` [N, S] whose first `lengths[i]` tokens are real (inputs are
    a row's real tokens but the last; labels its real tokens but the first). Each row starts at a
    multiple of `align` tokens in the pack (its own pad tokens after its real ones, which causal
    layers never show to them); the pack ends at a multiple of `multiple`. `scored` [N, S-1] (in
    the padded layout: entry j scores token j+1): the inputs whose next-token log-prob the loss
    reads; only they get logits (`logits_at`). None: all real inputs."""
    device = tokens.device
    inputs_per_row = (lengths - 1).clamp(min=1).to(torch.long)
    slots = -(-inputs_per_row // align) * align  # each row's share of the pack
    ends = torch.cumsum(slots, 0)
    starts = ends - slots
    total = -(-int(ends[-1]) // multiple) * multiple
    row = torch.repeat_interleave(torch.arange(len(lengths), device=device), inputs_per_row)
    position = torch.arange(len(row), device=device) - (torch.cumsum(inputs_per_row, 0) - inputs_per_row)[row]
    where = starts[row] + position  # each real input's place in the pack
    input_ids = torch.full((total,), pad, dtype=torch.long, device=device)
    input_ids[where] = tokens[row, position]
    position_ids = torch.arange(total, device=device)
    position_ids = position_ids - starts[torch.bucketize(position_ids, ends, right=True).clamp(max=len(ends) - 1)]
    boundaries = [0, *ends.tolist()] + ([total] if total > int(ends[-1]) else [])
    contiguous = bool(torch.equal(slots, inputs_per_row))
    if scored is not None:
        keep = scored[row, position]
        row, position, where = row[keep], position[keep], where[keep]
        contiguous = False
    return PackedRows(
        input_ids=input_ids[None], position_ids=position_ids[None], labels=tokens[row, position + 1],
        row=row, position=position, where=where,
        cu_seqlens=torch.tensor(boundaries, dtype=torch.int32, device=device),
        max_seqlen=max(b - a for a, b in zip(boundaries[:-1], boundaries[1:])),
        contiguous=contiguous, selected=scored is not None,
    )


@contextlib.contextmanager
def logits_at(language_model: torch.nn.Module, index: Optional[torch.Tensor]):
    """While a forward runs in this context, the output layer computes logits only at the pack
    positions `index` (the model then returns [1, len(index), V/TP]): an RLP loss reads the log-probs
    of the thought tokens and x_t only, so the context's logits (most of a row) are never made,
    neither their FLOPs nor their [tokens, V/TP] fp32 copies. No-op for `index` None or a pipeline
    stage without the output layer.

    Under sequence parallelism the output layer would all-gather the sequence itself; here the
    gather comes first (its backward keeps this rank's share of the gradient, which the output
    layer's own backward has already summed over TP) and the layer runs without it, as megatron's
    GPTModel does when it keeps only the last token's logits."""
    layer = getattr(language_model, "output_layer", None)
    if index is None or layer is None:
        yield
        return
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    original = layer.forward
    sequence_parallel = layer.sequence_parallel

    def forward(hidden, *args, **kwargs):
        if sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return original(hidden[index], *args, **kwargs)

    layer.forward = forward
    layer.sequence_parallel = False
    try:
        yield
    finally:
        layer.forward = original
        layer.sequence_parallel = sequence_parallel


def pack_alignment(language_model: torch.nn.Module) -> int:
    """Where packed rows must start for a packed row to compute exactly as the same row alone: the
    architecture's answer (`ArchitectureSpec.pack_alignment`): a multiple of the Mamba mixers' SSD
    chunk size in hybrid models (the chunked scan then cuts a row into the same chunks wherever it
    sits in the pack, so it rounds the same); 1 for attention-only models."""
    return architecture_of(language_model).pack_alignment(language_model)


def unpack_logprobs(real_logprobs: torch.Tensor, packed: PackedRows, shape: tuple[int, int]) -> torch.Tensor:
    """Log-probs [n] of the real inputs' labels -> the padded layout [N, S-1] (entry j scores token
    j+1 of its row); padding entries are 0 and carry no gradient."""
    out = real_logprobs.new_zeros(shape)
    return out.index_put((packed.row, packed.position), real_logprobs)
