"""Export a checkpoint's policy (or its EMA teacher) as a Hugging Face model folder.

    python recipes/export_checkpoint.py --checkpoint outputs/tiny_gpt-1a2b3c4d/checkpoints --out hf/tiny
    python recipes/export_checkpoint.py --checkpoint /ckpt/run/checkpoints/step_0001000 --out /ckpt/hf/rlp-1000 \\
        --hf-base /ckpt/Qwen3-1.7B-Base                    # Megatron-Bridge, in the NeMo container
    python recipes/export_checkpoint.py ... --ema-teacher  # the EMA teacher instead of the policy

--checkpoint is a training checkpoint (`step_XXXXXXX/`), a run's checkpoint folder (its latest complete
checkpoint) or an import (recipes/import_checkpoint.py's output). The checkpoint is loaded whole in
one process (whatever TP x PP saved it) and written to --out: config.json, safetensors, the tokenizer,
and export.json (what was exported, by which converter).

Converters (`--converter`, default `auto`): Megatron-Bridge's `AutoBridge.save_hf_pretrained` when
Bridge imports and --hf-base names the Hugging Face model the run started from (its config, tokenizer
and custom code are copied from there); otherwise the dependency-free conversion of the GPT family
(Qwen3 with QK norms, Llama without), which runs anywhere, CPU included, and takes the tokenizer from
the run's `data.tokenizer` (or --tokenizer: a tokenizer.json or a Hugging Face tokenizer folder).
Megatron-Bridge cannot be imported without Transformer Engine, hence CUDA; nemo_rlp/training/hf_checkpoint.py
says exactly why. The logic is there; this file only reads the command line.

Exit status: 0 written; 2 a bad argument or checkpoint (one line on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemo_rlp.config import ConfigError  # noqa: E402
from nemo_rlp.recipe_logging import setup_recipe_logging  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint, a run's checkpoint folder, or an import")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write (new or empty)")
    parser.add_argument("--ema-teacher", action="store_true", help="export the EMA teacher instead of the policy")
    parser.add_argument("--hf-base", help="the Hugging Face model the run started from (needed by Megatron-Bridge; "
                                          "the fallback takes its vocabulary size and tokenizer)")
    parser.add_argument("--tokenizer", help="a tokenizer.json or Hugging Face tokenizer folder (default: the run's)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="the exported weights' dtype (default: the model's)")
    parser.add_argument("--converter", choices=("auto", "bridge", "fallback"), default="auto",
                        help="Megatron-Bridge, the dependency-free conversion, or Bridge when it can (default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_recipe_logging()
    from nemo_rlp.training.hf_checkpoint import export_checkpoint

    use_bridge = {"auto": None, "bridge": True, "fallback": False}[args.converter]
    try:
        record = export_checkpoint(args.checkpoint, args.out, teacher=args.ema_teacher, hf_base=args.hf_base,
                                   tokenizer=args.tokenizer, dtype=args.dtype, use_bridge=use_bridge)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {record['weights']} of {record['checkpoint']} as {record['architecture']} "
          f"({record['converter']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
