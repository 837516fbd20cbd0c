"""The pure-torch Mamba-2 kernels (nemo_rlp.models.mamba_cpu_kernels) against plain recurrences.

The oracle is the model itself, token by token: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,
y_t = h_t C_t (+ D x_t, gated by SiLU(z)). The chunked scan must match it for lengths that are not a
multiple of the chunk, carry gradients (gradcheck in float64), and the decoding updates must
reproduce the scan's outputs token by token after a prefill.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from nemo_rlp.models import mamba_cpu_kernels as K

SCAN_ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: one intra-op thread avoids OpenMP spin-waits on a busy 2-core machine
    # (gradcheck here is 100x slower with 2 threads under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scan_inputs(seed=0, b=2, L=45, h=4, p=8, g=2, n=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    return dict(
        x=randn(b, L, h, p),
        dt=randn(b, L, h),
        A=-(torch.rand(h, generator=gen) * 4 + 0.5).to(dtype),
        B=randn(b, L, g, n, scale=n**-0.5),
        C=randn(b, L, g, n, scale=n**-0.5),
        D=randn(h),
        z=randn(b, L, h, p),
        dt_bias=randn(h, scale=0.5),
        initial_states=randn(b, h, p, n, scale=0.5),
    )


def _reference(inp, dtype=torch.float64):
    dt = F.softplus(inp["dt"].to(dtype) + inp["dt_bias"].to(dtype))
    cast = {k: v.to(dtype) for k, v in inp.items()}
    return K.ssd_recurrence_reference(
        cast["x"], dt, cast["A"], cast["B"], cast["C"], D=cast["D"], z=cast["z"],
        initial_states=cast["initial_states"],
    )


@pytest.mark.parametrize("chunk_size", [16, 7])
def test_chunked_scan_matches_stepwise_recurrence_fp32(chunk_size):
    inp = _scan_inputs()
    assert inp["x"].shape[1] % chunk_size != 0
    out, final = K.mamba_chunk_scan_combined(
        inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size, D=inp["D"], z=inp["z"],
        dt_bias=inp["dt_bias"], initial_states=inp["initial_states"], dt_softplus=True,
        return_final_states=True,
    )
    assert out.dtype == torch.float32 and out.shape == inp["x"].shape
    ref64, final64 = _reference(inp, torch.float64)
    ref32, final32 = _reference(inp, torch.float32)
    err64 = (out.double() - ref64).abs().max().item()
    err32 = (out - ref32).abs().max().item()
    err_state = (final.double() - final64).abs().max().item()
    print(
        f"\nscan vs recurrence (chunk {chunk_size}, L=45, fp32): max |y - y_ref64| = {err64:.2e}, "
        f"|y - y_ref32| = {err32:.2e}, final state {err_state:.2e} (|y| <= {ref64.abs().max():.1f})"
    )
    assert err64 < SCAN_ATOL and err32 < SCAN_ATOL and err_state < SCAN_ATOL


def test_scan_does_not_depend_on_chunk_size_and_handles_length_one():
    inp = _scan_inputs(seed=1, L=33)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    kw = dict(D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True)
    outs = [K.mamba_chunk_scan_combined(*args, q, **kw) for q in (1, 4, 16, 64)]
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], atol=SCAN_ATOL, rtol=0)
    one = K.mamba_chunk_scan_combined(*(a[:, :1] if a.dim() > 1 else a for a in args), 16, **kw)
    torch.testing.assert_close(one, outs[0][:, :1], atol=SCAN_ATOL, rtol=0)


def test_seq_idx_resets_the_state_at_sequence_boundaries():
    inp = _scan_inputs(seed=2, b=1, L=37)
    bounds = [0, 10, 29, 37]
    seq_idx = torch.cat([torch.full((e - s,), i) for i, (s, e) in enumerate(zip(bounds, bounds[1:]))]).unsqueeze(0)
    kw = dict(D=inp["D"], z=inp["z"], dt_bias=inp["dt_bias"], dt_softplus=True)
    packed, final = K.mamba_chunk_scan_combined(
        inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 8, seq_idx=seq_idx, return_final_states=True, **kw
    )
    pieces, finals = [], []
    for s, e in zip(bounds, bounds[1:]):
        sl = slice(s, e)
        y, f = K.mamba_chunk_scan_combined(
            inp["x"][:, sl], inp["dt"][:, sl], inp["A"], inp["B"][:, sl], inp["C"][:, sl], 8,
            D=inp["D"], z=inp["z"][:, sl], dt_bias=inp["dt_bias"], dt_softplus=True, return_final_states=True,
        )
        pieces.append(y)
        finals.append(f)
    torch.testing.assert_close(packed, torch.cat(pieces, dim=1), atol=SCAN_ATOL, rtol=0)
    torch.testing.assert_close(final, finals[-1], atol=SCAN_ATOL, rtol=0)
    # The varlen states are each sequence's final state.
    _, varlen = K.mamba_chunk_scan_combined(
        inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 8, seq_idx=seq_idx,
        cu_seqlens=torch.tensor(bounds), return_varlen_states=True, **kw,
    )
    torch.testing.assert_close(varlen, torch.cat(finals, dim=0), atol=SCAN_ATOL, rtol=0)


def test_scan_gradcheck_float64():
    inp = _scan_inputs(seed=3, b=1, L=7, h=2, p=2, g=1, n=3, dtype=torch.float64)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
    tensors = [inp[k].clone().requires_grad_(True) for k in names]

    def fn(x, dt, A, B, C, D, z, dt_bias, initial_states):
        return K.mamba_chunk_scan_combined(
            x, dt, A, B, C, 3, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
            dt_softplus=True, return_final_states=True,
        )

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_split_conv1d_scan_gradcheck_float64_and_matches_its_parts():
    gen = torch.Generator().manual_seed(4)
    b, L, h, p, g, n, w = 1, 6, 2, 2, 1, 2, 3
    dim = h * p
    zxbcdt = torch.randn(b, L, 2 * dim + 2 * g * n + h, generator=gen, dtype=torch.float64)
    conv_w = torch.randn(dim + 2 * g * n, w, generator=gen, dtype=torch.float64) * 0.5
    conv_b = torch.randn(dim + 2 * g * n, generator=gen, dtype=torch.float64) * 0.1
    dt_bias = torch.randn(h, generator=gen, dtype=torch.float64) * 0.5
    A = -torch.rand(h, generator=gen, dtype=torch.float64) - 0.5
    D = torch.randn(h, generator=gen, dtype=torch.float64)
    args = [t.clone().requires_grad_(True) for t in (zxbcdt, conv_w, conv_b, dt_bias, A, D)]

    def fn(zxbcdt, conv_w, conv_b, dt_bias, A, D):
        return K.mamba_split_conv1d_scan_combined(zxbcdt, conv_w, conv_b, dt_bias, A, D, 4, headdim=p, ngroups=g)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4)

    # The same thing spelled out: conv + SiLU, scan with the SiLU(z) gate.
    z, xBC, dt = torch.split(zxbcdt, [dim, dim + 2 * g * n, h], dim=-1)
    xBC = K.causal_conv1d_fn(xBC.transpose(1, 2), conv_w, conv_b, activation="silu").transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, g * n, g * n], dim=-1)
    y = K.mamba_chunk_scan_combined(
        x.reshape(b, L, h, p), dt, A, B.reshape(b, L, g, n), C.reshape(b, L, g, n), 4, D=D,
        z=z.reshape(b, L, h, p), dt_bias=dt_bias, dt_softplus=True,
    )
    torch.testing.assert_close(fn(zxbcdt, conv_w, conv_b, dt_bias, A, D), y.reshape(b, L, dim))
    # With the gated RMSNorm folded in instead of the plain gate.
    norm_w = torch.rand(dim, generator=gen, dtype=torch.float64) + 0.5
    y_ungated = K.mamba_chunk_scan_combined(
        x.reshape(b, L, h, p), dt, A, B.reshape(b, L, g, n), C.reshape(b, L, g, n), 4, D=D,
        dt_bias=dt_bias, dt_softplus=True,
    ).reshape(b, L, dim)
    normed = K.mamba_split_conv1d_scan_combined(
        zxbcdt, conv_w, conv_b, dt_bias, A, D, 4, headdim=p, ngroups=g, rmsnorm_weight=norm_w,
        norm_before_gate=False,
    )
    torch.testing.assert_close(normed, K.rmsnorm_fn(y_ungated, norm_w, z=z, group_size=dim // g, norm_before_gate=False))


def test_causal_conv1d_matches_torch_conv_and_continues_from_initial_states():
    gen = torch.Generator().manual_seed(5)
    b, d, L, w = 2, 6, 11, 4
    x = torch.randn(b, d, L, generator=gen)
    weight = torch.randn(d, w, generator=gen)
    bias = torch.randn(d, generator=gen)
    ref = F.silu(F.conv1d(x, weight.unsqueeze(1), bias, padding=w - 1, groups=d)[..., :L])
    out, final = K.causal_conv1d_fn(x, weight, bias, activation="silu", return_final_states=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(final, x[..., -(w - 1):])
    # Splitting the sequence and carrying the last w-1 inputs gives the same outputs.
    first, carried = K.causal_conv1d_fn(x[..., :5], weight, bias, activation="silu", return_final_states=True)
    second = K.causal_conv1d_fn(x[..., 5:], weight, bias, initial_states=carried, activation="silu")
    torch.testing.assert_close(torch.cat([first, second], dim=-1), ref)
    # seq_idx: a packed second sequence does not see the first.
    seq_idx = torch.tensor([[0] * 4 + [1] * 7] * b)
    packed = K.causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx, activation="silu")
    alone = K.causal_conv1d_fn(x[..., 4:], weight, bias, activation="silu")
    torch.testing.assert_close(packed[..., 4:], alone)
    torch.testing.assert_close(packed[..., :4], ref[..., :4])
    # The packed-sequence conv states: each sequence's last w inputs, zero-padded on the left.
    states = K.causal_conv1d_varlen_states(x[0].t(), torch.tensor([0, 2, 11]), state_len=w)
    torch.testing.assert_close(states[0], F.pad(x[0, :, :2], (w - 2, 0)))
    torch.testing.assert_close(states[1], x[0, :, -w:])


def test_gated_rmsnorm_groups_and_gate_order():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, 8, generator=gen)
    z = torch.randn(3, 5, 8, generator=gen)
    norm = K.RMSNormGated(8, eps=1e-5, group_size=4, norm_before_gate=False)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(8, generator=gen) + 0.5)

    def rms(v):
        v = v.reshape(3, 5, 2, 4)
        return (v * torch.rsqrt(v.square().mean(-1, keepdim=True) + 1e-5)).reshape(3, 5, 8)

    torch.testing.assert_close(norm(x, z), rms(x * F.silu(z)) * norm.weight)
    torch.testing.assert_close(norm(x), rms(x) * norm.weight)
    norm.norm_before_gate = True
    torch.testing.assert_close(norm(x, z), rms(x) * norm.weight * F.silu(z))
    assert norm(x.bfloat16(), z.bfloat16()).dtype == torch.bfloat16
    x64 = x[:1, :2].double().requires_grad_(True)
    z64 = z[:1, :2].double().requires_grad_(True)
    w64 = norm.weight.detach().double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: K.rmsnorm_fn(a, c, z=b, eps=1e-5, group_size=4, norm_before_gate=False), (x64, z64, w64)
    )


def test_decoding_updates_reproduce_the_scan_token_by_token():
    """The mixer's inference path: prefill (conv + scan, keeping both states), then one token per
    step through causal_conv1d_update and selective_state_update, in the shapes megatron passes."""
    gen = torch.Generator().manual_seed(7)
    b, L, h, p, g, n, w, prefill = 2, 29, 4, 8, 2, 16, 4, 11
    dim = h * p
    xBC = torch.randn(b, L, dim + 2 * g * n, generator=gen)
    dt = torch.randn(b, L, h, generator=gen)
    z = torch.randn(b, L, h, p, generator=gen)
    conv_w = torch.randn(dim + 2 * g * n, w, generator=gen) * 0.5
    conv_b = torch.randn(dim + 2 * g * n, generator=gen) * 0.1
    A = -(torch.rand(h, generator=gen) * 4 + 0.5)
    D = torch.randn(h, generator=gen)
    dt_bias = torch.randn(h, generator=gen) * 0.5

    def split(conv_out):  # (b, l, dim + 2gn) -> x, B, C
        x, B, C = torch.split(conv_out, [dim, g * n, g * n], dim=-1)
        return x.reshape(*x.shape[:2], h, p), B.reshape(*B.shape[:2], g, n), C.reshape(*C.shape[:2], g, n)

    # The whole sequence at once.
    conv_all = K.causal_conv1d_fn(xBC.transpose(1, 2), conv_w, conv_b, activation="silu").transpose(1, 2)
    y_all = K.mamba_chunk_scan_combined(*split(conv_all)[:1], dt, A, *split(conv_all)[1:], 8, D=D, z=z,
                                        dt_bias=dt_bias, dt_softplus=True)

    # Prefill, as MambaMixer._ssm_prefill: conv state = last w inputs, SSM state from the scan.
    x_pre = xBC[:, :prefill].transpose(1, 2)
    conv_state = F.pad(x_pre, (w - x_pre.shape[-1], 0)).contiguous()
    conv_pre = K.causal_conv1d_fn(x_pre, conv_w, conv_b, activation="silu").transpose(1, 2)
    xp, Bp, Cp = split(conv_pre)
    y_pre, ssm_state = K.mamba_chunk_scan_combined(
        xp, dt[:, :prefill], A, Bp, Cp, 8, D=D, z=z[:, :prefill], dt_bias=dt_bias, dt_softplus=True,
        return_final_states=True,
    )
    ys = [y_pre]
    # Decode, as MambaMixer._ssm_decode with the kernels: A (h p n), dt/dt_bias/D (.. h p), B/C (b g n).
    A_full = A[:, None, None].expand(h, p, n)
    for t in range(prefill, L):
        xBC_t = K.causal_conv1d_update(xBC[:, t], conv_state, conv_w, conv_b, "silu")
        x_t, B_t, C_t = torch.split(xBC_t, [dim, g * n, g * n], dim=-1)
        y_t = K.selective_state_update(
            ssm_state, x_t.reshape(b, h, p), dt[:, t, :, None].expand(b, h, p), A_full,
            B_t.reshape(b, g, n), C_t.reshape(b, g, n), D[:, None].expand(h, p), z=z[:, t],
            dt_bias=dt_bias[:, None].expand(h, p), dt_softplus=True,
        )
        ys.append(y_t.unsqueeze(1))
    y_steps = torch.cat(ys, dim=1)
    err = (y_steps - y_all).abs().max().item()
    print(f"\ndecode steps vs one scan (fp32, {L - prefill} steps after a {prefill}-token prefill): max err {err:.2e}")
    assert err < SCAN_ATOL


def test_state_updates_with_batch_indices_touch_only_their_rows():
    gen = torch.Generator().manual_seed(8)
    h, p, n = 2, 3, 4
    state = torch.randn(5, h, p, n, generator=gen)
    before = state.clone()
    idx = torch.tensor([3, -1, 0])
    x = torch.randn(3, h, p, generator=gen)
    dt = torch.rand(3, h, p, generator=gen)
    A = -torch.rand(h, p, n, generator=gen)
    B = torch.randn(3, 1, n, generator=gen)
    C = torch.randn(3, 1, n, generator=gen)
    out = K.selective_state_update(state, x, dt, A, B, C, state_batch_indices=idx)
    dense = before[[3, 0]].clone()
    out_dense = K.selective_state_update(dense, x[[0, 2]], dt[[0, 2]], A, B[[0, 2]], C[[0, 2]])
    torch.testing.assert_close(out[[0, 2]], out_dense)
    torch.testing.assert_close(state[[3, 0]], dense)
    torch.testing.assert_close(state[[1, 2, 4]], before[[1, 2, 4]])

    conv_state = torch.randn(4, 3, 4, generator=gen)
    conv_before = conv_state.clone()
    xs = torch.randn(2, 3, generator=gen)
    weight = torch.randn(3, 4, generator=gen)
    K.causal_conv1d_update(xs, conv_state, weight, conv_state_indices=torch.tensor([2, 0]))
    torch.testing.assert_close(conv_state[2], torch.cat([conv_before[2, :, 1:], xs[0, :, None]], dim=-1))
    torch.testing.assert_close(conv_state[[1, 3]], conv_before[[1, 3]])


def test_tensor_ops_stand_ins():
    a = torch.arange(12.0).reshape(6, 2)
    out = torch.zeros(4, 2)
    K.tensor_get_slice_after(a, out, torch.tensor([3]))
    torch.testing.assert_close(out[:3], a[3:])
    merged = torch.zeros(6, 2)
    K.tensor_merge(a, -a[:2], torch.tensor([2]), output_tensor=merged)
    torch.testing.assert_close(merged[:2], a[:2])
    torch.testing.assert_close(merged[2:4], -a[:2])
    states = torch.zeros(4, 2)
    K.tensor_masked_update(states, torch.tensor([2, -1]), torch.ones(2, 2))
    torch.testing.assert_close(states.sum(1), torch.tensor([0.0, 0.0, 2.0, 0.0]))


def test_install_puts_the_stand_ins_where_the_mixer_looks():
    if not torch.cuda.is_available():
        assert K.install() is True
    else:
        K.install(force=True)
    from megatron.core.ssm import mamba_mixer

    assert mamba_mixer.HAVE_MAMBA_SSM is True
    assert mamba_mixer.mamba_chunk_scan_combined is K.mamba_chunk_scan_combined
    assert mamba_mixer.mamba_split_conv1d_scan_combined is K.mamba_split_conv1d_scan_combined
    assert mamba_mixer.causal_conv1d_fn is K.causal_conv1d_fn
    # The decode kernels by version (megatron's own ops from 0.17: K.STAND_INS_BY_VERSION).
    stand_ins = K._stand_ins_for(K_version())
    assert mamba_mixer.causal_conv1d_update is stand_ins["causal_conv1d_update"]
    assert mamba_mixer.selective_state_update is stand_ins["selective_state_update"]
    assert mamba_mixer.ExtendedRMSNorm is K.ExtendedRMSNorm
    assert mamba_mixer.tensor_masked_update is K.tensor_masked_update
    assert K.install() is True  # idempotent
    # Nothing was installed under the real packages' names.
    for name in ("mamba_ssm", "causal_conv1d", "triton"):
        assert name not in sys.modules or getattr(sys.modules[name], "__file__", None)


def test_megatron_decode_kernels_match_the_mamba_ssm_ones_with_a_sequence_dimension():
    """megatron-core 0.17 on decodes through its own ops (x sequence-first, intermediate states per
    token, padding rows): the stand-ins for them agree with the per-token ones above."""
    gen = torch.Generator().manual_seed(9)
    b, s, h, p, g, n, w, rows = 3, 2, 2, 4, 1, 8, 4, 5
    dim = h * p + 2 * g * n
    conv_state = torch.randn(rows, dim, w, generator=gen)
    weight, bias = torch.randn(dim, w, generator=gen), torch.randn(dim, generator=gen)
    x = torch.randn(b, s, dim, generator=gen)
    idx = torch.tensor([4, -1, 1])
    reference = conv_state.clone()
    intermediate = torch.zeros(rows, s, dim, w)
    out = K.megatron_causal_conv1d_update(x, conv_state, weight, bias, "silu", conv_state_indices=idx,
                                          intermediate_conv_states=intermediate)
    for t in range(s):
        expected = K.causal_conv1d_update(x[[0, 2], t], reference, weight, bias, activation="silu",
                                          conv_state_indices=idx[[0, 2]])
        torch.testing.assert_close(out[[0, 2], t], expected)
        torch.testing.assert_close(intermediate[[4, 1], t], reference[[4, 1]])
    assert out[1].abs().max() == 0  # a padding row
    torch.testing.assert_close(conv_state, reference)
    one = K.megatron_causal_conv1d_update(x[:, 0], conv_state.clone(), weight, bias, "silu", idx)
    assert one.shape == (b, dim)

    state = torch.randn(rows, h, p, n, generator=gen)
    ref_state = state.clone()
    xs, dts = torch.randn(b, s, h, p, generator=gen), torch.rand(b, s, h, p, generator=gen)
    A = -torch.rand(h, p, n, generator=gen)
    B, C = torch.randn(b, s, g, n, generator=gen), torch.randn(b, s, g, n, generator=gen)
    inter = torch.zeros(rows, s, h, p, n)
    out = K.megatron_selective_state_update(state, xs, dts, A, B, C, dt_softplus=True, state_batch_indices=idx,
                                            intermediate_ssm_states=inter)
    assert out.shape == xs.shape
    for t in range(s):
        expected = K.selective_state_update(ref_state, xs[:, t], dts[:, t], A, B[:, t], C[:, t], dt_softplus=True,
                                            state_batch_indices=idx)
        torch.testing.assert_close(out[[0, 2], t], expected[[0, 2]])
        torch.testing.assert_close(inter[[4, 1], t], ref_state[[4, 1]])
    torch.testing.assert_close(state, ref_state)


def test_every_stand_in_replaced_a_name_the_mixer_binds_and_takes_its_arguments():
    """The installed megatron-core's version row (STAND_INS_BY_VERSION) takes effect: every name it
    sets existed in megatron's mixer module (install() refuses otherwise), and where the original is
    a function (megatron's own Triton ops from 0.17 on, importable wherever triton is), the stand-in
    accepts every parameter of it, by the same name and position."""
    import inspect

    from megatron.core.ssm import mamba_mixer

    K.install(force=True)
    stand_ins = K._stand_ins_for(K_version())
    assert set(stand_ins) <= set(K.replaced)
    for name, stand_in in stand_ins.items():
        assert getattr(mamba_mixer, name) is stand_in, name
        original = K.replaced[name]
        if inspect.isfunction(original) and inspect.isfunction(stand_in):
            theirs = list(inspect.signature(original).parameters)
            ours = list(inspect.signature(stand_in).parameters)
            assert ours[: len(theirs)] == theirs or "unused" in ours, (name, theirs, ours)


def K_version():
    from nemo_rlp.megatron_version import installed_version

    return installed_version()
