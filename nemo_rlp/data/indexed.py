"""Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``): write them, read their documents lazily.

Pretraining teams keep tokenized data in megatron-core's format (``megatron.core.datasets.indexed_dataset``):
the ``.bin`` holds the token ids of every sequence back to back, the ``.idx`` their lengths, byte offsets
and which sequences make up each document. This module goes through megatron-core's own
``IndexedDatasetBuilder`` / ``IndexedDataset`` (and ``DType.optimal_dtype`` for the token dtype: uint16
below 65500 ids, int32 above), so files written here are read by Megatron and the other way round.

* :func:`write_indexed_dataset` writes token sequences (one sequence per document, optionally ending
  with the end-of-document id, as Megatron's ``preprocess_data.py --append-eod`` does).
* :func:`preprocess` tokenizes JSONL / text files straight into a dataset, streaming, with a progress
  log line (the logic behind ``recipes/preprocess_data.py``).
* :class:`IndexedDocuments` is a read-only sequence of documents over a dataset: each document is read
  from the memory-mapped ``.bin`` when accessed (nothing is read up front but the index), with the
  same conventions as :func:`nemo_rlp.data.corpus.load_jsonl_documents`: a trailing end-of-document id
  is dropped (the NTP batcher adds separators) and documents shorter than ``min_tokens`` are skipped,
  counted and logged. Token ids outside the tokenizer's vocabulary are an error, never passed on.

megatron-core is imported only when a dataset is opened or written, so importing this module is cheap.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, overload

import numpy as np

from nemo_rlp.data.texts import EncodeCounts, encode_documents, iter_texts, log_skipped

if TYPE_CHECKING:
    from nemo_rlp.data.tokenizer import Tokenizer

__all__ = [
    "IndexedDocuments",
    "PreprocessStats",
    "bin_path",
    "idx_path",
    "preprocess",
    "token_dtype",
    "write_indexed_dataset",
]

logger = logging.getLogger(__name__)

_SCAN_TOKENS = 1 << 26  # tokens checked against the vocabulary when a dataset is opened (the rest on access)

_FIX_BUILD = (
    "build it with `python recipes/preprocess_data.py --input DOCS.jsonl --tokenizer tokenizer.json "
    "--output-prefix PREFIX`"
)


def bin_path(path_prefix: str | os.PathLike[str]) -> Path:
    """``PREFIX.bin``: the token ids."""
    return Path(f"{os.fspath(path_prefix)}.bin")


def idx_path(path_prefix: str | os.PathLike[str]) -> Path:
    """``PREFIX.idx``: the index (sequence lengths, offsets, document boundaries)."""
    return Path(f"{os.fspath(path_prefix)}.idx")


def token_dtype(vocab_size: int) -> type[np.number]:
    """The dtype megatron-core picks for ``vocab_size`` ids (``DType.optimal_dtype``): uint16 or int32."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def _check_prefix(path_prefix: str | os.PathLike[str]) -> None:
    """FileNotFoundError naming the missing ``.bin`` / ``.idx`` (and a prefix given with its suffix)."""
    prefix = os.fspath(path_prefix)
    for path in (bin_path(prefix), idx_path(prefix)):
        if not path.is_file():
            hint = ""
            if prefix.endswith((".bin", ".idx")):
                hint = f" The path is a prefix: pass {prefix[:-4]!r} (without {prefix[-4:]})."
            raise FileNotFoundError(
                f"indexed dataset file not found: {path} (path prefix {prefix!r} needs both {prefix}.bin and "
                f"{prefix}.idx).{hint} Check the prefix, or {_FIX_BUILD}."
            )


# --- writing -----------------------------------------------------------------------------------------


def write_indexed_dataset(
    path_prefix: str | os.PathLike[str],
    documents: Iterable[Sequence[int]],
    vocab_size: int,
    *,
    eod_id: int | None = None,
) -> tuple[int, int]:
    """Write ``documents`` (one sequence each) as ``PREFIX.bin`` / ``PREFIX.idx``; returns (documents, tokens).

    The dtype follows ``vocab_size`` (megatron's ``DType.optimal_dtype``). With ``eod_id`` every document
    gets it appended. Ids outside ``[0, vocab_size)`` raise ValueError (they would wrap in uint16), as do
    empty documents. Files are written under temporary names and renamed at the end, so an interrupted
    run never leaves a dataset that looks complete.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = os.fspath(path_prefix)
    dtype = token_dtype(vocab_size)
    tmp_bin, tmp_idx = Path(f"{prefix}.bin.partial"), Path(f"{prefix}.idx.partial")
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    num_docs = num_tokens = 0
    try:
        for i, doc in enumerate(documents):
            arr = np.asarray(doc, dtype=np.int64)
            if eod_id is not None:
                arr = np.append(arr, eod_id)
            if arr.ndim != 1 or arr.size == 0:
                raise ValueError(f"document {i} is empty (or not a flat sequence of ids); drop it before writing")
            low, high = int(arr.min()), int(arr.max())
            if low < 0 or high >= vocab_size:
                raise ValueError(
                    f"document {i} holds token id {low if low < 0 else high}, outside [0, {vocab_size}): "
                    "vocab_size must be the tokenizer's vocabulary size (markers included)"
                )
            builder.add_document(arr.astype(dtype), [arr.size])
            num_docs, num_tokens = num_docs + 1, num_tokens + int(arr.size)
        builder.finalize(str(tmp_idx))
    except BaseException:
        builder.data_file.close()
        for path in (tmp_bin, tmp_idx):
            path.unlink(missing_ok=True)
        raise
    os.replace(tmp_bin, bin_path(prefix))
    os.replace(tmp_idx, idx_path(prefix))
    return num_docs, num_tokens


@dataclass(frozen=True)
class PreprocessStats:
    """What :func:`preprocess` wrote and skipped."""

    num_documents: int  # written
    num_tokens: int  # written, end-of-document ids included
    num_skipped: int  # shorter than min_tokens (before the end-of-document id)
    dtype: str


def _progress_log(counts: EncodeCounts, start: float, every_s: float):
    """``log(path)``, to call after each chunk that :func:`encode_documents` reads: logs the progress of
    :func:`preprocess` at most every ``every_s`` seconds, over all its inputs."""
    last_log = start

    def log(path) -> None:
        nonlocal last_log
        now = time.monotonic()
        if now - last_log >= every_s:
            last_log = now
            logger.info(
                "preprocess: %s: %d documents read, %d skipped, %.1fM characters, %.2fM characters/s",
                path, counts.read, counts.skipped, counts.chars / 1e6, counts.chars / 1e6 / max(now - start, 1e-9),
            )

    return log


def preprocess(
    inputs: Sequence[str | os.PathLike[str]],
    tokenizer: Tokenizer,
    output_prefix: str | os.PathLike[str],
    *,
    fmt: str = "jsonl",
    text_key: str = "text",
    append_eod: bool = False,
    min_tokens: int = 1,
    overwrite: bool = False,
    log_every_s: float = 10.0,
) -> PreprocessStats:
    """Tokenize ``inputs`` (JSONL or text files, read streaming) into one indexed dataset.

    Each input line is one document (see :func:`nemo_rlp.data.texts.iter_texts`); all bad-input errors
    name the file and line. Documents with fewer than ``min_tokens`` tokens are skipped, counted and
    logged. A progress line is logged every ``log_every_s`` seconds.
    """
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    if not inputs:
        raise ValueError("no input files given")
    for path in inputs:  # all inputs checked before any work
        if not Path(path).is_file():
            raise FileNotFoundError(f"input file not found: {path}. Pass existing JSONL / text files.")
    prefix = os.fspath(output_prefix)
    existing = [p for p in (bin_path(prefix), idx_path(prefix)) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} already exists; choose another output prefix or pass --overwrite to replace it"
        )
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)

    counts = EncodeCounts()
    start = time.monotonic()
    progress = _progress_log(counts, start, log_every_s)

    def documents() -> Iterable[list[int]]:
        for path in inputs:
            texts = iter_texts(path, fmt=fmt, text_key=text_key)
            encoded = encode_documents(texts, tokenizer.encode_batch, min_tokens, counts, lambda: progress(path))
            yield from (ids for _, ids in encoded)

    eod = tokenizer.eod_id if append_eod else None
    num_docs, num_tokens = write_indexed_dataset(prefix, documents(), tokenizer.vocab_size, eod_id=eod)
    log_skipped("preprocess", counts, min_tokens, logger)
    if num_docs == 0:
        for path in (bin_path(prefix), idx_path(prefix)):
            path.unlink(missing_ok=True)
        raise ValueError(
            f"no document of {', '.join(map(str, inputs))} has at least min_tokens={min_tokens} tokens "
            f"({counts.read} read); nothing written. Check text_key={text_key!r} and the input format."
        )
    stats = PreprocessStats(num_docs, num_tokens, counts.skipped, np.dtype(token_dtype(tokenizer.vocab_size)).name)
    logger.info("preprocess: wrote %s.{bin,idx} in %.1f s: %s", prefix, time.monotonic() - start, stats)
    return stats


# --- reading -----------------------------------------------------------------------------------------


# megatron-core's index layout (indexed_dataset._IndexWriter, 0.16): header, version <Q, dtype code
# <B, sequence count <Q, document count <Q, then the int32 sequence lengths. Read here only to
# compare sizes before megatron-core is imported; tests/unit/test_indexed_data.py checks these
# constants against megatron-core's own.
MEGATRON_INDEX_HEADER = b"MMIDIDX\x00\x00"
MEGATRON_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                        7: np.float32, 8: np.uint16}


def _check_bin_size(bin_file: Path, idx_file: Path) -> None:
    """Raise if the .bin does not hold the bytes its .idx describes. Anything this cannot read is
    left to megatron-core's reader (and the errors around it)."""
    try:
        with open(idx_file, "rb") as f:
            if f.read(len(MEGATRON_INDEX_HEADER)) != MEGATRON_INDEX_HEADER:
                return
            _version, code = struct.unpack("<QB", f.read(9))
            (count,) = struct.unpack("<Q", f.read(8))
            f.read(8)  # the document count
            lengths = np.fromfile(f, dtype=np.int32, count=count)
    except (OSError, struct.error, ValueError):
        return
    dtype = MEGATRON_DTYPE_CODES.get(code)
    if dtype is None or len(lengths) != count:
        return
    dtype = np.dtype(dtype)
    expected, actual = int(lengths.astype(np.int64).sum()) * dtype.itemsize, bin_file.stat().st_size
    if actual != expected:
        raise _size_mismatch(bin_file, idx_file, expected, dtype, actual)


def _size_mismatch(bin_file: Path, idx_file: Path, expected: int, dtype: np.dtype, actual: int,
                   contiguous: bool = True) -> ValueError:
    return ValueError(
        f"{bin_file} does not match its index {idx_file}: the index describes {expected} bytes of {dtype.name} "
        f"tokens{'' if contiguous else ' (not stored back to back)'}, the file has {actual}. The files are "
        f"truncated or from different runs; rebuild the dataset: {_FIX_BUILD}."
    )


class IndexedDocuments(Sequence[np.ndarray]):
    """The documents of a Megatron indexed dataset, read lazily from the memory-mapped ``.bin``.

    A document is the concatenation of its sequences (one per document unless the data was split into
    sentences). ``documents[i]`` is kept document ``i``, a numpy array (dtype of the file) read on access;
    ``lengths`` holds every kept document's length (samplers use it instead of reading documents).

    Args:
        path_prefix: ``PREFIX`` of ``PREFIX.bin`` / ``PREFIX.idx``.
        vocab_size: the tokenizer's vocabulary; an id outside ``[0, vocab_size)`` raises ValueError
            (checked on the first 64M tokens when opened, and on every document read).
        eod_id: if given, a trailing end-of-document id is dropped from each document.
        min_tokens: shorter documents (after dropping the end-of-document id) are skipped and counted.
    """

    def __init__(
        self,
        path_prefix: str | os.PathLike[str],
        *,
        vocab_size: int | None = None,
        eod_id: int | None = None,
        min_tokens: int = 1,
    ) -> None:
        if min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
        self.path_prefix = os.fspath(path_prefix)
        self.bin_path, self.idx_path = bin_path(self.path_prefix), idx_path(self.path_prefix)
        self.vocab_size = vocab_size
        _check_prefix(self.path_prefix)
        if self.bin_path.stat().st_size == 0:  # megatron cannot memory-map an empty file
            raise ValueError(
                f"indexed dataset {self.path_prefix!r} holds no tokens ({self.bin_path} is empty); rebuild it from "
                f"non-empty input: {_FIX_BUILD}."
            )
        # Before megatron-core is imported (about 4 s of CPU): a truncated .bin fails at once.
        _check_bin_size(self.bin_path, self.idx_path)
        from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, IndexedDataset

        try:
            with open(self.idx_path, "rb") as f:  # megatron would assert (and warn from __del__): check first
                header = f.read(len(_INDEX_HEADER))
            if header != _INDEX_HEADER:
                raise ValueError(f"bad header {header[:16]!r}, expected {_INDEX_HEADER!r}")
            self._dataset = IndexedDataset(self.path_prefix, multimodal=False, mmap=True)
        except Exception as exc:  # megatron asserts on a bad version, numpy fails on a short file
            raise ValueError(
                f"could not read indexed dataset {self.path_prefix!r} ({type(exc).__name__}: {exc}); "
                f"{self.idx_path} must be an index written by megatron-core's IndexedDatasetBuilder. Rebuild the "
                f"dataset: {_FIX_BUILD}."
            ) from exc
        index = self._dataset.index
        self.dtype = np.dtype(index.dtype)
        # Copies (np.array): megatron closes its memory maps in __del__, so no view of them may escape.
        seq_lengths = np.array(index.sequence_lengths, dtype=np.int64)
        pointers = np.array(index.sequence_pointers, dtype=np.int64)
        doc_index = np.array(self._dataset.document_indices, dtype=np.int64)

        # The .bin must hold exactly the sequences the .idx describes, back to back.
        itemsize = self.dtype.itemsize
        expected = int(seq_lengths.sum()) * itemsize
        actual = self.bin_path.stat().st_size
        contiguous = len(pointers) == 0 or (
            pointers[0] == 0 and np.array_equal(pointers[1:], pointers[:-1] + seq_lengths[:-1] * itemsize)
        )
        if actual != expected or not contiguous:
            raise _size_mismatch(self.bin_path, self.idx_path, expected, self.dtype, actual, contiguous)

        # Document d spans sequences doc_index[d]:doc_index[d+1], i.e. tokens starts[d]:starts[d]+lengths[d].
        token_ends = np.concatenate([[0], np.cumsum(seq_lengths)])
        starts = token_ends[doc_index[:-1]]
        lengths = token_ends[doc_index[1:]] - starts
        # All tokens as one view of megatron's memory map, used only while self._dataset is alive.
        self._tokens = self._dataset.bin_reader.read(dtype=index.dtype, count=int(seq_lengths.sum()), offset=0)
        self.num_stored = len(lengths)
        if self.num_stored == 0:
            raise ValueError(
                f"indexed dataset {self.path_prefix!r} holds no documents; rebuild it from non-empty input: {_FIX_BUILD}."
            )
        if vocab_size is not None:
            self._check_ids(self._tokens[:_SCAN_TOKENS], where="its first tokens")
        # Stored documents not ending with the end-of-document id (None: no eod_id given); megatron's
        # GPTDataset needs them all to end with it (nemo_rlp.data.megatron_ntp).
        self.num_without_eod: int | None = None
        if eod_id is not None:
            ends_with_eod = lengths > 0
            ends_with_eod[ends_with_eod] = self._tokens[(starts + lengths - 1)[ends_with_eod]] == eod_id
            self.num_without_eod = int((~ends_with_eod).sum())
            lengths = lengths - ends_with_eod
        keep = lengths >= min_tokens
        self.num_skipped = int(self.num_stored - keep.sum())
        self.min_tokens = min_tokens
        self._ids = np.flatnonzero(keep)  # kept document -> stored document
        self._starts, self.lengths = starts[keep], lengths[keep]
        if self.num_skipped:
            logger.warning(
                "%s: skipped %d of %d documents shorter than min_tokens=%d tokens",
                self.path_prefix, self.num_skipped, self.num_stored, min_tokens,
            )
        if len(self._ids) == 0:
            raise ValueError(
                f"{self.path_prefix}: none of its {self.num_stored} documents has at least min_tokens={min_tokens} "
                f"tokens{' (after dropping the end-of-document id)' if eod_id is not None else ''}; rebuild the "
                "dataset from longer documents."
            )
        logger.info(
            "%s: %d documents, %d tokens (%s)", self.path_prefix, len(self), self.num_tokens, self.dtype.name
        )

    def _check_ids(self, tokens: np.ndarray, where: str) -> None:
        if tokens.size == 0 or self.vocab_size is None:
            return
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(
                f"{self.bin_path}: {where} hold token id {low if low < 0 else high}, outside the tokenizer's "
                f"vocabulary [0, {self.vocab_size}). The dataset was tokenized with another tokenizer: set "
                "data.tokenizer to the one it was built with, or rebuild it with recipes/preprocess_data.py "
                "--tokenizer <your tokenizer.json>."
            )

    @property
    def num_tokens(self) -> int:
        """Tokens in kept documents (a dropped end-of-document id not counted)."""
        return int(self.lengths.sum())

    def stored_index(self, i: int) -> int:
        """The document's index in the ``.idx`` (differs from ``i`` once short documents were skipped)."""
        return int(self._ids[i])

    def __len__(self) -> int:
        return len(self._ids)

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[np.ndarray]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self._ids)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents")
        i = int(i) % n
        start = int(self._starts[i])
        doc = np.array(self._tokens[start : start + int(self.lengths[i])])  # a copy: see __init__
        self._check_ids(doc, where=f"document {self.stored_index(i)}")
        return doc

    def __repr__(self) -> str:
        return (
            f"IndexedDocuments({self.path_prefix!r}, documents={len(self)}, tokens={self.num_tokens}, "
            f"dtype={self.dtype.name}, skipped={self.num_skipped})"
        )
