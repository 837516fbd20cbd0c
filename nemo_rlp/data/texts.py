"""Reading text files of documents, and the one place where texts become token-id documents.

The low-level readers of ``nemo_rlp.data``, used by every source that starts from text:

* :func:`iter_texts` streams the documents' texts of a ``jsonl`` or ``text`` file;
  :func:`iter_jsonl_records` the JSON objects behind them. Every bad line is an error that names the
  file, the line and the fix.
* :func:`encode_documents` tokenizes texts in chunks of :data:`ENCODE_CHUNK` and drops, counting them,
  the documents shorter than ``min_tokens``; :func:`log_skipped` reports the count. The JSONL and text
  loaders, the marked-positions loader and the indexed-dataset writer all go through these two, so
  "too short" means the same everywhere and is never silent.
* :data:`Documents` and :func:`document_lengths`: what every source returns, and its lengths without
  reading every document when the source keeps them (``lengths``).

Nothing here imports a tokenizer: ``encode_documents`` takes the batch-encoding function.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from nemo_rlp.data.bundled import BUNDLED_CORPUS

__all__ = [
    "ENCODE_CHUNK",
    "MIN_TOKENS",
    "Documents",
    "EncodeCounts",
    "document_lengths",
    "encode_documents",
    "iter_jsonl_records",
    "iter_texts",
    "log_skipped",
]

logger = logging.getLogger(__name__)

# A sequence of documents, each a sequence of token ids without an end-of-document id: lists, or lazy
# numpy views such as nemo_rlp.data.indexed.IndexedDocuments.
Documents = Sequence[Sequence[int]]

MIN_TOKENS = 2  # a document needs a context token and a next token
ENCODE_CHUNK = 4096  # texts per encode_batch call: bounds the memory of the Rust-side encodings


def _decoded_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 file, streaming; invalid UTF-8 names the line and byte offset."""
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}. Point the data path at {what}.")
    offset = 0  # byte offset of the current line, to locate invalid UTF-8 in tools like `xxd -s`
    with open(path, "rb") as f:  # bytes, so a decoding error can name its line and offset
        for lineno, raw in enumerate(f, start=1):
            line_offset, offset = offset, offset + len(raw)
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{path}:{lineno}: invalid UTF-8 at byte offset {line_offset + exc.start} of the file "
                    f"({exc.reason}). Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                ) from None


def iter_texts(path: str | os.PathLike[str], fmt: str = "jsonl", text_key: str = "text") -> Iterator[str]:
    """The documents' texts of a ``jsonl`` or ``text`` file, read streaming (for files larger than memory).

    ``jsonl`` gives the ``text_key`` string of every record of :func:`iter_jsonl_records`, with its
    errors (file, line and fix); ``text`` gives every non-blank line without its line break.
    """
    if fmt not in ("jsonl", "text"):
        raise ValueError(f"format {fmt!r} has no texts to read; use 'jsonl' or 'text'")
    if fmt == "jsonl":
        for _, record in iter_jsonl_records(path, text_key):
            yield record[text_key]
        return
    found = False
    for _, line in _decoded_lines(Path(path), "a UTF-8 text file with one document per line"):
        if line.strip():  # blank lines (e.g. a trailing one) carry no document
            found = True
            yield line.rstrip("\r\n")
    if not found:
        raise ValueError(f"{path} is empty: no non-blank lines found. Expected one document per line.")


def _check_record(path: Path, lineno: int, line: str, text_key: str) -> dict:
    """The JSON object of one line, whose ``text_key`` holds a string; otherwise an error naming the fix."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}:{lineno}: not valid JSON ({exc.msg}, column {exc.colno}). Each line must be one "
            f'JSON object such as {{"{text_key}": "..."}}; fix or remove the line.'
        ) from None
    if not isinstance(record, dict):
        raise ValueError(
            f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}. Each line must be "
            f'one object such as {{"{text_key}": "..."}}.'
        )
    if text_key not in record:
        raise ValueError(
            f"{path}:{lineno}: no key {text_key!r} (keys present: {sorted(record)}). "
            "Set text_key to the key that holds the document text."
        )
    if not isinstance(record[text_key], str):
        raise ValueError(
            f"{path}:{lineno}: {text_key!r} holds a {type(record[text_key]).__name__}, expected a string. "
            "Set text_key to the key that holds the document text."
        )
    return record


def iter_jsonl_records(path: str | os.PathLike[str], text_key: str = "text") -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSON-lines file whose ``text_key`` holds a
    string; every other line is an error that names the file, the line and the fix."""
    path = Path(path)
    what = f'a JSON-lines file with one {{"{text_key}": "..."}} object per line (the bundled one is {BUNDLED_CORPUS})'
    found = False
    for lineno, line in _decoded_lines(path, what):
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) carry no document
        found = True
        yield lineno, _check_record(path, lineno, line, text_key)
    if not found:
        raise ValueError(
            f"{path} is empty: no JSON lines found. Expected one {{\"{text_key}\": \"...\"}} object per line."
        )


@dataclass
class EncodeCounts:
    """What :func:`encode_documents` has read so far: documents, those skipped as too short, characters."""

    read: int = 0
    skipped: int = 0
    chars: int = 0


def encode_documents(
    texts: Iterable[str],
    encode_batch: Callable[[list[str]], Sequence[Any]],
    min_tokens: int,
    counts: EncodeCounts,
    after_chunk: Callable[[], None] | None = None,
) -> Iterator[tuple[int, Any]]:
    """(index of the text, its encoding) for every text whose encoding has at least ``min_tokens`` tokens.

    ``encode_batch`` maps a list of texts to one encoding per text, anything with a ``len`` in tokens
    (``Tokenizer.encode_batch``'s id lists, or Hugging Face encodings when offsets are needed). Texts
    are read and encoded :data:`ENCODE_CHUNK` at a time, so a file larger than memory streams;
    ``counts`` is updated as they go and ``after_chunk`` (e.g. a progress log) runs after each chunk.
    """
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    texts = iter(texts)
    while chunk := list(islice(texts, ENCODE_CHUNK)):
        first = counts.read
        counts.chars += sum(len(t) for t in chunk)
        counts.read += len(chunk)
        for i, encoding in enumerate(encode_batch(chunk), start=first):
            if len(encoding) < min_tokens:
                counts.skipped += 1
            else:
                yield i, encoding
        if after_chunk is not None:
            after_chunk()


def log_skipped(where: Any, counts: EncodeCounts, min_tokens: int, log: logging.Logger = logger) -> None:
    """Warn how many documents :func:`encode_documents` skipped for being shorter than ``min_tokens``."""
    if counts.skipped:
        log.warning("%s: skipped %d of %d documents shorter than min_tokens=%d tokens",
                    where, counts.skipped, counts.read, min_tokens)


def document_lengths(documents: Documents) -> np.ndarray:
    """Every document's length (int64), from ``documents.lengths`` when it has one (lazy sources)."""
    lengths = getattr(documents, "lengths", None)
    if lengths is not None:
        return np.asarray(lengths, dtype=np.int64)
    return np.fromiter((len(d) for d in documents), dtype=np.int64, count=len(documents))
