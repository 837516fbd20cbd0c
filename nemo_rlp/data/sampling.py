"""RLP context sampling and NTP batches over tokenized documents; deterministic and resumable.

* :class:`ContextSampler` draws (context x_<t, next token x_t) pairs for RLP. Its randomness is one
  numpy ``Generator`` (PCG64) seeded with ``seed``; ``state_dict`` saves the generator's exact state,
  so a restored sampler continues the very same sequence. With ``positions_per_document = k > 1`` it
  draws document *windows* (:class:`ContextWindow`, at most ``max_context + 1`` tokens) and k positions
  in each: one no-think forward of the EMA teacher over a window gives S_ema for all of them. An
  optional position filter (e.g. :class:`LogProbBand`, off by default) keeps only positions whose
  teacher log-prob passes; it needs a :data:`Scorer`, which the caller passes in (the RLP step makes
  it from the teacher: ``nemo_rlp.training.steps.teacher_scorer``), so this package knows no model.
  Each way of proposing windows is its own small class (:class:`UniformPositions`,
  :class:`UniformWindows`, :class:`MarkedPositions`); the sampler draws from one of them and applies
  the filter.
* :class:`NTPBatcher` cuts the concatenated documents into next-token-prediction windows. It keeps no
  generator state at all, only counters: epoch ``e`` visits documents in the order
  ``numpy.random.default_rng([seed, e]).permutation(num_documents)``, and the cursor is
  (epoch, document index in that order, token index in the document), which is all ``state_dict`` saves.

Both expect the same documents (same order) on restore and check their count and total length.
Documents are any sequence of token-id sequences (lists, or lazy numpy views such as
:class:`nemo_rlp.data.indexed.IndexedDocuments`); a ``lengths`` attribute, when present, is used
instead of reading every document.
Streams are reproducible for a given numpy version (numpy does not promise identical streams across
major releases).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from nemo_rlp.data.texts import Documents, document_lengths

__all__ = [
    "ContextSampler",
    "ContextWindow",
    "LogProbBand",
    "MarkedPositions",
    "NTPBatcher",
    "PositionFilter",
    "RLPContext",
    "Scorer",
    "UniformPositions",
    "UniformWindows",
]

logger = logging.getLogger(__name__)


@dataclass
class RLPContext:
    """One RLP example: the thought is sampled after ``prefix`` and scored on ``target``.

    ``target == documents[doc_index][position]`` and
    ``prefix == documents[doc_index][position - len(prefix):position]`` with
    ``min_context <= len(prefix) <= max_context``. With one position per document the prefix is as long
    as allowed, ``documents[doc_index][max(0, position - max_context):position]``; with k positions it
    starts where their shared :class:`ContextWindow` starts.
    """

    prefix: list[int]
    target: int
    doc_index: int
    position: int


# Scores windows with the no-think teacher: for each window (token ids), an array of len(window) - 1
# floats whose entry j - 1 is log p̄(window[j] | window[:j]) (the convention of token_logprobs).
Scorer = Callable[[Sequence[Sequence[int]]], Sequence[np.ndarray]]
# Gets the teacher log-probs of candidate targets, returns a boolean mask of those to keep.
PositionFilter = Callable[[np.ndarray], np.ndarray]


@dataclass
class ContextWindow:
    """A slice of one document and the sampled positions in it, which share one teacher forward.

    ``tokens == documents[doc_index][start:start + len(tokens)]``; ``offsets`` are sorted, distinct, with
    ``min_context <= j < len(tokens) <= max_context + 1``, and ``tokens`` ends at the last target. Offset
    ``j`` is the context ``tokens[:j]`` with next token ``tokens[j]`` (document position ``start + j``), so
    one no-think forward over ``tokens`` scores every offset: ``S_ema[j] = log p̄(tokens[j] | tokens[:j])``.
    ``teacher_logprobs`` holds that forward's ``len(tokens) - 1`` log-probs (entry ``j - 1`` scores
    ``tokens[j]``) when a scorer was given to :meth:`ContextSampler.sample_windows`, else None.
    """

    doc_index: int
    start: int
    tokens: list[int]
    offsets: list[int]
    teacher_logprobs: np.ndarray | None = None

    def contexts(self) -> list[RLPContext]:
        """One :class:`RLPContext` per offset, in offset order."""
        return [RLPContext(self.tokens[:j], self.tokens[j], self.doc_index, self.start + j) for j in self.offsets]

    def s_ema(self) -> np.ndarray:
        """The teacher's no-think log-prob of each offset's target, in offset order: float32 [len(offsets)]."""
        if self.teacher_logprobs is None:
            raise ValueError("this window was not scored: pass a scorer to ContextSampler.sample_windows")
        return np.asarray(self.teacher_logprobs, dtype=np.float32)[np.asarray(self.offsets, dtype=np.int64) - 1]

    def __eq__(self, other: object) -> bool:  # the log-probs array has no plain ==
        if not isinstance(other, ContextWindow):
            return NotImplemented
        same_scores = (self.teacher_logprobs is None) == (other.teacher_logprobs is None) and (
            self.teacher_logprobs is None or np.array_equal(self.teacher_logprobs, other.teacher_logprobs)
        )
        return (self.doc_index, self.start, self.tokens, self.offsets) == (
            other.doc_index, other.start, other.tokens, other.offsets
        ) and same_scores


@dataclass(frozen=True)
class LogProbBand:
    """Keep positions whose no-think log-prob lies in ``[low, high]``: not already near-certain (so a
    thought has room to help) and not hopeless. A :data:`PositionFilter`."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"LogProbBand needs low < high, got [{self.low}, {self.high}]")

    def __call__(self, logprobs: np.ndarray) -> np.ndarray:
        return (logprobs >= self.low) & (logprobs <= self.high)


def _document_fingerprint(documents: Documents) -> tuple[int, int]:
    """(count, total tokens): cheap evidence that a saved state is restored onto the same documents."""
    return len(documents), int(document_lengths(documents).sum())


def _as_list(tokens: Sequence[int]) -> list[int]:
    return tokens.tolist() if hasattr(tokens, "tolist") else [int(t) for t in tokens]


_MAX_PROPOSALS_PER_CONTEXT = 50  # a position filter passing fewer than ~1 in 50 windows is an error


class Proposal(NamedTuple):
    """A drawn window before any filtering: ``tokens == documents[doc_index][start:start + len(tokens)]``
    and the offsets into ``tokens`` that may become contexts (``candidates``, sorted)."""

    doc_index: int
    start: int
    tokens: list[int]
    candidates: np.ndarray


class UniformPositions:
    """``positions_per_document == 1``: a uniform eligible document, a uniform position
    ``min_context <= t < len(doc)`` in it, and the window that ends at t with the longest allowed
    prefix (at most ``max_context`` tokens); t is the only candidate."""

    def __init__(self, documents: Documents, eligible: np.ndarray, lengths: np.ndarray,
                 min_context: int, max_context: int) -> None:
        self.documents, self.eligible, self.lengths = documents, eligible, lengths
        self.min_context, self.max_context = min_context, max_context

    def propose(self, rng: np.random.Generator, count: int) -> list[Proposal]:
        which = rng.integers(0, len(self.eligible), size=count)
        positions = rng.integers(self.min_context, self.lengths[which])  # high is exclusive
        starts = np.maximum(0, positions - self.max_context)
        return [self._proposal(w, s, p + 1, p - s) for w, s, p in zip(which.tolist(), starts.tolist(), positions.tolist())]

    def _proposal(self, which: int, start: int, end: int, first: int) -> Proposal:
        """Eligible document ``which``, tokens ``[start, end)``, candidates from offset ``first`` to the end."""
        doc_index = int(self.eligible[which])
        return Proposal(doc_index, start, _as_list(self.documents[doc_index][start:end]), np.arange(first, end - start))


class UniformWindows(UniformPositions):
    """``positions_per_document = k > 1``: a uniform eligible document and a window of
    ``W = min(len(doc), max_context + 1)`` consecutive tokens at a uniform start in it (long documents
    are thereby windowed); every offset ``min_context <= j < W`` is a candidate."""

    def propose(self, rng: np.random.Generator, count: int) -> list[Proposal]:
        which = rng.integers(0, len(self.eligible), size=count)
        lengths = self.lengths[which]
        sizes = np.minimum(lengths, self.max_context + 1)
        starts = rng.integers(0, lengths - sizes + 1)  # high is exclusive
        ends = starts + sizes
        return [self._proposal(w, s, e, self.min_context) for w, s, e in zip(which.tolist(), starts.tolist(), ends.tolist())]


class MarkedPositions:
    """``data.rlp_positions: marked``: windows that end at a uniformly drawn usable mark
    (``min_context <= p < len(doc)``); their candidates are the marks inside them (only the drawn one
    when ``positions_per_document == 1``)."""

    def __init__(self, documents: Documents, marks: Sequence[Sequence[int]], lengths: np.ndarray,
                 min_context: int, max_context: int, positions_per_document: int) -> None:
        if len(marks) != len(lengths):
            raise ValueError(f"marks must list positions for each of the {len(lengths)} documents, got {len(marks)}")
        self.documents, self.min_context, self.max_context = documents, min_context, max_context
        self.single = positions_per_document == 1
        doc = np.repeat(np.arange(len(marks)), [len(m) for m in marks])
        pos = np.fromiter((p for m in marks for p in m), dtype=np.int64, count=len(doc))
        usable = (pos >= min_context) & (pos < lengths[doc])
        self.mark_doc, self.mark_pos = doc[usable], pos[usable]  # sorted by document
        self.num_excluded_marks = int((~usable).sum())
        if len(self.mark_pos) == 0:
            raise ValueError(
                f"none of the {len(pos)} marked positions has min_context={min_context} tokens of context "
                "before it in its document. Lower data.min_context."
            )
        if self.num_excluded_marks:
            logger.warning("ContextSampler: %d of %d marked positions have fewer than min_context=%d tokens "
                           "before them; they are not drawn", self.num_excluded_marks, len(pos), min_context)

    def propose(self, rng: np.random.Generator, count: int) -> list[Proposal]:
        which = rng.integers(0, len(self.mark_pos), size=count)
        out = []
        for m in which.tolist():
            doc_index, position = int(self.mark_doc[m]), int(self.mark_pos[m])
            start = max(0, position - self.max_context)
            if self.single:
                candidates = np.array([position - start])
            else:
                lo, hi = np.searchsorted(self.mark_doc, [doc_index, doc_index + 1])
                same = self.mark_pos[lo:hi]
                candidates = same[(same >= start + self.min_context) & (same <= position)] - start
            out.append(Proposal(doc_index, start, _as_list(self.documents[doc_index][start : position + 1]), candidates))
        return out


class ContextSampler:
    """Uniform document, then position(s) in it; contexts never cross a document boundary.

    The windows come from one proposer: :class:`UniformPositions` (``positions_per_document == 1``, the
    default), :class:`UniformWindows` (``k > 1``) or :class:`MarkedPositions` (``marks`` given). Of a
    window's candidate positions, k distinct ones are drawn uniformly (all of them if there are fewer);
    each context is the window's tokens before its offset. Documents with ``len(doc) <= min_context``
    have no such position; they are excluded up front (``num_excluded``) and logged.

    :meth:`sample_windows` returns the windows themselves, so the training step can run ONE teacher
    forward per window for S_ema of all its positions (``scorer``). A ``position_filter`` (e.g.
    :class:`LogProbBand`; None = off) is applied to the teacher log-probs of each window's candidate
    positions; the k positions are then drawn among those that pass, and windows where none passes are
    redrawn (counted in ``num_rejected_windows``). A filter therefore needs a scorer. With a filter the
    stream is deterministic given the scorer's values.
    """

    def __init__(
        self,
        documents: Documents,
        *,
        min_context: int,
        max_context: int,
        seed: int,
        positions_per_document: int = 1,
        position_filter: PositionFilter | None = None,
        marks: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if min_context < 1:
            raise ValueError(f"min_context must be >= 1 (a thought needs some context), got {min_context}")
        if max_context < min_context:
            raise ValueError(f"max_context ({max_context}) must be >= min_context ({min_context})")
        if positions_per_document < 1:
            raise ValueError(f"positions_per_document must be >= 1, got {positions_per_document}")
        self.documents = documents
        self.min_context, self.max_context, self.seed = min_context, max_context, seed
        self.positions_per_document = positions_per_document
        self.position_filter = position_filter
        lengths = document_lengths(documents)
        eligible = self._eligible_documents(lengths)
        self._fingerprint = _document_fingerprint(documents)
        self.marked = marks is not None
        self._proposer: UniformPositions | MarkedPositions
        if marks is not None:
            self._proposer = MarkedPositions(documents, marks, lengths, min_context, max_context, positions_per_document)
            self.num_excluded_marks = self._proposer.num_excluded_marks
            self._fingerprint = (*self._fingerprint[:2], len(self._proposer.mark_pos))
        else:
            uniform = UniformPositions if positions_per_document == 1 else UniformWindows
            self._proposer = uniform(documents, eligible, lengths[eligible], min_context, max_context)
        self._rng = np.random.default_rng(seed)
        self.num_sampled = 0
        # Windows returned; windows drawn but dropped by the filter; filter candidates seen and passed.
        self.num_windows = self.num_rejected_windows = self.num_candidates = self.num_passed = 0

    def _eligible_documents(self, lengths: np.ndarray) -> np.ndarray:
        """Indices of the documents longer than ``min_context``; the others counted and logged."""
        eligible = np.flatnonzero(lengths > self.min_context)
        self.num_excluded = len(lengths) - len(eligible)
        if len(eligible) == 0:
            longest = int(lengths.max()) if len(lengths) else 0
            raise ValueError(
                f"no document is long enough for min_context={self.min_context}: a document needs at least "
                f"min_context + 1 tokens and the longest of {len(lengths)} has {longest}. Lower min_context."
            )
        if self.num_excluded:
            logger.warning(
                "ContextSampler: excluded %d of %d documents with <= min_context=%d tokens",
                self.num_excluded, len(lengths), self.min_context,
            )
        return eligible

    @classmethod
    def from_config(cls, documents: Documents, data_cfg: Any, *, seed: int) -> ContextSampler:
        """A sampler with ``data.min_context``, ``max_context``, ``positions_per_document``,
        ``logprob_band`` (a :class:`LogProbBand` filter, or none) and ``rlp_positions`` (``marked``: the
        documents' marks, see :mod:`nemo_rlp.data.marked`) of a :class:`nemo_rlp.config.DataConfig`."""
        band = data_cfg.logprob_band
        marks = None
        if getattr(data_cfg, "rlp_positions", "uniform") == "marked":
            marks = getattr(documents, "marks", None)
            if marks is None:
                raise ValueError(
                    "data.rlp_positions=marked needs documents with marked positions (a JSON-lines corpus "
                    f"with a {data_cfg.positions_key!r} list per line, see nemo_rlp/data/marked.py); these "
                    "documents have none. Use data.rlp_positions=uniform."
                )
        return cls(
            documents,
            min_context=data_cfg.min_context,
            max_context=data_cfg.max_context,
            seed=seed,
            positions_per_document=data_cfg.positions_per_document,
            position_filter=LogProbBand(float(band[0]), float(band[1])) if band else None,
            marks=marks,
        )

    def sample_windows(self, n: int, scorer: Scorer | None = None) -> list[ContextWindow]:
        """Windows holding exactly ``n`` positions in all (the last one may hold fewer than k); their
        contexts, in order, are ``[c for w in windows for c in w.contexts()]``.

        With ``scorer`` (the RLP step's is ``nemo_rlp.training.steps.teacher_scorer``), every drawn
        window is scored in one call per round and each returned window carries ``teacher_logprobs``
        (so ``window.s_ema()`` is S_ema of its positions); a position filter requires it.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if self.position_filter is not None and scorer is None:
            raise ValueError("a position filter needs the teacher's log-probs: pass scorer= (see teacher_scorer)")
        windows: list[ContextWindow] = []
        remaining, proposed = n, 0
        while remaining > 0:
            count = self._proposal_count(n, remaining, proposed)
            proposals = self._proposer.propose(self._rng, count)
            proposed += count
            scores = scorer([p.tokens for p in proposals]) if scorer is not None else [None] * count
            for proposal, logprobs in zip(proposals, scores):
                if remaining == 0:
                    break
                window = self._window(proposal, logprobs, remaining)
                if window is not None:
                    windows.append(window)
                    remaining -= len(window.offsets)
        self.num_sampled += n
        self.num_windows += len(windows)
        return windows

    def _proposal_count(self, n: int, remaining: int, proposed: int) -> int:
        """Windows to draw next: enough for the rest at the yield seen so far (k per window before any
        filtering); a RuntimeError once the filter has passed too little for too long."""
        if proposed > _MAX_PROPOSALS_PER_CONTEXT * n:
            raise RuntimeError(
                f"the position filter {self.position_filter} passed {self.num_passed} of {self.num_candidates} "
                f"candidate positions so far; {proposed} windows drawn could not give {n} contexts. Widen "
                "data.logprob_band or turn it off (null)."
            )
        k = self.positions_per_document
        per_window = k if proposed == 0 else max((n - remaining) / proposed, 0.05)
        return max(1, int(np.ceil(remaining / min(per_window, k))))

    def _window(self, proposal: Proposal, logprobs: Any, remaining: int) -> ContextWindow | None:
        """The window of a proposal: its candidates filtered, then at most k (and ``remaining``) of them
        drawn; None when the filter passes none of them."""
        doc_index, start, tokens, candidates = proposal
        if logprobs is not None:
            logprobs = np.asarray(logprobs, dtype=np.float32)
            if logprobs.shape != (len(tokens) - 1,):
                raise ValueError(
                    f"scorer returned {logprobs.shape} log-probs for a window of {len(tokens)} tokens; "
                    f"expected ({len(tokens) - 1},): entry j-1 scores token j"
                )
        if self.position_filter is not None:
            passed = np.asarray(self.position_filter(logprobs[candidates - 1]), dtype=bool)
            self.num_candidates += len(candidates)
            self.num_passed += int(passed.sum())
            candidates = candidates[passed]
            if len(candidates) == 0:
                self.num_rejected_windows += 1
                return None
        take = min(self.positions_per_document, len(candidates), remaining)
        if take < len(candidates):
            candidates = np.sort(self._rng.choice(candidates, size=take, replace=False))
        end = int(candidates[-1]) + 1
        return ContextWindow(
            doc_index=doc_index,
            start=start,
            tokens=tokens[:end],
            offsets=candidates.tolist(),
            teacher_logprobs=None if logprobs is None else logprobs[: end - 1],
        )

    def stats(self) -> dict[str, float]:
        """Counters for logging: contexts, windows, and (with a filter) the fraction of positions passing."""
        out = {"contexts": float(self.num_sampled), "windows": float(self.num_windows)}
        if self.position_filter is not None:
            out["filter_pass_frac"] = self.num_passed / max(self.num_candidates, 1)
            out["filter_rejected_windows"] = float(self.num_rejected_windows)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the exact sequence (plain Python types)."""
        return {
            "seed": self.seed,
            "min_context": self.min_context,
            "positions_per_document": self.positions_per_document,
            "marked": self.marked,
            "num_sampled": self.num_sampled,
            "counters": [self.num_windows, self.num_rejected_windows, self.num_candidates, self.num_passed],
            "documents": list(self._fingerprint),
            "rng": copy.deepcopy(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; ValueError if it was saved over other documents or other settings."""
        k = state.get("positions_per_document", 1)
        if k != self.positions_per_document or state.get("marked", False) != self.marked:
            raise ValueError(
                f"ContextSampler state was saved with positions_per_document={k}, marked positions "
                f"{state.get('marked', False)}, but this sampler has {self.positions_per_document}, "
                f"{self.marked}; restore with the same data and settings (data.rlp_positions)."
            )
        if tuple(state["documents"]) != self._fingerprint or state["min_context"] != self.min_context:
            raise ValueError(
                f"ContextSampler state was saved over documents (count, tokens)={tuple(state['documents'])} "
                f"with min_context={state['min_context']}, but this sampler has {self._fingerprint} and "
                f"min_context={self.min_context}; restore with the same data and settings."
            )
        self.seed = state["seed"]
        self.num_sampled = state["num_sampled"]
        counters = state.get("counters", [0, 0, 0, 0])
        self.num_windows, self.num_rejected_windows, self.num_candidates, self.num_passed = map(int, counters)
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])


class NTPBatcher:
    """Next-token-prediction windows over documents shuffled per epoch and joined by ``eod_id``.

    The stream is ``doc_a + [eod] + doc_b + [eod] + ...`` in the epoch's shuffled order, running on into
    the next epoch's order. Row i of a batch holds ``seq_len + 1`` consecutive tokens and the next row
    starts ``seq_len`` tokens later (as in Megatron's GPT dataset), so with ``[:, :-1]`` as input and
    ``[:, 1:]`` as labels every stream token is a label exactly once.
    """

    def __init__(self, documents: Documents, *, seq_len: int, eod_id: int, seed: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if len(documents) == 0:
            raise ValueError("NTPBatcher needs at least one document")
        self.documents = documents
        self.seq_len, self.eod_id, self.seed = seq_len, int(eod_id), seed
        self._fingerprint = _document_fingerprint(documents)
        # Cursor: epoch, index into that epoch's order, token index in the document (len(doc) = its eod).
        self.epoch, self.doc_pos, self.tok_pos = 0, 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _current_document(self) -> Sequence[int]:
        if self._order_epoch != self.epoch:  # one permutation per epoch, recomputed only when it changes
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.documents))
            self._order_epoch = self.epoch
        return self.documents[int(self._order[self.doc_pos])]

    def _take(self, k: int) -> list[int]:
        """Consume ``k`` stream tokens; afterwards the cursor always points at a real next token."""
        out: list[int] = []
        while len(out) < k:
            doc = self._current_document()
            end = min(self.tok_pos + k - len(out), len(doc) + 1)
            out.extend(_as_list(doc[self.tok_pos : min(end, len(doc))]))
            if end == len(doc) + 1:  # reached the separator: emit it and move to the next document
                out.append(self.eod_id)
                self.tok_pos, self.doc_pos = 0, self.doc_pos + 1
                if self.doc_pos == len(self.documents):
                    self.epoch, self.doc_pos = self.epoch + 1, 0
            else:
                self.tok_pos = end
        return out

    def _peek(self) -> int:
        doc = self._current_document()
        return int(doc[self.tok_pos]) if self.tok_pos < len(doc) else self.eod_id

    def next_batch(self, batch_size: int) -> torch.LongTensor:
        """``[batch_size, seq_len + 1]`` token ids: the next ``batch_size`` windows of the stream."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rows = []
        for _ in range(batch_size):
            window = self._take(self.seq_len)
            window.append(self._peek())  # the last label; it is also the next window's first input
            rows.append(window)
        return torch.tensor(rows, dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        """The cursor and seed (plain ints): the order of every epoch follows from them."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "doc_pos": self.doc_pos,
            "tok_pos": self.tok_pos,
            "documents": list(self._fingerprint),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; ValueError if it was saved over other documents."""
        if state.get("kind") == "megatron":
            raise ValueError(
                "the checkpoint's NTP stream is megatron's GPTDataset (data.ntp_dataset=megatron, or auto over "
                "indexed data), this run uses nemo_rlp's NTPBatcher; resume with data.ntp_dataset=megatron"
            )
        if tuple(state["documents"]) != self._fingerprint:
            raise ValueError(
                f"NTPBatcher state was saved over documents (count, tokens)={tuple(state['documents'])}, "
                f"but this batcher has {self._fingerprint}; restore with the same data."
            )
        self.seed, self.epoch, self.doc_pos, self.tok_pos = (
            state["seed"], state["epoch"], state["doc_pos"], state["tok_pos"],
        )
        self._order_epoch = -1  # the seed may have changed: recompute the order
