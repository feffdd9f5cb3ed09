"""Plots: per-layer probe scores with the selection marked, loss curves, re-probing. PNG files, no display needed."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from aletheia_lora.files import atomic_path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
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
    plt = pyplot()
    layers = sorted(scores)
    chosen = set(selected)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(layers) + 2), 3.6))
    colors = ["tab:orange" if i in chosen else "tab:gray" for i in layers]
    ax.bar(layers, [scores[i] for i in layers], color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"score ({metric})")
    ax.set_title(title)
    ax.set_xticks(layers[:: max(1, len(layers) // 30)])
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:orange", "tab:gray")]
    ax.legend(handles, [f"selected ({len(chosen)})", "not selected"], loc="upper right", fontsize=8)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_loss_curves(log_history: Sequence[Mapping], path: str | os.PathLike, *, title: str = "Training") -> Path:
    """Training loss (and eval loss, where logged) against the optimizer step."""
    plt = pyplot()
    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log_history if "eval_loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    if train:
        ax.plot(*zip(*train), marker=".", label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    if train or evals:
        ax.legend()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


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
    plt = pyplot()
    steps = [int(h["step"]) for h in history]
    fig, ax = plt.subplots(figsize=(6.4, max(3.0, 0.12 * num_layers + 1.2)))
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
            ax.add_patch(plt.Rectangle((steps[i], layer - 0.45), end - steps[i], 0.9, color="tab:orange", lw=0))
    ax.set_xlim(steps[0], end)
    ax.set_ylim(-0.5, num_layers - 0.5)
    ax.set_xticks(steps)
    ax.set_xlabel("training step (a probe at each tick)")
    ax.set_ylabel("block")
    ax.set_title(title)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)
