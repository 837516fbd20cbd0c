"""NTP batches from megatron-core's GPTDataset / BlendedMegatronDatasetBuilder (nemo_rlp.data.megatron_ntp).

Every indexed dataset is written here, in tmp_path, with distinct token ids per document, so that a
sample's tokens say where in the stream it comes from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nemo_rlp.config import ConfigError, load_config
from nemo_rlp.data.bundled import BUNDLED_CORPUS
from nemo_rlp.data.indexed import IndexedDocuments, preprocess, write_indexed_dataset
from nemo_rlp.data.megatron_ntp import (
    MegatronNTPStream,
    MegatronTokenizerInfo,
    build_gpt_dataset,
    choose_ntp_dataset,
)
from nemo_rlp.data.sampling import NTPBatcher
from nemo_rlp.data.sources import load_documents
from nemo_rlp.data.tokenizer import bundled_tokenizer
from tests.tiny_run import TINY_RUN

EOD, VOCAB = 0, 30000
TOKENIZER = MegatronTokenizerInfo(VOCAB, EOD)


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """megatron-core 0.16 builds a blend's indices only under torch.distributed (the Trainer always has
    a process group): one process, as the Trainer makes it."""
    created = not torch.distributed.is_initialized()
    if created:
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    if created:
        torch.distributed.destroy_process_group()


def _documents(first_id: int, lengths: list[int]) -> list[list[int]]:
    """Documents of distinct ids from ``first_id`` on, each ending with the EOD id."""
    docs, next_id = [], first_id
    for n in lengths:
        docs.append(list(range(next_id, next_id + n)) + [EOD])
        next_id += n
    return docs


def _write(prefix: Path, docs: list[list[int]]) -> str:
    write_indexed_dataset(prefix, docs, VOCAB)
    return str(prefix)


def _stream(paths, weights, tmp_path, *, seq_len=16, num_samples=50, seed=1234, global_batch=4, offset=0, **identity):
    dataset = build_gpt_dataset(paths, weights, seq_len=seq_len, num_samples=num_samples, seed=seed,
                                tokenizer=TOKENIZER, cache_dir=tmp_path / "cache")
    return MegatronNTPStream(dataset, global_batch_size=global_batch, rank_offset=offset,
                             identity={"seed": seed, **identity})


def test_samples_are_the_bin_documents_joined_by_eod_each_token_once(tmp_path):
    rng = np.random.default_rng(0)
    docs = _documents(1, rng.integers(3, 40, size=30).tolist())
    prefix = _write(tmp_path / "docs", docs)
    written = np.fromfile(f"{prefix}.bin", dtype=np.uint16)
    assert written.tolist() == [t for d in docs for t in d]  # the .bin: documents back to back, each with EOD

    seq_len, num_tokens = 16, len(written)
    stream = _stream([prefix], None, tmp_path, seq_len=seq_len, num_samples=(num_tokens - 1) // seq_len,
                     global_batch=1)
    dataset = stream.dataset
    assert len(dataset) == (num_tokens - 1) // seq_len  # one epoch, every full window
    rows = torch.cat([stream.next_batch(1) for _ in range(len(dataset))])
    assert rows.shape == (len(dataset), seq_len + 1) and rows.dtype == torch.long

    # The epoch's stream: the documents in the dataset's (shuffled) order, each ending with EOD.
    order = np.asarray(dataset.document_index)
    assert sorted(order.tolist()) == list(range(len(docs)))
    joined = np.array([t for d in order for t in docs[d]])
    where = {int(t): i for i, t in enumerate(joined) if t != EOD}
    starts = []
    for row in rows.numpy():
        k = int(np.flatnonzero(row != EOD)[0])
        start = where[int(row[k])] - k
        assert row.tolist() == joined[start:start + seq_len + 1].tolist()  # consecutive tokens, EOD between docs
        starts.append(start)
    # Row i + 1 starts seq_len after row i (NTPBatcher's contract): every token is a label exactly once.
    assert sorted(starts) == list(range(0, len(dataset) * seq_len, seq_len))
    assert starts != sorted(starts)  # and the samples are shuffled


def test_blend_weights_are_token_shares(tmp_path):
    short = _write(tmp_path / "short", _documents(1, [4] * 400))  # 5 tokens per document
    long = _write(tmp_path / "long", _documents(10000, [49] * 100))  # 50 tokens per document
    stream = _stream([short, long], [0.3, 0.7], tmp_path, seq_len=8, num_samples=2000, global_batch=2000)
    rows = stream.next_batch(2000)
    inputs, labels = rows[:, :-1], rows[:, 1:]  # each stream token is an input once, each pair once
    long_ids, short_ids = (inputs >= 10000).sum().item(), ((inputs > EOD) & (inputs < 10000)).sum().item()
    long_tokens, short_tokens = long_ids * 50 / 49, short_ids * 5 / 4  # with their EOD ids
    assert long_tokens / (long_tokens + short_tokens) == pytest.approx(0.7, abs=0.01)  # Megatron's: token shares
    # Counted in documents (an EOD after a long document's id), the long source has about
    # 0.7/50 / (0.7/50 + 0.3/5) = 19%, what our document-share BlendedDocuments would give it for weight 0.19.
    ends = labels == EOD
    assert (inputs[ends] >= 10000).float().mean().item() == pytest.approx(0.19, abs=0.03)


def test_resume_continues_exactly_and_ranks_take_their_shares(tmp_path):
    prefix = _write(tmp_path / "docs", _documents(1, [25] * 60))
    reference = _stream([prefix], None, tmp_path, global_batch=5)
    batches = [reference.next_batch(5) for _ in range(6)]

    first = _stream([prefix], None, tmp_path, global_batch=5)
    for _ in range(3):
        first.next_batch(5)
    state = first.state_dict()
    again = _stream([prefix], None, tmp_path, global_batch=5)  # read back from the cache
    again.load_state_dict(state)
    assert all(torch.equal(again.next_batch(5), b) for b in batches[3:])

    # Two data-parallel ranks: 3 + 2 rows of each global batch of 5, in order.
    rank0 = _stream([prefix], None, tmp_path, global_batch=5, offset=0)
    rank1 = _stream([prefix], None, tmp_path, global_batch=5, offset=3)
    for b in batches[:3]:
        assert torch.equal(torch.cat([rank0.next_batch(3), rank1.next_batch(2)]), b)


def test_resume_onto_another_dataset_or_stream_names_the_difference(tmp_path):
    prefix = _write(tmp_path / "docs", _documents(1, [25] * 60))
    state = _stream([prefix], None, tmp_path, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"differs from the checkpoint's .*seed: saved 1, now 2"):
        _stream([prefix], None, tmp_path, seed=2).load_state_dict(state)
    batcher = NTPBatcher([[1, 2, 3]], seq_len=4, eod_id=EOD, seed=0)
    with pytest.raises(ValueError, match="resume with data.ntp_dataset=megatron"):
        batcher.load_state_dict(state)
    with pytest.raises(ValueError, match="resume with data.ntp_dataset=ours"):
        _stream([prefix], None, tmp_path).load_state_dict(batcher.state_dict())


def test_past_the_end_the_samples_repeat(tmp_path, caplog):
    prefix = _write(tmp_path / "docs", _documents(1, [20] * 5))  # 105 tokens: 6 samples of 16
    stream = _stream([prefix], None, tmp_path, num_samples=6, global_batch=4)
    first = stream.next_batch(4)
    with caplog.at_level(logging.WARNING):
        second = stream.next_batch(4)
    assert "samples are used up" in caplog.text
    assert torch.equal(second[2:], first[:2])


def _data_cfg(**kw):
    base = {"format": "jsonl", "ntp_dataset": "auto"}
    return SimpleNamespace(**{**base, **kw})


def test_auto_picks_ours_for_jsonl_and_megatron_for_indexed_data_with_eod(tmp_path, caplog):
    assert choose_ntp_dataset(_data_cfg(), [[1, 2, 3]]) == "ours"
    with_eod = IndexedDocuments(_write(tmp_path / "eod", _documents(1, [5] * 4)), eod_id=EOD)
    plain = tmp_path / "plain"
    write_indexed_dataset(plain, [[1, 2, 3]] * 4, VOCAB)
    without = IndexedDocuments(plain, eod_id=EOD)
    assert (with_eod.num_without_eod, without.num_without_eod) == (0, 4)
    assert choose_ntp_dataset(_data_cfg(format="indexed"), with_eod) == "megatron"
    assert choose_ntp_dataset(_data_cfg(format="indexed", ntp_dataset="ours"), with_eod) == "ours"
    with caplog.at_level(logging.WARNING):
        assert choose_ntp_dataset(_data_cfg(format="indexed"), without) == "ours"
    assert "--append-eod" in caplog.text
    with pytest.raises(ValueError, match=r"4 of the indexed documents do not end with .*--append-eod"):
        choose_ntp_dataset(_data_cfg(format="indexed", ntp_dataset="megatron"), without)
    # The default config (the bundled JSONL demo) keeps nemo_rlp's NTPBatcher.
    assert load_config([]).data.ntp_dataset == "auto"
    assert choose_ntp_dataset(load_config([]).data, [[1, 2]]) == "ours"


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.ntp_dataset=gpt"], r"data\.ntp_dataset='gpt' is not allowed: 'auto', 'ours' or 'megatron'"),
    (["data.ntp_dataset=megatron"], r"data\.ntp_dataset.*reads indexed data"),
    (["data.ntp_samples=0"], r"data\.ntp_samples=0 is not allowed: null \(one pass over the data\)"),
])
def test_bad_choices_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


def test_trainer_reads_megatron_batches_and_resumes_them(tmp_path):
    """A tiny run on the bundled corpus preprocessed with --append-eod: auto picks GPTDataset, one pass
    over the data; a resumed trainer continues with the same NTP batches, also when trainer.steps grew
    (the dataset does not depend on it), and stops naming the difference when the dataset differs."""
    from nemo_rlp.training.loop import Trainer

    prefix = tmp_path / "bundled"
    stats = preprocess([BUNDLED_CORPUS], bundled_tokenizer(), prefix, append_eod=True, min_tokens=2)
    overrides = [*TINY_RUN, "data.format=indexed", f"data.corpus={prefix}", "data.rlp_positions=uniform",
                 "trainer.schedule.ntp_warmup_steps=3", "trainer.steps=3"]
    run = Trainer(load_config(overrides), tmp_path / "run")
    assert isinstance(run.ntp_batches, MegatronNTPStream) and run.ntp_source == "megatron"
    assert len(run.ntp_batches.dataset) == (stats.num_tokens - 1) // 32  # data.ntp_seq_len=32
    assert list((tmp_path / "run" / "ntp_dataset_cache").glob("*GPTDataset-train-shuffle_index.npy"))
    run.train_step()
    run.save()
    expected = [run.ntp_batches.next_batch(4) for _ in range(2)]
    longer = overrides[:-2] + ["trainer.schedule.ntp_warmup_steps=10", "trainer.steps=10"]
    resumed = Trainer(load_config(longer), tmp_path / "run")
    assert resumed.step == 1 and resumed.ntp_batches.consumed_samples == 4
    assert all(torch.equal(resumed.ntp_batches.next_batch(4), b) for b in expected)
    with pytest.raises(ConfigError, match=r"requested_samples: saved None, now 40"):
        Trainer(load_config(overrides + ["data.ntp_samples=40"]), tmp_path / "run")
    # Another data-parallel size (no rank state to restore): the global stream goes on from the step.
    from nemo_rlp.training.checkpoint import Checkpointer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checkpointer, "_rank_source", lambda *args: None)
        regrouped = Trainer(load_config(longer), tmp_path / "run")
    assert regrouped.ntp_batches.consumed_samples == 4
    assert torch.equal(regrouped.ntp_batches.next_batch(4), expected[0])


def test_megatron_on_data_without_eod_stops_at_preflight(tmp_path):
    """Before any model is built: the entry point's one-line config error (exit status 2)."""
    from nemo_rlp.preflight import load_inputs

    tok = bundled_tokenizer()
    preprocess([BUNDLED_CORPUS], tok, tmp_path / "plain", min_tokens=2)  # no --append-eod
    base = ["data.format=indexed", f"data.corpus={tmp_path / 'plain'}", "data.rlp_positions=uniform", "eval=none"]
    with pytest.raises(ConfigError, match=r"data.ntp_dataset=megatron: 5000 of the indexed documents do not end"):
        load_inputs(load_config(base + ["data.ntp_dataset=megatron"]))
    assert load_inputs(load_config(base)).ntp_dataset == "ours"  # auto: NTPBatcher adds the separators
