"""The named at-scale model configs build the published architectures: parameter counts.

Both models are built by the project's providers on the meta device (no memory, seconds), the
parameters are counted, printed (run pytest with -s to see them) and compared with the published
size and with a closed-form count from the published architecture.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch

from nemo_rlp.config import ParallelConfig, load_config
from nemo_rlp.models import build_model


@contextlib.contextmanager
def _on_meta():
    """Build on the meta device: factory calls without a device land on meta. megatron's Mamba mixer
    allocates a few small tensors on `torch.cuda.current_device()` (the CPU on the CPU platform);
    `.to(meta)` in the provider moves them."""
    with torch.device("meta"):
        yield


def _count_on_meta(name: str) -> tuple[int, float]:
    from nemo_rlp.parallel import distributed

    distributed.initialize(ParallelConfig(), 1234)
    cfg = load_config([f"model={name}"]).model
    start = time.perf_counter()
    with _on_meta():
        model = build_model(cfg, cfg.vocab_size, 1, torch.device("meta"))
    seconds = time.perf_counter() - start
    assert all(p.is_meta for p in model.parameters())
    return sum(p.numel() for p in model.parameters()), seconds


def _nemotron_h_closed_form(m) -> int:
    H, V, F = m.hidden_size, m.vocab_size, m.ffn_hidden_size
    heads, p, n, g, width = m.mamba_num_heads, m.mamba_head_dim, m.mamba_state_dim, m.mamba_num_groups, 4
    d_inner = heads * p
    mamba = (
        H  # pre-norm
        + H * (2 * d_inner + 2 * g * n + heads)  # in_proj: z, x, B, C, dt
        + (d_inner + 2 * g * n) * (width + 1)  # depthwise conv1d weight and bias
        + 3 * heads  # dt_bias, A_log, D
        + d_inner  # gated RMSNorm
        + d_inner * H  # out_proj
    )
    kv = m.kv_channels
    attention = H + H * (m.num_attention_heads + 2 * m.num_query_groups) * kv + m.num_attention_heads * kv * H
    mlp = H + 2 * H * F
    pattern = m.hybrid_override_pattern
    return 2 * V * H + H + pattern.count("M") * mamba + pattern.count("*") * attention + pattern.count("-") * mlp


def _qwen3_closed_form(m) -> int:
    H, V, F, kv = m.hidden_size, m.vocab_size, m.ffn_hidden_size, m.kv_channels
    attention = H * (m.num_attention_heads + 2 * m.num_query_groups) * kv + m.num_attention_heads * kv * H + 2 * kv
    layer = 2 * H + attention + 3 * H * F
    return V * H + m.num_layers * layer + H  # tied embeddings: one V x H matrix


@pytest.mark.parametrize(
    "name, published, closed_form, tolerance",
    [
        ("nemotron_nano_12b_v2", 12.31e9, _nemotron_h_closed_form, 0.01),
        # Qwen3-1.7B is published as "1.7B" (1.4B non-embedding); the HF config gives 1.7206e9 with tied
        # embeddings, 1.2% above the rounded figure: compare with 1.72e9 (3 significant digits).
        ("qwen3_1p7b", 1.72e9, _qwen3_closed_form, 0.01),
    ],
)
def test_parameter_count_on_meta(name, published, closed_form, tolerance):
    count, seconds = _count_on_meta(name)
    cfg = load_config([f"model={name}"]).model
    expected = closed_form(cfg)
    print(
        f"\n{name}: {count:,} parameters ({count / 1e9:.4f}B; reference {published / 1e9:.2f}B, "
        f"{100 * (count / published - 1):+.3f}%), built on meta in {seconds:.1f} s"
    )
    assert count == expected
    assert abs(count / published - 1) < tolerance


def test_qwen3_against_its_published_figures():
    """Qwen3-1.7B's model card: 1.7B parameters, 1.4B of them non-embedding. The total is a rounded
    1.72B (+1.2% over "1.7B"); the non-embedding count is within 1% of its published figure."""
    count, _ = _count_on_meta("qwen3_1p7b")
    cfg = load_config(["model=qwen3_1p7b"]).model
    non_embedding = count - cfg.vocab_size * cfg.hidden_size  # tied: one vocabulary matrix
    print(f"\nqwen3_1p7b: {count / 1e9:.4f}B total ({100 * (count / 1.7e9 - 1):+.2f}% vs the rounded 1.7B), "
          f"{non_embedding / 1e9:.4f}B non-embedding ({100 * (non_embedding / 1.4e9 - 1):+.2f}% vs 1.4B)")
    assert abs(non_embedding / 1.4e9 - 1) < 0.01
    assert round(count / 1e9, 1) == 1.7
