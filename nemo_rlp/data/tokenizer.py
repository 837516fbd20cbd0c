"""Tokenizer wrapper around Hugging Face ``tokenizers`` with RLP's thought markers.

RLP inserts a thought between ``<think>`` and ``</think>`` right after the context x_<t and then scores
the real next token x_t. The rollout works on token ids, so both markers (and the end-of-document and
padding tokens) must each be exactly one id. :class:`Tokenizer` checks that when it loads a file, so a
wrong tokenizer fails at start-up with a message that says what to fix, not deep inside a rollout.

:func:`train_byte_level_bpe` builds the small tokenizer bundled with the package (see
``scripts/build_tiny_corpus.py``): byte-level BPE (any text encodes, no unknown token, exact
round trip) whose pre-tokenizer isolates every digit, so numbers are read digit by digit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from nemo_rlp.data.bundled import BUNDLED_TOKENIZER

__all__ = ["DEFAULT_SPECIAL_TOKENS", "Tokenizer", "bundled_tokenizer", "load_tokenizer", "train_byte_level_bpe"]

# Order fixes the ids of the bundled tokenizer: <pad>=0, <|endoftext|>=1, <think>=2, </think>=3.
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<|endoftext|>", "<think>", "</think>")

# GPT-2's split pattern with ``\p{N}+`` replaced by ``\p{N}``: each digit is its own piece (with the
# space before it, as GPT-2 keeps a leading space on words), so BPE can never merge digits together.
_SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

_FIX_SPECIAL = (
    "add it as a special token (for the bundled tokenizer, rebuild it with scripts/build_tiny_corpus.py; "
    "for your own, call tokenizer.add_special_tokens([...]) and save it again), "
    "or pass the marker your tokenizer uses"
)


class Tokenizer:
    """A Hugging Face tokenizer plus the ids of the RLP markers, end-of-document and padding.

    Build it with :meth:`from_file`; the constructor takes an already loaded
    ``tokenizers.Tokenizer`` and runs the same checks.
    """

    THINK_START = "<think>"
    THINK_END = "</think>"
    EOD = "<|endoftext|>"
    PAD = "<pad>"

    def __init__(
        self,
        hf_tokenizer: tokenizers.Tokenizer,
        *,
        think_start: str = THINK_START,
        think_end: str = THINK_END,
        eod: str = EOD,
        pad: str = PAD,
        source: str = "<in memory>",
    ) -> None:
        self._tok = hf_tokenizer
        self.source = source
        self.think_start, self.think_end, self.eod, self.pad = think_start, think_end, eod, pad
        self.think_start_id = self._single_token_id(think_start, "think_start")
        self.think_end_id = self._single_token_id(think_end, "think_end")
        self.eod_id = self._single_token_id(eod, "eod")
        self.pad_id = self._single_token_id(pad, "pad")
        # pad may equal eod (a common convention); the markers must be told apart from everything else.
        named = {"think_start": self.think_start_id, "think_end": self.think_end_id, "eod": self.eod_id}
        if len(set(named.values())) != len(named):
            raise ValueError(
                f"tokenizer {source}: think_start, think_end and eod must be different tokens, got ids {named}; "
                "pass distinct markers"
            )
        if self.pad_id in (self.think_start_id, self.think_end_id):
            raise ValueError(f"tokenizer {source}: pad {pad!r} must not be a thought marker")

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        think_start: str = THINK_START,
        think_end: str = THINK_END,
        eod: str = EOD,
        pad: str = PAD,
    ) -> Tokenizer:
        """Load a ``tokenizer.json`` saved by Hugging Face ``tokenizers`` and check the markers."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file not found: {path}. Pass the path of a tokenizer.json saved by Hugging Face "
                "tokenizers (the bundled one is nemo_rlp/data/assets/tokenizer.json, "
                "built by scripts/build_tiny_corpus.py)."
            )
        try:
            hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception for unreadable / malformed files
            raise ValueError(
                f"could not read tokenizer file {path}: {exc}. It must be a tokenizer.json saved by Hugging Face "
                "tokenizers (Tokenizer.save); a transformers/sentencepiece model directory is not enough."
            ) from exc
        return cls(hf, think_start=think_start, think_end=think_end, eod=eod, pad=pad, source=str(path))

    def _single_token_id(self, token: str, role: str) -> int:
        """Id of ``token``; ValueError unless it exists and encodes to exactly that one id."""
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer {self.source}: {role} marker {token!r} is not a token; {_FIX_SPECIAL}.")
        # A plain vocabulary entry can still be split by the pre-tokenizer (e.g. "<" "think" ">"), and a
        # multi-id marker would break the rollout, which inserts markers as single ids.
        ids = self._tok.encode(token, add_special_tokens=False).ids
        if ids != [token_id]:
            raise ValueError(
                f"tokenizer {self.source}: {role} marker {token!r} encodes to {len(ids)} tokens {ids}, "
                f"not to its single id {token_id}; {_FIX_SPECIAL}."
            )
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding must have at least this many)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def hf_tokenizer(self) -> tokenizers.Tokenizer:
        """The wrapped Hugging Face tokenizer."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added. Marker strings inside ``text`` become their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` over many texts at once (parallel in the Rust library)."""
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` with special tokens kept, so thoughts print between their markers."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, think_start_id={self.think_start_id}, "
            f"think_end_id={self.think_end_id}, eod_id={self.eod_id}, pad_id={self.pad_id})"
        )


def train_byte_level_bpe(
    texts: Iterable[str],
    vocab_size: int = 512,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
) -> tokenizers.Tokenizer:
    """Train a byte-level BPE tokenizer whose pre-tokenizer splits digits individually.

    All 256 byte symbols are in the vocabulary, so any UTF-8 text encodes and decodes back exactly;
    ``special_tokens`` get the first ids and are single, never-split tokens. ``vocab_size`` counts
    them and the 256 byte symbols, so it must exceed ``256 + len(special_tokens)`` to learn merges.
    """
    minimum = 256 + len(special_tokens)
    if vocab_size <= minimum:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for merges; use more than {minimum}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            # use_regex=False: the split above already did GPT-2's job; this only maps bytes to symbols.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    # The trainer reads special-token strings in the text as plain characters; split them out so no
    # merges are spent on pieces like "think" that encoding never produces (markers are matched first).
    if special_tokens:
        specials = re.compile("|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True)))
        texts = (piece for text in texts for piece in specials.split(text) if piece)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def bundled_tokenizer() -> Tokenizer:
    """The byte-level BPE tokenizer trained on the bundled corpus (vocab 1024, markers as ids 0-3)."""
    return Tokenizer.from_file(BUNDLED_TOKENIZER)


def load_tokenizer(data_cfg, rlp_cfg) -> Tokenizer:
    """The run's tokenizer: `data.tokenizer` (or the bundled one) with the markers the config names
    (`rlp.think_start`, `rlp.think_end`, `data.eod_token`, `data.pad_token`)."""
    return Tokenizer.from_file(
        data_cfg.tokenizer or BUNDLED_TOKENIZER,
        think_start=rlp_cfg.think_start,
        think_end=rlp_cfg.think_end,
        eod=data_cfg.eod_token,
        pad=data_cfg.pad_token or data_cfg.eod_token,
    )


def train_corpus_tokenizer(
    paths: Sequence[str | os.PathLike[str]],
    vocab_size: int = 4096,
    fmt: str = "jsonl",
    text_key: str = "text",
    think_start: str = Tokenizer.THINK_START,
    think_end: str = Tokenizer.THINK_END,
    eod: str = Tokenizer.EOD,
    pad: str = Tokenizer.PAD,
) -> tuple[Tokenizer, int]:
    """A byte-level BPE tokenizer (:func:`train_byte_level_bpe`) trained on a user's corpus, with the
    markers the trainer will look up as special tokens; returns it, checked as a run checks it, and
    the number of documents read.

    This is what ``recipes/build_tokenizer.py`` runs: the bundled tokenizer knows only the bundled
    worksheets, and a tokenizer made elsewhere rarely has ``<think>`` and ``</think>`` as single ids.
    The special tokens come first, in the bundled order (pad, end of document, ``<think>``,
    ``</think>``; a pad equal to the end-of-document marker is one token). ``paths`` are read
    streaming in ``fmt`` (``jsonl``: the ``text_key`` string of each line; ``text``: each non-blank
    line), with :func:`nemo_rlp.data.texts.iter_texts`'s errors: a missing file, an empty one, a
    line without ``text_key`` each name the file and the fix. An indexed dataset is already token
    ids: its tokenizer is the one it was made with.
    """
    from nemo_rlp.data.texts import iter_texts

    if fmt not in ("jsonl", "text"):
        raise ValueError(
            f"format {fmt!r}: a tokenizer is trained on text, 'jsonl' or 'text'; an indexed dataset is already "
            "tokenized, so build the tokenizer from the JSONL or text files it was made from"
        )
    if not paths:
        raise ValueError("no corpus file given")
    specials = list(dict.fromkeys([pad, eod, think_start, think_end]))
    documents = 0

    def texts():
        nonlocal documents
        for path in paths:
            for text in iter_texts(path, fmt, text_key):
                documents += 1
                yield text

    hf = train_byte_level_bpe(texts(), vocab_size=vocab_size, special_tokens=specials)
    source = ", ".join(str(p) for p in paths)
    tokenizer = Tokenizer(hf, think_start=think_start, think_end=think_end, eod=eod, pad=pad,
                          source=f"<trained on {source}>")
    return tokenizer, documents
