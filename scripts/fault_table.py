"""Rerun the fault cases of issue 21 through the real entry point on the tiny config and print a
Markdown table: case, exit status, the message a user sees, verdict.

    PYTHONPATH=. python scripts/fault_table.py [GROUP ...]    # default: every group below

Linux only; the disk-full and read-only cases mount small tmpfs file systems (root). Work files go
to $FAULT_TABLE_DIR (default /tmp/nemo_rlp_fault_table). About 10 minutes on 2 idle cores.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.tiny_run import TINY_RUN  # noqa: E402

BASE = Path(os.environ.get("FAULT_TABLE_DIR", "/tmp/nemo_rlp_fault_table"))
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
FAST = [*TINY_RUN, "trainer.schedule.ntp_warmup_steps=1"]
rows: list[tuple] = []


class Detail:
    """The last `run`'s stderr and CPU time (for the bad-input cases' one-line and time checks)."""

    stderr = ""
    cpu_s = 0.0


def run(args, cwd, timeout=600) -> tuple[int, str, float]:
    """Run the entry point to its end: (exit status, stdout and stderr, wall seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "nemo_rlp.train", *args], cwd=cwd, env=ENV, capture_output=True,
                       text=True, timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    Detail.stderr = p.stderr
    Detail.cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return p.returncode, p.stdout + p.stderr, time.monotonic() - start


def popen(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "nemo_rlp.train", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_line(p, pattern, lines):
    for line in p.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return True
    return False


def pick(log, *patterns):
    for pat in patterns:
        for line in log.splitlines():
            if re.search(pat, line):
                return re.sub(r"^\[?[\d\-: ,]*\]?\s*(\[[^\]]*\])?\s*", "", line.strip())[:230]
    return "(no match) " + log.strip().splitlines()[-1][:200] if log.strip() else ""


def row(case, rc, msg, ok, secs=None):
    rows.append((case, rc, msg.replace("|", "\\|"), ("ok" if ok else "FAIL") + (f" ({secs:.1f} s)" if secs else "")))
    print(rows[-1], flush=True)


def metrics(out):
    return [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]


def fresh(name):
    d = BASE / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def base_run(name, steps=4, extra=()):
    out = fresh(name) / "run"
    rc, log, _ = run([*FAST, f"trainer.steps={steps}", "checkpoint.every_steps=1", "checkpoint.keep_last=8",
                      f"logging.output_dir={out}", *extra], cwd=out.parent)
    assert rc == 0, log[-2000:]
    return out


def damage_cases():
    shard = lambda d: max((d / "dist").glob("*.distcp"), key=lambda p: p.stat().st_size)
    damages = {
        "truncated shard in newest checkpoint": lambda d: os.truncate(shard(d), 598),
        "deleted shard in newest checkpoint": lambda d: shard(d).unlink(),
        "garbage in newest dist/.metadata": lambda d: (d / "dist/.metadata").write_bytes(b"garbage" * 100),
        "deleted rank_state file in newest": lambda d: (d / "rank_state/rank00000.pt").unlink(),
        "garbage in newest complete.json": lambda d: (d / "complete.json").write_text("{garbage"),
    }
    template = base_run("template", steps=3)
    for case, harm in damages.items():
        out = fresh("dmg") / "run"
        shutil.copytree(template, out)
        harm(out / "checkpoints/step_0000003")
        rc, log, secs = run([*FAST, "trainer.steps=5", "checkpoint.every_steps=1", "checkpoint.keep_last=8",
                             f"logging.output_dir={out}"], cwd=out.parent)
        ok = rc == 0 and "resumed from" in log and "step_0000002 at step 2" in log and metrics(out) == list(range(5))
        row(case, rc, pick(log, "CHECKPOINT DAMAGED"), ok, secs)
    out = fresh("older") / "run"
    shutil.copytree(template, out)
    rc, log, secs = run([*FAST, "trainer.steps=5", f"checkpoint.resume={out}/checkpoints/step_0000001",
                         f"logging.output_dir={out}"], cwd=out.parent)
    row("explicit checkpoint.resume=<older step>", rc, pick(log, "resumed from"),
        rc == 0 and "step_0000001 at step 1" in log, secs)
    rc, log, secs = run([*FAST, "trainer.steps=5", "model.hidden_size=96", f"checkpoint.resume={template}/checkpoints",
                         f"logging.output_dir={fresh('mismatch')}/run"], cwd=BASE)
    row("checkpoint of another model size", rc, pick(log, "config error"), rc == 2 and "model.hidden_size" in log, secs)


def orphan_case():
    d = fresh("orphans")
    p = popen([*FAST, "trainer.steps=500", "checkpoint.every_steps=1", "checkpoint.async_save=true",
               f"logging.output_dir={d}/run"], cwd=d)
    lines = []
    wait_line(p, r"step +3/500 ", lines)
    kids = psutil.Process(p.pid).children(recursive=True)
    p.kill(); p.wait()
    time.sleep(5)
    alive = [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
    row("kill -9 of the trainer (async save)", -9, f"{len(kids)} helper processes before, {len(alive)} alive 5 s after",
        not alive)
    for k in alive:
        k.kill()


def disk_full_case():
    d = fresh("diskfull")
    mount = d / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4608k", "tmpfs", str(mount)], check=True)
    try:
        rc, log, secs = run([*FAST, "trainer.steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=8",
                             f"logging.output_dir={d}/run", f"checkpoint.dir={mount}"], cwd=d)
        left = sorted(p.name for p in mount.iterdir() if p.name != ".lock")
        row("disk full during a save (4.5 MiB tmpfs)", rc, pick(log, "checkpoint error"),
            rc == 1 and "no space left" in log and left == ["step_0000001"], secs)
        rc, log, secs = run([*FAST, "trainer.steps=3", f"logging.output_dir={d}/run", f"checkpoint.dir={mount}",
                             "checkpoint.every_steps=0"], cwd=d)
        row("  ... the same command again (disk still full)", rc,
            pick(log, "resumed from") + "; then again: " + pick(log, "checkpoint error")[:60] + "...",
            "step_0000001 at step 1" in log and rc == 1 and "no space left" in log, secs)
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def history_cases():
    d = fresh("default_dir")
    args = [*FAST, "trainer.steps=8", "checkpoint.every_steps=3"]
    p = popen(args, cwd=d)
    wait_line(p, r"step +5/8 ", [])
    p.kill(); p.wait()
    rc, log, secs = run(args, cwd=d)
    (run_dir,) = [x for x in (d / "outputs").iterdir() if (x / "checkpoints").is_dir()]
    row("kill -9, rerun with the default output dir", rc, f"one metrics.jsonl in outputs/{run_dir.name}: steps {metrics(run_dir)}",
        rc == 0 and metrics(run_dir) == list(range(8)), secs)
    rc, log, secs = run([*args, "logging.report=true"], cwd=d)
    pngs = sorted(x.name for x in (run_dir / "report").glob("*.png"))
    row("rerun of a finished run (report)", rc, f"report plots: {', '.join(pngs)}", rc == 0 and "ntp_loss.png" in pngs, secs)
    rc, log, secs = run([*args, "trainer.steps=3", "checkpoint.resume=never"], cwd=d)
    row("checkpoint.resume=never in a used directory", rc, f"metrics steps {metrics(run_dir)}; " + pick(log, "starting another history"),
        rc == 0 and metrics(run_dir) == [0, 1, 2], secs)
    out = fresh("crash_first") / "run"
    p = popen([*FAST, "trainer.steps=6", "checkpoint.every_steps=0", f"logging.output_dir={out}"], cwd=out.parent)
    wait_line(p, r"step +3/6 ", [])
    p.kill(); p.wait()
    rc, log, secs = run([*FAST, "trainer.steps=6", "checkpoint.every_steps=0", f"logging.output_dir={out}"], cwd=out.parent)
    row("crash before the first checkpoint, rerun", rc, f"metrics steps {metrics(out)}", rc == 0 and metrics(out) == list(range(6)), secs)


def lock_and_signal_cases():
    d = fresh("lock")
    args = [*FAST, "trainer.steps=500", "checkpoint.every_steps=0", f"logging.output_dir={d}/run"]
    p = popen(args, cwd=d)
    lines = []
    wait_line(p, r"step +2/500 ", lines)
    rc, log, secs = run(args, cwd=d)
    row("second run on the same output dir", rc, pick(log, "config error"), rc == 2 and f"PID {p.pid}" in log, secs)
    os.killpg(p.pid, signal.SIGINT)
    lines += p.stdout.readlines()
    rc = p.wait()
    log = "".join(lines)
    row("SIGINT (Ctrl-C) to the process group", rc, pick(log, "preempted"), rc == 75 and "KeyboardInterrupt" not in log)
    p = popen(args, cwd=d)
    lines = []
    wait_line(p, r"step +\d+/500 ", lines)
    os.killpg(p.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    rc = p.wait(timeout=60)
    row("two SIGINTs in a row", rc, "killed by SIGINT (the default action)" if rc == -2 else "".join(p.stdout.readlines())[-200:],
        rc in (-2, 75))


def bad_input_cases():
    from nemo_rlp.data.indexed import write_indexed_dataset
    from nemo_rlp.data.tokenizer import train_byte_level_bpe
    d = fresh("bad")
    (d / "empty.jsonl").write_text("")
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (d / "nokey.jsonl").write_text('{"body": "no text key here"}\n')
    train_byte_level_bpe(["some text"] * 4, vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"]).save(str(d / "nomarkers.json"))
    write_indexed_dataset(d / "corpus", [list(range(1, 40))] * 20, vocab_size=1024)
    shutil.copy(d / "corpus.idx", d / "short.idx")
    (d / "short.bin").write_bytes((d / "corpus.bin").read_bytes()[:100])
    (d / "a_file").write_text("")
    ro = d / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    idx = ["data.format=indexed", "data.rlp_positions=uniform"]
    cases = {
        "empty corpus file": [f"data.corpus={d}/empty.jsonl"],
        "bad JSON line": [f"data.corpus={d}/bad.jsonl"],
        "missing text key": [f"data.corpus={d}/nokey.jsonl"],
        "tokenizer without markers": [f"data.tokenizer={d}/nomarkers.json"],
        "indexed .bin truncated": [*idx, f"data.corpus={d}/short"],
        "data.corpus=prefix.bin (indexed)": [*idx, f"data.corpus={d}/corpus.bin"],
        "unknown key trainer.stpes=3": ["trainer.stpes=3"],
        "unknown key +trainer.stpes=3": ["+trainer.stpes=3"],
        "output dir below a file": [f"logging.output_dir={d}/a_file/run"],
        "read-only output dir": [f"logging.output_dir={ro}/run"],
    }
    try:
        for case, extra in cases.items():
            rc, log, secs = run([*TINY_RUN, "eval=none", *extra, f"hydra.run.dir={d}/hydra"], cwd=d)
            lines = Detail.stderr.strip().splitlines()
            ok = rc == 2 and len(lines) == 1 and Detail.cpu_s < 10
            row(case, rc, lines[-1] if lines else "", ok, None)
            rows[-1] = (*rows[-1][:3], rows[-1][3] + f" ({secs:.1f} s wall, {Detail.cpu_s:.1f} s CPU, load {os.getloadavg()[0]:.0f})")
    finally:
        subprocess.run(["umount", "-l", str(ro)])


if __name__ == "__main__":
    for part in sys.argv[1:] or ["damage_cases", "orphan_case", "disk_full_case", "history_cases",
                                 "lock_and_signal_cases", "bad_input_cases"]:
        try:
            globals()[part]()
        except Exception as e:
            row(part, "-", f"harness error: {type(e).__name__}: {e}"[:200], False)
    print("\n| case | exit | message | verdict |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
