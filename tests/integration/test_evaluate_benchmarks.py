"""recipes/evaluate.py: lm-evaluation-harness on a checkpoint of ours, on CPU, offline.

A tiny GPT model is trained for two steps by the trainer (so the checkpoint is a real training
checkpoint: policy, EMA teacher, optimizer), then evaluated on two tasks made here from local JSONL
files, a multiple-choice (log-likelihood) task and a generation task, through the recipe as a user
runs it (a subprocess, with the Hugging Face hub switched off). The figures must be in the results
JSON, with what the run chose (the generation budget, the thought end marker's id).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_rlp.config import load_config
from nemo_rlp.training import benchmarks
from nemo_rlp.training.loop import Trainer

from tests.tiny_run import TINY_RUN

REPO = Path(__file__).resolve().parents[2]

CHOICES = [
    {"question": "Walk 1 road from Basu to", "choices": [" Mara", " Gapu", " Zufu"], "label": 0},
    {"question": "2 + 3 =", "choices": [" 5", " 6", " 7"], "label": 0},
    {"question": "The opposite of up is", "choices": [" left", " down", " over"], "label": 1},
    {"question": "Count: 1, 2, 3,", "choices": [" 5", " 4", " 9"], "label": 1},
]
GENERATIONS = [
    {"prompt": "Walk 1 road from Basu to", "answer": "Mara"},
    {"prompt": "1 + 1 =", "answer": "2"},
    {"prompt": "Count: 4, 5,", "answer": "6"},
]


def _task_files(root: Path) -> Path:
    """Two lm-eval tasks over local JSONL files (lm-eval's `json` dataset builder: nothing downloaded)."""
    tasks = root / "tasks"
    tasks.mkdir()
    for name, rows in (("choice", CHOICES), ("generate", GENERATIONS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (tasks / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'choice.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (tasks / "tiny_generate.yaml").write_text(
        f"task: tiny_generate\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'generate.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "    ignore_case: true\n    ignore_punctuation: true\n"
    )
    bench = root / "tiny_benchmark.yaml"
    bench.write_text(f"name: tiny\ntasks: [tiny_choice, tiny_generate]\nmax_gen_toks: 16\nthink: true\n"
                     f"include_path: {tasks}\nbuiltin_tasks: false\n")
    return bench


def test_the_paper_benchmark_config_names_lm_eval_tasks():
    """conf/benchmark/rlp_paper.yaml loads, and every task in it is one lm-eval 0.4.13 has."""
    from lm_eval.tasks import TaskManager

    bench = benchmarks.load_benchmark("rlp_paper")
    assert bench.think and bench.max_gen_toks >= 8192 and not bench.apply_chat_template
    known = set(TaskManager().all_tasks)
    assert [t for t in bench.tasks if t not in known] == []
    assert benchmarks.load_benchmark("rlp_paper", ["limit=5", "max_gen_toks=1024"]).limit == 5


@pytest.mark.timeout(240)
def test_evaluate_recipe_writes_lm_eval_figures_for_a_tiny_checkpoint(tmp_path):
    overrides = [o for o in TINY_RUN if not o.startswith("model=")]
    Trainer(load_config(["model=tiny_gpt", *overrides, "trainer.steps=2", "trainer.schedule.ntp_warmup_steps=2"]),
            tmp_path / "run").train()
    bench = _task_files(tmp_path)
    out = tmp_path / "results" / "tiny.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "evaluate.py"), "--checkpoint", str(tmp_path / "run" / "checkpoints"),
         "--benchmark", str(bench), "--out", str(out), "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads(out.read_text())
    choice, generate = results["results"]["tiny_choice"], results["results"]["tiny_generate"]
    assert 0.0 <= choice["acc,none"] <= 1.0 and choice["acc_stderr,none"] >= 0.0
    assert 0.0 <= generate["exact_match,none"] <= 1.0
    assert results["n-samples"]["tiny_choice"]["effective"] == len(CHOICES)
    assert results["n-samples"]["tiny_generate"]["effective"] == len(GENERATIONS)
    ours = results["nemo_rlp"]
    assert ours["weights"] == "policy" and ours["max_gen_toks"] == 16
    assert ours["think_end_token"] == 3 and ours["think_end"] == "</think>"  # the bundled tokenizer's id
    assert "tiny_choice" in done.stdout  # lm-eval's table
    exported = json.loads((out.parent / "tiny_hf" / "export.json").read_text())
    assert exported["architecture"] == ["LlamaForCausalLM"]  # tiny_gpt has no QK norms
