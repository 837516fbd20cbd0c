"""The local spec's SwiGLU MLP (nemo_rlp.models.mlp): the built tiny GPT's MLPs are `SwiGLUMLP`s, and
each gives megatron's own `MLP.forward` the same floats, forward and backward, while autograd keeps
less for backward."""

from __future__ import annotations

import pytest
import torch

from nemo_rlp.config import ParallelConfig, load_config

SEED = 7


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    from nemo_rlp.parallel import distributed

    distributed.initialize(ParallelConfig(), SEED)


def _tiny_gpt():
    from nemo_rlp.parallel.distributed import ParallelLayout
    from nemo_rlp.training.policy import PolicyWithTeacher

    cfg = load_config(["model=tiny_gpt"])
    layout = ParallelLayout(world_size=1, rank=0, tensor_parallel=1, pipeline_parallel=1, data_parallel=1,
                            device=torch.device("cpu"))
    torch.manual_seed(SEED)
    return PolicyWithTeacher(cfg, 256, layout)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while `fn` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_tiny_gpt_mlps_are_swiglu_and_match_megatron_bitwise():
    from megatron.core.transformer.mlp import MLP

    from nemo_rlp.models.mlp import SwiGLUMLP

    model = _tiny_gpt()
    mlps = [m for m in model.language_model.modules() if isinstance(m, MLP)]
    assert mlps and all(type(m) is SwiGLUMLP for m in mlps)
    mlp = mlps[0]
    assert mlp._own_swiglu(None)  # tiny_gpt's config takes the SwiGLU path, not megatron's fallback
    x = torch.randn(5, 3, mlp.config.hidden_size, generator=torch.Generator().manual_seed(1))

    def run(forward):
        inp = x.clone().requires_grad_(True)
        for p in mlp.parameters():
            p.grad = None
            if hasattr(p, "main_grad"):
                p.main_grad.zero_()
        out, _ = forward(inp)
        out.backward(torch.ones_like(out) * 0.3 + inp.detach()[..., :1])
        grads = [(p.main_grad if hasattr(p, "main_grad") and p.grad is None else p.grad).clone()
                 for p in mlp.parameters()]
        return out.detach(), inp.grad.clone(), grads

    ours = run(mlp.forward)
    theirs = run(lambda inp: MLP.forward(mlp, inp))
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert all(torch.equal(a, b) for a, b in zip(ours[2], theirs[2]))
    assert all(g.abs().sum() > 0 for g in ours[2]) and ours[1].abs().sum() > 0  # not vacuously equal
    # What backward keeps: the fc1 output once, not silu(a), b + 0.0 and the fc1 output.
    inp = x.clone().requires_grad_(True)
    assert _saved_bytes(lambda: mlp.forward(inp)) < _saved_bytes(lambda: MLP.forward(mlp, inp))
