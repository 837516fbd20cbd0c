"""bench/rollout.py's mixed workload: the thought-length distribution it promises, forced lengths
honoured by every implementation, and the exact summary line."""

from __future__ import annotations

import re

import pytest
import torch

from nemo_rlp.config import ParallelConfig
from nemo_rlp.parallel import distributed


def test_truncated_geometric_has_a_quarter_at_L_and_mean_near_half_L():
    from bench.rollout import truncated_geometric

    lengths = truncated_geometric(40000, 128, 0.25, torch.Generator().manual_seed(0))
    assert lengths.min() >= 1 and lengths.max() == 128
    assert abs(float((lengths == 128).float().mean()) - 0.25) < 0.01
    assert 0.45 * 128 < float(lengths.float().mean()) < 0.6 * 128


def test_mixed_bench_runs_every_implementation_and_ends_with_the_summary_line(capsys):
    from bench import rollout

    distributed.initialize(ParallelConfig(), seed=0)
    median, counters, caps = rollout.bench_mixed("tiny_gpt", contexts=2, max_context=40, L=8, group=4, repeats=1)
    assert counters["rows"]["tokens"] == counters["lockstep"]["tokens"] == int(caps.sum())
    assert counters["rows"]["ctx_decoded"] == 0 and counters["lockstep"]["ctx_decoded"] > 0
    args = type("Args", (), dict(model="tiny_gpt", contexts=2, max_context=40, group_size=4, length=8, repeats=1))
    rollout.print_mixed(args, median, counters, caps)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    peer = r"[0-9.]+x" if "hf-generate" in median else re.escape("n/a (no peer)")
    assert re.fullmatch(rf"mixed G=4: new path [0-9.]+x lockstep, {peer} hf-generate", last), last


def test_hf_peer_has_our_logits():
    pytest.importorskip("transformers")
    from bench import hf_peer
    from nemo_rlp.config import load_config
    from nemo_rlp.models import build_model
    from nemo_rlp.models.handle import ModelHandle

    distributed.initialize(ParallelConfig(), seed=0)
    cfg = load_config(["model=tiny_gpt"]).model
    torch.manual_seed(0)
    ours = build_model(cfg, 256, 1, torch.device("cpu")).eval()
    peer = hf_peer.llama_from_gpt(ours, cfg, 256)
    tokens = torch.randint(4, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(peer(tokens).logits, ModelHandle(ours)._logits(tokens), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in peer.parameters()) == sum(p.numel() for p in ours.parameters())
