"""The run report (nemo_rlp.training.report): report.md, its PNG plots and summary.json, from
synthetic metric records."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from nemo_rlp.training.report import first_and_last_fifth, moving_average, read_metrics, write_report

PNGS = ("reward.png", "reward_pos_frac.png", "thought_len.png", "end_marker_rate.png", "ntp_loss.png")

EVALUATION = {
    "num_positions": 200,
    "thought_seeds": 3,
    "no_think": {"logprob": -1.9, "logprob_stderr": 0.1, "accuracy": 0.41, "accuracy_stderr": 0.035},
    "with_thought": {"logprob": -0.7, "logprob_stderr": 0.05, "accuracy": 0.78, "accuracy_stderr": 0.02},
    "examples": [
        {"context": "2 4 6 8", "thought": "add two", "target": "10", "correct_no_think": False,
         "correct_with_thought": True},
    ],
    "by_task": {"chain": {"num_positions": 50, "no_think_accuracy": 0.3, "with_thought_accuracy": 0.9}},
    "after_warmup": {
        "step": 10,
        "no_think": {"logprob": -2.0, "accuracy": 0.40, "accuracy_stderr": 0.035},
        "with_thought": {"logprob": -1.0, "accuracy": 0.50, "accuracy_stderr": 0.035},
    },
}
SUMMARY = [("steps (NTP / RLP)", "40 (20 / 20)"), ("wall time", "12.5 s")]


def run_records(steps: int = 40) -> list[dict]:
    """Steps alternate NTP (even) and RLP (odd); the i-th RLP step has reward -0.5 + 0.05 i and the
    j-th NTP step loss 6 - 0.1 j."""
    records = []
    for step in range(steps):
        if step % 2 == 0:
            j = step // 2
            records.append({"step": step, "kind": "ntp", "step_seconds": 0.09, "ntp_loss": 6.0 - 0.1 * j,
                            "grad_norm": 1.2, "lr": 1e-3})
        else:
            i = step // 2
            records.append({
                "step": step, "kind": "rlp", "step_seconds": 0.3, "reward_mean": -0.5 + 0.05 * i,
                "reward_std": 0.8, "reward_pos_frac": i / 20, "thought_len_mean": 10.0 + i,
                "thought_len_max": 20.0 + i, "end_marker_rate": 0.5, "clip_frac": 0.0,
                "reward_marker_term": 0.4, "reward_mean_without_marker": -0.9 + 0.05 * i,
            })
    return records


def samples() -> list[dict]:
    return [
        {"step": 1, "context": "x" * 200 + "THE END", "thought": "a | b\nc <think>", "target": " 7", "reward": 0.25},
        {"step": 3, "context": "short", "thought": "plain", "target": "y", "reward": -1.5},
    ]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    path = write_report(out, run_records(), samples(), EVALUATION, SUMMARY, title="test run")
    return path, path.read_text(encoding="utf-8"), json.loads((path.parent / "summary.json").read_text())


def test_report_md_and_every_plot(report):
    path, md, _ = report
    assert path.name == "report.md" and path.parent.name == "report"
    assert md.startswith("# test run\n")
    for png in PNGS:
        assert f"![{png[:-4]}]({png})" in md
        data = (path.parent / png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(path.parent / png) as image:
            assert image.format == "PNG"
            assert image.size == (600, 350)  # 6 x 3.5 inches at 100 dpi
    assert "skipped" not in md


def test_summary_table_at_the_top(report):
    _, md, figures = report
    assert md.index("| steps (NTP / RLP) | 40 (20 / 20) |") < md.index("## Training curves")
    assert figures["summary"] == dict(SUMMARY)


def test_fifths(report):
    _, md, figures = report
    fifths = figures["fifths"]
    # 20 RLP steps: the fifths are the first and last 4 (i = 0..3 and 16..19).
    assert fifths["reward_mean"]["first"] == pytest.approx(-0.5 + 0.05 * 1.5)
    assert fifths["reward_mean"]["last"] == pytest.approx(-0.5 + 0.05 * 17.5)
    assert fifths["reward_pos_frac"]["first"] == pytest.approx(1.5 / 20)
    assert fifths["thought_len_mean"]["last"] == pytest.approx(27.5)
    assert fifths["end_marker_rate"] == {"first": pytest.approx(0.5), "last": pytest.approx(0.5)}
    assert fifths["ntp_loss"]["first"] == pytest.approx(5.85)
    assert fifths["ntp_loss"]["last"] == pytest.approx(4.25)
    assert "mean reward, first fifth of RLP steps: -0.425; last fifth: +0.375" in md
    # The reward line sits under the reward plot.
    assert md.index("![reward](reward.png)") < md.index("mean reward, first fifth") < md.index("### Positive rewards")


def test_evaluation_tables(report):
    _, md, figures = report
    assert "Over 200 held-out positions, whole answers scored; 3 sampled thoughts per position" in md
    assert "| no thought | -1.900 ± 0.100 | 41.0% ± 3.5 |" in md
    assert "| with a sampled thought | -0.700 ± 0.050 | 78.0% ± 2.0 |" in md
    assert "| difference | +1.200 | +37.0 points |" in md
    assert "| chain | 50 | 30.0% | 90.0% | +60.0 points |" in md
    assert "| 2 4 6 8 | add two | 10 | no | yes |" in md
    # Against the end of the warm-up, with a verdict from the standard errors.
    assert ("accuracy with a sampled thought went from 50.0% to 78.0% (+28.0 points, more than twice its "
            "standard error)") in md
    assert "accuracy with no thought went from 40.0% to 41.0% (+1.0 points, within noise)" in md
    assert figures["evaluation"] == EVALUATION


def test_reward_without_the_start_marker_term(report):
    _, md, figures = report
    assert figures["fifths"]["reward_mean_without_marker"]["first"] == pytest.approx(-0.9 + 0.05 * 1.5)
    assert "Without the start-marker term" in md and "last fifth +0.)" not in md
    assert md.index("![reward](reward.png)") < md.index("Without the start-marker term") < md.index("### Positive")


def test_sampled_thoughts_are_escaped_and_truncated(report):
    _, md, _ = report
    assert "a \\| b↵c \\<think\\>" in md
    rows = [line for line in md.splitlines() if line.startswith(("| 1 |", "| 3 |"))]
    assert len(rows) == 2
    for row in rows:  # six cell separators: the table is not broken by the thought's "|" or newline
        assert len(re.findall(r"(?<!\\)\|", row)) == 6
    context = rows[0].split(" | ")[1]
    assert context == "…" + ("x" * 200 + "THE END")[-80:]
    assert "| +0.250 |" in rows[0] and "| -1.500 |" in rows[1]


def test_missing_metrics_skip_their_plots(tmp_path):
    records = [
        {"step": 0, "kind": "rlp", "reward_mean": 0.1},
        {"step": 1, "kind": "rlp", "reward_mean": float("nan"), "thought_len_mean": None},
        {"step": 2, "kind": "rlp", "reward_pos_frac": True, "end_marker_rate": 0.9},
        {"kind": "rlp", "reward_mean": 5.0},  # no step: cannot be placed, dropped
    ]
    path = write_report(tmp_path, records, [], None, [])
    md = path.read_text()
    report_dir = path.parent
    assert (report_dir / "reward.png").is_file() and (report_dir / "end_marker_rate.png").is_file()
    for name, metric in [("thought_len", "thought_len_mean"), ("ntp_loss", "ntp_loss"),
                         ("reward_pos_frac", "reward_pos_frac")]:
        assert not (report_dir / f"{name}.png").exists()
        assert f"_No `{metric}` values in the" in md and f"]({name}.png)" not in md
    assert md.count("plot skipped") == 3
    assert "## Evaluation" not in md and "No sampled thoughts" in md
    fifths = json.loads((report_dir / "summary.json").read_text())["fifths"]
    assert fifths["reward_mean"] == {"first": 0.1, "last": 0.1}
    assert fifths["ntp_loss"] == {"first": None, "last": None}


def test_no_records_at_all(tmp_path):
    md = write_report(tmp_path, [], [], None, []).read_text()
    assert md.count("plot skipped") == len(PNGS)


def test_a_rerun_removes_a_plot_it_no_longer_draws(tmp_path):
    write_report(tmp_path, run_records(10), [], None, [])
    assert (tmp_path / "report" / "ntp_loss.png").is_file()
    write_report(tmp_path, [r for r in run_records(10) if r["kind"] == "rlp"], [], None, [])
    assert not (tmp_path / "report" / "ntp_loss.png").exists()


def test_duplicate_steps_keep_the_last_and_order_by_step(tmp_path):
    records = [
        {"step": 4, "kind": "rlp", "reward_mean": 4.0},
        {"step": 0, "kind": "rlp", "reward_mean": 100.0},  # replaced by the later record of step 0
        {"step": 1, "kind": "rlp", "reward_mean": 1.0},
        {"step": 2, "kind": "rlp", "reward_mean": 2.0},
        {"step": 0, "kind": "rlp", "reward_mean": 0.0},
        {"step": 3, "kind": "rlp", "reward_mean": 3.0},
        {"step": 4, "kind": "rlp", "reward_mean": -4.0},
    ]
    path = write_report(tmp_path, records, [], None, [])
    fifths = json.loads((path.parent / "summary.json").read_text())["fifths"]
    assert fifths["reward_mean"] == {"first": 0.0, "last": -4.0}
    assert "(5 steps)" in path.read_text()


def test_first_and_last_fifth():
    assert first_and_last_fifth([]) == (None, None)
    assert first_and_last_fifth([3.0]) == (3.0, 3.0)
    assert first_and_last_fifth([1.0, 2.0, 3.0, 4.0]) == (1.0, 4.0)  # fewer than 5: one value each
    assert first_and_last_fifth([float(v) for v in range(1, 11)]) == (1.5, 9.5)


def test_moving_average():
    assert moving_average([1.0, 2.0, 3.0, 4.0], 1) == [1.0, 2.0, 3.0, 4.0]
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]


def test_read_metrics_round_trip(tmp_path):
    records = run_records(6)
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records[:3]) + "\n\n" + "\n".join(json.dumps(r) for r in records[3:]))
    assert read_metrics(path) == records


@pytest.mark.parametrize("bad", ['{"step": 2, "kind": ', "[1, 2]"])
def test_read_metrics_names_the_bad_line(tmp_path, bad):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n\n' + bad + '\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 3"):
        read_metrics(path)


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, nemo_rlp.training.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_periodic_evaluations_get_a_plot_and_a_table_and_leave_the_curves_alone(tmp_path):
    evals = [{"step": s, "kind": "eval", "step_seconds": 30.0, "heldout_accuracy_no_think": 0.1,
              "heldout_accuracy_with_thought": 0.25 + s / 100} for s in (9, 19)]
    plain = write_report(tmp_path / "plain", run_records(20), [], None, [])
    path = write_report(tmp_path / "evals", run_records(20) + evals, [], None, [])
    text = path.read_text()
    assert (path.parent / "heldout_accuracy.png").is_file()
    assert "| 10 | 10.0% | 34.0% |" in text and "| 20 | 10.0% | 44.0% |" in text
    fifths = lambda p: json.loads((p.parent / "summary.json").read_text())["fifths"]
    assert fifths(path) == fifths(plain)  # an evaluation shares its step with a training record
    assert not (plain.parent / "heldout_accuracy.png").exists() and "Held-out accuracy during" not in plain.read_text()
