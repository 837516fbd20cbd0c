"""Where documents come from: one entry point, :func:`load_documents`, dispatching on ``data.format``.

* ``jsonl``: one ``{text_key: "..."}`` object per line (:func:`nemo_rlp.data.corpus.load_jsonl_documents`);
  ``data.corpus: null`` is the bundled tiny corpus. With ``data.rlp_positions: marked``, its documents
  carry marked positions (:func:`nemo_rlp.data.marked.load_marked_jsonl`).
* ``text``: plain UTF-8 text, one document per non-blank line (as Hugging Face's ``text`` loader reads it;
  :func:`nemo_rlp.data.corpus.load_text_documents`).
* ``indexed``: a Megatron indexed dataset, ``data.corpus`` being its path prefix (``PREFIX.bin`` /
  ``PREFIX.idx``, e.g. from ``recipes/preprocess_data.py``); documents are read lazily
  (:class:`nemo_rlp.data.indexed.IndexedDocuments`).
* ``data.blend: [[weight, path], ...]`` instead of ``data.corpus`` mixes several sources of that format
  (:class:`BlendedDocuments`).

Whatever the source, the result is a sequence of documents (each a sequence of token ids, no
end-of-document id) that :class:`~nemo_rlp.data.sampling.ContextSampler` and
:class:`~nemo_rlp.data.sampling.NTPBatcher` take as is. Lazy sources expose ``lengths`` (a numpy array),
which the samplers use instead of reading every document (:func:`~nemo_rlp.data.texts.document_lengths`).
:data:`FORMATS` is the one list of formats; the config validates ``data.format`` against it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from nemo_rlp.data.bundled import BUNDLED_CORPUS
from nemo_rlp.data.corpus import load_jsonl_documents_with_stats, load_text_documents
from nemo_rlp.data.indexed import IndexedDocuments
from nemo_rlp.data.marked import load_marked_jsonl
from nemo_rlp.data.texts import MIN_TOKENS, Documents, document_lengths

if TYPE_CHECKING:
    from nemo_rlp.data.tokenizer import Tokenizer

__all__ = ["FORMATS", "BlendedDocuments", "load_documents"]

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "text", "indexed")


class BlendedDocuments(Sequence[Sequence[int]]):
    """Several document sources mixed by weight into one deterministic sequence of documents.

    The blend has ``counts[i]`` slots for source ``i``, ``counts[i] / len(blend) ≈ weights[i] / sum(weights)``,
    so drawing a blend document uniformly (as the samplers do) draws source ``i`` with its weight. Weights
    are shares of *documents* (Megatron's blend weights are shares of fixed-length samples, i.e. of
    tokens; the two agree when the sources' mean document lengths do). The size is the smallest that
    holds every document of every source at least once, ``max_i ceil(len(source_i) / weight_i)``: small
    sources are repeated, each document ``floor`` or ``ceil(counts[i] / len(source_i))`` times. If that
    exceeds ``max_size``, the size is ``max_size`` and a source that no longer fits is subsampled at an
    even stride (logged as a warning). Slot ``r`` of source ``i`` is its document ``r * len_i // counts[i]``:
    no randomness, nothing stored per slot but the lengths.
    """

    def __init__(
        self,
        sources: Sequence[Documents],
        weights: Sequence[float],
        names: Sequence[str] | None = None,
        max_size: int = 1 << 27,
    ) -> None:
        names = list(names) if names is not None else [f"source {i}" for i in range(len(sources))]
        if not sources or len(sources) != len(weights) or len(names) != len(sources):
            raise ValueError(f"need one weight and name per source, got {len(sources)} sources, {len(weights)} "
                             f"weights, {len(names)} names")
        for name, weight, docs in zip(names, weights, sources):
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
                raise ValueError(f"blend weight of {name} must be a finite number > 0, got {weight!r}")
            if len(docs) == 0:
                raise ValueError(f"blend source {name} has no documents")
        self.sources, self.names = list(sources), names
        total = float(sum(weights))
        self.weights = np.array([w / total for w in weights])
        sizes = np.array([len(s) for s in sources], dtype=np.int64)
        size = int(max(math.ceil(n / w - 1e-9) for n, w in zip(sizes, self.weights)))
        size = min(size, max_size)
        self.counts = np.maximum(1, np.rint(self.weights * size)).astype(np.int64)
        self._ends = np.cumsum(self.counts)
        self._sizes = sizes
        for name, n, c in zip(names, sizes, self.counts):
            if c < n:
                logger.warning(
                    "blend: %s is subsampled, %d of its %d documents used (its weight is small for a blend "
                    "capped at %d documents); raise its weight or split the blend", name, c, n, max_size,
                )
        per_source = [document_lengths(s)[(np.arange(c) * n) // c] for s, n, c in zip(sources, sizes, self.counts)]
        self.lengths = np.concatenate(per_source)
        for name, n, c, w in zip(names, sizes, self.counts, self.weights):
            logger.info("blend: %s weight %.4f: %d slots over %d documents (%.2f passes)", name, w, c, n, c / n)

    def locate(self, i: int) -> tuple[int, int]:
        """(source index, document index in that source) of blend document ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents")
        i = int(i) % n
        src = int(np.searchsorted(self._ends, i, side="right"))
        r = i - (int(self._ends[src - 1]) if src else 0)
        return src, r * int(self._sizes[src]) // int(self.counts[src])

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        src, doc = self.locate(i)
        return self.sources[src][doc]

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {w:.3f}" for n, w in zip(self.names, self.weights))
        return f"BlendedDocuments({len(self)} documents; {parts})"


def _load_one(fmt: str, path: str | None, tokenizer: Tokenizer, text_key: str) -> Documents:
    if fmt == "jsonl":
        return load_jsonl_documents_with_stats(path or BUNDLED_CORPUS, tokenizer, text_key, MIN_TOKENS)[0]
    if path is None:
        raise ValueError(f"data.format={fmt!r} needs data.corpus (or data.blend); only the bundled corpus is "
                         "built in, and it is JSONL")
    if fmt == "text":
        return load_text_documents(path, tokenizer)
    if fmt == "indexed":
        return IndexedDocuments(path, vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod_id, min_tokens=MIN_TOKENS)
    raise ValueError(f"data.format={fmt!r} is not one of {FORMATS}")


def load_documents(data_cfg: Any, tokenizer: Tokenizer) -> Documents:
    """The documents ``data_cfg`` (a :class:`nemo_rlp.config.DataConfig`) names, tokenized by ``tokenizer``.

    Returns a list of token-id lists (``jsonl``, ``text``), an :class:`IndexedDocuments` (``indexed``) or,
    with ``data.blend``, a :class:`BlendedDocuments` over the sources. Every problem raises with the file
    and the fix; documents shorter than 2 tokens are skipped, counted and logged.
    """
    fmt = data_cfg.format
    if data_cfg.blend:
        if data_cfg.corpus is not None:
            raise ValueError("set data.corpus or data.blend, not both")
        pairs = [(float(w), str(p)) for w, p in data_cfg.blend]
        sources = [_load_one(fmt, p, tokenizer, data_cfg.text_key) for _, p in pairs]
        return BlendedDocuments(sources, [w for w, _ in pairs], names=[p for _, p in pairs])
    if getattr(data_cfg, "rlp_positions", "uniform") == "marked":
        return load_marked_jsonl(data_cfg.corpus or BUNDLED_CORPUS, tokenizer, data_cfg.text_key, data_cfg.positions_key)
    return _load_one(fmt, data_cfg.corpus, tokenizer, data_cfg.text_key)
