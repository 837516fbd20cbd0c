"""Documents from JSON-lines files, tokenized; the bundled tiny corpus and tokenizer.

A document is a list of token ids. Every problem with an input file is reported with the file, the
line and what to do about it, and documents that are dropped for being too short are counted and
logged, never dropped silently.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from nemo_rlp.data.tokenizer import Tokenizer

__all__ = [
    "ASSETS_DIR",
    "BUNDLED_CORPUS",
    "BUNDLED_TOKENIZER",
    "DocumentStats",
    "assets_dir",
    "bundled_tokenizer",
    "load_bundled_documents",
    "load_jsonl_documents",
    "load_jsonl_documents_with_stats",
    "read_jsonl_texts",
]

logger = logging.getLogger(__name__)

# Files that ship inside the package (rebuild with scripts/build_tiny_corpus.py).
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUNDLED_CORPUS = ASSETS_DIR / "tiny_corpus.jsonl"
BUNDLED_TOKENIZER = ASSETS_DIR / "tokenizer.json"

_ENCODE_CHUNK = 4096  # texts per encode_batch call: bounds the memory of the Rust-side encodings


def assets_dir() -> Path:
    """Folder holding the bundled ``tiny_corpus.jsonl`` and ``tokenizer.json``."""
    return ASSETS_DIR


@dataclass(frozen=True)
class DocumentStats:
    """What :func:`load_jsonl_documents_with_stats` kept and dropped."""

    num_documents: int  # kept
    num_tokens: int  # in kept documents
    num_skipped: int  # shorter than min_tokens
    min_tokens: int


def read_jsonl_texts(path: str | os.PathLike[str], text_key: str = "text") -> list[str]:
    """The ``text_key`` string of every non-blank line of a JSON-lines file.

    Raises FileNotFoundError for a missing file and ValueError, naming the file and line, for invalid
    UTF-8, a line that is not a JSON object, a missing key, a non-string value, or a file with no lines.
    """
    # One reader for every text format, streaming; imported here because it imports this module.
    from nemo_rlp.data.sources import iter_texts

    return list(iter_texts(path, "jsonl", text_key))


def load_jsonl_documents_with_stats(
    path: str | os.PathLike[str],
    tokenizer: Tokenizer,
    text_key: str = "text",
    min_tokens: int = 2,
) -> tuple[list[list[int]], DocumentStats]:
    """Like :func:`load_jsonl_documents`, also returning :class:`DocumentStats`."""
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    texts = read_jsonl_texts(path, text_key)
    documents: list[list[int]] = []
    skipped = 0
    for start in range(0, len(texts), _ENCODE_CHUNK):
        for ids in tokenizer.encode_batch(texts[start : start + _ENCODE_CHUNK]):
            if len(ids) >= min_tokens:
                documents.append(ids)
            else:
                skipped += 1
    if skipped:
        logger.warning(
            "%s: skipped %d of %d documents shorter than min_tokens=%d tokens",
            path, skipped, len(texts), min_tokens,
        )
    if not documents:
        raise ValueError(
            f"{path}: none of its {len(texts)} documents has at least min_tokens={min_tokens} tokens. "
            f"Lower min_tokens, or check text_key={text_key!r} and the tokenizer."
        )
    stats = DocumentStats(
        num_documents=len(documents),
        num_tokens=sum(len(d) for d in documents),
        num_skipped=skipped,
        min_tokens=min_tokens,
    )
    logger.info("%s: %s", path, stats)
    return documents, stats


def load_jsonl_documents(
    path: str | os.PathLike[str],
    tokenizer: Tokenizer,
    text_key: str = "text",
    min_tokens: int = 2,
) -> list[list[int]]:
    """Token ids of every document of a JSON-lines file (one ``{text_key: str}`` object per line).

    No end-of-document token is appended (the NTP batcher adds separators). Documents with fewer than
    ``min_tokens`` tokens are dropped and their count is logged as a warning; ValueError if none is left.
    """
    return load_jsonl_documents_with_stats(path, tokenizer, text_key, min_tokens)[0]


def bundled_tokenizer() -> Tokenizer:
    """The byte-level BPE tokenizer trained on the bundled corpus (vocab 512, markers as ids 0-3)."""
    return Tokenizer.from_file(BUNDLED_TOKENIZER)


def load_bundled_documents(tokenizer: Tokenizer | None = None, min_tokens: int = 2) -> list[list[int]]:
    """The bundled tiny corpus, tokenized with ``tokenizer`` (default: the bundled tokenizer)."""
    return load_jsonl_documents(BUNDLED_CORPUS, tokenizer or bundled_tokenizer(), min_tokens=min_tokens)
