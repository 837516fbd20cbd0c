"""The tiny hybrid Mamba-Transformer (megatron-core MambaModel, local spec, CPU Mamba kernels).

Cached decoding goes through megatron's own inference path: a StaticInferenceContext holds the
attention KV cache and the Mamba conv/SSM states; prefill once, then one token per step, and every
step must agree with recomputing the whole sequence without a cache.
"""

from __future__ import annotations

import pytest
import torch

from nemo_rlp.config import ConfigError, ParallelConfig, load_config
from nemo_rlp.models import build_model
from nemo_rlp.models.handle import ModelHandle

SEED = 1234
VOCAB = 256


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: avoid OpenMP spin-waits on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cfg():
    return load_config(["model=tiny_hybrid"])


@pytest.fixture(scope="module")
def model(cfg):
    from nemo_rlp.parallel import distributed

    distributed.initialize(ParallelConfig(), SEED)
    torch.manual_seed(SEED)
    return build_model(cfg.model, VOCAB, 1, torch.device("cpu"))


def _tokens(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def _positions(tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
    return torch.arange(offset, offset + tokens.shape[1]).unsqueeze(0).expand_as(tokens)


def test_builds_the_pattern_with_local_modules(model, cfg):
    from megatron.core.ssm.mamba_layer import MambaLayer
    from megatron.core.ssm.mamba_mixer import MambaMixer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    kinds = "".join(
        "M" if isinstance(layer, MambaLayer) else ("*" if layer.self_attention.__class__.__name__ == "SelfAttention" else "-")
        for layer in model.decoder.layers
    )
    assert kinds == cfg.model.hybrid_override_pattern == "M*M-"
    assert all(isinstance(layer, (MambaLayer, TransformerLayer)) for layer in model.decoder.layers)
    mixer = next(m for m in model.modules() if isinstance(m, MambaMixer))
    assert (mixer.nheads, mixer.headdim, mixer.d_state, mixer.ngroups, mixer.chunk_size) == (8, 16, 16, 2, 16)
    # The final norm is a torch norm, not megatron's hard-coded TENorm.
    assert isinstance(model.decoder.final_norm, torch.nn.RMSNorm)


def test_checkpoint_keys_are_the_transformer_engine_names(model):
    """The local spec's separate norms are saved under the TE spec's fused-norm names."""
    keys = {getattr(v, "key", None) for v in model.sharded_state_dict().values()}
    for key in (
        "decoder.layers.0.mixer.in_proj.layer_norm_weight",
        "decoder.layers.0.mixer.in_proj.weight",
        "decoder.layers.0.mixer.norm.weight",
        "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.3.mlp.linear_fc1.layer_norm_weight",
        "decoder.final_norm.weight",
    ):
        assert key in keys, key


def test_forward_backward_and_both_mixer_paths_agree(model):
    """Training runs the fused split-conv-scan kernel (use_mem_eff_path); the other path runs the
    separate conv, scan and gated norm. Same weights, same logits; every parameter gets a gradient."""
    from megatron.core.ssm.mamba_mixer import MambaMixer

    model.train()
    tokens = _tokens(2, 37)
    logits = model(tokens, _positions(tokens), None)
    assert logits.shape == (2, 37, VOCAB)
    model.zero_grad(set_to_none=True)
    torch.log_softmax(logits.float(), -1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name

    mixers = [m for m in model.modules() if isinstance(m, MambaMixer)]
    assert mixers and all(m.use_mem_eff_path for m in mixers)
    try:
        for m in mixers:
            m.use_mem_eff_path = False
        with torch.no_grad():
            other = model(tokens, _positions(tokens), None)
    finally:
        for m in mixers:
            m.use_mem_eff_path = True
    torch.testing.assert_close(other, logits.detach(), atol=1e-5, rtol=1e-5)


def test_causal_right_padding_does_not_change_real_positions(model):
    model.eval()
    handle = ModelHandle(model)
    tokens = _tokens(2, 30, seed=1)
    with torch.no_grad():
        full = handle.token_logprobs(tokens)
        short = handle.token_logprobs(tokens[:, :19])
    torch.testing.assert_close(short, full[:, :18], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prompt_len", [2, 13])
def test_cached_decoding_equals_full_recompute(model, prompt_len):
    """Prefill (shorter than the conv width, or not a multiple of the chunk), then greedy decoding
    one token per step through megatron's StaticInferenceContext; at every step the greedy token must
    be identical and the log-probs within 1e-4 of a forward over the whole sequence without cache."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from nemo_rlp.models.cache_ops import cached_forward

    model.eval()
    steps, batch = 24, 3
    prompt = _tokens(batch, prompt_len, seed=2)
    ctx = StaticInferenceContext(max_batch_size=batch, max_sequence_length=prompt_len + steps + 1)
    seq = prompt
    max_err = 0.0
    with torch.no_grad():
        # As megatron's inference engines run a cached forward (InferenceMode from megatron-core 0.18).
        with cached_forward(model, fresh=True):
            logits = model(prompt, _positions(prompt), None, inference_context=ctx, runtime_gather_output=True)
        ctx.sequence_len_offset += prompt_len
        for step in range(steps):
            cached = torch.log_softmax(logits[:, -1].float(), dim=-1)
            full = torch.log_softmax(model(seq, _positions(seq), None)[:, -1].float(), dim=-1)
            err = (cached - full).abs().max().item()
            max_err = max(max_err, err)
            assert err < 1e-4, f"step {step}: log-prob error {err:.2e}"
            next_token = full.argmax(-1, keepdim=True)
            assert torch.equal(cached.argmax(-1, keepdim=True), next_token), f"step {step}: greedy token differs"
            seq = torch.cat([seq, next_token], dim=1)
            with cached_forward(model, fresh=False):
                logits = model(
                    next_token, _positions(next_token, ctx.sequence_len_offset), None,
                    inference_context=ctx, runtime_gather_output=True,
                )
            ctx.sequence_len_offset += 1
    print(f"\ncached vs full recompute (prompt {prompt_len}, {steps} steps): max |dlogp| = {max_err:.2e}")


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.hybrid_override_pattern=M*MX", "model.hybrid_override_pattern"),
        ("model.hybrid_override_pattern=M*M", "model.hybrid_override_pattern"),
        ("model.mamba_num_groups=3", "model.mamba_num_groups"),
        ("model.mamba_chunk_size=0", "model.mamba_chunk_size"),
        ("parallel.tensor_model_parallel_size=4", "parallel.tensor_model_parallel_size"),
    ],
)
def test_bad_hybrid_configs_are_rejected_by_name(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(["model=tiny_hybrid", override])


def test_pattern_needs_the_hybrid_arch():
    with pytest.raises(ConfigError, match=r"model\.hybrid_override_pattern"):
        load_config(["model.hybrid_override_pattern=M*"])
    assert load_config(["model=tiny_hybrid", "parallel.tensor_model_parallel_size=2"]).model.arch == "hybrid"
