"""Marked positions: the demo corpus's answers, their loading, and RLP contexts drawn only there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nemo_rlp.config import ConfigError, load_config
from nemo_rlp.data import synthetic
from nemo_rlp.data.bundled import BUNDLED_CORPUS
from nemo_rlp.data.marked import char_to_token_positions, load_marked_jsonl
from nemo_rlp.data.sampling import ContextSampler
from nemo_rlp.data.tokenizer import Tokenizer, bundled_tokenizer
from nemo_rlp.training.evaluate import BUNDLED_HELDOUT, answer_positions
from tests.drawn import drawn_contexts


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return bundled_tokenizer()


@pytest.fixture(scope="module")
def bundled(tok):
    return load_marked_jsonl(BUNDLED_CORPUS, tok)


def _write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_generated_answers_point_at_the_answer_text() -> None:
    """Each answer offset is the space before an answer that ends its question's sentence or phrase,
    never one that follows a worked thought, and the kinds are recorded per answer."""
    records = list(synthetic.iter_records(synthetic.CorpusConfig(num_docs=200, seed=7, marked_tasks=("walk", "story"))))
    assert sum(len(r["answers"]) for r in records) > 50
    for r in records:
        text = r["text"]
        assert "\x00" not in text
        assert len(r["answers"]) == len(r["tasks"])
        for offset, task in zip(r["answers"], r["tasks"]):
            assert task in ("walk", "story")
            assert text[offset] == " " and text[offset + 1] != " "
            before = text[:offset]
            assert not before.endswith("</think>")
            assert before.endswith(("=", "is", "has", "appears", "room", "number", "to")) or task == "sequence", before[-30:]


def test_walk_thoughts_follow_the_map_and_heldout_starts_are_unseen() -> None:
    """A walk's worked thought follows the fixed roads from its start; the training corpus never asks a
    walk from a held-out start (its roads are still stated), and the held-out set asks only those."""
    texts = list(synthetic.iter_documents(synthetic.CorpusConfig(num_docs=400, seed=3, thought_fraction=1.0,
                                                                 useful_thought_fraction=1.0)))
    walks = [w for t in texts for w in t.split("Walk ")[1:]]
    assert len(walks) > 100
    for walk in walks:
        hops, start = int(walk.split()[0]), walk.split()[3]
        assert start not in synthetic.HELDOUT_STARTS or hops == 2  # their 3-road walks are held out
        path = walk.split("<think> ")[1].split("</think>")[0].split(" -> ")
        assert path[0] == start and len(path) == hops + 1
        assert all(synthetic.ROADS[a] == b for a, b in zip(path, path[1:]))
        assert walk.split("</think> ")[1].startswith(path[-1] + ".")
    assert any("Road: " in t for t in texts)
    heldout = [w for t in synthetic.iter_documents(synthetic.HELDOUT) for w in t.split("Walk ")[1:]]
    assert heldout and {w.split()[3] for w in heldout} <= synthetic.HELDOUT_STARTS
    assert all(w.split()[0] == "3" for w in heldout)
    # One cycle through every town: each is one road's start and one road's end.
    assert sorted(synthetic.ROADS) == sorted(synthetic.ROADS.values()) == sorted(synthetic.TOWNS)


def test_char_offsets_map_to_the_covering_token() -> None:
    offsets = [(0, 3), (3, 4), (4, 7), (8, 10)]  # a gap at 7: a trimmed character
    assert char_to_token_positions(offsets, [0, 2, 3, 4, 6, 7, 8, 9]) == [0, 0, 1, 2, 2, 3, 3, 3]


def test_bundled_marks_are_answer_tokens(bundled, tok) -> None:
    """Marked tokens of the bundled corpus decode to the answer's first token (a space, then text)."""
    assert bundled.num_marks > 500
    for doc, marks in list(zip(bundled.documents, bundled.marks))[:300]:
        for p in marks:
            assert 0 < p < len(doc)
            piece = tok.decode([doc[p]])
            assert piece.startswith(" ") and piece.strip(), piece


def test_marked_sampler_draws_only_marks(bundled) -> None:
    marks = {(d, p) for d, ps in enumerate(bundled.marks) for p in ps}
    sampler = ContextSampler(bundled, min_context=8, max_context=64, seed=0, marks=bundled.marks)
    contexts = drawn_contexts(sampler, 200)
    assert all((c.doc_index, c.position) in marks for c in contexts)
    assert all(8 <= len(c.prefix) <= 64 and c.target == bundled[c.doc_index][c.position] for c in contexts)
    # Several positions per window: every one a mark, in one window that ends at the last.
    windowed = ContextSampler(bundled, min_context=8, max_context=200, seed=0, positions_per_document=3,
                              marks=bundled.marks)
    windows = windowed.sample_windows(60)
    assert sum(len(w.offsets) for w in windows) == 60
    assert any(len(w.offsets) > 1 for w in windows)
    for w in windows:
        assert all((w.doc_index, w.start + j) in marks for j in w.offsets)
        assert len(w.tokens) == w.offsets[-1] + 1


def test_marked_sampler_state_refuses_an_unmarked_sampler(bundled) -> None:
    marked = ContextSampler(bundled, min_context=8, max_context=64, seed=0, marks=bundled.marks)
    drawn_contexts(marked, 5)
    state = marked.state_dict()
    again = ContextSampler(bundled, min_context=8, max_context=64, seed=0, marks=bundled.marks)
    again.load_state_dict(state)
    assert [c.position for c in drawn_contexts(again, 20)] == [c.position for c in drawn_contexts(marked, 20)]
    with pytest.raises(ValueError, match="rlp_positions"):
        ContextSampler(bundled, min_context=8, max_context=64, seed=0).load_state_dict(state)


def test_marks_too_early_for_min_context(tmp_path, tok) -> None:
    path = _write(tmp_path / "a.jsonl", [{"text": "Let a = 3. So a = 3.", "answers": [17]}])
    docs = load_marked_jsonl(path, tok)
    with pytest.raises(ValueError, match="min_context"):
        ContextSampler(docs, min_context=50, max_context=64, seed=0, marks=docs.marks)


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"text": "abc def", "answers": [99]}, "character offsets"),
        ({"text": "abc def", "answers": "3"}, "character offsets"),
        ({"text": "abc def", "answers": [3], "tasks": ["a", "b"]}, "one task name per entry"),
        ({"text": "abc def", "answers": [0]}, "first token"),
        ({"text": "abc def"}, "no document marks a position"),
    ],
)
def test_bad_marks_are_named(tmp_path, tok, record, match) -> None:
    path = _write(tmp_path / "bad.jsonl", [{"text": "ok then", "answers": []}, record])
    with pytest.raises(ValueError, match=match):
        load_marked_jsonl(path, tok)


def test_heldout_positions(tok) -> None:
    docs = load_marked_jsonl(BUNDLED_HELDOUT, tok)
    positions = answer_positions(docs, max_context=32, limit=100, tokenizer=tok)
    assert len(positions) == 100
    assert all(0 < len(p.prefix) <= 32 for p in positions)
    assert {p.task for p in positions} == set(synthetic.CorpusConfig().marked_tasks)
    # The whole answer word is scored (tests/unit/test_science.py checks multi-token answers).
    words = [tok.decode(p.answer) for p in positions]
    assert all(w.startswith(" ") and w[1:].isalnum() for w in words), words
    records = [json.loads(line) for line in BUNDLED_HELDOUT.read_text().splitlines()]
    expected = [r["text"][c:].split()[0].rstrip(".,") for r in records for c in r["answers"]][:100]
    assert [w.strip() for w in words] == expected
    assert len(answer_positions(docs, max_context=32, limit=0, tokenizer=tok)) == docs.num_marks


def test_marked_positions_config_checks(tmp_path) -> None:
    assert load_config([]).data.rlp_positions == "marked"
    with pytest.raises(ConfigError, match="data.rlp_positions"):
        load_config(["data.rlp_positions=everywhere"])
    (tmp_path / "x.txt").write_text("a document\n")
    with pytest.raises(ConfigError, match="data.rlp_positions"):
        load_config(["data.format=text", f"data.corpus={tmp_path}/x.txt", "eval=none"])
    corpus = _write(tmp_path / "c.jsonl", [{"text": "x"}])
    with pytest.raises(ConfigError, match="eval.corpus"):
        load_config([f"data.corpus={corpus}"])


def test_uniform_documents_cannot_be_drawn_as_marked(tok) -> None:
    cfg = load_config([]).data
    with pytest.raises(ValueError, match="rlp_positions=marked"):
        ContextSampler.from_config([[1, 2, 3] * 10], cfg, seed=0)
    assert np.all(np.asarray(drawn_contexts(ContextSampler.from_config([[1, 2, 3] * 10], load_config(["data.rlp_positions=uniform"]).data, seed=0), 3)[0].prefix) > 0)
