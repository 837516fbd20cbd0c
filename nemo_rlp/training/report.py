"""The run report, written at the end of a training run into `output_dir/report/`:

    report.md           a Markdown summary: the run's summary table, the training curves (each with
                        its first- and last-fifth mean), the held-out evaluation (log p(x_t) and
                        accuracy without and with a sampled thought, by task, a few examples), and
                        sampled thoughts with their rewards
    reward.png          mean reward per RLP step, shaded +- the reward spread (std across contexts),
                        with its moving average and a dashed line at zero
    reward_pos_frac.png fraction of positive rewards per RLP step
    thought_len.png     mean thought length per RLP step (and the longest thought, if recorded)
    end_marker_rate.png fraction of thoughts closed by the end marker per RLP step
    ntp_loss.png        next-token-prediction loss per NTP step
    summary.json        the summary table, the evaluation, and the first/last-fifth means of the
                        curves above, for tools and tests that should not parse Markdown

The per-step records are those of `metrics.jsonl` (`read_metrics`). Any metric may be missing from
any record: a curve with no values is skipped (and the report says so). When a step was recorded more
than once (a resumed run), the last record wins. Plots are drawn with matplotlib's Agg canvas on a
`Figure` of their own, never through pyplot, so writing a report touches no global plotting state;
matplotlib is imported only when a report is written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

NTP, RLP = "ntp", "rlp"

# One curve per row: png name (also the image's alt text), heading, metric, the kind of step that
# records it, y-axis label, what the first/last-fifth line calls it, and its number format.
CURVES = (
    ("reward", "Reward", "reward_mean", RLP, "reward", "mean reward", "{:+.3f}"),
    ("reward_pos_frac", "Positive rewards", "reward_pos_frac", RLP, "fraction of rewards > 0",
     "fraction of positive rewards", "{:.3f}"),
    ("thought_len", "Thought length", "thought_len_mean", RLP, "tokens", "mean thought length", "{:.1f}"),
    ("end_marker_rate", "End-marker rate", "end_marker_rate", RLP, "fraction of thoughts closed",
     "end-marker rate", "{:.3f}"),
    ("ntp_loss", "NTP loss", "ntp_loss", NTP, "loss (nats / token)", "NTP loss", "{:.4f}"),
)
CONTEXT_CHARS = 80  # a sampled thought's context is shown by its last this-many characters
MAX_EXAMPLES = 8  # evaluation examples shown in the report


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (one JSON object per line; blank lines skipped; a bad line
    raises ValueError naming file and line)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                # A bad line of the file, like one that is not JSON: ValueError, as documented.
                raise ValueError(  # noqa: TRY004
                    f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}"
                )
            records.append(record)
    return records


def first_and_last_fifth(values: Sequence[float]) -> tuple[float | None, float | None]:
    """The means of the first and of the last max(1, n // 5) values; (None, None) when there are none."""
    values = list(values)
    if not values:
        return None, None
    k = max(1, len(values) // 5)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The trailing mean over `window` values (fewer at the start, where fewer exist)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def write_report(
    output_dir: Path,
    records: Sequence[Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    evaluation: Mapping[str, Any] | None,
    summary: Sequence[tuple[str, str]],
    title: str = "nemo-rlp run report",
) -> Path:
    """Write output_dir/report/report.md and its PNG plots; return the path of report.md."""
    report_dir = Path(output_dir) / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    records = _last_record_per_step(records)

    md = [f"# {title}", ""]
    if summary:
        md += ["## Summary", "", "| quantity | value |", "|---|---|"]
        md += [f"| {_cell(name)} | {_cell(value)} |" for name, value in summary]
        md.append("")

    md += ["## Training curves", "", "x axis: optimizer step.", ""]
    fifths = {}
    for name, heading, metric, kind, ylabel, what, fmt in CURVES:
        png = report_dir / f"{name}.png"
        steps, values = _series(records, kind, metric)
        first, last = first_and_last_fifth(values)
        fifths[metric] = {"first": first, "last": last}
        md += [f"### {heading}", ""]
        if not values:
            png.unlink(missing_ok=True)  # no stale plot from an earlier report in the same folder
            md += [f"_No `{metric}` values in the {kind.upper()} records: plot skipped._", ""]
            continue
        fig, ax = _new_axes(f"{heading} per {kind.upper()} step", ylabel)
        if metric == "reward_mean":
            band_steps, means, stds = _series(records, kind, metric, "reward_std")
            if band_steps:
                lo = [m - s for m, s in zip(means, stds)]
                hi = [m + s for m, s in zip(means, stds)]
                ax.fill_between(band_steps, lo, hi, color="C0", alpha=0.15, lw=0, label="± reward std")
            ax.axhline(0.0, color="black", lw=0.8, ls="--")
        _plot_series(ax, steps, values, metric, "C0")
        marker_line = None
        if metric == "reward_mean":  # the reward without the teacher's start-marker term, when logged
            bare_steps, bare = _series(records, kind, "reward_mean_without_marker")
            if bare:
                _plot_series(ax, bare_steps, bare, "reward_mean_without_marker", "C2")
                b_first, b_last = first_and_last_fifth(bare)
                fifths["reward_mean_without_marker"] = {"first": b_first, "last": b_last}
                marker_line = (
                    f"Without the start-marker term (the part of S_ema's deficit that is the no-think teacher's "
                    f"probability of `<think>`, metric `reward_marker_term`): first fifth {b_first:+.3f}; "
                    f"last fifth {b_last:+.3f}."
                )
        if metric == "thought_len_mean":
            max_steps, max_values = _series(records, kind, "thought_len_max")
            if max_values:
                _plot_series(ax, max_steps, max_values, "thought_len_max", "C1")
        ax.legend(fontsize=7, loc="best")
        _save(fig, png)
        md += [f"![{name}]({png.name})", ""]
        fifths_line = f"{what}, first fifth of {kind.upper()} steps: {fmt.format(first)}; last fifth: {fmt.format(last)}"
        md += [f"{fifths_line} ({len(values)} steps)", ""]
        if marker_line:
            md += [marker_line, ""]

    md += _periodic_evaluation_lines(records, report_dir)
    if evaluation is not None:
        md += _evaluation_lines(evaluation)

    md += ["## Sampled thoughts", ""]
    if samples:
        md += ["| step | context | thought | target | reward |", "|---:|---|---|---|---:|"]
        for s in samples:
            md.append(
                f"| {s.get('step', '-')} | {_cell(_tail(s.get('context', '')))} | {_cell(s.get('thought', ''))} "
                f"| {_cell(s.get('target', ''))} | {_number(s.get('reward'), '{:+.3f}')} |"
            )
    else:
        md.append("_No sampled thoughts were recorded._")
    md.append("")

    report = report_dir / "report.md"
    report.write_text("\n".join(md), encoding="utf-8")
    figures = {"summary": dict(summary), "evaluation": evaluation, "fifths": fifths}
    (report_dir / "summary.json").write_text(json.dumps(figures, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    return report


# ----------------------------------------------------------------------------- records


def _last_record_per_step(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records in step order, one per step and kind (the last one given: a resumed run rewrites its
    steps; a periodic evaluation, kind "eval", shares its step with that step's training record);
    records without a step are dropped."""
    by_step = {}
    for record in records:
        if record.get("step") is not None:
            by_step[(int(record["step"]), record.get("kind") == "eval")] = record
    return [by_step[key] for key in sorted(by_step)]


def _series(records, kind: str, *metrics: str) -> tuple[list[int], ...]:
    """(steps, values of each metric) over the records of `kind` (or of no kind) that hold a finite
    number for every one of `metrics`."""
    rows = [
        (int(r["step"]), *(float(r[m]) for m in metrics))
        for r in records
        if r.get("kind", kind) == kind and all(_is_finite_number(r.get(m)) for m in metrics)
    ]
    return tuple(list(column) for column in zip(*rows)) if rows else tuple([] for _ in range(len(metrics) + 1))


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------- plots


def _new_axes(title: str, ylabel: str):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _plot_series(ax, steps: list[int], values: list[float], label: str, color: str) -> None:
    """The raw values, light, and their moving average (window max(1, n // 20)), solid."""
    window = max(1, len(values) // 20)
    ax.plot(steps, values, color=color, alpha=0.35, lw=1, marker="." if len(values) < 50 else None, label=label)
    if window > 1:
        ax.plot(steps, moving_average(values, window), color=color, lw=2, label=f"{label}, moving average ({window} steps)")


def _periodic_evaluation_lines(records: Sequence[Mapping[str, Any]], report_dir: Path) -> list[str]:
    """The held-out accuracy every `eval.every_steps` (kind "eval" records): a plot and a table; nothing
    when the run made no periodic evaluation."""
    png = report_dir / "heldout_accuracy.png"
    steps, plain, think = _series(records, "eval", "heldout_accuracy_no_think", "heldout_accuracy_with_thought")
    if not steps or not any(r.get("kind") == "eval" for r in records):
        png.unlink(missing_ok=True)
        return []
    steps = [s + 1 for s in steps]  # records count steps from 0; the evaluation ran after step s + 1
    fig, ax = _new_axes("Held-out accuracy during the run (eval.every_steps)", "accuracy (%)")
    ax.plot(steps, [100 * v for v in think], color="C0", marker=".", label="with a sampled thought")
    ax.plot(steps, [100 * v for v in plain], color="C1", marker=".", label="no thought")
    ax.legend(fontsize=7, loc="best")
    _save(fig, png)
    md = ["### Held-out accuracy during the run", "", f"![heldout_accuracy]({png.name})", "",
          "| after step | no thought | with a sampled thought |", "|---:|---:|---:|"]
    md += [f"| {s} | {100 * a:.1f}% | {100 * b:.1f}% |" for s, a, b in zip(steps, plain, think)]
    return md + [""]


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, format="png")


# ----------------------------------------------------------------------------- markdown


def _evaluation_lines(evaluation: Mapping[str, Any]) -> list[str]:
    no_think, with_thought = evaluation.get("no_think") or {}, evaluation.get("with_thought") or {}
    lp0, lp1 = no_think.get("logprob"), with_thought.get("logprob")
    acc0, acc1 = no_think.get("accuracy"), with_thought.get("accuracy")
    md = ["## Evaluation", ""]
    if evaluation.get("num_positions") is not None:
        seeds = evaluation.get("thought_seeds", 1)
        md += [f"Over {evaluation['num_positions']} held-out positions, whole answers scored; "
               f"{seeds} sampled thought{'s' if seeds > 1 else ''} per position; ± one standard error.", ""]

    def se(figure: Mapping[str, Any], key: str, scale: float) -> str:
        value = figure.get(key + "_stderr")
        return "" if value is None else f" ± {scale * value:.{3 if scale == 1 else 1}f}"

    md += [
        "| | mean log p(answer) | accuracy |",
        "|---|---:|---:|",
        f"| no thought | {_number(lp0, '{:.3f}')}{se(no_think, 'logprob', 1)} | {_percent(acc0)}{se(no_think, 'accuracy', 100)} |",
        f"| with a sampled thought | {_number(lp1, '{:.3f}')}{se(with_thought, 'logprob', 1)} "
        f"| {_percent(acc1)}{se(with_thought, 'accuracy', 100)} |",
        f"| difference | {_number(_difference(lp1, lp0), '{:+.3f}')} | {_points(_difference(acc1, acc0))} |",
        "",
    ]
    before = evaluation.get("after_warmup")
    if before:  # the same evaluation when the NTP warm-up ended: what RLP (and further NTP) changed
        b0, b1 = before["no_think"]["accuracy"], before["with_thought"]["accuracy"]
        md += [
            f"After the NTP warm-up (step {before.get('step', '?')}), before any RLP step: accuracy "
            f"{_percent(b0)} with no thought and {_percent(b1)} with a sampled thought "
            f"({_points(_difference(b1, b0))} points).",
            "",
            _what_rlp_changed(before, evaluation),
            "",
        ]
    by_task = evaluation.get("by_task") or {}
    if by_task:
        md += [
            "### By task",
            "",
            "| task | positions | accuracy, no thought | accuracy, with thought | difference |",
            "|---|---:|---:|---:|---:|",
        ]
        for task, row in by_task.items():
            a0, a1 = row.get("no_think_accuracy"), row.get("with_thought_accuracy")
            md.append(
                f"| {_cell(task)} | {row.get('num_positions', '-')} | {_percent(a0)} | {_percent(a1)} "
                f"| {_points(_difference(a1, a0))} |"
            )
        md.append("")
    examples = evaluation.get("examples") or []
    if examples:
        shown = examples[:MAX_EXAMPLES]
        md += [
            "### Examples" + (f" (first {len(shown)} of {len(examples)})" if len(shown) < len(examples) else ""),
            "",
            "| context | thought | answer | right, no thought | right, with thought |",
            "|---|---|---|---|---|",
        ]
        for e in shown:
            md.append(
                f"| {_cell(_tail(e.get('context', '')))} | {_cell(e.get('thought', ''))} | {_cell(e.get('target', ''))} "
                f"| {_yes_no(e.get('correct_no_think'))} | {_yes_no(e.get('correct_with_thought'))} |"
            )
        md.append("")
    return md


def _what_rlp_changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """One plain sentence: the held-out figures at the end against the end of the warm-up, and whether
    the change is larger than twice its standard error (the two evaluations' errors combined)."""
    parts = []
    for key, name in (("with_thought", "with a sampled thought"), ("no_think", "with no thought")):
        a, b = before[key], after[key]
        delta = b["accuracy"] - a["accuracy"]
        se = (a.get("accuracy_stderr", 0.0) ** 2 + b.get("accuracy_stderr", 0.0) ** 2) ** 0.5
        verdict = "more than twice its standard error" if abs(delta) > 2 * se > 0 else "within noise"
        parts.append(f"accuracy {name} went from {_percent(a['accuracy'])} to {_percent(b['accuracy'])} "
                     f"({_points(delta)}, {verdict})")
    return ("**What the steps after the warm-up changed** (RLP steps and the NTP steps between them): "
            + "; ".join(parts) + ". `bench/science.py` compares this with the same compute spent on NTP alone.")


def _yes_no(value: Any) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _tail(text: str) -> str:
    text = str(text)
    return text if len(text) <= CONTEXT_CHARS else "…" + text[-CONTEXT_CHARS:]


def _cell(text: Any) -> str:
    """Text for one Markdown table cell, shown as written: line breaks become a visible "↵" and the
    characters Markdown would act on (the cell separator `|`, emphasis, links, HTML tags such as a
    thought's `<think>` marker) are backslash-escaped."""
    text = str(text).replace("\r\n", "\n").replace("\r", "\n").replace("\n", "↵")
    for char in "\\`*_[]<>|~":
        text = text.replace(char, "\\" + char)
    return text


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def _points(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:+.1f} points"


def _jsonable(value: Any) -> Any:
    """For json.dumps: numbers from numpy or torch as floats, anything else as its text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
