"""Documents with marked positions: where RLP should think, and where an evaluation asks for an answer.

A JSON-lines document may carry, besides its text, the character offsets of chosen next tokens:

    {"text": "Let k = 7. Let x = k. What is x? x = 7.", "answers": [36], "tasks": ["chain"]}

``answers`` (the key is ``data.positions_key``) lists offsets into ``text``; each marks the token that
starts at (or covers) that character, so the mark of `` 7`` is the offset of its space. ``tasks``
(optional, one name per answer) groups the marks in evaluation reports. The bundled corpus marks the
answers that its walks and word problems show without a worked thought (``nemo_rlp.data.synthetic``).

With ``data.rlp_positions: marked`` the RLP contexts are drawn at marked positions only
(:class:`nemo_rlp.data.sampling.ContextSampler`); the held-out evaluation always scores marked positions
(``nemo_rlp.training.evaluate``).
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nemo_rlp.data.texts import MIN_TOKENS, EncodeCounts, encode_documents, iter_jsonl_records, log_skipped

if TYPE_CHECKING:
    from nemo_rlp.data.tokenizer import Tokenizer

__all__ = ["POSITIONS", "MarkedDocuments", "char_to_token_positions", "load_marked_jsonl"]

logger = logging.getLogger(__name__)

# Where RLP contexts end (data.rlp_positions): anywhere in a document, or only at its marks.
POSITIONS = ("uniform", "marked")


class MarkedDocuments(Sequence[list[int]]):
    """Token-id documents (a sequence, like any other source) with, per document, the token positions
    of its marks (``marks[i]``, sorted, each ``0 < p < len(documents[i])``) and their task names."""

    def __init__(self, documents: list[list[int]], marks: list[list[int]], tasks: list[list[str]]) -> None:
        if not len(documents) == len(marks) == len(tasks):
            raise ValueError(f"need marks and tasks per document, got {len(documents)}, {len(marks)}, {len(tasks)}")
        self.documents, self.marks, self.tasks = documents, marks, tasks

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, i):
        return self.documents[i]

    @property
    def num_marks(self) -> int:
        return sum(len(m) for m in self.marks)


def char_to_token_positions(token_offsets: Sequence[tuple[int, int]], chars: Sequence[int]) -> list[int]:
    """For each character offset, the index of the first token that ends after it: the token that
    covers the character, or the next one if the character belongs to none (e.g. trimmed whitespace)."""
    ends = [end for _, end in token_offsets]
    return [bisect.bisect_right(ends, c) for c in chars]


def load_marked_jsonl(
    path: str | os.PathLike[str],
    tokenizer: Tokenizer,
    text_key: str = "text",
    positions_key: str = "answers",
    tasks_key: str = "tasks",
) -> MarkedDocuments:
    """Tokenize a JSON-lines file whose documents mark positions (module docstring).

    Every document is kept (a document shorter than 2 tokens is dropped with its marks, counted and
    logged); a mark at token 0 has no context and is an error, as are marks that are not offsets into
    the text. ValueError (file, line, fix) for malformed marks, and when no document has a mark.
    """
    path = Path(path)
    texts: list[str] = []
    chars: list[list[int]] = []
    names: list[list[str]] = []
    for lineno, record in iter_jsonl_records(path, text_key):
        text = record[text_key]
        offsets = record.get(positions_key, [])
        if not (isinstance(offsets, list) and all(isinstance(c, int) and 0 <= c < len(text) for c in offsets)):
            raise ValueError(
                f"{path}:{lineno}: {positions_key!r} must be a list of character offsets into {text_key!r} "
                f"(integers in [0, {len(text)})), got {str(offsets)[:200]}. Fix the line or set "
                "data.positions_key to the key holding the offsets."
            )
        tasks = record.get(tasks_key, ["all"] * len(offsets))
        if not (isinstance(tasks, list) and len(tasks) == len(offsets)):
            raise ValueError(
                f"{path}:{lineno}: {tasks_key!r} must list one task name per entry of {positions_key!r} "
                f"({len(offsets)}), got {str(tasks)[:200]}"
            )
        texts.append(text)
        chars.append(list(offsets))
        names.append([str(t) for t in tasks])

    documents, marks, tasks = [], [], []
    counts = EncodeCounts()

    def encode_batch(batch: list[str]):
        return tokenizer.hf_tokenizer.encode_batch(batch, add_special_tokens=False)  # with character offsets

    for i, enc in encode_documents(texts, encode_batch, MIN_TOKENS, counts):
        order = sorted(range(len(chars[i])), key=chars[i].__getitem__)
        positions = char_to_token_positions(enc.offsets, [chars[i][j] for j in order])
        if positions and positions[0] == 0:
            raise ValueError(
                f"{path}: document {i + 1} marks its first token (character {min(chars[i])}): a marked "
                "token needs at least one token of context before it"
            )
        documents.append(list(enc.ids))
        marks.append(positions)
        tasks.append([names[i][j] for j in order])
    log_skipped(path, counts, MIN_TOKENS, logger)
    out = MarkedDocuments(documents, marks, tasks)
    if out.num_marks == 0:
        raise ValueError(
            f"{path}: no document marks a position (key {positions_key!r}). Add character offsets under that "
            "key, or set data.positions_key to the key that holds them."
        )
    logger.info("%s: %d documents, %d marked positions", path, len(out), out.num_marks)
    return out
