"""Markdown tables, the benchmark page and the plots of a training benchmark, rendered from its JSON alone.

Every function here reads the result dict (its ``config`` under today's setting names: :func:`render_outputs`
loads the JSON through :func:`~aletheia_lora.bench.config.load_result`), never a live run, so
``aletheia-lora bench --render-only`` re-renders the committed results. A result without a general corpus
(``--general-data none``: its general losses and forgetting are null) shows ``-`` for forgetting and says why once,
in its header. The plots are drawn outside pyplot (:func:`~aletheia_lora.plots.new_figure`): the caller's
matplotlib backend is left alone.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aletheia_lora.bench.config import BASELINE, BEYOND_ARMS, STRATEGY_ARMS, TARGET_ARM, TINY_MODEL, load_result
from aletheia_lora.files import write_text
from aletheia_lora.plots import new_figure, plot_reprobe_history, save_figure


def layer_runs(layers: Sequence[int]) -> list[list[int]]:
    """The runs of consecutive blocks in ``layers`` (in their order): ``[0, 1, 2, 5]`` -> ``[[0, 1, 2], [5]]``."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return runs


def layers_text(layers: Sequence[int], num_layers: int) -> str:
    """``all 30``, or the count and the runs of consecutive blocks: ``15: 0-4,7,9-17``."""
    if len(layers) == num_layers:
        return f"all {num_layers}"
    runs = layer_runs(layers)
    return f"{len(layers)}: " + ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _num(value, fmt: str, none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _recommendation(result: dict) -> list[str]:
    """Which selection strategy the figures favour as the CLI default, and the best quality per time."""
    arms = [a for a in result["arms"] if a["kind"] in STRATEGY_ARMS]
    if not arms:
        return []

    def rank(arm: dict) -> tuple:
        ratio = arm["time_to_quality"]["ratio_to_all"]
        return (math.inf if ratio is None else ratio, arm["views"]["equal_time"]["target_loss"])

    best = min(arms, key=rank)
    ratio = best["time_to_quality"]["ratio_to_all"]
    reach = (
        "does not reach all-layer LoRA's loss within the cap"
        if ratio is None
        else (f"reaches all-layer LoRA's loss in {ratio:.2f}x its time")
    )
    lines = [
        f"- **Default strategy by these figures: `{best['name']}`.** Of the strategies, it {reach}, "
        f"with {best['measured_speedup']:.2f}x faster steps and an equal-time loss of "
        f"{best['views']['equal_time']['target_loss']:.4f} ({best['views']['equal_time']['target_vs_all'] - 1:+.2%} "
        f"vs all-layer LoRA); ranked by time to quality, then equal-time loss:"
    ]
    for arm in sorted(arms, key=rank):
        r = arm["time_to_quality"]["ratio_to_all"]
        lines.append(
            f"  - `{arm['name']}` {'not reached' if r is None else f'{r:.2f}x'}, equal-time loss "
            f"{arm['views']['equal_time']['target_loss']:.4f}, equal-step loss "
            f"{arm['views']['equal_steps']['target_loss']:.4f}, step speedup {arm['measured_speedup']:.2f}x."
        )
    selective = [a for a in result["arms"] if a["kind"] != BASELINE]
    top = min(selective, key=lambda a: a["views"]["equal_time"]["target_loss"])
    lines.append(
        f"- Best quality per unit of time among the selective arms: `{top['name']}` (lowest adapted block "
        f"{top['lowest_layer']}), equal-time loss {top['views']['equal_time']['target_loss']:.4f}."
    )
    return lines


def _overview(result: dict) -> list[str]:
    """Sentences over all arms: quality per time, the cost model, memory and forgetting."""
    base = next(a for a in result["arms"] if a["kind"] == BASELINE)
    selective = [a for a in result["arms"] if a["kind"] != BASELINE]
    speedups = [a["measured_speedup"] for a in selective]
    ahead = [a["name"] for a in selective if a["views"]["equal_time"]["target_vs_all"] <= 1]
    lines = [
        "- "
        + (
            f"At equal time {', '.join(f'`{n}`' for n in ahead)} matched or beat all-layer LoRA's loss."
            if ahead
            else "No selective arm matched all-layer LoRA's loss at equal time: their steps were "
            f"{min(speedups):.2f}-{max(speedups):.2f}x faster, but each step lowered the loss by less, and more "
            "steps in the same time did not make up for it."
        )
    ]
    errors = [a["prediction_error"] for a in selective]
    order = sorted(selective, key=lambda a: a["measured_speedup"])
    same_order = order == sorted(selective, key=lambda a: a["predicted_speedup"])
    lines.append(
        f"- The cost model's predicted speedups are off by {min(errors):+.1%} to {max(errors):+.1%} of the "
        f"measured ones and {'rank' if same_order else 'do not rank'} the arms in the measured order"
        + (
            " (all too low, as if the adapters' small rank-r products cost more than the model counts on a CPU)."
            if max(errors) < 0 and result["machine"]["device"] == "cpu"
            else "."
        )
    )
    calibrated = [a["calibrated_error"] for a in selective if a.get("calibrated_error") is not None]
    if calibrated:
        lines.append(
            f"- Calibrated on this machine before training ({result['calibration']['seconds']:.0f} s), the "
            f"predictions are off by {min(calibrated):+.1%} to {max(calibrated):+.1%}."
        )
    saved = sorted(result["arms"], key=lambda a: a["lowest_layer"])
    if all(a["memory"].get("saved_activations_mb") is not None for a in saved):
        lines.append(
            "- Activations kept for the backward pass, by lowest adapted block: "
            + ", ".join(f"{a['memory']['saved_activations_mb']:.0f} MB (`{a['name']}`)" for a in saved)
            + ". The resident-memory peak of a first step is noisier (the allocator reuses freed memory)."
        )
    forgetting = [a["views"]["equal_steps"]["forgetting"] for a in result["arms"]]
    if all(f is not None and f < 0 for f in forgetting):
        lines.append(
            "- The general-corpus loss fell in every arm (negative forgetting), so no arm forgot; the forgetting "
            "target then compares how much each improved it (all-layer LoRA "
            f"{base['views']['equal_steps']['forgetting']:+.4f})."
        )
    return lines


def _reading(result: dict) -> list[str]:
    arms = {a["name"]: a for a in result["arms"]}
    base = arms[BASELINE]
    lines = []
    deep = [a["name"] for a in result["arms"] if a["lowest_layer_reached"] != a["lowest_layer"]]
    lines.append(
        "- The backward pass stopped at the lowest adapted block in every arm."
        if not deep
        else f"- The backward pass went below the lowest adapted block in {deep}: their speed-up is lost."
    )
    lines.extend(_overview(result))
    for arm in result["arms"]:
        if arm["kind"] == BASELINE:
            continue
        steps, equal_time = arm["views"]["equal_steps"], arm["views"]["equal_time"]
        lines.append(
            f"- `{arm['name']}` (lowest block {arm['lowest_layer']}): steps {arm['measured_speedup']:.2f}x faster "
            f"(predicted {arm['predicted_speedup']:.2f}x); at equal steps its loss is "
            f"{steps['target_vs_all'] - 1:+.2%} vs all-layer LoRA, at equal time "
            f"{equal_time['target_vs_all'] - 1:+.2%} ({equal_time['steps']} steps)"
            + (
                f"; forgetting {_num(steps['forgetting'], '+.4f')} nats "
                f"(all-layer {base['views']['equal_steps']['forgetting']:+.4f})."
                if _measures_forgetting(result)
                else "."  # the header says once why forgetting is not measured
            )
        )
    lines.extend(_recommendation(result))
    during = result["load_average"]["during"]
    cpus = result["machine"]["cpu_count"]
    if during:
        lines.append(
            f"- Machine load (1-minute average) during the run: median {statistics.median(during):.1f}, "
            f"max {max(during):.1f} on {cpus} CPUs. Other work slows every arm, but the arms took turns step by "
            "step, so ratios hold better than absolute times. One seed, and one learning rate for every arm "
            f"({result['config']['learning_rate']:g}): arms with fewer adapters might prefer another."
        )
    return lines


def _measures_forgetting(result: dict) -> bool:
    return result["base"].get("general_loss") is not None


def _data_text(result: dict) -> str:
    cfg = result["config"]
    forgetting = _measures_forgetting(result)
    if cfg["model"] == TINY_MODEL:
        return (
            f"Training rows count up by 1 from random starts; held-out target: {cfg['eval_blocks']} more such rows"
            + (f"; general rows for forgetting count up by 2 ({cfg['general_blocks']} rows)." if forgetting else ".")
        )
    return f"Held-out target: {cfg['data']} eval split ({cfg['eval_blocks']} blocks spread over it)" + (
        f"; general corpus for forgetting: {cfg['general_data']} ({cfg['general_blocks']} blocks)."
        if forgetting
        else "."
    )


def _base_text(result: dict) -> str:
    base = result["base"]
    if _measures_forgetting(result):
        return f"Base model: target loss {base['target_loss']:.4f}, general loss {base['general_loss']:.4f}."
    return (
        f"Base model: target loss {base['target_loss']:.4f}. Forgetting is not measured: no general corpus "
        "(`--general-data none`), so its columns show -."
    )


def headline_table(result: dict) -> str:
    """One row per arm: layers, measured and predicted speedup, losses, forgetting and time to quality."""
    n = result["model"]["num_layers"]
    lines = [
        "| arm | layers | speedup measured | predicted | target loss (vs all) | equal-time loss (vs all) "
        "| forgetting | time to all-layer loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in result["arms"]:
        steps, equal_time, ttq = arm["views"]["equal_steps"], arm["views"]["equal_time"], arm["time_to_quality"]
        lines.append(
            f"| {arm['name']} | {layers_text(arm['layers'], n)} | {arm['measured_speedup']:.2f}x "
            f"| {arm['predicted_speedup']:.2f}x | {steps['target_loss']:.4f} ({steps['target_vs_all'] - 1:+.2%}) "
            f"| {equal_time['target_loss']:.4f} ({equal_time['target_vs_all'] - 1:+.2%}) "
            f"| {_num(steps['forgetting'], '+.4f')} "
            f"| {'not reached' if ttq['ratio_to_all'] is None else format(ttq['ratio_to_all'], '.2f') + 'x'} |"
        )
    return "\n".join(lines)


def _header(result: dict, h: str) -> list[str]:
    cfg, model, machine, load = result["config"], result["model"], result["machine"], result["load_average"]
    truncation = {a["name"]: a for a in result["arms"]}.get(TARGET_ARM)
    probe = f"- Probe: {result['probe']['seconds']:.1f} s"
    if truncation:
        probe += f", {truncation['probe_share']:.1%} of probe + the truncation arm's {cfg['max_steps']}-step training"
    return [
        f"{h} Training benchmark `{result['name']}`: LoRA on all layers vs layer selections",
        "",
        f"{model['name']} ({model['type']}, {model['num_layers']} layers); LoRA r={cfg['r']} "
        f"alpha={cfg['lora_alpha']:g} on every attention and MLP projection of the adapted blocks; selective arms "
        f"adapt {cfg['top_pct']:g}% of the blocks. Batch {cfg['batch_size']} x {cfg['max_length']} tokens, AdamW "
        f"lr {cfg['learning_rate']:g} ({cfg['lr_scheduler_type']}), seed {cfg['seed']}; arms trained round-robin "
        f"on the same batches. {_data_text(result)} {_base_text(result)}",
        "",
        f"- Command: `{result['command']}` ({result['created']}, {result['wall_seconds'] / 60:.1f} min"
        + (f", {result['cpu_seconds'] / 60:.1f} min of CPU)" if "cpu_seconds" in result else ")"),
        f"- Machine: {machine['platform']}, {machine['cpu_count']} CPUs, {machine['torch_threads']} torch "
        f"thread(s), device {machine.get('device_name', machine['device'])}; load average before "
        f"{load['before'][0]:.2f}, after {load['after'][0]:.2f}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        probe,
        f"- Cost model: {result['cost_model']}",
        "",
        headline_table(result),
    ]


def _equal_steps(result: dict, h: str) -> list[str]:
    cfg, n = result["config"], result["model"]["num_layers"]
    rss = result["arms"][0]["memory"]["kind"] == "rss"
    lines = [
        f"{h}# Equal steps ({cfg['max_steps']} steps each)",
        "",
        f"Speedup: all-layer median step time / the arm's (first {cfg['untimed_steps']} steps left out); paired: "
        "median of the per-round ratios. Predicted: the run's cost model (`cost_model` in the JSON); calibrated: "
        "`--calibrate`'s fit to LoRA steps timed before training (- where not calibrated); error: prediction / "
        f"measured - 1. Memory: growth of {'resident' if rss else 'allocated'} memory while "
        "building the arm (model copy, adapters, optimizer) and its peak growth during its first step; saved: "
        "activations autograd kept for the backward pass. Forgetting: general-corpus loss after minus before.",
        "",
        "| arm | layers | backward down to | s/step | tokens/s | speedup | paired | predicted | error | calibrated "
        "| error | build MB | step peak MB | saved MB | target loss | vs all | forgetting |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in result["arms"]:
        view, mem = arm["views"]["equal_steps"], arm["memory"]
        lines.append(
            f"| {arm['name']} | {layers_text(arm['layers'], n)} | {arm['lowest_layer_reached']} "
            f"| {arm['median_step_seconds']:.3f} | {arm['tokens_per_second']:.0f} | {arm['measured_speedup']:.2f}x "
            f"| {arm['paired_speedup']:.2f}x | {arm['predicted_speedup']:.2f}x | {arm['prediction_error']:+.1%} "
            f"| {_speedup(arm.get('calibrated_speedup'))} | {_num(arm.get('calibrated_error'), '+.1%')} "
            f"| {_num(mem.get('build_mb'), '.0f')} | {_num(mem.get('first_step_peak_mb'), '.0f')} "
            f"| {_num(mem.get('saved_activations_mb'), '.0f')} | {view['target_loss']:.4f} "
            f"| {view['target_vs_all'] - 1:+.2%} | {_num(view['forgetting'], '+.4f')} |"
        )
    return lines


def _equal_time(result: dict, h: str) -> list[str]:
    lines = [
        f"{h}# Equal time ({result['equal_time_seconds']:.1f} s of training each: all-layer LoRA's "
        f"{result['config']['max_steps']} steps)",
        "",
        "| arm | steps | train s | target loss | vs all | forgetting | vs all-layer forgetting |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in result["arms"]:
        view = arm["views"]["equal_time"]
        note = " (read off its curve: slower than all-layer)" if view["interpolated"] else ""
        lines.append(
            f"| {arm['name']} | {view['steps']}{note} | {_num(view['seconds'], '.1f')} | {view['target_loss']:.4f} "
            f"| {view['target_vs_all'] - 1:+.2%} | {_num(view['forgetting'], '+.4f')} "
            f"| {_num(view['forgetting_vs_all'], '+.4f')} |"
        )
    return lines


def _time_to_quality(result: dict, h: str) -> list[str]:
    quality, cfg = result["quality"], result["config"]
    lines = [
        f"{h}# Time to quality (all-layer LoRA's {cfg['max_steps']}-step loss {quality['target_loss']:.4f}; held-out "
        f"loss every {cfg['eval_steps']} steps, interpolated; cap {quality['cap']:g}x = "
        f"{quality['cap_seconds']:.1f} s)",
        "",
        "| arm | seconds to reach | vs all-layer time | trained s | final loss |",
        "|---|---|---|---|---|",
    ]
    for arm in result["arms"]:
        ttq = arm["time_to_quality"]
        ratio = "-" if ttq["ratio_to_all"] is None else f"{ttq['ratio_to_all']:.2f}x"
        lines.append(
            f"| {arm['name']} | {_num(ttq['seconds'], '.1f', 'not reached')} | {ratio} "
            f"| {ttq['trained_seconds']:.1f} | {arm['curve'][-1]['loss']:.4f} |"
        )
    return lines


def _ratio(value: float | None, reference: float | None) -> str:
    return "-" if value is None or reference is None else f"{value / reference - 1:+.2%}"


def _beyond(result: dict, h: str) -> list[str]:
    """``ranks`` and ``reprobe`` against ``score``: the same blocks first, uniform rank, selected once."""
    arms = {a["name"]: a for a in result["arms"]}
    score = arms["score"]
    cfg, n = result["config"], result["model"]["num_layers"]
    lines = [
        f"{h}# Beyond one-shot selection with uniform rank (each against `score`)",
        "",
        "`ranks`: the `score` blocks with ranks in proportion to their probe scores, at most the LoRA parameters of "
        f"uniform r={cfg['r']} on them. `reprobe`: the `score` blocks first; every {cfg['reprobe_every']} steps the "
        "probe runs again on the model being trained (other rows) and the trainable adapters move to its "
        "selection; blocks that leave keep what they learned, frozen. Its clock includes the re-probes. Losses "
        "are relative to `score`'s in the same view.",
        "",
        "| arm | trainable params | s/step | speedup vs all | equal-step loss (vs score) "
        "| equal-time loss (vs score) | time to all-layer loss | forgetting |",
        "|---|---|---|---|---|---|---|---|",
    ]
    score_steps, score_time = score["views"]["equal_steps"]["target_loss"], score["views"]["equal_time"]["target_loss"]
    for arm in [score] + [a for a in result["arms"] if a["kind"] in BEYOND_ARMS]:
        steps, equal_time, ttq = arm["views"]["equal_steps"], arm["views"]["equal_time"], arm["time_to_quality"]
        reached = "not reached" if ttq["ratio_to_all"] is None else f"{ttq['ratio_to_all']:.2f}x"
        lines.append(
            f"| {arm['name']} | {arm['memory']['trainable_parameters']:,} | {arm['median_step_seconds']:.3f} "
            f"| {arm['measured_speedup']:.2f}x "
            f"| {steps['target_loss']:.4f} ({_ratio(steps['target_loss'], score_steps)}) "
            f"| {equal_time['target_loss']:.4f} ({_ratio(equal_time['target_loss'], score_time)}) "
            f"| {reached} | {_num(steps['forgetting'], '+.4f')} |"
        )
    lines.append("")
    for arm in result["arms"]:
        info = arm.get("beyond")
        if not info:
            continue
        if arm["kind"] == "ranks":
            ranks = info["ranks"]
            lines.append(
                f"- `ranks`: {info['lora_parameters']:,} LoRA parameters against {info['uniform_parameters']:,} for "
                f"uniform r={cfg['r']}; ranks by block: "
                + ", ".join(f"{layer}: {rank}" for layer, rank in ranks.items())
                + "."
            )
        else:
            moves = [e for e in info["history"][1:] if e["moved_in"] or e["moved_out"]]
            lines.append(
                f"- `reprobe`: {info['probes']} re-probes took {info['seconds']:.1f} s, "
                f"{info['share_of_clock']:.1%} of its training clock; the selection changed {len(moves)} time(s)"
                + (
                    ": " + "; ".join(f"step {e['step']}: +{e['moved_in']} -{e['moved_out']}" for e in moves)
                    if moves
                    else ""
                )
                + f". Blocks trained at some point: {layers_text(info['layers_ever_trained'], n)}; "
                f"last selection: {layers_text(info['final_layers'], n)}."
            )
    return lines


def render_markdown(result: dict, *, level: int = 1) -> str:
    """The tables and the reading of a benchmark result, as Markdown (top heading at ``level``)."""
    h = "#" * level
    out = _header(result, h) + [""] + _equal_steps(result, h) + [""] + _equal_time(result, h)
    out += [""] + _time_to_quality(result, h)
    if any(a["kind"] in BEYOND_ARMS for a in result["arms"]):
        out += [""] + _beyond(result, h)
    if result["targets"]:
        out += ["", f"{h}# Targets (arm `{TARGET_ARM}`)", "", "| target | value | met |", "|---|---|---|"]
        verdict = {True: "met", False: "MISSED", None: "-"}
        out += [f"| {t['target']} | {t['value']} | {verdict[t['met']]} |" for t in result["targets"]]
    out += ["", f"{h}# Reading", "", *_reading(result), ""]
    return "\n".join(out)


def model_label(result: dict) -> str:
    """The model's name for a plot title: its alias or Hub id as given, a checkpoint folder by its name only."""
    name = str(result["model"]["name"])
    if "/" not in name and "\\" not in name:
        return name
    parts = name.replace("\\", "/").rstrip("/").split("/")
    # a Hub id (org/name) stays whole; a filesystem path (absolute, ./, ~, or deeper) is cut to its last folder
    if len(parts) == 2 and parts[0] not in ("", ".", "..", "~"):
        return name
    return parts[-1] or name


def plot_loss_vs_time(result: dict, path: str | os.PathLike) -> Path:
    """Held-out target loss against training seconds, one line per arm."""
    fig = new_figure((7.5, 4.5))
    ax = fig.subplots()
    for arm in result["arms"]:
        xs = [p["seconds"] for p in arm["curve"]]
        ys = [p["loss"] for p in arm["curve"]]
        style = {"color": "black", "linewidth": 2.2} if arm["kind"] == BASELINE else {}
        ax.plot(xs, ys, marker=".", label=arm["name"], **style)
    ax.axhline(result["quality"]["target_loss"], color="gray", linestyle="--", linewidth=0.8)
    ax.axvline(result["equal_time_seconds"], color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlabel("training seconds (evaluation not counted)")
    ax.set_ylabel("held-out target loss (nats/token)")
    ax.set_title(f"{model_label(result)}: held-out loss vs wall-clock")
    curves = [p["loss"] for a in result["arms"] for p in a["curve"][1:]]
    if curves:  # the base model's loss would squash the curves
        low, high = min(curves), max(curves)
        ax.set_ylim(low - 0.05 * (high - low or 1), high + 0.1 * (high - low or 1))
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_speedups(result: dict, path: str | os.PathLike) -> Path:
    """Predicted and measured step speedup of every arm against all-layer LoRA."""
    arms = result["arms"]
    fig = new_figure((max(6.0, 0.9 * len(arms) + 2), 3.8))
    ax = fig.subplots()
    x = np.arange(len(arms))
    ax.bar(x - 0.2, [a["predicted_speedup"] for a in arms], 0.4, label="predicted (FLOP cost model)")
    ax.bar(x + 0.2, [a["measured_speedup"] for a in arms], 0.4, label="measured (median step time)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(x, [f"{a['name']}\n(from {a['lowest_layer']})" for a in arms], fontsize=8)
    ax.set_ylabel("speedup vs all layers")
    ax.set_title(f"{model_label(result)}: step speedup by arm")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _other_runs(others: Sequence[dict], results_link: str) -> list[str]:
    """A table linking the other training benchmarks of the results folder: their arms and headline figures."""
    lines = [
        "## Other training benchmarks in the same folder",
        "",
        "| run | model | arms: step speedup, equal-time loss vs all-layer LoRA | command |",
        "|---|---|---|---|",
    ]
    for other in others:
        arms = "; ".join(
            f"{a['name']} {a['measured_speedup']:.2f}x, {a['views']['equal_time']['target_vs_all'] - 1:+.2%}"
            for a in other["arms"]
            if a["kind"] != BASELINE
        )
        lines.append(
            f"| [`{other['name']}`]({results_link}/train_{other['name']}.md) | {other['model']['name']} "
            f"| {arms} | `{other['command']}` |"
        )
    lines.append("")
    beyond = [(o, a) for o in others for a in o["arms"] if a["kind"] in BEYOND_ARMS]
    if beyond:
        lines += [
            "### Ranks and re-probing against one-shot `score` selection, run by run",
            "",
            "Relative to the `score` arm of the same run (same blocks at the start, uniform rank, selected once).",
            "",
            "| run | seed | arm | equal-step loss | equal-time loss | time to all-layer loss (arm / score) "
            "| re-probe share of clock |",
            "|---|---|---|---|---|---|---|",
        ]
        for other, arm in beyond:
            score = next(a for a in other["arms"] if a["kind"] == "score")
            ttq = arm["time_to_quality"]["ratio_to_all"], score["time_to_quality"]["ratio_to_all"]
            share = arm["beyond"].get("share_of_clock")
            steps, time_ = (
                _ratio(arm["views"][view]["target_loss"], score["views"][view]["target_loss"])
                for view in ("equal_steps", "equal_time")
            )
            lines.append(
                f"| `{other['name']}` | {other['config']['seed']} | {arm['name']} | {steps} | {time_} "
                f"| {_num(ttq[0], '.2f', 'not reached')} / {_num(ttq[1], '.2f', 'not reached')} "
                f"| {_num(share, '.1%')} |"
            )
        lines.append("")
    return lines


def render_docs(result: dict, probe_markdown: str | None, *, results_link: str, others: Sequence[dict] = ()) -> str:
    """The benchmark page: the training benchmark, links to ``others`` and the probe-vs-reference table."""
    name = result["name"]
    out = [
        "# Benchmarks",
        "",
        f"Generated from `{results_link}/train_{name}.json` by `{result['command']}` "
        f"(`aletheia-lora bench --render-only ...` re-renders it); do not edit by hand.",
        "",
        "How the training benchmark works: every arm is its own copy of the base model with LoRA on one set of "
        "blocks. The arms take their steps in turn (round-robin, rotating which goes first) on the same batches "
        "in the same order, with the same seed, optimizer and learning-rate schedule, so a busy machine slows "
        "all of them alike. Each arm's training clock sums its measured step times; evaluation is not counted. "
        "Equal steps compares the arms after the same number of steps; equal time lets the faster arms train "
        "until they have used the time all-layer LoRA needed; time to quality is when an arm's held-out loss "
        "first reaches all-layer LoRA's final loss.",
        "",
        render_markdown(result, level=2),
        f"![held-out loss vs training time]({results_link}/train_{name}_loss_vs_time.png)",
        "",
        f"![speedup by arm]({results_link}/train_{name}_speedup.png)",
        "",
        *(_other_runs(others, results_link) if others else []),
        "## Gradient probe benchmark (`bench/probe_vs_reference.py`)",
        "",
    ]
    if probe_markdown:
        # its headings go under this section's
        out.append("\n".join("##" + line if line.startswith("#") else line for line in probe_markdown.splitlines()))
    else:
        out.append("Not run yet: `.venv/bin/python bench/probe_vs_reference.py` writes `probe_vs_reference.md`.")
    return "\n".join(out).rstrip() + "\n"


def render_outputs(out_dir: str | os.PathLike, name: str, *, docs: str | os.PathLike | None = None) -> list[Path]:
    """(Re-)write ``train_NAME.md``, the plots and optionally the docs page from ``out_dir/train_NAME.json``.

    Args:
        out_dir: The folder that holds the JSON.
        name: The run's name.
        docs: Also write the benchmark page here; it includes ``out_dir/probe_vs_reference.md`` when present.

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    source = out / f"train_{name}.json"
    if not source.is_file():
        raise FileNotFoundError(f"no benchmark result {str(source)!r}: run `aletheia-lora bench` first")
    result = load_result(source)
    written = [
        write_text(out / f"train_{name}.md", render_markdown(result)),
        plot_loss_vs_time(result, out / f"train_{name}_loss_vs_time.png"),
        plot_speedups(result, out / f"train_{name}_speedup.png"),
    ]
    for arm in result["arms"]:
        if arm["kind"] == "reprobe":
            title = f"{model_label(result)}: blocks trained by arm reprobe, every {arm['beyond']['every']} steps"
            path = out / f"train_{name}_reprobe.png"
            history = arm["beyond"]["history"]
            num_layers, steps = result["model"]["num_layers"], len(arm["step_seconds"])
            written.append(plot_reprobe_history(history, num_layers, path, title=title, end_step=steps))
    if docs is not None:
        docs = Path(docs)
        docs.parent.mkdir(parents=True, exist_ok=True)
        probe = out / "probe_vs_reference.md"
        link = Path(os.path.relpath(out.resolve(), docs.parent.resolve())).as_posix()
        others = [load_result(path) for path in sorted(out.glob("train_*.json")) if path != source]
        probe_text = probe.read_text() if probe.is_file() else None
        text = render_docs(result, probe_text, results_link=link, others=others)
        written.append(write_text(docs, text))
    return written
