"""Train a byte-level BPE tokenizer on your own corpus, with RLP's markers as special tokens.

    python recipes/build_tokenizer.py --input docs.jsonl [--input more.jsonl] --output tokenizer.json \\
        [--vocab-size 4096] [--format jsonl|text] [--text-key text] [--overwrite]

Each line is one document (JSONL: its `--text-key` string; text: the line), as the trainer reads
them. The tokenizer is the kind bundled with the package (`nemo_rlp.data.tokenizer.train_byte_level_bpe`):
every byte is a symbol, so any text encodes and decodes back exactly, and every digit is its own
piece. `<pad>`, `<|endoftext|>`, `<think>` and `</think>` (or the markers given with --pad, --eod,
--think-start, --think-end, which must then be passed to the trainer too: data.pad_token,
data.eod_token, rlp.think_start, rlp.think_end) are special tokens with ids 0-3, each one id.
`--vocab-size` counts them and the 256 byte symbols; a small corpus may stop short of it (merges
need a pair seen twice), and the size reached is printed. Train on the result with

    python -m nemo_rlp.train data.corpus=docs.jsonl data.tokenizer=tokenizer.json data.rlp_positions=uniform eval=none

(README, "Bring your own corpus"). The model's vocabulary follows the tokenizer (model.vocab_size: null).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemo_rlp.data.tokenizer import Tokenizer, train_corpus_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", required=True, help="a JSONL / text file; repeat for more")
    parser.add_argument("--output", required=True, help="the tokenizer.json to write")
    parser.add_argument("--vocab-size", type=int, default=4096, help="ids in all, special tokens and bytes included")
    parser.add_argument("--format", choices=("jsonl", "text"), default="jsonl")
    parser.add_argument("--text-key", default="text", help="JSONL key holding the document text")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--think-start", default=Tokenizer.THINK_START)
    parser.add_argument("--think-end", default=Tokenizer.THINK_END)
    parser.add_argument("--eod", default=Tokenizer.EOD)
    parser.add_argument("--pad", default=Tokenizer.PAD)
    args = parser.parse_args(argv)

    output = Path(args.output)
    try:
        if output.exists() and not args.overwrite:
            raise ValueError(f"{output} exists; pass --overwrite to replace it")
        if not output.parent.is_dir():
            raise ValueError(f"the directory of --output {output} does not exist; create it first")
        tokenizer, documents = train_corpus_tokenizer(
            args.input, vocab_size=args.vocab_size, fmt=args.format, text_key=args.text_key,
            think_start=args.think_start, think_end=args.think_end, eod=args.eod, pad=args.pad,
        )
        tokenizer.hf_tokenizer.save(str(output))
        # What the trainer will load: the markers must survive the round trip through the file.
        saved = Tokenizer.from_file(output, think_start=args.think_start, think_end=args.think_end,
                                    eod=args.eod, pad=args.pad)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    short = f" (asked for {args.vocab_size}: the corpus has no more merges seen twice)" if (
        saved.vocab_size < args.vocab_size) else ""
    print(
        f"wrote {output}: {saved.vocab_size} tokens{short}, trained on {documents} documents; "
        f"pad={saved.pad_id} eod={saved.eod_id} think_start={saved.think_start_id} think_end={saved.think_end_id}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
