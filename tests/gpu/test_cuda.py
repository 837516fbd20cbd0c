"""The CUDA path without the CPU platform: checks that need a GPU (`python -m pytest -m gpu`).

scripts/gpu_check.sh runs them first on a lent GPU machine; elsewhere they are deselected (CI) or
skipped (no CUDA).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _layout():
    from nemo_rlp.config import load_config
    from nemo_rlp.parallel import distributed

    return distributed.initialize(load_config([]).parallel, seed=0)


def test_on_cuda_the_cpu_platform_stays_off():
    from nemo_rlp.parallel import cpu_platform

    layout = _layout()
    assert layout.device.type == "cuda"
    assert not cpu_platform.is_installed()
    assert torch.distributed.get_backend() == "nccl"


def test_torch_mamba_kernels_give_the_same_scan_and_gradients_on_cuda_as_on_cpu():
    """The pure-torch SSD scan is what megatron's mixer runs on a GPU without mamba-ssm: on CUDA it
    must compute what it computes on CPU, forward and backward."""
    from nemo_rlp.models import mamba_cpu_kernels as K

    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    b, L, h, p, g, n = 2, 77, 4, 16, 2, 32
    inputs = {
        "x": torch.randn(b, L, h, p, generator=gen),
        "dt": torch.randn(b, L, h, generator=gen),
        "A": -(torch.rand(h, generator=gen) * 4 + 0.5),
        "B": torch.randn(b, L, g, n, generator=gen) / n**0.5,
        "C": torch.randn(b, L, g, n, generator=gen) / n**0.5,
        "D": torch.randn(h, generator=gen),
        "z": torch.randn(b, L, h, p, generator=gen),
        "dt_bias": torch.randn(h, generator=gen) * 0.5,
    }

    def run(device):
        leaves = {k: v.to(device).requires_grad_(True) for k, v in inputs.items()}
        y, final = K.mamba_chunk_scan_combined(
            leaves["x"],
            leaves["dt"],
            leaves["A"],
            leaves["B"],
            leaves["C"],
            16,
            D=leaves["D"],
            z=leaves["z"],
            dt_bias=leaves["dt_bias"],
            dt_softplus=True,
            return_final_states=True,
        )
        (y.square().mean() + final.square().mean()).backward()
        return [y, final] + [leaves[k].grad for k in ("x", "dt", "A", "B", "C")]

    for on_cpu, on_cuda in zip(run("cpu"), run("cuda")):
        torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny_gpt", "tiny_hybrid"])
def test_rollout_modes_sample_the_same_thoughts_on_cuda(name):
    """The three rollout modes on CUDA, with the trainer's CPU generator (its noise is drawn on CPU and
    moved), decode the same tokens: the KV and SSM caches on the GPU reproduce full recompute."""
    from nemo_rlp.config import load_config
    from nemo_rlp.models import build_model
    from nemo_rlp.models.handle import ModelHandle
    from nemo_rlp.rollout.sampler import MODES, Markers, SamplingParams, sample_thoughts

    torch.backends.cuda.matmul.allow_tf32 = False
    layout = _layout()
    torch.manual_seed(0)
    handle = ModelHandle(build_model(load_config([f"model={name}"]).model, 512, 1, layout.device))
    gen = torch.Generator().manual_seed(1)
    prefixes = [torch.randint(4, 512, (length,), generator=gen).tolist() for length in (20, 33, 27)]
    markers = Markers(think_start=2, think_end=3, pad=0)
    batches = {
        mode: sample_thoughts(
            handle,
            prefixes,
            [5, 6, 7],
            SamplingParams(group_size=4, max_thought_len=12, mode=mode),
            markers,
            torch.Generator().manual_seed(2),
            layout.device,
        )
        for mode in MODES
    }
    reference = batches["recompute"]
    assert reference.tokens.device.type == "cuda"
    for mode, batch in batches.items():
        assert torch.equal(batch.tokens, reference.tokens), mode
        torch.testing.assert_close(batch.s_pred, reference.s_pred, rtol=1e-4, atol=1e-4)
