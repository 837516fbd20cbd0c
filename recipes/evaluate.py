"""Evaluate a checkpoint on benchmarks with lm-evaluation-harness (`pip install -e '.[eval]'`).

    python recipes/evaluate.py --checkpoint /ckpt/run/checkpoints --benchmark rlp_paper --out results/run.json
    python recipes/evaluate.py --hf /ckpt/hf/rlp-1000 --benchmark rlp_paper --out results/rlp-1000.json
    python recipes/evaluate.py --checkpoint ... --benchmark rlp_paper --out ... limit=50 max_gen_toks=4096

--checkpoint (a training checkpoint, a run's checkpoint folder, or an import) is first exported to a
Hugging Face folder (--export-dir, default OUT's name + `_hf`; recipes/export_checkpoint.py does the
same), which lm-eval's own Hugging Face model runs; --hf evaluates an exported folder directly.
--benchmark is a name in nemo_rlp/conf/benchmark/ (`rlp_paper`: the paper's tasks, thinking allowed)
or a YAML file of the same keys; trailing `key=value` arguments override them. Why the exported model
and not a wrapper around our policy, and what "thinking allowed" does: nemo_rlp/training/benchmarks.py.

Writes OUT: lm-eval's results (per task and metric, with standard errors, the task configs and
versions) and, under "nemo_rlp", the benchmark config, the checkpoint and the generation budget used;
prints lm-eval's table. Exit status: 0 done; 2 a bad argument (one line on stderr).
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
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint, a run's checkpoint folder, or an import")
    source.add_argument("--hf", help="a Hugging Face folder (recipes/export_checkpoint.py's output)")
    parser.add_argument("--benchmark", default="rlp_paper", help="a name in nemo_rlp/conf/benchmark/ or a YAML file")
    parser.add_argument("--out", required=True, help="the results JSON to write")
    parser.add_argument("--ema-teacher", action="store_true", help="evaluate the checkpoint's EMA teacher")
    parser.add_argument("--export-dir", help="where to export --checkpoint (default: OUT's name + _hf)")
    parser.add_argument("--device", default=None, help="cuda, cuda:0, cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", help="the dtype lm-eval loads the model in (bfloat16 on GPU)")
    parser.add_argument("overrides", nargs="*", help="benchmark config overrides, key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_recipe_logging()
    import torch

    from nemo_rlp.training import benchmarks

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        bench = benchmarks.load_benchmark(args.benchmark, args.overrides)
        results = benchmarks.evaluate_checkpoint(args.checkpoint, args.hf, bench, args.out, device,
                                                 teacher=args.ema_teacher, dtype=args.dtype,
                                                 export_dir=args.export_dir)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(benchmarks.table(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
