"""RLP context sampling and NTP batches over tokenized documents; deterministic and resumable.

* :class:`ContextSampler` draws (context x_<t, next token x_t) pairs for RLP. Its randomness is one
  numpy ``Generator`` (PCG64) seeded with ``seed``; ``state_dict`` saves the generator's exact state,
  so a restored sampler continues the very same sequence.
* :class:`NTPBatcher` cuts the concatenated documents into next-token-prediction windows. It keeps no
  generator state at all, only counters: epoch ``e`` visits documents in the order
  ``numpy.random.default_rng([seed, e]).permutation(num_documents)``, and the cursor is
  (epoch, document index in that order, token index in the document), which is all ``state_dict`` saves.

Both expect the same documents (same order) on restore and check their count and total length.
Streams are reproducible for a given numpy version (numpy does not promise identical streams across
major releases).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["ContextSampler", "NTPBatcher", "RLPContext"]

logger = logging.getLogger(__name__)

Documents = Sequence[Sequence[int]]


@dataclass
class RLPContext:
    """One RLP example: the thought is sampled after ``prefix`` and scored on ``target``.

    ``target == documents[doc_index][position]`` and
    ``prefix == documents[doc_index][max(0, position - max_context):position]``.
    """

    prefix: list[int]
    target: int
    doc_index: int
    position: int


def _document_fingerprint(documents: Documents) -> tuple[int, int]:
    """(count, total tokens): cheap evidence that a saved state is restored onto the same documents."""
    return len(documents), int(sum(len(d) for d in documents))


def _as_list(tokens: Sequence[int]) -> list[int]:
    return tokens.tolist() if hasattr(tokens, "tolist") else [int(t) for t in tokens]


class ContextSampler:
    """Uniform document, then uniform position t with ``min_context <= t < len(doc)``.

    The prefix is the (at most ``max_context``) tokens of the same document right before t, so a
    context never crosses a document boundary. Documents with ``len(doc) <= min_context`` have no such
    position; they are excluded up front (``num_excluded``) and logged.
    """

    def __init__(self, documents: Documents, *, min_context: int, max_context: int, seed: int) -> None:
        if min_context < 1:
            raise ValueError(f"min_context must be >= 1 (a thought needs some context), got {min_context}")
        if max_context < min_context:
            raise ValueError(f"max_context ({max_context}) must be >= min_context ({min_context})")
        self.documents = documents
        self.min_context, self.max_context, self.seed = min_context, max_context, seed
        lengths = np.fromiter((len(d) for d in documents), dtype=np.int64, count=len(documents))
        self._eligible = np.flatnonzero(lengths > min_context)
        self._eligible_lengths = lengths[self._eligible]
        self.num_excluded = len(documents) - len(self._eligible)
        if len(self._eligible) == 0:
            longest = int(lengths.max()) if len(lengths) else 0
            raise ValueError(
                f"no document is long enough for min_context={min_context}: a document needs at least "
                f"min_context + 1 tokens and the longest of {len(documents)} has {longest}. Lower min_context."
            )
        if self.num_excluded:
            logger.warning(
                "ContextSampler: excluded %d of %d documents with <= min_context=%d tokens",
                self.num_excluded, len(documents), min_context,
            )
        self._fingerprint = _document_fingerprint(documents)
        self._rng = np.random.default_rng(seed)
        self.num_sampled = 0

    @property
    def num_eligible(self) -> int:
        """Documents that can be sampled from."""
        return len(self._eligible)

    def sample(self, n: int) -> list[RLPContext]:
        """``n`` independent contexts (uniform document, then uniform position in it)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        which = self._rng.integers(0, len(self._eligible), size=n)
        positions = self._rng.integers(self.min_context, self._eligible_lengths[which])  # high is exclusive
        contexts = []
        for w, t in zip(which.tolist(), positions.tolist()):
            doc_index = int(self._eligible[w])
            doc = self.documents[doc_index]
            contexts.append(
                RLPContext(
                    prefix=_as_list(doc[max(0, t - self.max_context) : t]),
                    target=int(doc[t]),
                    doc_index=doc_index,
                    position=t,
                )
            )
        self.num_sampled += n
        return contexts

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the exact sequence (plain Python types)."""
        return {
            "seed": self.seed,
            "min_context": self.min_context,
            "num_sampled": self.num_sampled,
            "documents": list(self._fingerprint),
            "rng": copy.deepcopy(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; ValueError if it was saved over other documents or another min_context."""
        if tuple(state["documents"]) != self._fingerprint or state["min_context"] != self.min_context:
            raise ValueError(
                f"ContextSampler state was saved over documents (count, tokens)={tuple(state['documents'])} "
                f"with min_context={state['min_context']}, but this sampler has {self._fingerprint} and "
                f"min_context={self.min_context}; restore with the same data and settings."
            )
        self.seed = state["seed"]
        self.num_sampled = state["num_sampled"]
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
        if tuple(state["documents"]) != self._fingerprint:
            raise ValueError(
                f"NTPBatcher state was saved over documents (count, tokens)={tuple(state['documents'])}, "
                f"but this batcher has {self._fingerprint}; restore with the same data."
            )
        self.seed, self.epoch, self.doc_pos, self.tok_pos = (
            state["seed"], state["epoch"], state["doc_pos"], state["tok_pos"],
        )
        self._order_epoch = -1  # the seed may have changed: recompute the order
