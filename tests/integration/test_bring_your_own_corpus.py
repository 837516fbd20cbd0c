"""README "Bring your own corpus": its commands run, shortened, on a small corpus made here.

A user's corpus meets what the bundled one never does: no tokenizer of its own, no marked answers
under the default `data.rlp_positions=marked`, a held-out file without marks, and a wish to branch a
baseline from the end of the warm-up (a checkpoint `keep_last` must not delete, resumed from a
directory that need not be called `step_XXXXXXX`). The commands are the README's, checked to be
there verbatim, with a tiny model and schedule appended.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_rlp.config import ConfigError, load_config
from nemo_rlp.preflight import load_inputs
from nemo_rlp.training import checkpoint as ckpt
from nemo_rlp.training import checkpoint_integrity as integrity
from tests.tiny_run import TINY_RUN

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()

BUILD = "python recipes/build_tokenizer.py --input my_corpus.jsonl --output my_tokenizer.json --vocab-size 4096"
MINE = "data.corpus=my_corpus.jsonl data.tokenizer=my_tokenizer.json data.rlp_positions=uniform"
TRAIN_HELDOUT = f"python -m nemo_rlp.train {MINE} eval.corpus=my_heldout.jsonl logging.output_dir=runs/mine"
BRANCH = (f"python -m nemo_rlp.train {MINE} eval=none logging.output_dir=runs/mine_cpt "
          "checkpoint.resume=runs/mine/checkpoints/step_0001200 trainer.schedule.compute_matched_cpt=true")

# The tests' tiny run, keeping what the README's commands set: the evaluation and the default
# keep_steps (the end of the warm-up, here step 2). Every step is saved, the last one kept.
SHORT = [o for o in TINY_RUN if not o.startswith(("eval=", "checkpoint.keep_steps="))] + [
    "trainer.steps=4",
    "trainer.schedule.ntp_warmup_steps=2",
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=1",
]
SHORT_EVAL = ["eval.num_positions=8", "eval.batch_contexts=8"]  # with eval.corpus (eval=none has no keys)
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}

WORDS = ("river stone lamp garden market winter letter window orange silver morning harbor paper "
         "candle forest bridge school kettle mirror ladder blanket pocket").split()
TOWNS = ("Basu", "Mara", "Zufu", "Gapu", "Lomi", "Teka")


def write_corpus(directory: Path) -> None:
    """my_corpus.jsonl (plain documents, no marks) and my_heldout.jsonl (an answer marked per line)."""
    rng = random.Random(7)
    with open(directory / "my_corpus.jsonl", "w") as f:
        for i in range(240):
            town = rng.choice(TOWNS)
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))
            f.write(json.dumps({"text": f"In {town} the {words} cost {rng.randint(2, 99)} coins. Note {i}."}) + "\n")
    with open(directory / "my_heldout.jsonl", "w") as f:
        for i in range(12):
            text = f"The {rng.choice(WORDS)} in {rng.choice(TOWNS)} cost {rng.randint(2, 99)} coins."
            f.write(json.dumps({"text": text, "answers": [text.index(" cost") + 5]}) + "\n")


def command(line: str, *extra: str) -> list[str]:
    """A README line as argv: this Python, the recipe from the repository, `extra` appended."""
    argv = shlex.split(line)
    argv[0] = sys.executable
    if argv[1].startswith("recipes/"):
        argv[1] = str(REPO / argv[1])
    return argv + list(extra)


def run(argv: list[str], cwd: Path, timeout: float = 500) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_the_readme_shows_these_commands():
    for line in (BUILD, TRAIN_HELDOUT, BRANCH, f"python -m nemo_rlp.train {MINE} eval=none logging.output_dir=runs/mine"):
        assert line in README, line


@pytest.mark.timeout(1200)  # about 1 minute alone on 2 cores; far more on a busy machine
def test_own_corpus_tokenizer_training_heldout_and_a_branched_baseline(tmp_path):
    write_corpus(tmp_path)

    built = run(command(BUILD), tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    assert "wrote my_tokenizer.json" in built.stdout
    tokenizer = json.loads((tmp_path / "my_tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    assert specials == {"<pad>": 0, "<|endoftext|>": 1, "<think>": 2, "</think>": 3}

    # The default marked positions on a corpus without marks: exit 2, one line, the fix named.
    unmarked = run(command("python -m nemo_rlp.train data.corpus=my_corpus.jsonl data.tokenizer=my_tokenizer.json "
                           "eval=none", *SHORT), tmp_path)
    assert unmarked.returncode == 2, unmarked.stderr[-3000:]
    assert len(unmarked.stderr.strip().splitlines()) == 1, unmarked.stderr
    assert "data.rlp_positions=uniform" in unmarked.stderr and "data.positions_key" in unmarked.stderr
    assert "Traceback" not in unmarked.stderr + unmarked.stdout

    trained = run(command(TRAIN_HELDOUT, *SHORT, *SHORT_EVAL, "logging.report=true"), tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = tmp_path / "runs" / "mine"
    records = metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert {r["kind"] for r in records} == {"ntp", "rlp"}
    assert json.loads((out / "report" / "summary.json").read_text()).get("evaluation")
    # Every step was saved and keep_last=1 kept the last; the end of the warm-up (the default
    # keep_steps) stayed.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]

    # The baseline branches off from a copy under another name; its step comes from complete.json.
    shutil.copytree(out / "checkpoints" / "step_0000002", tmp_path / "warmup_end")
    branch = BRANCH.replace("runs/mine/checkpoints/step_0001200", "warmup_end")
    branched = run(command(branch, *SHORT), tmp_path)
    assert branched.returncode == 0, branched.stderr[-3000:]
    assert f"resumed from {tmp_path / 'warmup_end'} at step 2" in branched.stdout + branched.stderr
    assert "compute-matched CPT" in branched.stdout + branched.stderr  # the arithmetic, at start-up
    records = metrics(tmp_path / "runs" / "mine_cpt")
    # The RLP run's steps 2-3 (one NTP, one RLP) as NTP steps only, the RLP step's FLOPs included.
    assert records[0]["step"] == 2 and len(records) >= 2 and {r["kind"] for r in records} == {"ntp"}
    assert (tmp_path / "warmup_end" / ckpt.MARKER).is_file()  # resumed from, never moved or deleted


# ------------------------------------------------------------------------------------------------
# The pieces, in process
# ------------------------------------------------------------------------------------------------


def _build_tokenizer_main():
    spec = importlib.util.spec_from_file_location("build_tokenizer", REPO / "recipes" / "build_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["--input", "missing.jsonl"], "corpus file not found: missing.jsonl"),
        ("", ["--input", "c.jsonl"], "c.jsonl is empty"),
        ('{"body": "some text"}\n', ["--input", "c.jsonl"], "no key 'text' (keys present: ['body'])"),
        ("\n\n", ["--input", "c.jsonl", "--format", "text"], "c.jsonl is empty"),
        ('{"text": "a b"}\n', ["--input", "c.jsonl", "--vocab-size", "200"], "vocab_size=200 leaves no room"),
    ],
)
def test_build_tokenizer_errors_name_the_file_and_the_fix(tmp_path, monkeypatch, capsys, setup, args, message):
    monkeypatch.chdir(tmp_path)
    if setup is not None:
        (tmp_path / "c.jsonl").write_text(setup)
    assert _build_tokenizer_main()([*args, "--output", "tok.json"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "tok.json").exists()


def test_build_tokenizer_reads_text_and_keeps_custom_markers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs.txt").write_text("the cat sat on the mat\n\nthe dog sat on the log\n" * 20)
    main = _build_tokenizer_main()
    argv = ["--input", "docs.txt", "--format", "text", "--output", "tok.json", "--vocab-size", "300", "--eod", "<eos>"]
    assert main(argv) == 0
    assert "trained on 40 documents" in capsys.readouterr().out
    from nemo_rlp.data.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tmp_path / "tok.json", eod="<eos>")
    assert (tok.pad_id, tok.eod_id, tok.think_start_id, tok.think_end_id) == (0, 1, 2, 3)
    assert tok.decode(tok.encode("the cat <think> sat</think>")) == "the cat <think> sat</think>"
    assert main(argv) == 1 and "pass --overwrite" in capsys.readouterr().err  # never overwritten silently


def test_unmarked_files_name_the_override_that_fits_their_role(tmp_path):
    write_corpus(tmp_path)
    corpus, heldout = tmp_path / "my_corpus.jsonl", tmp_path / "my_heldout.jsonl"
    with pytest.raises(ConfigError) as err:
        load_inputs(load_config([f"data.corpus={corpus}", "eval=none"]))
    assert str(err.value).startswith("data.corpus:") and "data.rlp_positions=uniform" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_inputs(load_config([f"data.corpus={corpus}", "data.rlp_positions=uniform", f"eval.corpus={corpus}"]))
    assert str(err.value).startswith("eval.corpus:") and "eval=none" in str(err.value)
    inputs = load_inputs(load_config([f"data.corpus={corpus}", "data.rlp_positions=uniform", f"eval.corpus={heldout}"]))
    assert len(inputs.documents) == 240 and len(inputs.eval_positions) == 12


def _fake_checkpoint(path: Path, step: int) -> Path:
    """A complete checkpoint as far as discovery and the integrity check look: marker and manifest."""
    (path / "dist").mkdir(parents=True)
    (path / "dist" / ".metadata").write_bytes(b"meta")
    (path / integrity.MANIFEST).write_text(json.dumps(integrity.manifest_of(path)))
    (path / ckpt.MARKER).write_text(json.dumps({"step": step, "ranks": []}))
    return path


def test_a_checkpoint_of_any_name_is_one_checkpoint_with_its_markers_step(tmp_path):
    renamed = _fake_checkpoint(tmp_path / "warmup_end", 2000)
    assert ckpt.is_one_checkpoint(renamed) and ckpt.marker_step(renamed) == 2000
    assert ckpt.resolve_checkpoint(renamed) == renamed and integrity.problem(renamed) is None
    assert ckpt.checkpoint_step(renamed) is None  # not a step_XXXXXXX directory: not listed, not pruned
    folder = tmp_path / "run"
    _fake_checkpoint(folder / "step_0000010", 10)
    assert not ckpt.is_one_checkpoint(folder) and ckpt.resolve_checkpoint(folder) == folder / "step_0000010"
    # A marker without a step, or a step_XXXXXXX name its marker contradicts, is not resumable.
    (renamed / ckpt.MARKER).write_text(json.dumps({"ranks": []}))
    assert ckpt.marker_step(renamed) is None and "does not name step" in integrity.problem(renamed)
    (folder / "step_0000010" / ckpt.MARKER).write_text(json.dumps({"step": 11, "ranks": []}))
    assert ckpt.marker_step(folder / "step_0000010") is None


def test_keep_steps_are_neither_deleted_nor_counted_by_keep_last(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _fake_checkpoint(tmp_path / ckpt.step_dir_name(step), step)
    _fake_checkpoint(tmp_path / "warmup_end", 2)
    deleted = ckpt.keep_last(tmp_path, 2, keep_steps=[2])
    assert [p.name for p in deleted] == ["step_0000001", "step_0000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002", "step_0000004", "step_0000005", "warmup_end"]


def test_keep_steps_default_to_the_end_of_the_warmup():
    assert load_config([]).checkpoint.keep_steps == [load_config([]).trainer.schedule.ntp_warmup_steps]
    assert load_config(["trainer.schedule.ntp_warmup_steps=30"]).checkpoint.keep_steps == [30]
    assert load_config(["checkpoint.keep_steps=[]"]).checkpoint.keep_steps == []
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_steps"):
        load_config(["checkpoint.keep_steps=[-1]"])
