"""Plots: per-layer probe scores with the selection marked, loss curves, speed vs quality, re-probing. PNG files.

Every figure is a :class:`matplotlib.figure.Figure` drawn by the Agg canvas directly: pyplot is never imported
and the matplotlib backend is never switched, so plotting from a notebook or a GUI program leaves its backend and
its open figures as they were, and no display is needed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aletheia_lora.files import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from aletheia_lora.select import Selection


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure of ``figsize`` inches on its own Agg canvas, outside pyplot (no backend switch, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Save ``fig`` as a PNG at ``path``, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    return Path(path)


def plot_layer_scores(
    scores: Mapping[int, float],
    selected: Sequence[int],
    path: str | os.PathLike,
    *,
    title: str = "Gradient probe: per-layer scores",
    metric: str = "grad_norm",
) -> Path:
    """Bar chart of the probe score of every layer, selected layers highlighted."""
    from matplotlib.patches import Rectangle

    layers = sorted(scores)
    chosen = set(selected)
    fig = new_figure((max(6.0, 0.28 * len(layers) + 2), 3.6))
    ax = fig.subplots()
    colors = ["tab:orange" if i in chosen else "tab:gray" for i in layers]
    ax.bar(layers, [scores[i] for i in layers], color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"score ({metric})")
    ax.set_title(title)
    ax.set_xticks(layers[:: max(1, len(layers) // 30)])
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in ("tab:orange", "tab:gray")]
    ax.legend(handles, [f"selected ({len(chosen)})", "not selected"], loc="upper right", fontsize=8)
    return save_figure(fig, path)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _points(log_history: Sequence[Mapping], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every record holding a finite ``key`` and a ``step``, one per step (the last)."""
    found = {int(r["step"]): float(r[key]) for r in log_history if _finite(r.get(key)) and "step" in r}
    return sorted(found.items())


def plot_loss_curves(
    log_history: Sequence[Mapping],
    path: str | os.PathLike,
    *,
    title: str = "Training",
    eval_loss_before: float | None = None,
    eval_loss_after: float | None = None,
    steps: int | None = None,
) -> Path:
    """Train loss per logged step, held-out loss at each evaluation and before training, on one axis.

    ``log_history`` is the Trainer's (``trainer.state.log_history``): records with ``loss`` are train losses,
    records with ``eval_loss`` evaluations, and the closing record's ``train_loss`` (the mean over the run) is
    shown, as one point at the last step, only when no step's train loss was logged (fewer steps than
    ``logging_steps``). When fewer than two train losses or no evaluation exist, the title says what is shown, so
    the plot is never silently empty.

    Args:
        log_history: The Trainer's log records, each with a ``step``.
        path: The PNG to write.
        title: The first line of the title.
        eval_loss_before: Held-out loss of the base model, drawn at step 0 (unless the log holds an evaluation
            there).
        eval_loss_after: Held-out loss after training, drawn at the last step unless the log holds an evaluation
            there.
        steps: The optimizer steps trained (the x of ``eval_loss_after`` and of the mean train loss); default: the
            last step in ``log_history``.
    """
    from matplotlib.ticker import MaxNLocator

    train = _points(log_history, "loss")
    evals = dict(_points(log_history, "eval_loss"))
    logged_steps = [int(r["step"]) for r in log_history if "step" in r]
    last = steps if steps is not None else max(logged_steps, default=None)
    notes = []
    mean_train = None
    if not train:
        mean = [float(r["train_loss"]) for r in log_history if _finite(r.get("train_loss"))]
        if mean and last is not None:
            mean_train = (last, mean[-1])
            notes.append("no per-step train loss logged (fewer steps than --logging-steps): the run's mean shown")
        else:
            notes.append("no train loss logged")
    elif len(train) == 1:
        notes.append("one train loss logged")
    before_from_log = 0 in evals
    if eval_loss_before is not None and _finite(eval_loss_before) and not before_from_log:
        evals[0] = float(eval_loss_before)
    if eval_loss_after is not None and _finite(eval_loss_after) and last is not None and last not in evals:
        evals[last] = float(eval_loss_after)
    if not evals:
        notes.append("no held-out loss")

    fig = new_figure((6.4, 3.6 + 0.25 * len(notes)))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), marker=".", color="tab:blue", label="train loss (logged steps)")
    if mean_train is not None:
        ax.plot(*mean_train, marker="s", linestyle="none", color="tab:blue", label="train loss (mean over the run)")
    if evals:
        xs = sorted(evals)
        ax.plot(xs, [evals[x] for x in xs], marker="o", color="tab:orange", label="held-out loss")
    if 0 in evals:
        ax.plot(0, evals[0], marker="*", markersize=13, linestyle="none", color="tab:red", label="before training")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 0.5 ticks on a short run
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("\n".join([title, *notes]), **({"fontsize": 9} if notes else {}))
    if train or evals or mean_train:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "nothing was logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    return save_figure(fig, path)


def plot_speed_quality(
    selection: Selection,
    path: str | os.PathLike,
    *,
    title: str = "Selection: predicted speed vs probe score captured",
) -> Path:
    """The selection strategies' predicted speedups (x) against the share of probe score they capture (y).

    Draws every candidate of the ``truncation`` strategy (``selection.frontier``; Pareto points joined), each
    strategy's selection at the same budget (``selection.alternatives``), LoRA on every block (1x, 100%), and rings
    the chosen selection. A selection without probe scores (blocks named by the user) has nothing to compare: the
    figure says so.

    Args:
        selection: The :class:`~aletheia_lora.select.Selection` of a probe (e.g. from ``make_selection``).
        path: The PNG to write.
        title: The first line of the title; the second names what predicted the speedups.
    """
    fig = new_figure((6.4, 4.2))
    ax = fig.subplots()
    ax.set_xlabel("predicted speedup per step vs LoRA on all blocks (x)")
    ax.set_ylabel("probe score captured (%)")
    lines = [title]
    if selection.cost_model:
        lines.append(f"speedups predicted by: {selection.cost_model}")
    comparable = selection.alternatives or selection.frontier
    if not comparable or selection.predicted_speedup is None or selection.score_share is None:
        lines.append(f"nothing to compare: strategy {selection.strategy!r} has no probe scores")
        ax.set_title("\n".join(lines), fontsize=9)
        ax.text(0.5, 0.5, f"layers {list(selection.layers)}", ha="center", va="center", transform=ax.transAxes)
        return save_figure(fig, path)

    frontier = list(selection.frontier)
    others = [p for p in frontier if not p.pareto]
    pareto = sorted((p for p in frontier if p.pareto), key=lambda p: p.speedup)
    if others:
        ax.scatter(
            [p.speedup for p in others],
            [100 * p.captured_share for p in others],
            s=10,
            color="lightgray",
            label="other truncation candidates",
        )
    if pareto:
        ax.plot(
            [p.speedup for p in pareto],
            [100 * p.captured_share for p in pareto],
            marker=".",
            color="tab:gray",
            linewidth=1,
            label="truncation frontier (Pareto)",
        )
    ax.scatter([1.0], [100.0], marker="X", s=60, color="black", label="all blocks", zorder=3)
    markers = {"score": "o", "truncation": "s", "contiguous": "^"}
    for name, alt in selection.alternatives.items():
        ax.scatter(
            [alt.speedup],
            [100 * alt.captured_share],
            marker=markers.get(name, "D"),
            s=55,
            zorder=4,
            label=f"{name} (from block {alt.lowest_layer})",
        )
    ax.scatter(
        [selection.predicted_speedup],
        [100 * selection.score_share],
        s=260,
        facecolors="none",
        edgecolors="tab:red",
        linewidths=2,
        zorder=5,
        label=f"chosen: {selection.strategy}, {selection.predicted_speedup:.2f}x, {selection.score_share:.1%}",
    )
    ax.grid(alpha=0.3)
    ax.set_title("\n".join(lines), fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def plot_reprobe_history(
    history: Sequence[Mapping],
    num_layers: int,
    path: str | os.PathLike,
    *,
    title: str = "Re-probing",
    end_step: int | None = None,
) -> Path:
    """Which blocks trained from each probe on: one column per probe, selected blocks filled.

    ``history`` holds the entries of :class:`~aletheia_lora.reprobe.ReprobeCallback` (``step``, ``layers``) in
    order; a column spans the steps from its probe to the next one, the last one up to ``end_step`` (default:
    one interval).
    """
    from matplotlib.patches import Rectangle

    steps = [int(h["step"]) for h in history]
    fig = new_figure((6.4, max(3.0, 0.12 * num_layers + 1.2)))
    ax = fig.subplots()
    for i, entry in enumerate(history):
        if i + 1 < len(steps):
            end = steps[i + 1]
        else:
            end = (
                end_step
                if end_step and end_step > steps[i]
                else steps[i] + max(1, steps[i] - steps[i - 1] if i else 1)
            )
        for layer in entry["layers"]:
            ax.add_patch(Rectangle((steps[i], layer - 0.45), end - steps[i], 0.9, color="tab:orange", lw=0))
    ax.set_xlim(steps[0], end)
    ax.set_ylim(-0.5, num_layers - 0.5)
    ax.set_xticks(steps)
    ax.set_xlabel("training step (a probe at each tick)")
    ax.set_ylabel("block")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_freeze_timeline(
    freeze: Mapping,
    num_layers: int,
    path: str | os.PathLike,
    *,
    title: str = "Progressive freezing",
    end_step: int | None = None,
) -> Path:
    """Progressive freezing over a run: the lowest trainable block (and the lowest the backward pass reached) vs
    step above, the step time vs step below, a dotted line at each freeze.

    ``freeze`` is a report's ``freeze`` part (:meth:`~aletheia_lora.freeze.FreezeCallback.summary` with
    ``step_seconds``): ``timeline`` (``step``, ``lowest_trainable``), ``reached`` and ``step_seconds`` (pairs of a
    step and a value).
    """
    timeline = list(freeze.get("timeline") or [])
    seconds = [(int(s), float(t)) for s, t in freeze.get("step_seconds") or []]
    reached = [(int(s), int(b)) for s, b in freeze.get("reached") or []]
    last = max(
        [end_step or 0] + [s for s, _ in seconds] + [s for s, _ in reached] + [int(e["step"]) for e in timeline]
    )
    fig = new_figure((6.4, 5.2))
    top, bottom = fig.subplots(2, 1, sharex=True)
    if timeline:
        xs = [int(e["step"]) for e in timeline] + [max(last, 1)]
        ys = [int(e["lowest_trainable"]) for e in timeline]
        top.step(xs, ys + ys[-1:], where="post", color="tab:blue", label="lowest trainable block")
    if reached:
        top.plot([s for s, _ in reached], [b for _, b in reached], ".", ms=3, color="tab:orange",
                 label="lowest block the backward pass reached (-1: embeddings)")  # fmt: skip
    top.set_ylim(-1.5, num_layers - 0.5)
    top.set_ylabel("block")
    top.legend(fontsize=7, loc="best")
    top.grid(alpha=0.3)
    if seconds:
        bottom.plot([s for s, _ in seconds], [t for _, t in seconds], "-", lw=1, color="tab:green")
    bottom.set_ylabel("step time (s)")
    bottom.set_xlabel("training step")
    bottom.grid(alpha=0.3)
    for entry in timeline[1:]:
        for ax in (top, bottom):
            ax.axvline(int(entry["step"]), ls=":", color="grey", lw=0.8)
    top.set_title(title)
    return save_figure(fig, path)
