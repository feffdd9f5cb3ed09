"""The protocol's page (``docs/QUALITY.md``), its Markdown table and plots, from the summary JSON alone."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from aletheia_lora.files import write_text
from aletheia_lora.plots import save_figure

logger = logging.getLogger(__name__)


def _num(value, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def _spread(stats: dict, fmt: str = ".4f") -> str:
    if stats["mean"] is None:
        return "-"
    text = format(stats["mean"], fmt)
    return text if stats["sd"] is None else f"{text} ± {format(stats['sd'], fmt)}"


def _ratios(seeds: list[dict], key: str) -> str:
    values = [s.get(key) for s in seeds]
    return " / ".join("not reached" if v is None else f"{v:.2f}x" for v in values) or "-"


def gap_lines(summary: dict) -> list[str]:
    """The page's first lines: the question and its answer, a miss stated as a miss."""
    gap = summary["gap"]
    arm = gap["arm"]
    question = (f"Does the default (`{arm}`) reach all-layer LoRA's best test loss in <= {gap['time_limit']}x its "
                "wall time on every task, with equal-time test loss no worse, in every seed?")  # fmt: skip
    if gap.get("why"):
        answer = f"Not answered: the {gap['why']}."
    elif gap["met"] is None:
        answer = "Not known yet: the protocol is incomplete (" + str(len(summary["missing_units"])) + " units to run)."
    else:
        answer = "**Yes.**" if gap["met"] else "**No: a miss.**"
    lines = [question, answer, ""]
    for task, entry in gap["tasks"].items():
        if entry["seeds"]:
            per_seed = "; ".join(
                f"seed {r['seed']}: time {_ratios([r], 'time_to_all_quality')}, "
                f"equal-time loss {_num(r['equal_time_test_loss_vs_all'], '.3f')}x"
                for r in entry["seeds"]
            )
            lines.append(f"- {task}: {'met' if entry['met'] else 'missed'} ({per_seed})")
    return lines


def _rate(arm: dict) -> str:
    rate = _num(arm["learning_rate"], "g")
    return f"{rate} (= {arm['rate_from']})" if arm.get("rate_from") else rate


def extra_lines(entry: dict) -> list[str]:
    """What the arms without a sweep add: where their rate comes from, the freezing timelines, the cache builds."""
    arms = entry["arms"]
    shared = [(name, arm["rate_from"]) for name, arm in arms.items() if arm.get("rate_from")]
    if not shared:
        return []
    lines = [
        "No sweep for "
        + ", ".join(f"`{name}` (the rate `{source}` chose)" for name, source in shared)
        + ": prefix caching changes no loss, only time, and progressive freezing starts as LoRA on every block; "
        "they train every seed at that rate. A cached arm's clock includes the cache's build, charged at step 0.",
        "",
    ]
    for name, arm in arms.items():
        seeds = arm["seeds"]
        if any("frozen_at" in s for s in seeds):
            per_seed = "; ".join(
                f"seed {s['seed']}: " + (", ".join(f"{b}@{step}" for b, step in s["frozen_at"].items()) or "none")
                for s in seeds
            )
            lines.append(f"- `{name}` froze (block@step): {per_seed}")
        if any("cache_build_seconds" in s for s in seeds):
            built = " / ".join(f"{s['cache_build_seconds']:.2f}" for s in seeds)
            lines.append(f"- `{name}` built its prefix cache in {built} s (per seed)")
    return lines + [""]


def task_table(task: str, entry: dict) -> list[str]:
    """The verdict table of one task: every arm at its chosen rate, mean ± sd over the seeds."""
    rows = [
        f"### {task}",
        "",
        "| arm | rate | test loss | equal-time loss vs all | time to all's best | time to 95% of all's drop "
        "| step speedup | forgetting | peak MB (first step) | beats all |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in entry["arms"].items():
        s = arm["summary"]
        rows.append(
            f"| {name} | {_rate(arm)} | {_spread(s['test_loss'])} | "
            f"{_spread(s['equal_time_test_loss_vs_all'], '.3f')} | {_ratios(arm['seeds'], 'time_to_all_quality')} | "
            f"{_ratios(arm['seeds'], 'time_to_bounded_quality')} | {_spread(s['step_speedup'], '.2f')} | "
            f"{_spread(s['forgetting'], '+.4f')} | {_spread(s['first_step_peak_mb'], '.0f')} | "
            f"{'-' if arm['beats_all'] is None else 'yes' if arm['beats_all'] else 'no'} |"
        )
    rows += [""] + extra_lines(entry)
    rates = sorted({k for arm in entry["arms"].values() for k in arm["sweep"]}, key=float)
    rows += [f"Validation loss by learning rate ({task}; each arm's chosen rate is its lowest):", "",
             "| arm | " + " | ".join(rates) + " |", "|---|" + "---|" * len(rates)]  # fmt: skip
    for name, arm in entry["arms"].items():
        if not arm.get("rate_from"):  # the others have no sweep of their own
            rows.append(f"| {name} | " + " | ".join(_num(arm["sweep"].get(r)) for r in rates) + " |")
    return rows + [""]


def time_prediction_lines(summary: dict) -> list[str]:
    """Each arm's training time as the cost model predicted it before training, beside the measured one."""
    info = summary.get("time_prediction")
    if not info or info["max_error"] is None:
        return []
    lines = [
        "## Training time: predicted before training, measured",
        "",
        f"Predicted: the cost model the arms were selected with ({info['cost_model']}; at each unit's own ranks), "
        "from each unit's blocks, its "
        "freeze timeline (the progressive arms: the blocks frozen when they were) and its cache builds "
        "(`aletheia_lora.timeline.predict_timeline`), without timing anything; measured: the unit's training seconds "
        "(its cache build and the freezing rule's decisions included); both over all-layer LoRA's in the same seed. "
        f"Error: predicted / measured - 1, per seed. Largest error {info['max_error']:.1%}, median "
        f"{info['median_error']:.1%}. The units were timed one after another on a 2-core machine whose other core "
        "was mostly busy (another unit or a benchmark), so the measured column carries that load; its spread over the "
        "seeds shows how much.",
        "",
        "| task | arm | predicted time vs all | measured time vs all | error per seed |",
        "|---|---|---|---|---|",
    ]
    unpriced = []
    for task, entry in summary["tasks"].items():
        for name, arm in entry["arms"].items():
            seeds = [s for s in arm["seeds"] if "time_prediction_error" in s]
            if arm["seeds"] and not seeds and name not in unpriced:
                unpriced.append(name)
            if name == "all" or not seeds:
                continue
            s = arm["summary"]
            errors = " / ".join(f"{x['time_prediction_error']:+.1%}" for x in seeds)
            lines.append(
                f"| {task} | {name} | {_spread(s['predicted_time_vs_all'], '.3f')} | "
                f"{_spread(s['time_vs_all'], '.3f')} | {errors} |"
            )
    if unpriced:
        lines += ["", "Not predicted: " + ", ".join(f"`{name}`" for name in unpriced) + "."]
    return lines + [""]


def render_markdown(summary: dict) -> str:
    """The page: the gap first, then the command, then a verdict and sweep table per task."""
    extensions = summary.get("config", {}).get("sweep_extensions", 0)  # absent from runs before the setting
    lines = ["# Quality protocol", ""] + gap_lines(summary) + [""]
    lines += [
        "Made by:",
        "",
        "```",
        summary.get("command", ""),
        "```",
        "",
        "Each arm's learning rate is the validation argmin of its sweep on the first seed (a sweep whose best "
        f"rate was its lowest or highest went one rate further, up to {extensions} times); losses are on a test "
        "split no choice used. Times are ratios of summed step times (evaluation off the clock) to all-layer "
        "LoRA's in the same seed; 'time to all's best' is the time to reach all-layer LoRA's best test loss at "
        "its chosen rate; 'beats all' needs a lower test loss in every seed or by over two standard errors.",
        "",
    ]
    for task, entry in summary["tasks"].items():
        lines += task_table(task, entry)
        if entry.get("plots"):
            lines += [f"![{task}]({p})" for p in entry["plots"]] + [""]
    lines += time_prediction_lines(summary)
    if summary["missing_units"]:
        lines += [f"{len(summary['missing_units'])} units not run yet.", ""]
    return "\n".join(lines)


def plot_task(task: str, entry: dict, folder: Path, name: str) -> list[str]:
    """Held-out test loss vs training seconds (mean over seeds, ±sd band) and validation loss vs rate."""
    try:
        from matplotlib.figure import Figure
    except ImportError:  # plots are optional
        return []
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    for arm, data in entry["arms"].items():
        curve = data.get("curve") or []
        if curve:
            xs = [p["seconds"] for p in curve]
            ys = [p["test_loss"] for p in curve]
            sd = [p["test_loss_sd"] for p in curve]
            # dashed: the arms that share another arm's rate (their colours repeat after the first ten arms)
            left.plot(xs, ys, label=arm, linestyle="--" if data.get("rate_from") else "-")
            left.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.15)
        points = [(float(k), v) for k, v in data["sweep"].items() if v is not None]
        if points:
            right.plot(*zip(*sorted(points)), marker="o", label=arm)
    left.set(xlabel="training seconds", ylabel="test loss", title=f"{task}: test loss vs time")
    right.set(xscale="log", xlabel="learning rate", ylabel="validation loss", title=f"{task}: sweep")
    left.legend(fontsize=7)
    fig.tight_layout()
    path = folder / f"{name}_{task}.png"
    save_figure(fig, path)  # atomically, like every other output
    return [path.name]


def render_quality(summary: dict, out: str | os.PathLike, *, docs: str | os.PathLike | None = None) -> None:
    """Write ``OUT/NAME.md`` and the plots; with ``docs``, the page there too (plot links relative to it)."""
    out = Path(out)
    for task, entry in summary["tasks"].items():
        entry["plots"] = plot_task(task, entry, out, summary["name"])
    write_text(out / f"{summary['name']}.md", render_markdown(summary))
    if docs is not None:
        docs = Path(docs)
        docs.parent.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(out, docs.parent)
        for entry in summary["tasks"].values():
            entry["plots"] = [f"{rel}/{p}" for p in entry["plots"]]
        write_text(docs, render_markdown(summary))
        for entry in summary["tasks"].values():
            entry["plots"] = [p.rsplit("/", 1)[-1] for p in entry["plots"]]
