"""The MLP of the local (non-Transformer-Engine) layer specs: megatron's `MLP` whose gated SiLU
(SwiGLU) keeps one tensor for backward instead of three.

megatron's unfused GLU (mlp.py, `glu` in `MLP.forward`, megatron-core 0.16.1) computes
`silu(a) * (b + glu_linear_offset)` with `a, b = chunk(fc1_output, 2)`, and autograd keeps the
fc1 output (for silu's backward), silu(a) and `b + offset` (a new tensor even at offset 0) for the
product's backward, besides the product itself, which fc2 keeps: per layer, per token, 1 + 3/2 times
the fc1 output's width where the fc1 output alone is enough to recompute all of it. At context 1024
with B*G = 32 rows that is 54 MB per layer of tiny_gpt, and the largest part of a training step's
activation memory after attention; chunk's backward then also concatenates the two halves of the
gradient into a new tensor.

`SwiGLU` keeps the fc1 output only, recomputes silu(a) in backward (one elementwise pass over half the
fc1 width) and writes both halves of the gradient into one buffer; both passes work on 2-D views
of the fc1 output (why: the comment in `SwiGLU`). Its values are the same floats as
megatron's: the forward is the same two ops (b + 0.0 is b), and the backward is the same ops
(`silu_backward(grad * b, a)`, `grad * silu(a)`) on the same inputs. `SwiGLUMLP` takes this path for
what the local specs build (SiLU, gated, no activation clamp, offset 0, no bias fusion, no TE
activation, no per-token scale) and megatron's forward otherwise. `use_swiglu_mlp` makes the MLPs
of a built model `SwiGLUMLP`s (the GPT provider does so with the local spec): megatron builds them as
its own `MLP`, whose spec it recognises and gives the layer's tensor-parallel group. On GPU with
Transformer Engine the TE spec is used and none of this runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP


class SwiGLU(torch.autograd.Function):
    """silu(a) * b for a, b = the two halves of the last dimension of x; keeps x only."""

    # `a` is a strided view (each token's first half of the fc1 output). Megatron's tensors are
    # [s, b, 2F], and with b = 1 (packed rows) the size-1 middle dimension keeps torch's elementwise
    # kernels from collapsing the view to two dimensions: silu over it ran 3.5x slower than over the
    # same view as [s*b, 2F] (28 ms against 8 on a contiguous copy and 12 on the 2-D view, at the
    # bench's 34880 x 192, one thread). So both passes work on 2-D views: no copy of `a`, and the
    # same floats (the same kernels on the same values; tests/unit/test_swiglu_mlp.py is bitwise).
    # In backward grad * b is written straight into the gradient's first half and silu(a) is the one
    # temporary, so neither pass holds more than megatron's did.

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        a, b = torch.chunk(x.reshape(-1, x.shape[-1]), 2, dim=-1)
        return F.silu(a).mul_(b).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        a, b = torch.chunk(x.reshape(-1, x.shape[-1]), 2, dim=-1)
        grad = grad.reshape(-1, grad.shape[-1])
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, whatever x is
        grad_a, grad_b = torch.chunk(out.view(-1, x.shape[-1]), 2, dim=-1)
        torch.mul(grad, b, out=grad_a)  # grad * b in place of a temporary
        torch.ops.aten.silu_backward.grad_input(grad_a, a, grad_input=grad_a)
        torch.mul(grad, F.silu(a), out=grad_b)
        return out


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(a) * b of the halves a, b of x's last dimension (autograd keeps x only)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return SwiGLU.apply(x)
    a, b = torch.chunk(x, 2, dim=-1)
    return F.silu(a) * b


class SwiGLUMLP(MLP):
    """megatron's `MLP` (same constructor, parameters and state dict) whose SwiGLU keeps the fc1
    output only for backward (`SwiGLU`); other activations take megatron's forward."""

    def _own_swiglu(self, per_token_scale) -> bool:
        config = self.config
        return (
            per_token_scale is None
            and config.gated_linear_unit
            and self.activation_func is F.silu
            and not config.bias_activation_fusion
            and not config.use_te_activation_func
            and config.activation_func_clamp_value is None
            and config.glu_linear_offset == 0.0
        )

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self._own_swiglu(per_token_scale):
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(swiglu(intermediate))


def use_swiglu_mlp(model: torch.nn.Module) -> int:
    """Make every megatron `MLP` of `model` a `SwiGLUMLP` (no new state: the same module, parameters
    and state dict); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is MLP:
            module.__class__ = SwiGLUMLP
            count += 1
    return count
