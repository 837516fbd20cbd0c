"""Benchmark evaluation of a checkpoint with lm-evaluation-harness (`lm-eval`, the `eval` extra).

The model lm-eval runs is the checkpoint **exported to a Hugging Face folder** (`nemo_rlp.training.hf_checkpoint`)
and loaded by lm-eval's own `HFLM`, not an `lm_eval` model class written around our megatron-core
policy. Why: `HFLM` is lm-eval's reference implementation of everything a task asks (log-likelihoods
of continuations with lm-eval's own context/continuation tokenization, rolling log-likelihoods,
generation with stop sequences, batching, chat templates, thought stripping), and the export is
checked to give the same logits as our model (tests/unit/test_hf_conversion.py). A wrapper around our
policy would rewrite those request types on our model handle and have to match lm-eval's conventions
by hand, for no gain in what is measured. What it costs: one export per evaluation (seconds for a
small model, a copy of the weights on disk).

Thinking, as the paper allows it (`BenchmarkConfig.think`, `max_gen_toks`): generation tasks may
write a long thought before the answer (a generous `max_gen_toks` for every generation task), and the
answer graded is the text after the model's last `</think>` (lm-eval's `think_end_token`, given as the
token's id so that it works whether or not the tokenizer treats it as special); prompts are the
tasks' own, with no chat template unless asked. The thought is not forced: no `<think>` is inserted
into the prompt; the model thinks when it has learned to.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from nemo_rlp.config import CONF_DIR, ConfigError

log = logging.getLogger("nemo_rlp")

BENCHMARK_DIR = CONF_DIR / "benchmark"


@dataclass
class BenchmarkConfig:
    """One evaluation: which lm-eval tasks, and how generation runs (conf/benchmark/*.yaml)."""

    name: str = "custom"
    tasks: list[str] = field(default_factory=list)
    # New tokens a generation task may write (every generation task; a task's own value is replaced).
    max_gen_toks: int = 32768
    # Grade the text after the model's last thought end marker (the run's rlp.think_end).
    think: bool = True
    apply_chat_template: bool = False
    gen_kwargs: dict = field(default_factory=dict)
    num_fewshot: Optional[int] = None
    batch_size: Union[int, str] = 1
    limit: Optional[float] = None
    # A folder of task YAMLs of your own; `builtin_tasks: false` skips indexing lm-eval's (faster).
    include_path: Optional[str] = None
    builtin_tasks: bool = True


def load_benchmark(name_or_path: str, overrides: list[str] = ()) -> BenchmarkConfig:
    """A benchmark config: a name in nemo_rlp/conf/benchmark/ or a YAML file, with `key=value` overrides."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(name_or_path)
    if not path.is_file():
        path = BENCHMARK_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in BENCHMARK_DIR.glob("*.yaml")))
        raise ConfigError(f"--benchmark {name_or_path!r}: neither a YAML file nor a name in {BENCHMARK_DIR} ({known})")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(BenchmarkConfig), OmegaConf.load(path),
                                 OmegaConf.from_dotlist(list(overrides)))
        bench = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"benchmark config {path}: {str(err).splitlines()[0]}") from None
    if not bench.tasks:
        raise ConfigError(f"benchmark config {path}: `tasks` is empty; list lm-eval task names")
    if bench.max_gen_toks < 1:
        raise ConfigError(f"benchmark config {path}: max_gen_toks={bench.max_gen_toks} must be positive")
    return bench


def _lm_eval():
    try:
        import lm_eval
    except ImportError as err:
        raise ConfigError(f"the benchmark evaluation needs lm-evaluation-harness ({err}): "
                          "pip install -e '.[eval]' (lm-eval 0.4.13)") from None
    return lm_eval


def _model_limits(hf_dir: Path, bench: BenchmarkConfig, think_end: str) -> dict[str, Any]:
    """HFLM's arguments that depend on the exported model: the thought end marker's id (None when the
    tokenizer has no single token for it) and a generation budget that fits the model's context."""
    import transformers

    config = json.loads((hf_dir / "config.json").read_text())
    context = int(config.get("max_position_embeddings") or 2048)
    max_gen = bench.max_gen_toks
    if max_gen >= context:
        max_gen = context // 2
        log.warning("max_gen_toks=%d does not fit the model's %d-token context: lowered to %d",
                    bench.max_gen_toks, context, max_gen)
    think_id = None
    if bench.think:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
        ids = tokenizer.encode(think_end, add_special_tokens=False)
        if len(ids) == 1:
            think_id = ids[0]
        else:
            log.warning("%r is not one token of the exported tokenizer: thoughts are not stripped before grading",
                        think_end)
    return {"max_gen_toks": max_gen, "think_end_token": think_id}


def run_lm_eval(hf_dir: str | Path, bench: BenchmarkConfig, device: str, dtype: str = "float32",
                think_end: str = "</think>") -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of the Hugging Face folder `hf_dir` (HFLM) on `bench`'s tasks:
    lm-eval's results dict, with what this run chose under `"nemo_rlp"`."""
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager

    hf_dir = Path(hf_dir)
    limits = _model_limits(hf_dir, bench, think_end)
    model_args: dict[str, Any] = {"pretrained": str(hf_dir), "dtype": dtype}
    if limits["think_end_token"] is not None:
        model_args["think_end_token"] = limits["think_end_token"]
    task_manager = TaskManager(include_path=bench.include_path, include_defaults=bench.builtin_tasks)
    unknown = [t for t in bench.tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ConfigError(f"lm-eval knows no task {', '.join(map(repr, unknown))} "
                          f"(lm-eval {lm_eval.__version__ if hasattr(lm_eval, '__version__') else ''}"
                          f"{', include_path ' + bench.include_path if bench.include_path else ''})")
    results = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=list(bench.tasks), num_fewshot=bench.num_fewshot,
        batch_size=bench.batch_size, device=device, limit=bench.limit, task_manager=task_manager,
        gen_kwargs={"max_gen_toks": limits["max_gen_toks"], **bench.gen_kwargs},
        apply_chat_template=bench.apply_chat_template, log_samples=False,
    )
    results["nemo_rlp"] = {"benchmark": asdict(bench), "hf_model": str(hf_dir.resolve()), **limits,
                           "think_end": think_end if limits["think_end_token"] is not None else None}
    return results


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """The results as JSON (lm-eval's own serialisation of numpy values and the like)."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    return path


def table(results: dict[str, Any]) -> str:
    """lm-eval's markdown table of the figures."""
    from lm_eval.utils import make_table

    return make_table(results)


def evaluate_checkpoint(checkpoint: Optional[str | Path], hf_dir: Optional[str | Path], bench: BenchmarkConfig,
                        out: str | Path, device: str, teacher: bool = False, dtype: str = "float32",
                        export_dir: Optional[str | Path] = None) -> dict[str, Any]:
    """Export `checkpoint` (policy, or `teacher`) to `export_dir` (default: beside the results) and
    evaluate it; or evaluate an already exported Hugging Face folder `hf_dir`. Writes `out` (JSON)."""
    from nemo_rlp.training.hf_checkpoint import export_checkpoint

    _lm_eval()  # before the export: fail early without lm-eval
    out = Path(out)
    if (checkpoint is None) == (hf_dir is None):
        raise ConfigError("pass exactly one of --checkpoint (ours) and --hf (an exported Hugging Face folder)")
    think_end = "</think>"
    if checkpoint is not None:
        hf_dir = Path(export_dir) if export_dir else out.with_suffix("").with_name(out.stem + "_hf")
        record = export_checkpoint(checkpoint, hf_dir, teacher=teacher)
        think_end = record["think_end_token"]
    elif (Path(hf_dir) / "export.json").is_file():
        think_end = json.loads((Path(hf_dir) / "export.json").read_text()).get("think_end_token", think_end)
    results = run_lm_eval(hf_dir, bench, device, dtype, think_end)
    if checkpoint is not None:
        results["nemo_rlp"]["checkpoint"] = str(Path(checkpoint).resolve())
        results["nemo_rlp"]["weights"] = "ema_teacher" if teacher else "policy"
    write_results(results, out)
    return results
