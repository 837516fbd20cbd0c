"""The tiny hybrid Mamba-Transformer under tensor parallelism on CPU (gloo): TP=2 equals TP=1.

One launch of two processes at TP=2, one single-process TP=1 reference; same config, seed and tokens.
The hybrid provider makes the initial weights independent of the layout (the Mamba mixer's own
parameters are redrawn in full and sliced per part), which is checked by gathering the TP shards
back into the TP=1 layout; then token log-probs, full-vocabulary next-token logits, gradients and
greedy cached decoding (megatron's StaticInferenceContext: KV cache + Mamba conv/SSM states) are
compared.
"""

from __future__ import annotations

import pytest
import torch

from .launch import run_distributed
from .layouts import gather_tp, mixer_parts

pytestmark = pytest.mark.distributed

SEED = 1234
TOKENIZER_VOCAB = 200  # padded to 256 at TP=1 and TP=2
ATOL = 1e-5
DECODE_STEPS = 12
def _worker(tensor_parallel: int, tokens: torch.Tensor, lengths: torch.Tensor) -> dict:
    from megatron.core import parallel_state
    from megatron.core.inference.contexts import StaticInferenceContext

    from nemo_rlp.config import ParallelConfig, load_config
    from nemo_rlp.models import build_model
    from nemo_rlp.models.cache_ops import cached_forward
    from nemo_rlp.models.handle import ModelHandle
    from nemo_rlp.models.vocab import padded_vocab_size
    from nemo_rlp.parallel import distributed

    cfg = load_config(["model=tiny_hybrid"])
    layout = distributed.initialize(ParallelConfig(tensor_model_parallel_size=tensor_parallel), SEED)
    vocab = padded_vocab_size(cfg.model, TOKENIZER_VOCAB, tensor_parallel)
    torch.manual_seed(SEED)
    model = build_model(cfg.model, vocab, tensor_parallel, layout.device)
    handle = ModelHandle(model)
    parts = mixer_parts(model)
    params = dict(model.named_parameters())
    weights = {name: gather_tp(name, p, p, parts) for name, p in params.items()}

    handle.eval()
    with torch.no_grad():
        logprobs = handle.token_logprobs(tokens)
    next_logits = handle.next_token_logits(tokens, lengths)

    # Greedy cached decoding from the first 7 tokens of every row.
    prompt = tokens[:, :7]
    ctx = StaticInferenceContext(max_batch_size=prompt.shape[0], max_sequence_length=7 + DECODE_STEPS)
    generated, step_logprobs = [], []
    with torch.no_grad():
        current = prompt
        for _ in range(DECODE_STEPS):
            offset = ctx.sequence_len_offset
            positions = torch.arange(offset, offset + current.shape[1]).unsqueeze(0).expand_as(current)
            with cached_forward(model, fresh=offset == 0):  # as megatron's engines (InferenceMode, 0.18 on)
                logits = model(current, positions, None, inference_context=ctx, runtime_gather_output=True)
            ctx.sequence_len_offset += current.shape[1]
            logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
            current = logp.argmax(-1, keepdim=True)
            generated.append(current)
            step_logprobs.append(logp)

    handle.train()
    model.zero_grad(set_to_none=True)
    handle.token_logprobs(tokens).sum().backward()
    grads = {name: gather_tp(name, p.grad, p, parts) for name, p in params.items()}

    return {
        "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
        "local_shapes": {name: tuple(p.shape) for name, p in params.items()},
        "weights": weights,
        "logprobs": logprobs,
        "next_logits": next_logits,
        "generated": torch.cat(generated, dim=1),
        "decode_logprobs": torch.stack(step_logprobs, dim=1),
        "grads": grads,
    }


@pytest.fixture(scope="module")
def runs():
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, TOKENIZER_VOCAB, (3, 40), generator=gen)
    lengths = torch.tensor([40, 17, 3])
    tp2 = run_distributed(_worker, world_size=2, args=(2, tokens, lengths), timeout=180)
    tp1 = run_distributed(_worker, world_size=1, args=(1, tokens, lengths), timeout=180)
    return {"tp2": tp2, "tp1": tp1[0]}


def test_tp2_shards_the_mixer(runs):
    assert [r["tp_size"] for r in runs["tp2"]] == [2, 2] and runs["tp1"]["tp_size"] == 1
    local, full = runs["tp2"][0]["local_shapes"], runs["tp1"]["local_shapes"]
    from nemo_rlp.models.hybrid.provider import conv1d_names

    conv_weight = f"decoder.layers.0.mixer.{conv1d_names()[0]}"
    for name in ("decoder.layers.0.mixer.in_proj.weight", conv_weight,
                 "decoder.layers.0.mixer.A_log", "decoder.layers.0.mixer.norm.weight",
                 "decoder.layers.0.mixer.out_proj.weight", "decoder.layers.1.self_attention.linear_qkv.weight"):
        dim = 1 if name.endswith("out_proj.weight") else 0
        assert local[name][dim] * 2 == full[name][dim], name


def test_weights_do_not_depend_on_the_tp_layout(runs):
    reference = runs["tp1"]["weights"]
    for rank, result in enumerate(runs["tp2"]):
        assert result["weights"].keys() == reference.keys()
        for name, full in reference.items():
            torch.testing.assert_close(result["weights"][name], full, atol=0, rtol=0, msg=f"rank {rank} {name}")


def test_tp2_outputs_match_tp1(runs):
    reference = runs["tp1"]
    assert reference["logprobs"].shape == (3, 39) and reference["next_logits"].shape == (3, 256)
    for result in runs["tp2"]:
        torch.testing.assert_close(result["logprobs"], reference["logprobs"], atol=ATOL, rtol=0)
        torch.testing.assert_close(result["next_logits"], reference["next_logits"], atol=ATOL, rtol=0)


def test_tp2_cached_decoding_matches_tp1(runs):
    reference = runs["tp1"]
    for result in runs["tp2"]:
        assert torch.equal(result["generated"], reference["generated"])
        torch.testing.assert_close(result["decode_logprobs"], reference["decode_logprobs"], atol=1e-4, rtol=0)


def test_tp2_gradients_match_tp1(runs):
    reference = runs["tp1"]["grads"]
    for rank, result in enumerate(runs["tp2"]):
        for name, full in reference.items():
            assert full is not None and full.abs().sum() > 0, name
            torch.testing.assert_close(result["grads"][name], full, atol=ATOL, rtol=0, msg=f"rank {rank} {name}")
