"""Tokenizer, corpus loading, RLP context sampling, NTP batches and the bundled synthetic corpus."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_rlp.data import synthetic
from nemo_rlp.data.bundled import BUNDLED_CORPUS, BUNDLED_TOKENIZER
from nemo_rlp.data.corpus import load_jsonl_documents, load_jsonl_documents_with_stats
from nemo_rlp.data.sampling import ContextSampler, NTPBatcher
from nemo_rlp.data.tokenizer import Tokenizer, bundled_tokenizer
from tests.drawn import drawn_contexts

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "build_tiny_corpus.py"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return bundled_tokenizer()


@pytest.fixture(scope="module")
def bundled_texts() -> list[str]:
    return [json.loads(line)["text"] for line in BUNDLED_CORPUS.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def bundled_docs(tok: Tokenizer) -> list[list[int]]:
    return load_jsonl_documents(BUNDLED_CORPUS, tok)


def _write(path: Path, data: str | bytes) -> Path:
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


# --- tokenizer ---------------------------------------------------------------------------------------


def test_bundled_tokenizer_markers_are_single_ids(tok: Tokenizer) -> None:
    assert tok.vocab_size == 1024
    assert (tok.pad_id, tok.eod_id, tok.think_start_id, tok.think_end_id) == (0, 1, 2, 3)
    for marker, marker_id in [("<think>", 2), ("</think>", 3), ("<|endoftext|>", 1), ("<pad>", 0)]:
        assert tok.encode(marker) == [marker_id]
    ids = tok.encode("Now Tom has<think> 3 + 4 = 7</think> 7 apples.")
    assert ids.count(tok.think_start_id) == 1 and ids.count(tok.think_end_id) == 1
    assert tok.decode(ids) == "Now Tom has<think> 3 + 4 = 7</think> 7 apples."  # markers stay visible


@pytest.mark.parametrize(
    "text",
    ["Tom has 3 apples. He buys 14 more.", "  spaces\tand\nnewlines  ", "héllo wörld 日本語 🙂", "", "12345"],
)
def test_bundled_tokenizer_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_bundled_tokenizer_round_trips_the_corpus(tok: Tokenizer, bundled_texts: list[str]) -> None:
    assert all(tok.decode(ids) == text for ids, text in zip(tok.encode_batch(bundled_texts), bundled_texts))


def test_digits_are_single_tokens(tok: Tokenizer) -> None:
    assert [tok.decode([i]) for i in tok.encode(" has 305 + 12")] == [" has", " 3", "0", "5", " +", " 1", "2"]


def _save_word_level(tmp_path: Path, vocab: list[str]) -> Path:
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    return path


def test_tokenizer_without_marker(tmp_path: Path) -> None:
    path = _save_word_level(tmp_path, ["[UNK]", "<pad>", "<|endoftext|>", "hello", "world"])
    with pytest.raises(ValueError, match=r"'<think>' is not a token.*add it as a special token"):
        Tokenizer.from_file(path)
    with pytest.raises(ValueError, match=r"'<eos>' is not a token"):
        Tokenizer.from_file(path, think_start="hello", think_end="world", eod="<eos>")


def test_tokenizer_marker_that_is_split(tmp_path: Path) -> None:
    # In the vocabulary but not a special token: the pre-tokenizer cuts it into "<", "think", ">".
    path = _save_word_level(tmp_path, ["[UNK]", "<pad>", "<|endoftext|>", "<think>", "</think>", "<", "think", ">"])
    with pytest.raises(ValueError, match=r"'<think>' encodes to 3 tokens.*special token"):
        Tokenizer.from_file(path)


def test_tokenizer_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Tokenizer.from_file(missing)
    broken = _write(tmp_path / "broken.json", "{not a tokenizer")
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        Tokenizer.from_file(broken)


# --- corpus ------------------------------------------------------------------------------------------


def test_corpus_missing_file(tmp_path: Path, tok: Tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match=r"corpus file not found: .*missing\.jsonl"):
        load_jsonl_documents(tmp_path / "missing.jsonl", tok)


def test_corpus_bad_json_names_line(tmp_path: Path, tok: Tokenizer) -> None:
    path = _write(tmp_path / "c.jsonl", '{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: not valid JSON"):
        load_jsonl_documents(path, tok)
    path = _write(tmp_path / "d.jsonl", '{"text": "fine"}\n\n["a list"]\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: expected a JSON object, got list"):
        load_jsonl_documents(path, tok)


def test_corpus_missing_key(tmp_path: Path, tok: Tokenizer) -> None:
    path = _write(tmp_path / "c.jsonl", '{"text": "fine"}\n{"body": "x", "id": 3}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: no key 'text' \(keys present: \['body', 'id'\]\).*text_key"):
        load_jsonl_documents(path, tok)
    assert load_jsonl_documents(_write(tmp_path / "b.jsonl", '{"body": "a b c"}\n'), tok, text_key="body")
    with pytest.raises(ValueError, match=r"b\.jsonl:1: 'text' holds a int"):
        load_jsonl_documents(_write(tmp_path / "b.jsonl", '{"text": 3}\n'), tok)


def test_corpus_invalid_utf8(tmp_path: Path, tok: Tokenizer) -> None:
    first = b'{"text": "fine"}\n'
    path = _write(tmp_path / "c.jsonl", first + b'{"text": "caf\xe9"}\n')
    offset = len(first) + len(b'{"text": "caf')
    with pytest.raises(ValueError, match=rf"c\.jsonl:2: invalid UTF-8 at byte offset {offset}.*Re-encode"):
        load_jsonl_documents(path, tok)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_corpus_empty_file(tmp_path: Path, tok: Tokenizer, content: str) -> None:
    with pytest.raises(ValueError, match=r"c\.jsonl is empty"):
        load_jsonl_documents(_write(tmp_path / "c.jsonl", content), tok)


def test_corpus_short_documents_skipped_and_counted(
    tmp_path: Path, tok: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    lines = [{"text": "Tom has 3 apples."}, {"text": ""}, {"text": "A"}, {"text": "Now Mia has 5 coins."}]
    path = _write(tmp_path / "c.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    with caplog.at_level(logging.WARNING, logger="nemo_rlp.data.corpus"):
        docs, stats = load_jsonl_documents_with_stats(path, tok, min_tokens=2)
    assert [tok.decode(d) for d in docs] == ["Tom has 3 apples.", "Now Mia has 5 coins."]
    assert (stats.num_documents, stats.num_skipped, stats.num_tokens) == (2, 2, sum(map(len, docs)))
    assert any("skipped 2 of 4 documents" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"none of its 4 documents has at least min_tokens=100"):
        load_jsonl_documents(path, tok, min_tokens=100)


def test_bundled_corpus_loads(bundled_docs: list[list[int]]) -> None:
    assert 4000 <= len(bundled_docs) <= 8000
    assert BUNDLED_CORPUS.stat().st_size < 2_000_000 and BUNDLED_TOKENIZER.stat().st_size < 200_000


# --- context sampler ---------------------------------------------------------------------------------


def _check_contexts(docs, contexts, min_context: int, max_context: int) -> None:
    for c in contexts:
        doc = docs[c.doc_index]
        assert min_context <= c.position < len(doc)
        assert c.target == doc[c.position]
        assert c.prefix == list(doc[max(0, c.position - max_context) : c.position])
        assert min_context <= len(c.prefix) <= max_context


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=8),
    min_context=st.integers(1, 10),
    extra=st.integers(0, 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_contexts_stay_inside_their_document(lengths: list[int], min_context: int, extra: int, seed: int) -> None:
    # Token values encode (document, position), so any window crossing a boundary would be caught.
    docs = [[1000 * d + i for i in range(n)] for d, n in enumerate(lengths)]
    eligible = sum(n > min_context for n in lengths)
    if eligible == 0:
        with pytest.raises(ValueError, match=f"min_context={min_context}"):
            ContextSampler(docs, min_context=min_context, max_context=min_context + extra, seed=seed)
        return
    sampler = ContextSampler(docs, min_context=min_context, max_context=min_context + extra, seed=seed)
    assert sampler.num_excluded == len(lengths) - eligible
    _check_contexts(docs, drawn_contexts(sampler, 50), min_context, min_context + extra)


def test_contexts_on_bundled_corpus(bundled_docs: list[list[int]]) -> None:
    sampler = ContextSampler(bundled_docs, min_context=8, max_context=32, seed=0)
    contexts = drawn_contexts(sampler, 500)
    _check_contexts(bundled_docs, contexts, 8, 32)
    assert any(len(c.prefix) == 32 for c in contexts) and any(len(c.prefix) < 32 for c in contexts)


def test_context_sampler_same_seed_same_contexts(bundled_docs: list[list[int]]) -> None:
    def make(seed: int) -> ContextSampler:
        return ContextSampler(bundled_docs, min_context=4, max_context=64, seed=seed)

    assert drawn_contexts(make(3), 100) == drawn_contexts(make(3), 100)
    assert drawn_contexts(make(3), 100) != drawn_contexts(make(4), 100)


def test_context_sampler_restore_continues_exactly(bundled_docs: list[list[int]]) -> None:
    sampler = ContextSampler(bundled_docs, min_context=4, max_context=64, seed=11)
    drawn_contexts(sampler, 37)
    state = json.loads(json.dumps(sampler.state_dict()))  # plain types: survives any checkpoint format
    expected = drawn_contexts(sampler, 10) + drawn_contexts(sampler, 25)
    restored = ContextSampler(bundled_docs, min_context=4, max_context=64, seed=999)
    restored.load_state_dict(state)
    assert drawn_contexts(restored, 10) + drawn_contexts(restored, 25) == expected
    assert restored.num_sampled == sampler.num_sampled == 72
    with pytest.raises(ValueError, match="same data"):
        ContextSampler(bundled_docs[:-1], min_context=4, max_context=64, seed=11).load_state_dict(state)


def test_context_sampler_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="min_context must be >= 1"):
        ContextSampler([[1, 2, 3]], min_context=0, max_context=4, seed=0)
    with pytest.raises(ValueError, match="max_context"):
        ContextSampler([[1, 2, 3]], min_context=3, max_context=2, seed=0)


# --- NTP batcher -------------------------------------------------------------------------------------


def _stream(batches: list[torch.Tensor]) -> list[int]:
    """Undo the one-token overlap between consecutive windows."""
    rows = [row.tolist() for b in batches for row in b]
    out = rows[0]
    for prev, row in zip(rows, rows[1:]):
        assert row[0] == prev[-1]  # each window starts with the previous window's last label
        out += row[1:]
    return out


def test_ntp_batches_are_documents_joined_by_eod() -> None:
    eod = 0
    docs = [[10 * d + i for i in range(1, n + 1)] for d, n in enumerate([3, 7, 1, 5, 9, 2], start=1)]
    batcher = NTPBatcher(docs, seq_len=5, eod_id=eod, seed=1)
    batches = [batcher.next_batch(3) for _ in range(5)]
    assert all(b.shape == (3, 6) and b.dtype == torch.long for b in batches)
    stream = _stream(batches)
    num_epoch_tokens = sum(len(d) + 1 for d in docs)
    assert len(stream) >= 2 * num_epoch_tokens
    for epoch in range(2):
        part = stream[epoch * num_epoch_tokens : (epoch + 1) * num_epoch_tokens]
        assert part[-1] == eod
        pieces = [list(map(int, p.split())) for p in " ".join(map(str, part[:-1])).split(f" {eod} ")]
        assert sorted(pieces) == sorted(docs)  # every document once per epoch, eod between documents
    first_epoch_order = [docs.index(p) for p in pieces]
    assert first_epoch_order != list(range(len(docs)))  # shuffled


def test_ntp_batcher_deterministic_and_restorable(bundled_docs: list[list[int]]) -> None:
    docs = bundled_docs[:50]

    def make(seed: int) -> NTPBatcher:
        return NTPBatcher(docs, seq_len=64, eod_id=1, seed=seed)

    a, b = make(5), make(5)
    assert all(torch.equal(a.next_batch(4), b.next_batch(4)) for _ in range(3))
    assert not torch.equal(make(5).next_batch(4), make(6).next_batch(4))
    a.next_batch(7)  # mid-document and mid-epoch
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_batch(8) for _ in range(20)]  # runs past the end of the epoch (50 docs ~ 4.6k tokens)
    assert a.state_dict()["epoch"] >= 1
    restored = make(123)
    restored.load_state_dict(state)
    assert all(torch.equal(restored.next_batch(8), e) for e in expected)
    with pytest.raises(ValueError, match="same data"):
        NTPBatcher(docs[:-1], seq_len=64, eod_id=1, seed=5).load_state_dict(state)


# --- synthetic corpus --------------------------------------------------------------------------------


def _run_script(out_dir: Path, hash_seed: str, *args: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    subprocess.run([sys.executable, str(SCRIPT), "--out-dir", str(out_dir), *args], check=True, env=env,
                   capture_output=True)


def test_build_script_is_byte_identical(tmp_path: Path) -> None:
    args = ("--num-docs", "300", "--seed", "7", "--vocab-size", "320")
    _run_script(tmp_path / "a", "1", *args)
    _run_script(tmp_path / "b", "2", *args)  # another hash seed: no dependence on set/dict order
    for name in (synthetic.CORPUS_FILENAME, synthetic.TOKENIZER_FILENAME):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert len((tmp_path / "a" / synthetic.CORPUS_FILENAME).read_text().splitlines()) == 300
    assert Tokenizer.from_file(tmp_path / "a" / synthetic.TOKENIZER_FILENAME).vocab_size == 320


def test_bundled_assets_match_generator(tmp_path: Path) -> None:
    synthetic.build_tiny_corpus(tmp_path)
    for bundled in (BUNDLED_CORPUS, BUNDLED_TOKENIZER):
        assert (tmp_path / bundled.name).read_bytes() == bundled.read_bytes(), (
            f"{bundled} is stale: rerun `python scripts/build_tiny_corpus.py` and commit the result"
        )


def test_generated_documents_shape(bundled_texts: list[str]) -> None:
    words = [synthetic._count_words(t) for t in bundled_texts]
    assert 20 <= min(words) and max(words) <= 120
    with_thoughts = [t for t in bundled_texts if "<think>" in t]
    assert len(with_thoughts) / len(bundled_texts) > 0.85  # 80% of episodes show one
    thoughts = sum(t.count("</think>") for t in bundled_texts)
    marked = sum(len(json.loads(line)["answers"]) for line in BUNDLED_CORPUS.read_text(encoding="utf-8").splitlines())
    assert marked < thoughts  # the unmarked kinds' answers are never marked
    for text in with_thoughts:  # markers balanced, never nested, thought non-empty
        assert re.fullmatch(r"(?:[^<]|<(?!/?think>))*(?:<think> [^<]+</think>(?:[^<]|<(?!/?think>))*)+", text)


def test_thoughts_splice_like_a_rollout(tok: Tokenizer, bundled_texts: list[str]) -> None:
    """Dropping the marker+thought ids gives the ids of the thought-free text: the token-level form
    RLP itself produces when it inserts a thought between x_<t and x_t."""
    for text in [t for t in bundled_texts if "<think>" in t][:200]:
        ids, kept, inside = tok.encode(text), [], False
        for i in ids:
            if i in (tok.think_start_id, tok.think_end_id):
                inside = i == tok.think_start_id
            elif not inside:
                kept.append(i)
        assert kept == tok.encode(re.sub(r"<think>.*?</think>", "", text))


def test_longest_episode_fits_the_length_budget() -> None:
    import random

    rng = random.Random(0)
    longest = max(
        synthetic._count_words(make())
        for show in (False, True)
        for make in synthetic._Episodes(rng, show).all()
        for _ in range(2000)
    )
    assert longest <= synthetic._LONGEST_EPISODE_WORDS


def test_generator_seed_changes_text() -> None:
    assert synthetic.generate_documents(20, seed=1) == synthetic.generate_documents(20, seed=1)
    assert synthetic.generate_documents(20, seed=1) != synthetic.generate_documents(20, seed=2)
    assert not any("<think>" in t for t in synthetic.generate_documents(50, thought_fraction=0.0))
    # Every answer is worked (a document of road facts alone has no answer to work).
    worked = list(synthetic.iter_records(synthetic.CorpusConfig(num_docs=50, thought_fraction=1.0)))
    assert not any(r["answers"] for r in worked)
    assert sum("<think>" in r["text"] for r in worked) >= 45


def _with_specials(tmp_path: Path, specials: list[str]) -> Path:
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(["[UNK]", "hi"])}, unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.add_special_tokens(specials)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    return path


def test_marker_names_come_from_the_config(tmp_path: Path) -> None:
    """A Qwen3-like tokenizer: <|endoftext|> and the think markers, no <pad>."""
    from nemo_rlp.config import load_config
    from nemo_rlp.data.tokenizer import load_tokenizer

    path = _with_specials(tmp_path, ["<|endoftext|>", "<think>", "</think>"])
    cfg = load_config([f"data.tokenizer={path}", "data.pad_token=null", "eval=none"])
    tok = load_tokenizer(cfg.data, cfg.rlp)
    assert tok.pad_id == tok.eod_id == tok.hf_tokenizer.token_to_id("<|endoftext|>")
    with pytest.raises(ValueError, match=r"'<pad>' is not a token"):
        cfg = load_config([f"data.tokenizer={path}", "eval=none"])
        load_tokenizer(cfg.data, cfg.rlp)
    # Another end-of-document token, named in the config.
    path = _with_specials(tmp_path, ["</s>", "<think>", "</think>"])
    cfg = load_config([f"data.tokenizer={path}", "data.eod_token='</s>'", "data.pad_token=null", "eval=none"])
    assert load_tokenizer(cfg.data, cfg.rlp).eod_id == load_tokenizer(cfg.data, cfg.rlp).hf_tokenizer.token_to_id("</s>")
