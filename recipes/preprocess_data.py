"""Tokenize JSONL (or plain-text) files into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx).

    python recipes/preprocess_data.py --input docs.jsonl [--input more.jsonl] --tokenizer tokenizer.json \\
        --output-prefix data/docs [--format jsonl|text] [--text-key text] [--append-eod] [--overwrite]

Each line is one document (JSONL: its `--text-key` string; text: the line). The token dtype follows the
tokenizer's vocabulary (megatron-core's DType.optimal_dtype: uint16 below 65500 ids, int32 above). Train
on the result with `data.format=indexed data.corpus=data/docs data.tokenizer=tokenizer.json`. The logic
is `nemo_rlp.data.indexed.preprocess`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemo_rlp.data.indexed import preprocess
from nemo_rlp.data.tokenizer import Tokenizer
from nemo_rlp.recipe_logging import setup_recipe_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", required=True, help="a JSONL / text file; repeat for more")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json saved by Hugging Face tokenizers")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--format", choices=("jsonl", "text"), default="jsonl")
    parser.add_argument("--text-key", default="text", help="JSONL key holding the document text")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    parser.add_argument("--min-tokens", type=int, default=1, help="skip (and count) shorter documents")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin / .idx")
    parser.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines")
    parser.add_argument("--think-start", default=Tokenizer.THINK_START)
    parser.add_argument("--think-end", default=Tokenizer.THINK_END)
    parser.add_argument("--eod", default=Tokenizer.EOD)
    parser.add_argument("--pad", default=Tokenizer.PAD)
    args = parser.parse_args(argv)

    setup_recipe_logging()
    try:
        tokenizer = Tokenizer.from_file(
            args.tokenizer, think_start=args.think_start, think_end=args.think_end, eod=args.eod, pad=args.pad
        )
        stats = preprocess(
            args.input,
            tokenizer,
            args.output_prefix,
            fmt=args.format,
            text_key=args.text_key,
            append_eod=args.append_eod,
            min_tokens=args.min_tokens,
            overwrite=args.overwrite,
            log_every_s=args.log_every,
        )
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.output_prefix}.bin and {args.output_prefix}.idx: {stats.num_documents} documents, "
        f"{stats.num_tokens} tokens ({stats.dtype}), {stats.num_skipped} skipped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
