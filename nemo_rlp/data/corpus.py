"""Documents from JSON-lines and plain-text files, tokenized into lists of token ids.

A document is a list of token ids without an end-of-document id (the NTP batcher adds separators).
Every problem with an input file is reported with the file, the line and what to do about it
(:mod:`nemo_rlp.data.texts`), and documents that are dropped for being too short are counted and
logged, never dropped silently. The bundled files are named in :mod:`nemo_rlp.data.bundled`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nemo_rlp.data.texts import MIN_TOKENS, EncodeCounts, encode_documents, iter_texts, log_skipped

if TYPE_CHECKING:
    from nemo_rlp.data.tokenizer import Tokenizer

__all__ = [
    "DocumentStats",
    "load_jsonl_documents",
    "load_jsonl_documents_with_stats",
    "load_text_documents",
    "read_jsonl_texts",
]

logger = logging.getLogger(__name__)


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
    return list(iter_texts(path, "jsonl", text_key))


def _encode_file(path, fmt: str, tokenizer: Tokenizer, text_key: str, min_tokens: int) -> tuple[list[list[int]], EncodeCounts]:
    """The documents of one file with at least ``min_tokens`` tokens; the skipped ones logged; none left is an error."""
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    counts = EncodeCounts()
    texts = iter_texts(path, fmt, text_key)
    documents = [ids for _, ids in encode_documents(texts, tokenizer.encode_batch, min_tokens, counts)]
    log_skipped(path, counts, min_tokens, logger)
    if not documents:
        hint = f" Lower min_tokens, or check text_key={text_key!r} and the tokenizer." if fmt == "jsonl" else ""
        raise ValueError(
            f"{path}: none of its {counts.read} documents has at least min_tokens={min_tokens} tokens.{hint}"
        )
    return documents, counts


def load_jsonl_documents_with_stats(
    path: str | os.PathLike[str],
    tokenizer: Tokenizer,
    text_key: str = "text",
    min_tokens: int = MIN_TOKENS,
) -> tuple[list[list[int]], DocumentStats]:
    """Like :func:`load_jsonl_documents`, also returning :class:`DocumentStats`."""
    documents, counts = _encode_file(path, "jsonl", tokenizer, text_key, min_tokens)
    stats = DocumentStats(
        num_documents=len(documents),
        num_tokens=sum(len(d) for d in documents),
        num_skipped=counts.skipped,
        min_tokens=min_tokens,
    )
    logger.info("%s: %s", path, stats)
    return documents, stats


def load_jsonl_documents(
    path: str | os.PathLike[str],
    tokenizer: Tokenizer,
    text_key: str = "text",
    min_tokens: int = MIN_TOKENS,
) -> list[list[int]]:
    """Token ids of every document of a JSON-lines file (one ``{text_key: str}`` object per line).

    No end-of-document token is appended (the NTP batcher adds separators). Documents with fewer than
    ``min_tokens`` tokens are dropped and their count is logged as a warning; ValueError if none is left.
    """
    return load_jsonl_documents_with_stats(path, tokenizer, text_key, min_tokens)[0]


def load_text_documents(
    path: str | os.PathLike[str], tokenizer: Tokenizer, min_tokens: int = MIN_TOKENS
) -> list[list[int]]:
    """Token ids of every non-blank line of a UTF-8 text file; short documents skipped, counted, logged."""
    return _encode_file(path, "text", tokenizer, "text", min_tokens)[0]
