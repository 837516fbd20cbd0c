"""Tensor and data parallelism on CPU (gloo): a layout changes how the model is computed, not what.

Two launches of two processes each: TP=2 (one model replica split over both ranks) and TP=1 x DP=2
(a whole model on each rank). The TP=1 ranks are the reference: same config, same seed, same tokens.
The provider initialises the full weights on CPU from one seed and then shards them
(`use_cpu_initialization=True`), so both layouts start from the same weights; that is checked by
gathering the TP shards, then the outputs and gradients of `ModelHandle` are compared.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from .launch import run_distributed
from .layouts import gather_tp

pytestmark = pytest.mark.distributed

SEED = 1234
TOKENIZER_VOCAB = 200  # padded to 256 for both TP=1 and TP=2 with the tiny config's multiple of 128
ATOL = 1e-5
UNSHARDED = ("decoder.final_layernorm.weight", "decoder.layers.0.input_layernorm.weight")


def _worker(tensor_parallel: int, tokens: torch.Tensor, lengths: torch.Tensor) -> dict:
    """One rank: build the tiny GPT for this layout, return full weights, outputs and gradients."""
    from megatron.core import parallel_state

    from nemo_rlp.config import ParallelConfig, load_config
    from nemo_rlp.models import build_model
    from nemo_rlp.models.handle import ModelHandle
    from nemo_rlp.models.vocab import padded_vocab_size
    from nemo_rlp.parallel import distributed

    cfg = load_config(["model=tiny_gpt"])
    layout = distributed.initialize(ParallelConfig(tensor_model_parallel_size=tensor_parallel), SEED)
    vocab = padded_vocab_size(cfg.model, TOKENIZER_VOCAB, tensor_parallel)
    torch.manual_seed(SEED)
    model = build_model(cfg.model, vocab, tensor_parallel, layout.device)
    handle = ModelHandle(model)

    weights = {name: gather_tp(name, p, p) for name, p in model.named_parameters()}
    handle.eval()
    with torch.no_grad():
        logprobs = handle.token_logprobs(tokens)
    next_logits = handle.next_token_logits(tokens, lengths)

    handle.train()
    model.zero_grad(set_to_none=True)
    handle.token_logprobs(tokens).sum().backward()
    grads = {name: gather_tp(name, p.grad, p) for name, p in model.named_parameters()}

    return {
        "env": {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")},
        "rank": torch.distributed.get_rank(),
        "vocab": vocab,
        "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
        "dp_size": parallel_state.get_data_parallel_world_size(),
        "layout": (layout.tensor_parallel, layout.data_parallel),
        "local_shapes": {name: tuple(p.shape) for name, p in model.named_parameters()},
        "weights": weights,
        "logprobs": logprobs,
        "next_logits": next_logits,
        "grads": grads,
    }


@pytest.fixture(scope="module")
def runs():
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, TOKENIZER_VOCAB, (3, 24), generator=gen)
    lengths = torch.tensor([24, 11, 3])
    tp2 = run_distributed(_worker, world_size=2, args=(2, tokens, lengths), timeout=120)
    dp2 = run_distributed(_worker, world_size=2, args=(1, tokens, lengths), timeout=120)
    return {"tp2": tp2, "dp2": dp2, "tokens": tokens}


def test_layouts_are_what_was_asked(runs):
    for r in runs["tp2"]:
        assert (r["tp_size"], r["dp_size"], r["layout"]) == (2, 1, (2, 1))
    for r in runs["dp2"]:
        assert (r["tp_size"], r["dp_size"], r["layout"]) == (1, 2, (1, 2))
    for results in (runs["tp2"], runs["dp2"]):
        assert [r["rank"] for r in results] == [0, 1]
        for rank, r in enumerate(results):
            assert r["env"]["RANK"] == r["env"]["LOCAL_RANK"] == str(rank) and r["env"]["WORLD_SIZE"] == "2"
    assert runs["tp2"][0]["vocab"] == runs["dp2"][0]["vocab"] == 256
    # The TP ranks really hold halves of the sharded weights.
    tp_shapes, full_shapes = runs["tp2"][0]["local_shapes"], runs["dp2"][0]["local_shapes"]
    assert (
        tp_shapes["decoder.layers.0.mlp.linear_fc1.weight"][0] * 2
        == full_shapes["decoder.layers.0.mlp.linear_fc1.weight"][0]
    )
    assert (
        tp_shapes["decoder.layers.0.self_attention.linear_proj.weight"][1] * 2
        == full_shapes["decoder.layers.0.self_attention.linear_proj.weight"][1]
    )
    assert (
        tp_shapes["embedding.word_embeddings.weight"][0] * 2
        == full_shapes["embedding.word_embeddings.weight"][0]
    )


def test_weights_do_not_depend_on_the_tp_layout(runs):
    reference = runs["dp2"][0]["weights"]
    for rank, result in enumerate(runs["tp2"]):
        assert result["weights"].keys() == reference.keys()
        for name, full in reference.items():
            torch.testing.assert_close(
                result["weights"][name], full, atol=0, rtol=0, msg=f"rank {rank} {name}"
            )


def test_tp2_token_logprobs_match_tp1(runs):
    reference = runs["dp2"][0]["logprobs"]
    assert reference.shape == (3, 23) and reference.dtype == torch.float32
    assert (reference < 0).all()
    for result in runs["tp2"]:
        torch.testing.assert_close(result["logprobs"], reference, atol=ATOL, rtol=0)


def test_tp2_next_token_logits_match_tp1_and_are_full_vocabulary(runs):
    reference = runs["dp2"][0]["next_logits"]
    assert reference.shape == (3, 256)
    for result in runs["tp2"]:
        torch.testing.assert_close(result["next_logits"], reference, atol=ATOL, rtol=0)
    # Every TP rank holds the whole distribution, so all ranks would sample the same token.
    torch.testing.assert_close(runs["tp2"][0]["next_logits"], runs["tp2"][1]["next_logits"], atol=0, rtol=0)


def test_tp2_gradients_match_tp1(runs):
    reference = runs["dp2"][0]["grads"]
    for name in UNSHARDED:
        assert reference[name] is not None and reference[name].abs().sum() > 0, name
    for rank, result in enumerate(runs["tp2"]):
        for name in UNSHARDED:  # replicated over TP: every rank holds the full gradient
            torch.testing.assert_close(
                result["grads"][name], reference[name], atol=ATOL, rtol=0, msg=f"rank {rank} {name}"
            )
        for name, full in reference.items():  # sharded ones, gathered
            torch.testing.assert_close(
                result["grads"][name], full, atol=ATOL, rtol=0, msg=f"rank {rank} {name}"
            )


def test_dp2_ranks_agree(runs):
    first, second = runs["dp2"]
    torch.testing.assert_close(second["logprobs"], first["logprobs"], atol=0, rtol=0)
    torch.testing.assert_close(second["next_logits"], first["next_logits"], atol=0, rtol=0)
    for name, full in first["weights"].items():
        torch.testing.assert_close(second["weights"][name], full, atol=0, rtol=0, msg=name)


# --------------------------------------------------------------------------------------------------
# The launcher itself
# --------------------------------------------------------------------------------------------------


def _fail_on_rank(rank: int) -> int:
    if int(os.environ["RANK"]) == rank:
        raise ValueError(f"rank {rank} says no")
    return int(os.environ["RANK"])


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def test_launcher_reraises_a_child_error_with_its_traceback():
    with pytest.raises(
        ChildProcessError, match=r"(?s)failed on rank 1.*Traceback.*ValueError: rank 1 says no"
    ) as info:
        run_distributed(_fail_on_rank, world_size=2, args=(1,), timeout=60)
    assert "in _fail_on_rank" in str(info.value)


def test_launcher_kills_a_run_that_outlives_its_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 2 s"):
        run_distributed(_sleep, world_size=2, args=(300,), timeout=2)
    assert time.monotonic() - start < 30
