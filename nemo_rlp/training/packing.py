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

from dataclasses import dataclass

import torch


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # long [1, T]: every row's inputs (its tokens but the last), end to end
    position_ids: torch.Tensor  # long [1, T]: position within its own row
    labels: torch.Tensor  # long [n]: the next token of each of the n real inputs
    row: torch.Tensor  # long [n]: which row each real input belongs to
    position: torch.Tensor  # long [n]: its position in that row
    where: torch.Tensor  # long [n]: its place in the pack
    cu_seqlens: torch.Tensor  # int32 [rows + 1 (+1 with end padding)]: boundaries in the pack
    max_seqlen: int
    contiguous: bool  # the real inputs fill the front of the pack (no row alignment)

    def packed_seq_params(self):
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
            max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen,
        )

    def real_tokens(self, packed: torch.Tensor) -> torch.Tensor:
        """The entries [n, ...] of a pack-shaped tensor [T, ...] at the real inputs (a view when they
        fill the front of the pack, in order: no row was padded for alignment)."""
        return packed[: len(self.where)] if self.contiguous else packed[self.where]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def pack_rows(tokens: torch.Tensor, lengths: torch.Tensor, multiple: int = 1, pad: int = 0, align: int = 1) -> PackedRows:
    """Pack right-padded rows `tokens` [N, S] whose first `lengths[i]` tokens are real (inputs are
    a row's real tokens but the last; labels its real tokens but the first). Each row starts at a
    multiple of `align` tokens in the pack (its own pad tokens after its real ones, which causal
    layers never show to them); the pack ends at a multiple of `multiple`."""
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
    return PackedRows(
        input_ids=input_ids[None], position_ids=position_ids[None], labels=tokens[row, position + 1],
        row=row, position=position, where=where,
        cu_seqlens=torch.tensor(boundaries, dtype=torch.int32, device=device),
        max_seqlen=max(b - a for a, b in zip(boundaries[:-1], boundaries[1:])),
        contiguous=bool(torch.equal(slots, inputs_per_row)),
    )


def pack_alignment(language_model: torch.nn.Module) -> int:
    """Where packed rows must start for a packed row to compute exactly as the same row alone: at a
    multiple of the Mamba mixers' SSD chunk size (the chunked scan then cuts a row into the same
    chunks wherever it sits in the pack, so it rounds the same); 1 for attention-only models."""
    sizes = [m.chunk_size for m in language_model.modules() if hasattr(m, "chunk_size") and hasattr(m, "cached_batch_size")]
    return max(sizes, default=1)


def unpack_logprobs(real_logprobs: torch.Tensor, packed: PackedRows, shape: tuple[int, int]) -> torch.Tensor:
    """Log-probs [n] of the real inputs' labels -> the padded layout [N, S-1] (entry j scores token
    j+1 of its row); padding entries are 0 and carry no gradient."""
    out = real_logprobs.new_zeros(shape)
    return out.index_put((packed.row, packed.position), real_logprobs)
