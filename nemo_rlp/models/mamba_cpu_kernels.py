"""Pure-torch stand-ins for the fused Mamba-2 kernels that megatron-core's `MambaMixer` calls.

On a GPU machine with mamba-ssm and causal-conv1d installed, the mixer runs their Triton/CUDA kernels
and this module does nothing. Without them (a CPU-only machine, or a GPU image lacking the packages),
`install()` puts plain-torch implementations of the same operations, with the same signatures, where
the mixer looks them up. Nothing here imports mamba-ssm, causal-conv1d or triton.

The kernels (each checked in `tests/unit/test_mamba_kernels.py`):

| function                              | what it computes                                              |
|---------------------------------------|---------------------------------------------------------------|
| `mamba_chunk_scan_combined`           | the chunked SSD scan (Mamba-2 "state space duality"): intra-  |
|                                       | chunk quadratic form + inter-chunk state passing; autograd    |
|                                       | through plain torch ops, so training works                    |
| `mamba_split_conv1d_scan_combined`    | split zxBCdt, causal conv1d + SiLU, SSD scan, SiLU(z) gate    |
|                                       | (or gated RMSNorm) and optional out-projection                |
| `causal_conv1d_fn`                    | depthwise causal conv1d (+ SiLU), optional initial states and |
|                                       | `seq_idx` boundaries                                          |
| `causal_conv1d_update`                | one decoding step of the conv, rolling the conv state in place|
| `causal_conv1d_varlen_states`         | last `state_len` inputs of each packed sequence               |
| `selective_state_update`              | one decoding step of the SSM, updating the state in place     |
| `RMSNormGated` / `ExtendedRMSNorm`    | grouped RMSNorm with SiLU(z) gate (before or after the norm)  |
| `tensor_get_slice_after`,             | megatron's Triton row-copy helpers for dynamic batching       |
| `tensor_merge`, `tensor_masked_update`|                                                               |

Scans and convolutions compute in fp32 (fp64 when given fp64, for gradcheck) and return the input
dtype, as the fused kernels do; SSM states are returned/kept in fp32.

`install()` stands in at these megatron-core 0.16.1 call sites (`megatron/core/ssm/mamba_mixer.py`;
from 0.17 the decode steps call megatron's own Triton ops instead, `megatron.core.ssm.ops`
`causal_conv1d_update(x[b, s, d], conv_state, weight, bias, silu_activation, conv_state_indices,
intermediate_conv_states)` and `selective_state_update(..., intermediate_ssm_states)`, bound under
the same names in the mixer: `megatron_causal_conv1d_update` / `megatron_selective_state_update`
stand in for them. Which stand-in goes where for the installed release is `STAND_INS_BY_VERSION`):

| line(s)      | megatron-core name                              | used at                                 |
|--------------|-------------------------------------------------|-----------------------------------------|
| 22-26        | `inference.contexts.attention_context.triton.   | 497-587 `_dynamic_inference`, 774, 787, |
|              | tensor_ops` (imports `triton` unconditionally,  | 881, 885 `_ssm_prefill` (dynamic        |
|              | so the mixer module cannot even be imported)    | batching only); a stand-in module is    |
|              |                                                 | registered in `sys.modules` when the    |
|              |                                                 | real one fails to import                |
| 48-50        | `selective_state_update` (mamba_ssm, Triton)    | 1031 `_ssm_decode`                      |
| 53-57        | `causal_conv1d_fn`, `causal_conv1d_update`,     | 805 `_ssm_prefill`, 949 `_ssm_decode`,  |
|              | `causal_conv1d_varlen_states` (causal-conv1d)   | 771 `_ssm_prefill`                      |
| 59-71        | `RMSNormGated` (else a MagicMock),              | 355 `MambaMixer.__init__`; called at    |
|              | `mamba_chunk_scan_combined`,                    | 682, 896, 1047; 850 `_ssm_prefill`;     |
|              | `mamba_split_conv1d_scan_combined`,             | 659 `_ssm_training`; 173 the            |
|              | `HAVE_MAMBA_SSM`                                | "MambaSSM is not installed" check       |
| 83           | `ExtendedRMSNorm(RMSNormGated)`, the class the  | 355; subclasses a MagicMock when        |
|              | mixer instantiates                              | mamba-ssm is absent, so it is replaced  |
| 1247         | `_check_mamba_sequence_packing_support`         | 654 `_ssm_training` with packed         |
|              | (asks mamba-ssm / causal-conv1d versions)       | sequences: these kernels honour seq_idx |

The mixer binds these names at import, so `install()` sets them as attributes of the imported
`megatron.core.ssm.mamba_mixer` module (whenever it was imported). Call `install()` before building
the hybrid model; `nemo_rlp.models.hybrid.provider` does. `install()` warns once if megatron-core is
outside the supported range, and refuses a release whose mixer no longer binds a name it sets.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

_TENSOR_OPS_MODULE = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"
_INF = float("inf")

_installed = False


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp64 when any input is fp64 (gradcheck), else fp32: the fused kernels accumulate in fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype):
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20, as the kernels: dt > 20 passes through
    if tuple(dt_limit) != (0.0, _INF):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = x[..., j+1] + ... + x[..., i] for i >= j, and -inf above the diagonal.

    Computed as a masked cumulative sum rather than a difference of cumulative sums, so that a -inf
    in `x` (a state reset at a sequence boundary) gives -inf only where the boundary is crossed
    and never -inf - -inf.
    """
    T = x.size(-1)
    x = x.unsqueeze(-1).expand(*x.shape, T)  # [..., k, j] = x[..., k]
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    x = x.masked_fill(~strictly_lower, 0.0)
    out = torch.cumsum(x, dim=-2)
    lower = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(0)
    return out.masked_fill(~lower, -_INF)


def _act(x: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    if activation is None:
        return x
    if activation in ("silu", "swish"):
        return F.silu(x)
    raise NotImplementedError(f"activation {activation!r}: only None, 'silu' and 'swish' are supported")


# ------------------------------------------------------------------------------------------------
# The SSD scan
# ------------------------------------------------------------------------------------------------


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_states: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD scan on discretisation-ready inputs, in the dtype of `x`.

    Computes, for every head h and position t, with the state h_t of shape (headdim, dstate):
        h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T,    y_t = h_t C_t
    where B and C are shared by the heads of a group (head i uses group i // (nheads / ngroups)).

    x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads), already biased/softplus'd;
    A: (nheads,); B, C: (batch, seqlen, ngroups, dstate); initial_states: (batch, nheads, headdim,
    dstate); seq_idx: (batch, seqlen) int, the state is reset where it changes.
    Returns y (batch, seqlen, nheads, headdim) and the final state (batch, nheads, headdim, dstate).
    Any length works: the tail is padded with dt = 0 (decay 1, no input), which leaves the state as is.
    """
    b, seqlen, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"nheads={h} is not a multiple of ngroups={g}")
    r = h // g
    Q = int(chunk_size)
    pad = (-seqlen) % Q
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    c = (seqlen + pad) // Q

    dA = dt * A.to(dt.dtype)  # (b, L, h), <= 0
    if seq_idx is not None:
        starts = torch.zeros_like(seq_idx, dtype=torch.bool)
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        # exp(-inf) = 0 drops the state carried into the first token of a new sequence.
        dA = dA.masked_fill(starts.unsqueeze(-1), -_INF)
    X = x * dt.unsqueeze(-1)

    # Chunked, heads split into (group, head-in-group) so B and C are never repeated per head.
    X = X.reshape(b, c, Q, g, r, p).permute(0, 1, 3, 4, 2, 5)  # (b, c, g, r, Q, p)
    Bc = B.reshape(b, c, Q, g, n).permute(0, 1, 3, 2, 4).unsqueeze(3)  # (b, c, g, 1, Q, n)
    Cc = C.reshape(b, c, Q, g, n).permute(0, 1, 3, 2, 4).unsqueeze(3)  # (b, c, g, 1, Q, n)
    dA = dA.reshape(b, c, Q, g, r).permute(0, 1, 3, 4, 2)  # (b, c, g, r, Q)
    dA_cumsum = torch.cumsum(dA, dim=-1)

    # 1. Within each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(dA_{s+1} + ... + dA_l) X_s.
    decay = torch.exp(_segsum(dA))  # (b, c, g, r, Q, Q)
    CB = Cc @ Bc.transpose(-1, -2)  # (b, c, g, 1, Q, Q)
    y = (CB * decay) @ X  # (b, c, g, r, Q, p)

    # 2. The state each chunk produces on its own, at its last position.
    decay_to_end = decay[..., -1, :]  # (b, c, g, r, Q): exp(dA_{s+1} + ... + dA_{Q-1})
    chunk_states = X.transpose(-1, -2) @ (Bc * decay_to_end.unsqueeze(-1))  # (b, c, g, r, p, n)

    # 3. Pass states across chunks: state entering chunk z = sum_{k<z} decay(k->z) * state_k.
    if initial_states is None:
        init = torch.zeros(b, 1, g, r, p, n, dtype=X.dtype, device=X.device)
    else:
        init = initial_states.to(X.dtype).reshape(b, 1, g, r, p, n)
    states = torch.cat([init, chunk_states], dim=1)  # (b, c+1, g, r, p, n)
    chunk_decay = torch.exp(_segsum(F.pad(dA_cumsum[..., -1].permute(0, 2, 3, 1), (1, 0))))  # (b,g,r,c+1,c+1)
    states = torch.einsum("bgrzk,bkgrpn->bzgrpn", chunk_decay, states)
    entering, final_state = states[:, :-1], states[:, -1]

    # 4. Contribution of the entering state to every position of the chunk.
    y = y + (Cc @ entering.transpose(-1, -2)) * torch.exp(dA_cumsum).unsqueeze(-1)

    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, c * Q, h, p)[:, :seqlen]
    return y, final_state.reshape(b, h, p, n)


def mamba_chunk_scan_combined(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    chunk_indices=None,
    chunk_offsets=None,
    cu_seqlens=None,
    dt_softplus=False,
    dt_limit=(0.0, _INF),
    return_final_states=False,
    return_varlen_states=False,
):
    """Stand-in for `mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`.

    x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads); A: (nheads,);
    B, C: (batch, seqlen, ngroups, dstate); D: (nheads, headdim) or (nheads,);
    z: (batch, seqlen, nheads, headdim), gates the output with SiLU(z); dt_bias: (nheads,);
    initial_states: (batch, nheads, headdim, dstate); seq_idx: (batch, seqlen);
    cu_seqlens: (nseq + 1,), only with return_varlen_states (batch 1, packed sequences).
    Returns out (dtype of x), plus the final states (fp32) and/or the per-sequence final states, in
    mamba-ssm's order: out | (out, final) | (out, varlen) | (out, final, varlen).
    """
    dtype = _compute_dtype(x, dt, B, C)
    dt_p = _process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
    xc = x.to(dtype)
    y, final_states = ssd_scan(
        xc, dt_p, A.to(dtype), B.to(dtype), C.to(dtype), chunk_size, initial_states=initial_states, seq_idx=seq_idx
    )
    if D is not None:
        Dc = D.to(dtype)
        y = y + xc * (Dc.unsqueeze(-1) if Dc.dim() == 1 else Dc)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    out = y.to(x.dtype)

    if not return_varlen_states:
        return (out, final_states) if return_final_states else out
    if cu_seqlens is None:
        raise ValueError("cu_seqlens must be provided if return_varlen_states is True")
    if x.shape[0] != 1:
        raise ValueError("return_varlen_states expects packed sequences (batch 1)")
    bounds = [int(v) for v in cu_seqlens.tolist()]
    varlen = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        init = initial_states[i : i + 1] if (initial_states is not None and initial_states.shape[0] > 1) else None
        _, state = ssd_scan(
            xc[:, lo:hi], dt_p[:, lo:hi], A.to(dtype), B[:, lo:hi].to(dtype), C[:, lo:hi].to(dtype), chunk_size, init
        )
        varlen.append(state)
    varlen_states = torch.cat(varlen, dim=0)
    return (out, final_states, varlen_states) if return_final_states else (out, varlen_states)


def ssd_recurrence_reference(x, dt, A, B, C, D=None, z=None, initial_states=None):
    """Token-by-token recurrence of the same model (test oracle). dt already processed.

    Same shapes as `ssd_scan`; returns (y, final_state) in the compute dtype of the inputs.
    """
    dtype = _compute_dtype(x, dt, B, C)
    b, L, h, p = x.shape
    g = B.shape[2]
    Bh = B.to(dtype).repeat_interleave(h // g, dim=2)
    Ch = C.to(dtype).repeat_interleave(h // g, dim=2)
    state = (
        torch.zeros(b, h, p, B.shape[-1], dtype=dtype, device=x.device)
        if initial_states is None
        else initial_states.to(dtype).clone()
    )
    ys = []
    for t in range(L):
        dA = torch.exp(dt[:, t].to(dtype) * A.to(dtype))  # (b, h)
        state = state * dA[:, :, None, None] + torch.einsum(
            "bh,bhp,bhn->bhpn", dt[:, t].to(dtype), x[:, t].to(dtype), Bh[:, t]
        )
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        Dc = D.to(dtype)
        y = y + x.to(dtype) * (Dc.unsqueeze(-1) if Dc.dim() == 1 else Dc)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y, state


# ------------------------------------------------------------------------------------------------
# Causal conv1d
# ------------------------------------------------------------------------------------------------


def _depthwise_conv(xp: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Valid depthwise conv: xp (batch, dim, seqlen + width - 1), weight (dim, width) -> (batch, dim, seqlen).

    A sum of `width` shifted products rather than F.conv1d: with width 4 it is as fast, and it
    avoids oneDNN building a new convolution primitive for every new sequence length (milliseconds
    each, and rollouts and RLP batches bring many lengths).
    """
    width = weight.shape[1]
    seqlen = xp.shape[-1] - width + 1
    out = xp[..., :seqlen] * weight[:, :1]
    for k in range(1, width):
        out = out + xp[..., k : k + seqlen] * weight[:, k : k + 1]
    return out if bias is None else out + bias.unsqueeze(-1)


def causal_conv1d_fn(
    x,
    weight,
    bias=None,
    seq_idx=None,
    initial_states=None,
    return_final_states=False,
    final_states_out=None,
    activation=None,
):
    """Stand-in for `causal_conv1d.causal_conv1d_fn`.

    x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,); seq_idx: (batch, seqlen), inputs of
    another sequence do not reach an output; initial_states: (batch, dim, width - 1), the inputs
    before x (they belong to the first sequence). Returns out (batch, dim, seqlen) in x's dtype, and
    with return_final_states also the last width - 1 inputs (batch, dim, width - 1).
    """
    dtype = _compute_dtype(x, weight)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    xc = x.to(dtype)
    w = weight.to(dtype)
    bc = bias.to(dtype) if bias is not None else None
    if initial_states is None:
        xp = F.pad(xc, (width - 1, 0))
    else:
        xp = torch.cat([initial_states.to(dtype), xc], dim=-1)
    if seq_idx is None:
        out = _depthwise_conv(xp, w, bc)
    else:
        fill = seq_idx[:, :1] if initial_states is not None else torch.full_like(seq_idx[:, :1], -1)
        sp = torch.cat([fill.expand(batch, width - 1), seq_idx], dim=1)
        same = sp.unfold(1, width, 1) == seq_idx.unsqueeze(-1)  # (batch, seqlen, width)
        windows = xp.unfold(-1, width, 1) * same.unsqueeze(1).to(dtype)  # (batch, dim, seqlen, width)
        out = torch.einsum("bdlw,dw->bdl", windows, w)
        if bc is not None:
            out = out + bc.unsqueeze(-1)
    out = _act(out, activation).to(x.dtype)
    if not return_final_states:
        return out
    final = xp[..., -(width - 1) :].to(x.dtype) if width > 1 else xp[..., :0].to(x.dtype)
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_update(
    x, conv_state, weight, bias=None, activation=None, cache_seqlens=None, conv_state_indices=None
):
    """Stand-in for `causal_conv1d.causal_conv1d_update`: decode steps, conv_state updated in place.

    x: (batch, dim) or (batch, dim, seqlen); conv_state: (batch, dim, state_len), state_len >=
    width - 1, or (N, dim, state_len) indexed by conv_state_indices (batch,) (negative: padding,
    not written); weight: (dim, width). Returns out shaped like x.
    """
    if cache_seqlens is not None:
        raise NotImplementedError("circular-buffer conv states (cache_seqlens) are not supported")
    dtype = _compute_dtype(x, weight)
    squeeze = x.dim() == 2
    xs = x.unsqueeze(-1) if squeeze else x
    batch, dim, seqlen = xs.shape
    width = weight.shape[1]
    state_len = conv_state.shape[-1]
    if state_len < width - 1:
        raise ValueError(f"conv_state length {state_len} < width - 1 = {width - 1}")
    if conv_state_indices is None:
        state = conv_state
    else:
        idx = conv_state_indices.long()
        state = conv_state[idx.clamp(min=0)]
    x_new = torch.cat([state.to(dtype), xs.to(dtype)], dim=-1)  # (batch, dim, state_len + seqlen)
    new_state = x_new[..., -state_len:].to(conv_state.dtype)
    if conv_state_indices is None:
        conv_state.copy_(new_state)
    else:
        valid = idx >= 0
        conv_state[idx[valid]] = new_state[valid]
    out = _depthwise_conv(
        x_new[..., -(seqlen + width - 1):], weight.to(dtype), bias.to(dtype) if bias is not None else None
    )
    out = _act(out, activation).to(x.dtype)
    return out.squeeze(-1) if squeeze else out


def causal_conv1d_varlen_states(x, cu_seqlens, state_len):
    """Stand-in for `causal_conv1d.causal_conv1d_varlen.causal_conv1d_varlen_states`.

    x: (total_tokens, dim) packed sequences; returns (nseq, dim, state_len): each sequence's last
    state_len inputs, zero-padded on the left when the sequence is shorter.
    """
    bounds = [int(v) for v in cu_seqlens.tolist()]
    nseq = len(bounds) - 1
    states = torch.zeros(nseq, x.shape[-1], state_len, dtype=x.dtype, device=x.device)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        take = min(state_len, hi - lo)
        if take > 0:
            states[i, :, state_len - take :] = x[hi - take : hi].t()
    return states


# ------------------------------------------------------------------------------------------------
# The SSM decoding step
# ------------------------------------------------------------------------------------------------


def selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None, **unused
):
    """Stand-in for `mamba_ssm.ops.triton.selective_state_update.selective_state_update`.

    One token: state <- exp(dt * A) * state + dt * x B^T (in place), out = state C + D x, gated by
    SiLU(z). state: (batch, dim, dstate) or (batch, nheads, dim, dstate) (or N rows indexed by
    state_batch_indices (batch,), negative: padding, not written); x, dt, z: (batch, [nheads,] dim);
    A: ([nheads,] dim, dstate); B, C: (batch, [ngroups,] dstate); D, dt_bias: ([nheads,] dim).
    Returns out shaped like x.
    """
    if unused.get("dst_state_batch_indices") is not None:
        raise NotImplementedError("dst_state_batch_indices is not supported")
    has_heads = state.dim() > 3
    dtype = _compute_dtype(x, dt, B, C)

    def heads(t, extra_dims):
        return t if (t is None or has_heads) else t.unsqueeze(extra_dims)

    x_, dt_, z_ = heads(x, 1), heads(dt, 1), heads(z, 1)
    A_, B_, C_ = heads(A, 0), heads(B, 1), heads(C, 1)
    D_, bias_ = heads(D, 0), heads(dt_bias, 0)
    if state_batch_indices is None:
        st = state if has_heads else state.unsqueeze(1)
    else:
        idx = state_batch_indices.long()
        st = (state if has_heads else state.unsqueeze(1))[idx.clamp(min=0)]
    nheads = st.shape[1]
    ngroups = B_.shape[1]

    dtc = dt_.to(dtype)
    if bias_ is not None:
        dtc = dtc + bias_.to(dtype)
    if dt_softplus:
        dtc = F.softplus(dtc)
    dA = torch.exp(dtc.unsqueeze(-1) * A_.to(dtype))  # (batch, nheads, dim, dstate)
    Bh = B_.to(dtype).repeat_interleave(nheads // ngroups, dim=1)  # (batch, nheads, dstate)
    Ch = C_.to(dtype).repeat_interleave(nheads // ngroups, dim=1)
    new_state = st.to(dtype) * dA + (dtc * x_.to(dtype)).unsqueeze(-1) * Bh.unsqueeze(-2)
    out = torch.einsum("bhdn,bhn->bhd", new_state, Ch)
    if D_ is not None:
        out = out + x_.to(dtype) * D_.to(dtype)
    if z_ is not None:
        out = out * F.silu(z_.to(dtype))

    new_state = new_state.to(state.dtype)
    if state_batch_indices is None:
        (state if has_heads else state.unsqueeze(1)).copy_(new_state)
    else:
        valid = idx >= 0
        if has_heads:
            state[idx[valid]] = new_state[valid]
        else:
            state[idx[valid]] = new_state[valid].squeeze(1)
    out = out.to(x.dtype)
    return out if has_heads else out.squeeze(1)


# ------------------------------------------------------------------------------------------------
# megatron-core's own decode kernels (0.17 on): `megatron.core.ssm.ops`, Triton, sequence dimension
# ------------------------------------------------------------------------------------------------


def megatron_causal_conv1d_update(
    x, conv_state, weight, bias, silu_activation, conv_state_indices=None, intermediate_conv_states=None
):
    """Stand-in for `megatron.core.ssm.ops.causal_conv1d_triton.causal_conv1d_update` (megatron-core
    0.17 on), which the mixer's `_ssm_decode` calls instead of causal-conv1d's.

    x: (batch, dim) or (batch, seqlen, dim) (sequence before channels, unlike causal-conv1d);
    conv_state: (N, dim, state_len), rolled in place one token at a time; silu_activation: the
    mixer's activation name ("silu" applies SiLU); conv_state_indices: (batch,), negative rows are
    padding (output 0, nothing written); intermediate_conv_states: (N, seqlen, dim, state_len), the
    conv state after each token. Returns out shaped like x.
    """
    activation = "silu" if silu_activation in ("silu", True) else None
    xs = x.unsqueeze(1) if x.dim() == 2 else x
    outs = []
    for s in range(xs.shape[1]):
        outs.append(causal_conv1d_update(
            xs[:, s], conv_state, weight, bias, activation=activation, conv_state_indices=conv_state_indices
        ))
        if intermediate_conv_states is not None:
            _store_rows(intermediate_conv_states, s, conv_state, conv_state_indices, xs.shape[0])
    out = torch.stack(outs, dim=1)
    if conv_state_indices is not None:
        out = out.masked_fill((conv_state_indices < 0).view(-1, 1, 1), 0)
    return out.squeeze(1) if x.dim() == 2 else out


def megatron_selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None,
    intermediate_ssm_states=None,
):
    """Stand-in for `megatron.core.ssm.ops.mamba_ssm.selective_state_update` (megatron-core 0.17 on).

    As `selective_state_update`, plus an optional sequence dimension after the batch: x, dt, z
    (batch, [seqlen,] [nheads,] dim), B, C (batch, [seqlen,] [ngroups,] dstate), stepped one token at
    a time; intermediate_ssm_states (N, seqlen, [nheads,] dim, dstate) gets the state after each."""
    has_heads = state.dim() > 3
    has_seq = x.dim() == (4 if has_heads else 3)
    if not has_seq:
        out = selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                     state_batch_indices=state_batch_indices)
        if intermediate_ssm_states is not None:
            _store_rows(intermediate_ssm_states, 0, state, state_batch_indices, x.shape[0])
        return out
    outs = []
    for s in range(x.shape[1]):
        outs.append(selective_state_update(
            state, x[:, s], dt[:, s], A, B[:, s], C[:, s], D=D, z=None if z is None else z[:, s],
            dt_bias=dt_bias, dt_softplus=dt_softplus, state_batch_indices=state_batch_indices,
        ))
        if intermediate_ssm_states is not None:
            _store_rows(intermediate_ssm_states, s, state, state_batch_indices, x.shape[0])
    return torch.stack(outs, dim=1)


def _store_rows(intermediate, step, state, indices, batch):
    """intermediate[row, step] = state[row] for the batch's state rows (indices; negative: padding)."""
    rows = torch.arange(batch, device=state.device) if indices is None else indices.long()
    rows = rows[rows >= 0]
    intermediate[rows, step] = state[rows].to(intermediate.dtype)


# ------------------------------------------------------------------------------------------------
# Gated RMSNorm
# ------------------------------------------------------------------------------------------------


def rmsnorm_fn(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=True, upcast=True):
    """Stand-in for `mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn` (the reference semantics).

    norm_before_gate=True: RMSNorm(x) * SiLU(z); False: RMSNorm(x * SiLU(z)). The RMS is taken over
    groups of `group_size` channels (all channels when None). Returns x's dtype.
    """
    dtype = x.dtype
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(cdtype) if upcast else x
    zf = (z.to(cdtype) if upcast else z) if z is not None else None
    if zf is not None and not norm_before_gate:
        xf = xf * F.silu(zf)
    N = xf.shape[-1]
    gs = N if group_size is None else group_size
    xg = xf.reshape(*xf.shape[:-1], N // gs, gs)
    rstd = torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + eps)
    out = (xg * rstd).reshape(xf.shape) * weight.to(xf.dtype)
    if bias is not None:
        out = out + bias.to(xf.dtype)
    if zf is not None and norm_before_gate:
        out = out * F.silu(zf)
    return out.to(dtype)


class RMSNormGated(nn.Module):
    """Stand-in for `mamba_ssm.ops.triton.layernorm_gated.RMSNorm` (same constructor, parameters)."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x, z=None):
        return rmsnorm_fn(
            x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
            norm_before_gate=self.norm_before_gate,
        )


class ExtendedRMSNorm(RMSNormGated):
    """megatron's `ExtendedRMSNorm` (mamba_mixer.py:83) over the stand-in: TP-sharded state dict."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        if not hasattr(self, "tp_group"):
            self.tp_group = parallel_state.get_tensor_model_parallel_group()
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {"weight": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )


# ------------------------------------------------------------------------------------------------
# The fused split + conv + scan of the training path
# ------------------------------------------------------------------------------------------------


def mamba_split_conv1d_scan_combined(
    zxbcdt,
    conv1d_weight,
    conv1d_bias,
    dt_bias,
    A,
    D,
    chunk_size,
    initial_states=None,
    seq_idx=None,
    dt_limit=(0.0, _INF),
    return_final_states=False,
    activation="silu",
    rmsnorm_weight=None,
    rmsnorm_eps=1e-6,
    outproj_weight=None,
    outproj_bias=None,
    headdim=None,
    ngroups=1,
    norm_before_gate=True,
):
    """Stand-in for `mamba_ssm.ops.triton.ssd_combined.mamba_split_conv1d_scan_combined`.

    zxbcdt: (batch, seqlen, [2 * d_nonssm +] 2 * dim + 2 * ngroups * dstate + nheads), dim =
    nheads * headdim; conv1d_weight: (dim + 2 * ngroups * dstate, width); D: (nheads, headdim) or
    (nheads,) with headdim given. Without rmsnorm_weight the output is scan(x) * SiLU(z); with it,
    the gated RMSNorm (grouped by dim // ngroups). Returns (batch, seqlen, [d_nonssm +] dim) or the
    out-projection of it, and with return_final_states the final SSM states.
    """
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("headdim is required when D is 1-D")
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    batch, seqlen, _ = zxbcdt.shape
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_nonssm = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    if d_nonssm < 0 or zxbcdt.shape[-1] != 2 * d_nonssm + 2 * dim + 2 * ngroups * dstate + nheads:
        raise ValueError(f"zxbcdt has {zxbcdt.shape[-1]} channels, inconsistent with the conv and D shapes")
    zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = causal_conv1d_fn(
        xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx=seq_idx, activation=activation
    ).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = x.reshape(batch, seqlen, nheads, headdim)
    B = B.reshape(batch, seqlen, ngroups, dstate)
    C = C.reshape(batch, seqlen, ngroups, dstate)
    z4 = z.reshape(batch, seqlen, nheads, headdim)
    result = mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, z=z4 if rmsnorm_weight is None else None, dt_bias=dt_bias,
        initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit,
        return_final_states=return_final_states,
    )
    out, final_states = result if return_final_states else (result, None)
    out = out.reshape(batch, seqlen, dim)
    if rmsnorm_weight is not None:
        out = rmsnorm_fn(
            out, rmsnorm_weight, None, z=z, eps=rmsnorm_eps, group_size=dim // ngroups,
            norm_before_gate=norm_before_gate,
        )
    if d_nonssm > 0:
        gate, up = zx0.chunk(2, dim=-1)
        out = torch.cat([F.silu(gate) * up, out], dim=-1)
    if outproj_weight is not None:
        out = F.linear(out, outproj_weight, outproj_bias)
    return (out, final_states) if return_final_states else out


# ------------------------------------------------------------------------------------------------
# megatron's Triton row helpers (dynamic batching), in torch
# ------------------------------------------------------------------------------------------------


def tensor_get_slice_after(input_tensor, output_tensor, pos_on_device, check_bounds: bool = False):
    """output_tensor[:n] = input_tensor[pos:], n = min(len(input) - pos, len(output))."""
    pos = int(pos_on_device.reshape(-1)[0])
    n = max(0, min(input_tensor.shape[0] - pos, output_tensor.shape[0]))
    if check_bounds and not 0 <= pos <= input_tensor.shape[0]:
        raise AssertionError("pos_on_device must be between 0 and input_tensor.shape[0]")
    output_tensor[:n].copy_(input_tensor[pos : pos + n])


def tensor_merge(tensor_a, tensor_b, pos_on_device, output_tensor=None, check_bounds: bool = False):
    """output[:pos] = a[:pos]; output[pos:pos + len(b)] = b (in place on a when output is None)."""
    pos = int(pos_on_device.reshape(-1)[0])
    out = tensor_a if output_tensor is None else output_tensor
    if output_tensor is not None:
        out[:pos].copy_(tensor_a[:pos])
    n = max(0, min(tensor_b.shape[0], out.shape[0] - pos))
    out[pos : pos + n].copy_(tensor_b[:n])


def tensor_masked_update(states, idx, new_states):
    """states[idx[i]] = new_states[i] for every idx[i] != -1."""
    idx = idx.long()
    valid = idx >= 0
    states[idx[valid]] = new_states[valid].to(states.dtype)


# ------------------------------------------------------------------------------------------------
# Installation
# ------------------------------------------------------------------------------------------------


def real_kernels_available() -> bool:
    """True when CUDA is up and mamba-ssm's Triton ops and causal-conv1d import."""
    if not torch.cuda.is_available():
        return False
    try:
        import causal_conv1d  # noqa: F401
        import mamba_ssm.ops.triton.layernorm_gated  # noqa: F401
        import mamba_ssm.ops.triton.selective_state_update  # noqa: F401
        import mamba_ssm.ops.triton.ssd_combined  # noqa: F401
    except Exception:  # an ImportError, or a broken build failing at import
        return False
    return True


def is_installed() -> bool:
    return _installed


def _register_tensor_ops_stand_in() -> None:
    """Make megatron's Triton tensor-ops module importable when `triton` is not."""
    if _TENSOR_OPS_MODULE in sys.modules:
        return
    try:
        __import__(_TENSOR_OPS_MODULE)
        return
    except ImportError:
        pass
    module = types.ModuleType(_TENSOR_OPS_MODULE)
    module.__doc__ = "nemo_rlp stand-in (pure torch) for megatron's Triton tensor ops; see mamba_cpu_kernels."
    module.tensor_get_slice_after = tensor_get_slice_after
    module.tensor_merge = tensor_merge
    module.tensor_masked_update = tensor_masked_update
    sys.modules[_TENSOR_OPS_MODULE] = module


def _stand_ins_support_sequence_packing(for_inference_not_training: bool = True):
    """Stand-in for megatron's version check (mamba_mixer.py:1247): the conv and the SSD scan here
    reset their state where `seq_idx` changes, which is all packed sequences need."""
    return True, None


def _stand_ins_for(version: str) -> dict[str, object]:
    """Every name the installed megatron-core's mixer module binds at import, with its stand-in:
    the names all supported versions share, then the rows of `STAND_INS_BY_VERSION` for `version`."""
    from nemo_rlp.megatron_version import rows_for

    stand_ins: dict[str, object] = {
        "causal_conv1d_fn": causal_conv1d_fn,
        "causal_conv1d_varlen_states": causal_conv1d_varlen_states,
        "mamba_chunk_scan_combined": mamba_chunk_scan_combined,
        "mamba_split_conv1d_scan_combined": mamba_split_conv1d_scan_combined,
        "RMSNormGated": RMSNormGated,
        "ExtendedRMSNorm": ExtendedRMSNorm,
        "HAVE_MAMBA_SSM": True,
        "tensor_get_slice_after": tensor_get_slice_after,
        "tensor_merge": tensor_merge,
        "tensor_masked_update": tensor_masked_update,
        # Packed sequences (training rows end to end, nemo_rlp.training.packing): megatron asks the
        # installed mamba-ssm / causal-conv1d versions whether they honour `seq_idx`; these do.
        "_check_mamba_sequence_packing_support": _stand_ins_support_sequence_packing,
    }
    for row in rows_for(STAND_INS_BY_VERSION, version):
        stand_ins.update(row)
    return stand_ins


# The decode kernels changed hands in megatron-core 0.17: 0.16 calls causal-conv1d's and mamba-ssm's
# (`causal_conv1d_update(x[b, d], ...)`), 0.17 on its own Triton ops in `megatron.core.ssm.ops`
# (`causal_conv1d_update(x[b, s, d], ..., silu_activation, conv_state_indices,
# intermediate_conv_states)`, `selective_state_update(..., intermediate_ssm_states)`).
# (first version, first version not covered, {mixer module name: stand-in}); `rows_for` picks.
STAND_INS_BY_VERSION = (
    ("0.16", "0.17", {"causal_conv1d_update": causal_conv1d_update,
                      "selective_state_update": selective_state_update}),
    ("0.17", "0.20", {"causal_conv1d_update": megatron_causal_conv1d_update,
                      "selective_state_update": megatron_selective_state_update}),
)

# Names the mixer binds only when causal-conv1d / mamba-ssm import (some versions' fallbacks set
# them to None, others leave them unbound): their absence says nothing about the version.
_BOUND_IF_IMPORTED = frozenset({"causal_conv1d_fn", "causal_conv1d_varlen_states", "mamba_chunk_scan_combined",
                                "mamba_split_conv1d_scan_combined"})

# The mixer module's own bindings of the names above, as found before `install()` replaced them
# (tests compare signatures: a stand-in must accept whatever the mixer passes).
replaced: dict[str, object] = {}


def install(force: bool = False) -> bool:
    """Put the stand-ins where megatron's MambaMixer looks them up. Returns True when they are active.

    Does nothing when the real kernels are usable (CUDA and mamba-ssm/causal-conv1d importable),
    unless `force`. Safe to call more than once, before or after megatron's mamba modules are imported.
    """
    global _installed
    if _installed:
        return True
    if not force and real_kernels_available():
        return False
    from nemo_rlp.megatron_version import installed_version, warn_if_unsupported

    warn_if_unsupported("the Mamba CPU kernels (nemo_rlp.models.mamba_cpu_kernels)")
    _register_tensor_ops_stand_in()
    from megatron.core.ssm import mamba_mixer

    stand_ins = _stand_ins_for(installed_version())
    missing = [name for name in stand_ins if not hasattr(mamba_mixer, name) and name not in _BOUND_IF_IMPORTED]
    if missing:
        # A name the mixer no longer binds: setting it would change nothing, and its call would reach
        # a real (GPU) kernel or a MagicMock. Fail here rather than in a forward.
        raise RuntimeError(f"megatron-core {installed_version()}'s mamba_mixer binds none of {missing}: "
                           "the Mamba CPU kernels need a new row in STAND_INS_BY_VERSION")
    for name, value in stand_ins.items():
        replaced.setdefault(name, getattr(mamba_mixer, name, None))
        setattr(mamba_mixer, name, value)
    _installed = True
    log.info("Mamba CPU kernels installed in megatron.core.ssm.mamba_mixer: %s", ", ".join(stand_ins))
    return True
