"""Megatron indexed datasets, the preprocess recipe, text files, blends and `load_documents`.

Every dataset is built here, in tmp_path, from the bundled tokenizer and small corpora.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nemo_rlp.config import ConfigError, load_config
from nemo_rlp.data.bundled import BUNDLED_CORPUS, BUNDLED_TOKENIZER
from nemo_rlp.data.corpus import load_jsonl_documents, load_text_documents, read_jsonl_texts
from nemo_rlp.data.indexed import IndexedDocuments, preprocess, token_dtype, write_indexed_dataset
from nemo_rlp.data.sampling import ContextSampler, NTPBatcher
from nemo_rlp.data.sources import BlendedDocuments, load_documents
from nemo_rlp.data.texts import document_lengths, iter_texts
from nemo_rlp.data.tokenizer import Tokenizer, bundled_tokenizer
from tests.drawn import drawn_contexts

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load_recipe():
    spec = importlib.util.spec_from_file_location("preprocess_data", REPO_ROOT / "recipes" / "preprocess_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return bundled_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The first 400 documents of the bundled corpus plus an empty and a one-token document."""
    lines = BUNDLED_CORPUS.read_text(encoding="utf-8").splitlines()[:400]
    lines[10:10] = [json.dumps({"text": ""}), json.dumps({"text": "A"})]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prefixes(corpus: Path, tok: Tokenizer, tmp_path_factory) -> dict[str, str]:
    """The corpus preprocessed with and without --append-eod, through the recipe's main()."""
    out = tmp_path_factory.mktemp("indexed")
    recipe = _load_recipe()
    result = {}
    for name, extra in (("plain", []), ("eod", ["--append-eod"])):
        prefix = str(out / name)
        assert recipe.main(["--input", str(corpus), "--tokenizer", str(BUNDLED_TOKENIZER), "--output-prefix", prefix,
                            *extra]) == 0
        result[name] = prefix
    return result


def _data_cfg(**kw) -> SimpleNamespace:
    base = {"format": "jsonl", "corpus": None, "blend": None, "text_key": "text", "min_context": 4,
            "max_context": 32, "positions_per_document": 1, "logprob_band": None}
    return SimpleNamespace(**{**base, **kw})


def _ids(docs) -> list[list[int]]:
    return [[int(t) for t in d] for d in docs]


# --- JSONL and its indexed dataset give the same token stream ----------------------------------------


@pytest.mark.parametrize("variant", ["plain", "eod"])
def test_indexed_matches_jsonl(corpus: Path, tok: Tokenizer, prefixes: dict[str, str], variant: str) -> None:
    jsonl = load_jsonl_documents(corpus, tok)  # drops the empty and the one-token document
    indexed = IndexedDocuments(prefixes[variant], vocab_size=tok.vocab_size, eod_id=tok.eod_id, min_tokens=2)
    assert indexed.dtype == np.uint16 and len(indexed) == len(jsonl) == 400
    assert _ids(indexed) == jsonl  # the EOD appended by --append-eod is dropped again on reading
    assert document_lengths(indexed).tolist() == [len(d) for d in jsonl]
    assert indexed.num_skipped == 1  # "A" (the empty one never reaches the file with --min-tokens 1)
    # The samplers see the same stream from both sources.
    a = NTPBatcher(jsonl, seq_len=64, eod_id=tok.eod_id, seed=3)
    b = NTPBatcher(indexed, seq_len=64, eod_id=tok.eod_id, seed=3)
    assert all(torch.equal(a.next_batch(4), b.next_batch(4)) for _ in range(30))  # > 1 epoch
    restored = NTPBatcher(indexed, seq_len=64, eod_id=tok.eod_id, seed=0)
    restored.load_state_dict(json.loads(json.dumps(a.state_dict())))  # mid-epoch, from the JSONL batcher
    assert all(torch.equal(a.next_batch(4), restored.next_batch(4)) for _ in range(5))
    ca = drawn_contexts(ContextSampler(jsonl, min_context=4, max_context=32, seed=5, positions_per_document=3), 200)
    cb = drawn_contexts(ContextSampler(indexed, min_context=4, max_context=32, seed=5, positions_per_document=3), 200)
    assert ca == cb


def test_indexed_keeps_eod_without_eod_id(tok: Tokenizer, prefixes: dict[str, str]) -> None:
    raw = IndexedDocuments(prefixes["eod"])
    assert all(int(d[-1]) == tok.eod_id for d in raw)
    assert IndexedDocuments(prefixes["eod"], eod_id=tok.eod_id).num_tokens == raw.num_tokens - len(raw)


def test_streaming_reader_matches_corpus_reader(corpus: Path) -> None:
    assert list(iter_texts(corpus)) == read_jsonl_texts(corpus)


def test_load_documents_dispatch(corpus: Path, tok: Tokenizer, prefixes: dict[str, str], tmp_path: Path) -> None:
    bundled = load_documents(_data_cfg(), tok)
    assert isinstance(bundled, list) and len(bundled) == 5000
    jsonl = load_documents(_data_cfg(corpus=str(corpus)), tok)
    indexed = load_documents(_data_cfg(format="indexed", corpus=prefixes["eod"]), tok)
    assert isinstance(indexed, IndexedDocuments) and _ids(indexed) == jsonl
    text = tmp_path / "docs.txt"  # one document per line; blank and too-short lines are dropped
    text.write_text("\n".join(read_jsonl_texts(corpus)) + "\n\n", encoding="utf-8")
    assert load_documents(_data_cfg(format="text", corpus=str(text)), tok) == jsonl
    with pytest.raises(ValueError, match="data.format='indexed' needs data.corpus"):
        load_documents(_data_cfg(format="indexed"), tok)


def test_multi_sequence_documents_and_int32(tmp_path: Path) -> None:
    """Documents split into several sequences (Megatron's --split-sentences) read as one; ids >= 65500
    need int32, which megatron's DType.optimal_dtype picks."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    assert token_dtype(512) == np.uint16 and token_dtype(70000) == np.int32
    prefix = str(tmp_path / "split")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    docs = [[[5, 6, 7], [69999, 8]], [[9, 10]], [[11], [12], [13, 14]]]
    for doc in docs:
        for sentence in doc:
            builder.add_item(torch.tensor(sentence))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    indexed = IndexedDocuments(prefix, vocab_size=70000)
    assert indexed.dtype == np.int32
    assert _ids(indexed) == [[t for sentence in doc for t in sentence] for doc in docs]
    assert _ids(indexed[-2:]) == [[9, 10], [11, 12, 13, 14]]
    with pytest.raises(IndexError):
        indexed[3]
    first = indexed[0]
    del indexed  # megatron closes its memory maps in __del__: a document must not be a view of them
    gc.collect()
    assert first.tolist() == [5, 6, 7, 69999, 8]


def test_write_rejects_ids_outside_vocab_and_empty_documents(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"document 1 holds token id 600, outside \[0, 512\)"):
        write_indexed_dataset(tmp_path / "x", [[1, 2], [3, 600]], vocab_size=512)
    with pytest.raises(ValueError, match="document 0 is empty"):
        write_indexed_dataset(tmp_path / "x", [[]], vocab_size=512)
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind


# --- bad data: clear errors naming the file and the fix -----------------------------------------------


@pytest.mark.parametrize("missing", [".bin", ".idx"])
def test_missing_bin_or_idx(prefixes: dict[str, str], tmp_path: Path, missing: str) -> None:
    prefix = tmp_path / "copy"
    for suffix in (".bin", ".idx"):
        if suffix != missing:
            Path(f"{prefix}{suffix}").write_bytes(Path(prefixes["plain"] + suffix).read_bytes())
    with pytest.raises(FileNotFoundError, match=rf"not found: {re.escape(str(prefix) + missing)}.*preprocess_data\.py"):
        IndexedDocuments(prefix)
    with pytest.raises(ConfigError, match=rf"data.corpus=.*{re.escape(str(prefix) + missing)} does not exist"):
        load_config(["data.format=indexed", f"data.corpus={prefix}"])


def test_prefix_given_with_suffix(prefixes: dict[str, str]) -> None:
    with pytest.raises(FileNotFoundError, match=r"The path is a prefix: pass '.*plain' \(without \.bin\)"):
        IndexedDocuments(prefixes["plain"] + ".bin")


def test_corrupt_index(prefixes: dict[str, str], tmp_path: Path) -> None:
    prefix = tmp_path / "bad"
    Path(f"{prefix}.bin").write_bytes(Path(prefixes["plain"] + ".bin").read_bytes())
    Path(f"{prefix}.idx").write_bytes(b"this is not an index at all, just some bytes")
    with pytest.raises(ValueError, match=r"could not read indexed dataset .*bad.*IndexedDatasetBuilder.*Rebuild"):
        IndexedDocuments(prefix)


def test_truncated_bin(prefixes: dict[str, str], tmp_path: Path) -> None:
    prefix = tmp_path / "cut"
    Path(f"{prefix}.idx").write_bytes(Path(prefixes["plain"] + ".idx").read_bytes())
    Path(f"{prefix}.bin").write_bytes(Path(prefixes["plain"] + ".bin").read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cut\.bin does not match its index .*truncated or from different runs"):
        IndexedDocuments(prefix)
    Path(f"{prefix}.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds no tokens .*cut\.bin is empty"):
        IndexedDocuments(prefix)


def test_dataset_from_another_tokenizer(tmp_path: Path, tok: Tokenizer) -> None:
    write_indexed_dataset(tmp_path / "big", [[5, 6, 7], [1500, 3]], vocab_size=2000)
    with pytest.raises(ValueError, match=r"big\.bin: its first tokens hold token id 1500, outside the tokenizer's "
                                         r"vocabulary \[0, 1024\).*set data.tokenizer"):
        load_documents(_data_cfg(format="indexed", corpus=str(tmp_path / "big")), tok)


def test_short_documents_skipped_counted_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_indexed_dataset(tmp_path / "s", [[5, 1], [6, 7, 1], [8, 1], [9, 10, 11, 1]], vocab_size=512)
    with caplog.at_level(logging.WARNING, logger="nemo_rlp.data.indexed"):
        docs = IndexedDocuments(tmp_path / "s", vocab_size=512, eod_id=1, min_tokens=2)
    assert _ids(docs) == [[6, 7], [9, 10, 11]] and docs.num_skipped == 2 and docs.stored_index(1) == 3
    assert any("skipped 2 of 4 documents shorter than min_tokens=2" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"none of its 4 documents has at least min_tokens=5 tokens"):
        IndexedDocuments(tmp_path / "s", eod_id=1, min_tokens=5)


def test_preprocess_errors(tmp_path: Path, tok: Tokenizer, corpus: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = _load_recipe()
    out = str(tmp_path / "out")
    missing = tmp_path / "missing.jsonl"
    assert recipe.main(["--input", str(missing), "--tokenizer", str(BUNDLED_TOKENIZER), "--output-prefix", out]) == 1
    assert f"input file not found: {missing}" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid UTF-8 at byte offset 30.*Re-encode"):
        preprocess([bad], tok, out)
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid UTF-8"):
        preprocess([bad], tok, out, fmt="text")
    assert not list(tmp_path.glob("out*"))  # an interrupted run leaves no dataset behind

    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"no document of .*empty\.jsonl has at least min_tokens=1 tokens \(1 read\)"):
        preprocess([empty], tok, out)
    with pytest.raises(ValueError, match=r"empty\.jsonl:1: no key 'body'"):
        preprocess([empty], tok, out, text_key="body")

    no_markers = tmp_path / "tokenizer.json"
    import tokenizers

    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "<pad>": 1, "<|endoftext|>": 2}, unk_token="[UNK]"))
    hf.save(str(no_markers))
    assert recipe.main(["--input", str(corpus), "--tokenizer", str(no_markers), "--output-prefix", out]) == 1
    assert "'<think>' is not a token" in capsys.readouterr().err

    preprocess([corpus], tok, out)
    with pytest.raises(FileExistsError, match=r"out\.bin already exists.*--overwrite"):
        preprocess([corpus], tok, out)
    preprocess([corpus], tok, out, overwrite=True)


def test_preprocess_logs_progress(tmp_path: Path, tok: Tokenizer, corpus: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="nemo_rlp.data.indexed"):
        stats = preprocess([corpus, corpus], tok, tmp_path / "two", append_eod=True, log_every_s=0.0)
    assert stats.num_documents == 2 * 401 and stats.num_skipped == 2 and stats.dtype == "uint16"
    assert any("documents read" in r.getMessage() for r in caplog.records)
    assert len(IndexedDocuments(tmp_path / "two", eod_id=tok.eod_id, min_tokens=2)) == 800


# --- text files ---------------------------------------------------------------------------------------


def test_text_format_errors(tmp_path: Path, tok: Tokenizer) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(b"first document\nsecond caf\xe9\n")
    with pytest.raises(ValueError, match=r"t\.txt:2: invalid UTF-8 at byte offset 25"):
        load_text_documents(path, tok)
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"t\.txt is empty"):
        load_text_documents(path, tok)
    with pytest.raises(FileNotFoundError, match=r"corpus file not found: .*nope\.txt"):
        load_text_documents(tmp_path / "nope.txt", tok)
    path.write_text("A\nTom has 3 apples.\r\n", encoding="utf-8")
    assert [tok.decode(d) for d in load_text_documents(path, tok)] == ["Tom has 3 apples."]


# --- blends -------------------------------------------------------------------------------------------


def test_blend_draws_sources_by_weight() -> None:
    a = [[1000 + i] * 3 for i in range(10)]
    b = [[2000 + i] * 5 for i in range(40)]
    blend = BlendedDocuments([a, b], [0.8, 0.2], names=["a", "b"])
    # Smallest size holding every document: max(10 / 0.8, 40 / 0.2) = 200 -> 160 from a, 40 from b.
    assert len(blend) == 200 and blend.counts.tolist() == [160, 40]
    docs = [blend[i] for i in range(len(blend))]
    assert sorted(map(tuple, docs[160:])) == sorted(map(tuple, b))  # each of b once
    assert all(docs.count(d) == 16 for d in a)  # each of a 16 times
    assert blend.lengths.tolist() == [len(d) for d in docs]
    sampler = ContextSampler(blend, min_context=1, max_context=8, seed=0)
    from_a = np.mean([c.target < 2000 for c in drawn_contexts(sampler, 4000)])
    assert abs(from_a - 0.8) < 0.03
    assert BlendedDocuments([a, b], [4, 1]).counts.tolist() == blend.counts.tolist()  # weights are normalised


def test_blend_cap_subsamples_evenly(caplog: pytest.LogCaptureFixture) -> None:
    a, b = [[1]] * 4, [[i] for i in range(100)]
    with caplog.at_level(logging.WARNING, logger="nemo_rlp.data.sources"):
        blend = BlendedDocuments([a, b], [0.5, 0.5], names=["a", "b"], max_size=20)
    assert blend.counts.tolist() == [10, 10]
    assert [blend[i][0] for i in range(10, 20)] == list(range(0, 100, 10))
    assert any("b is subsampled, 10 of its 100 documents used" in r.getMessage() for r in caplog.records)


def test_blend_errors() -> None:
    with pytest.raises(ValueError, match="blend weight of b must be a finite number > 0, got -1"):
        BlendedDocuments([[[1]], [[2]]], [1, -1], names=["a", "b"])
    with pytest.raises(ValueError, match="blend source b has no documents"):
        BlendedDocuments([[[1]], []], [1, 1], names=["a", "b"])


def test_load_documents_blend(prefixes: dict[str, str], tok: Tokenizer, tmp_path: Path) -> None:
    write_indexed_dataset(tmp_path / "small", [[5, 6, 7, 8, 9]] * 10, vocab_size=tok.vocab_size)
    cfg = _data_cfg(format="indexed", blend=[[0.75, prefixes["eod"]], [0.25, str(tmp_path / "small")]])
    docs = load_documents(cfg, tok)
    assert isinstance(docs, BlendedDocuments) and docs.counts.tolist() == [400, 134]  # 534 = ceil(400 / 0.75)
    assert _ids([docs[400]]) == [[5, 6, 7, 8, 9]]
    run = load_config(["data.format=indexed", "data.rlp_positions=uniform", "eval=none",
                       f"data.blend=[[0.75,{prefixes['eod']}],[0.25,{tmp_path / 'small'}]]"])
    assert run.data.blend == [[0.75, prefixes["eod"]], [0.25, str(tmp_path / "small")]]
    with pytest.raises(ConfigError, match=r"data.blend\[1\]=.*nope\.idx does not exist"):
        Path(f"{tmp_path / 'nope'}.bin").write_bytes(b"")
        load_config(["data.format=indexed", "data.rlp_positions=uniform", "eval=none",
                     f"data.blend=[[1,{prefixes['eod']}],[1,{tmp_path / 'nope'}]]"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["data.format=csv"], "data.format"),
        (["data.positions_per_document=0"], "data.positions_per_document"),
        (["data.logprob_band=[-1,-3]"], "data.logprob_band"),
        (["data.blend=[[0,x]]"], r"data.blend\[0\]"),
        (["data.format=text"], "data.corpus"),
        (["data.corpus=/nonexistent.jsonl"], "data.corpus"),
    ],
)
def test_data_config_validation(override: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}="):
        load_config(override)


def test_the_size_check_reads_megatron_cores_index_layout():
    """nemo_rlp.data.indexed reads the .idx header itself to refuse a truncated .bin before importing
    megatron-core; its constants must be megatron-core's."""
    from megatron.core.datasets import indexed_dataset as megatron_indexed

    from nemo_rlp.data import indexed

    assert indexed.MEGATRON_INDEX_HEADER == megatron_indexed._INDEX_HEADER
    assert {code: np.dtype(dtype) for code, dtype in indexed.MEGATRON_DTYPE_CODES.items()} == {
        d.value: np.dtype(d.name) for d in megatron_indexed.DType
    }
