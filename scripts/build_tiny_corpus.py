#!/usr/bin/env python
"""Generate the bundled tiny corpus and train its tokenizer (deterministic: same args, same bytes).

    python scripts/build_tiny_corpus.py [--out-dir nemo_rlp/data/assets] [--num-docs N] [--seed S]
                                        [--vocab-size 1024] [--thought-fraction 0.8]
                                        [--useful-thought-fraction 0.25]

Writes ``tiny_corpus.jsonl`` (one {"text", "answers", "tasks"} per line), ``tiny_heldout.jsonl`` and ``tokenizer.json`` (byte-level BPE with
``<pad>``, ``<|endoftext|>``, ``<think>``, ``</think>`` as special tokens, ids 0-3). The generator lives in
``nemo_rlp.data.synthetic``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemo_rlp.data.synthetic import CorpusConfig, build_tiny_corpus  # noqa: E402

_DEFAULTS = CorpusConfig()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent.parent / "nemo_rlp/data/assets")
    parser.add_argument("--num-docs", type=int, default=_DEFAULTS.num_docs)
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--thought-fraction", type=float, default=_DEFAULTS.thought_fraction)
    parser.add_argument("--useful-thought-fraction", type=float, default=_DEFAULTS.useful_thought_fraction)
    parser.add_argument("--wrong-thought-fraction", type=float, default=_DEFAULTS.wrong_thought_fraction)
    parser.add_argument("--marked-tasks", default=",".join(_DEFAULTS.marked_tasks))
    args = parser.parse_args(argv)
    cfg = CorpusConfig(num_docs=args.num_docs, seed=args.seed, thought_fraction=args.thought_fraction,
                       useful_thought_fraction=args.useful_thought_fraction,
                       wrong_thought_fraction=args.wrong_thought_fraction,
                       marked_tasks=tuple(args.marked_tasks.split(",")))
    corpus, tokenizer = build_tiny_corpus(args.out_dir, cfg, vocab_size=args.vocab_size)
    for path in (corpus, tokenizer):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
