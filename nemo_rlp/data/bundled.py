"""The files that ship inside the package, by path (rebuild them with scripts/build_tiny_corpus.py).

The lowest module of ``nemo_rlp.data``: it imports nothing, so every reader can name the bundled
files in its messages and defaults without importing the code that reads them.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASSETS_DIR", "BUNDLED_CORPUS", "BUNDLED_HELDOUT", "BUNDLED_TOKENIZER"]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUNDLED_CORPUS = ASSETS_DIR / "tiny_corpus.jsonl"
BUNDLED_HELDOUT = ASSETS_DIR / "tiny_heldout.jsonl"
BUNDLED_TOKENIZER = ASSETS_DIR / "tokenizer.json"
