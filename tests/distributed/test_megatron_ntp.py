"""megatron's GPT dataset under data parallelism (gloo, CPU): two ranks build one blend (rank 0 first,
the other from its cache) and take their shares of each global NTP batch (3 + 1 of 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .launch import run_distributed

pytestmark = pytest.mark.distributed

GLOBAL, SHARES = 4, (3, 1)


def _rank_batches(root: str) -> dict:
    from nemo_rlp.data.megatron_ntp import MegatronNTPStream, MegatronTokenizerInfo, build_gpt_dataset

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    dataset = build_gpt_dataset([f"{root}/a", f"{root}/b"], [0.25, 0.75], seq_len=8, num_samples=40, seed=7,
                                tokenizer=MegatronTokenizerInfo(1000, 0), cache_dir=f"{root}/cache")
    offset = sum(SHARES[:rank])
    mine = MegatronNTPStream(dataset, global_batch_size=GLOBAL, rank_offset=offset)
    whole = MegatronNTPStream(dataset, global_batch_size=GLOBAL)
    return {"mine": [mine.next_batch(SHARES[rank]) for _ in range(3)],
            "whole": [whole.next_batch(GLOBAL) for _ in range(3)], "hash": dataset.unique_description_hash}


def test_two_ranks_share_one_blend_and_split_each_global_batch(tmp_path: Path):
    from nemo_rlp.data.indexed import write_indexed_dataset

    write_indexed_dataset(tmp_path / "a", [[1, 2, 3, 0]] * 30, 1000)
    write_indexed_dataset(tmp_path / "b", [list(range(100, 120)) + [0]] * 30, 1000)
    ranks = run_distributed(_rank_batches, 2, (str(tmp_path),), timeout=240)
    assert ranks[0]["hash"] == ranks[1]["hash"]
    for step in range(3):
        assert torch.equal(ranks[0]["whole"][step], ranks[1]["whole"][step])  # one dataset, one order
        assert torch.equal(torch.cat([ranks[0]["mine"][step], ranks[1]["mine"][step]]), ranks[0]["whole"][step])
    # Built once: one description per dataset (two GPTDatasets and the blend) in the shared cache.
    assert len(list((tmp_path / "cache").glob("*description.txt"))) == 3
