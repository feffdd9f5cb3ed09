"""Rendering of ``bench/prefix_cache.py``'s result: the targets' assessment and the page ``docs/PREFIX_CACHE.md``.

Everything here reads the JSON that ``bench/prefix_cache.py`` writes, never a model: ``render_outputs`` is what the
script's ``--render-only`` runs. Lives next to the script, which imports it as a sibling module.
"""

from __future__ import annotations

import os
from pathlib import Path

from aletheia_lora.bench.config import load_result
from aletheia_lora.files import write_text

NAME = "prefix_cache"
CACHED_TOP_HALF = "contiguous+cache"
ARM_TEXT = {
    "all": "LoRA on every block (the baseline)",
    "contiguous": "the top half of the blocks",
    "contiguous+cache": "the top half, its frozen prefix cached",
    "truncation": "the probe's truncation-aware selection",
    "truncation+cache": "the truncation-aware selection, its frozen prefix cached",
}


def _arm(record: dict, name: str) -> dict | None:
    return next((a for a in record["arms"] if a["name"] == name), None)


def _speedup(record: dict, name: str) -> float | None:
    arm = _arm(record, name)
    return None if arm is None else arm["speedup_vs_all"]


def assess_targets(result: dict) -> dict:
    """The issue's targets against the measured figures: the cached top half's speedup over all-layer LoRA, on
    SmolLM2-135M and on every family whose LM head is under the configured share of the forward FLOPs."""
    targets = result["config"]["targets"]
    smollm2 = _speedup(result["smollm2"], CACHED_TOP_HALF)
    out = {
        "smollm2": {
            "threshold": targets["smollm2"],
            "measured": smollm2,
            "met": None if smollm2 is None else smollm2 >= targets["smollm2"],
        },
        "light_head_share": targets["light_head_share"],
        "families": [],
    }
    for fam in result["families"]:
        measured = _speedup(fam, CACHED_TOP_HALF)
        light = fam["head_share_of_forward"] < targets["light_head_share"]
        threshold = targets["light_head"] if light else None
        out["families"].append(
            {
                "family": fam["family"],
                "head_share_of_forward": fam["head_share_of_forward"],
                "threshold": threshold,
                "measured": measured,
                "met": None if threshold is None or measured is None else measured >= threshold,
            }
        )
    return out


def _x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def _s(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _blocks(layers: list[int]) -> str:
    runs, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            runs.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = cur
    return ", ".join(runs)


def _verdict(met: bool | None) -> str:
    return "no target" if met is None else "**met**" if met else "**missed**"


def smollm2_table(record: dict) -> str:
    lines = [
        "| arm | blocks adapted | blocks skipped (cached) | median step (s) | vs all | per-round vs all | predicted "
        "(FLOPs) | vs uncached | first-step peak growth (MB) | cache build (s) | cache size | break-even (steps) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in record["arms"]:
        cache, twin = a.get("cache"), a.get("vs_uncached")
        skipped = f"0-{cache['block'] - 1}" if cache else "-"
        peak = a.get("first_step_peak_growth_mb")
        lines.append(
            f"| {a['name']} | {_blocks(a['layers'])} | {skipped} | {a['median_step_seconds']:.3f} "
            f"| {_x(a['speedup_vs_all'])} | {_x(a['paired_speedup_vs_all'])} | {_x(a['predicted_speedup_vs_all'])} "
            f"| {_x(twin['speedup']) if twin else '-'} | {'-' if peak is None else f'{peak:.0f}'} "
            f"| {_s(cache['build_seconds'], 2) if cache else '-'} | {_bytes(cache['bytes']) if cache else '-'} "
            f"| {_s(twin['break_even_steps'], 1) if twin else '-'} |"
        )
    return "\n".join(lines)


def epochs_table(record: dict) -> str:
    lines = [
        "| arm | steps per epoch | uncached epoch (s) | first epoch: build + cached steps (s) | each later epoch (s) "
        "| build repaid after | loss difference from uncached (max over steps) |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in record["arms"]:
        if "epochs" not in a:
            continue
        e, twin = a["epochs"], a["vs_uncached"]
        repaid = (
            "never (no step saved)"
            if twin["break_even_steps"] is None
            else f"{twin['break_even_steps']:.1f} steps ({twin['break_even_epochs']:.2f} epoch)"
        )
        lines.append(
            f"| {a['name']} | {e['steps_per_epoch']} | {e['uncached_epoch_seconds']:.1f} "
            f"| {e['first_epoch_seconds']:.1f} | {e['later_epoch_seconds']:.1f} | {repaid} "
            f"| {twin['max_loss_difference']:.1e} |"
        )
    return "\n".join(lines)


def families_table(result: dict) -> str:
    assessed = {t["family"]: t for t in result["targets"]["families"]}
    lines = [
        "| family (model) | layers | scale | LM head share of forward | all-layer step (s) | contiguous vs all "
        "| contiguous+cache vs all | per-round | predicted (FLOPs) | cache vs uncached | cache build (s) "
        "| break-even (steps) | target | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fam in result["families"]:
        top, cached = _arm(fam, "contiguous"), _arm(fam, CACHED_TOP_HALF)
        twin = (cached or {}).get("vs_uncached")
        t = assessed[fam["family"]]
        lines.append(
            f"| {fam['family']} ({fam['model']}) | {fam['scaled']['layers']} | /{fam['scale']} "
            f"| {fam['head_share_of_forward']:.1%} | {_arm(fam, 'all')['median_step_seconds']:.3f} "
            f"| {_x(top and top['speedup_vs_all'])} | {_x(cached and cached['speedup_vs_all'])} "
            f"| {_x(cached and cached['paired_speedup_vs_all'])} "
            f"| {_x(cached and cached['predicted_speedup_vs_all'])} "
            f"| {_x(twin and twin['speedup'])} | {_s(cached and cached['cache']['build_seconds'], 2)} "
            f"| {_s(twin and twin['break_even_steps'], 1)} | {_x(t['threshold'], 1) if t['threshold'] else '-'} "
            f"| {_verdict(t['met'])} |"
        )
    return "\n".join(lines)


NOISY = 0.05  # a median ratio this far from the median of per-round ratios is flagged as noisy


def _measured_text(record: dict, measured: float | None) -> str:
    """``1.72x``, with the per-round ratio when the two disagree by more than :data:`NOISY`."""
    arm = _arm(record, CACHED_TOP_HALF)
    if arm is None or measured is None:
        return _x(measured)
    paired = arm["paired_speedup_vs_all"]
    if abs(measured / paired - 1) > NOISY:
        return f"{_x(measured)} (per-round {_x(paired)}: noisy)"
    return _x(measured)


def _targets_text(result: dict) -> list[str]:
    t = result["targets"]
    s = t["smollm2"]
    fams = {f["family"]: f for f in result["families"]}
    lines = [
        f"- **SmolLM2-135M**: cached top half {_measured_text(result['smollm2'], s['measured'])} of all-layer "
        f"LoRA's step rate, target >= {s['threshold']:.1f}x: {_verdict(s['met'])} (LM head "
        f"{result['smollm2']['head_share_of_forward']:.1%} of the forward FLOPs)."
    ]
    light = [f for f in t["families"] if f["threshold"] is not None]
    heavy = [f for f in t["families"] if f["threshold"] is None]
    if light:
        met = [f for f in light if f["met"]]
        lines.append(
            f"- **Families whose LM head is under {t['light_head_share']:.0%} of the forward** (target >= "
            f"{light[0]['threshold']:.1f}x): met in {len(met)} of {len(light)}: "
            + "; ".join(
                f"{f['family']} {_measured_text(fams[f['family']], f['measured'])} {_verdict(f['met'])}" for f in light
            )
            + "."
        )
    if heavy:
        lines.append(
            "- **Families with a heavier LM head** (no target set; the head runs forward and backward in every arm): "
            + "; ".join(
                f"{f['family']} {_measured_text(fams[f['family']], f['measured'])} (head "
                f"{f['head_share_of_forward']:.0%})"
                for f in heavy
            )
            + "."
        )
    lines.append(
        "- Verdicts read the ratio of the median step times (the `vs all` column); where the median of the "
        f"per-round ratios differs from it by more than {NOISY:.0%}, both are shown: other processes slowed some "
        "rounds, and a re-run on a quiet machine decides."
    )
    return lines


def _model_label(record: dict) -> str:
    name = str(record["model"]["name"])
    return "SmolLM2-135M" if "smollm2" in name.lower() else f"the {name} model (smoke test)"


def _reading(result: dict) -> list[str]:
    """What the figures say, computed from the JSON."""
    sm = result["smollm2"]
    label = _model_label(sm)
    lines = []
    for selection in ("contiguous", "truncation"):
        plain, cached = _arm(sm, selection), _arm(sm, selection + "+cache")
        if plain is None or cached is None:
            continue
        twin = cached["vs_uncached"]
        lines.append(
            f"On {label} the cache takes `{selection}` from {_x(plain['speedup_vs_all'])} to "
            f"{_x(cached['speedup_vs_all'])} of all-layer LoRA's step rate ({_x(twin['speedup'])} over the same "
            f"blocks uncached; the FLOP model predicts {_x(plain['predicted_speedup_vs_all'])} and "
            f"{_x(cached['predicted_speedup_vs_all'])}). Its build ran blocks 0-{cached['cache']['block'] - 1} once "
            f"over {cached['cache']['rows']} rows in {cached['cache']['build_seconds']:.1f} s "
            f"({cached['cache']['seconds_per_row'] * 1000:.0f} ms per row) and holds "
            f"{_bytes(cached['cache']['bytes'])} "
            f"({cached['cache']['dtype']}, one hidden state per token)."
        )
    cached = [a for a in sm["arms"] if a.get("vs_uncached")]
    if cached:
        parts = []
        for a in cached:
            twin, e = a["vs_uncached"], a["epochs"]
            repaid = (
                "never (no step saved)"
                if twin["break_even_epochs"] is None
                else f"after {twin['break_even_epochs']:.2f} epoch"
            )
            parts.append(
                f"`{a['name']}` {repaid} (first epoch {e['first_epoch_seconds']:.1f} s against "
                f"{e['uncached_epoch_seconds']:.1f} s uncached, then {e['later_epoch_seconds']:.1f} s per epoch)"
            )
        lines.append(
            "Break-even of the build: "
            + "; ".join(parts)
            + ". It runs the prefix forward once per row, about what one uncached epoch spends on the prefix "
            "anyway (without autograd, in larger batches), so the first epoch costs about what it costs "
            "uncached and the saving comes with the epochs after it. The build is timed once, before the "
            "rounds, so unlike the step ratios it carries whatever load the machine had at that moment."
        )
    fams = [(f, _arm(f, "contiguous"), _arm(f, CACHED_TOP_HALF)) for f in result["families"]]
    fams = [(f, top, cached) for f, top, cached in fams if top is not None and cached is not None]
    if fams:
        gains = [cached["vs_uncached"]["speedup"] for _, _, cached in fams]
        over_all = [cached["speedup_vs_all"] for _, _, cached in fams]
        lines.append(
            f"Across the {len(fams)} families the cached top half ran {min(over_all):.2f}-{max(over_all):.2f}x "
            f"(mean {sum(over_all) / len(over_all):.2f}x) of all-layer LoRA's step rate and "
            f"{min(gains):.2f}-{max(gains):.2f}x (mean {sum(gains) / len(gains):.2f}x) of the uncached top half's; "
            "the FLOP model predicted "
            + ", ".join(f"{f['family']} {cached['predicted_speedup_vs_all']:.2f}x" for f, _, cached in fams)
            + "."
        )
    lines.append(
        "The skipped part is only the forward of the frozen blocks (no backward ran there anyway: autograd already "
        "stops at the lowest adapted block), so the gain is bounded by that forward's share of the step; what stays "
        "in every arm, above all the LM head's forward and backward over the whole vocabulary, caps it. The FLOP "
        "column is that bound from `CostModel.from_model` (block and head FLOPs; norms, rotary embeddings and "
        "per-operation overheads not counted)."
    )
    return [" ".join(lines)]


def render_docs(result: dict, source: str = f"bench/results/{NAME}.json") -> str:
    """The page, from the result; ``source`` names the JSON it was rendered from."""
    cfg, sm = result["config"], result["smollm2"]
    machine = result["machine"]
    trunc = sm["truncation"]
    committed = trunc.get("committed")
    if committed is None:
        trunc_source = "no committed training-benchmark result was on disk to compare it with"
    elif trunc["same_as_committed"]:
        trunc_source = f"the same blocks as the committed `{committed['file']}` (its `truncation` arm)"
    else:
        trunc_source = (
            f"**not** the committed `{committed['file']}`'s `truncation` arm ({_blocks(committed['layers'])}); "
            "this run's probe chose otherwise"
        )
    busy = [sm["other_cores_busy"]["median"]] + [f["other_cores_busy"]["median"] for f in result["families"]]
    affinity = machine.get("cpu_affinity")
    quick = result.get("quick")
    label = _model_label(sm)
    model_text = "bundled SmolLM2-135M" if label == "SmolLM2-135M" else f"random `{sm['model']['name']}` model"
    lines = [
        "# Prefix cache: step time",
        "",
        f"<!-- Generated by bench/prefix_cache.py from {source}; do not edit by hand. -->",
        "",
        *(
            [
                "**Smoke test (`--quick`): a tiny random model and shortened families; no figure here is a "
                "measurement.**",
                "",
            ]
            if quick
            else []
        ),  # fmt: skip
        "With adapters only in blocks `m` and above, the embeddings and blocks `0..m-1` are a fixed function of a "
        "training row. `PrefixCache` (`aletheia_lora.prefix_cache`, `TrainConfig(cache_prefix=True)`) runs them "
        "once per row before training and feeds the stored hidden states to block `m` at every step. This page "
        "measures what that buys over the same selection without the cache and over LoRA on every block.",
        "",
        "## The targets",
        "",
        *_targets_text(result),
        "",
        f"Reproduce: `OMP_NUM_THREADS=1 taskset -c {affinity[0] if affinity else 1} {result['command']}` "
        f"({result['wall_seconds'] / 60:.1f} min here); `.venv/bin/python bench/prefix_cache.py --render-only` "
        "re-renders this page from the JSON. Ratios are what count: the arms run interleaved step by step in one "
        "process, so machine noise hits all arms alike; absolute seconds depend on the machine.",
        "",
        f"## {label[0].upper() + label[1:]}",
        "",
        f"The {model_text} ({sm['model']['num_layers']} blocks, {sm['model']['parameters'] / 1e6:.1f}M "
        f"parameters, {cfg['smollm2']['dtype']}), CPU, {machine['torch_threads']} torch thread; batch "
        f"{sm['batch_size']} x {sm['seq_len']} tokens of `{sm['rows']['data']}` training rows (the training "
        f"benchmark's: the first {sm['rows']['rows']} of its {sm['rows']['of_training_rows']} rows, one epoch of "
        f"{sm['rows']['steps_per_epoch']} steps, every row cached); LoRA r={cfg['r']} (alpha {cfg['lora_alpha']}) "
        f"on all attention and MLP projections of the adapted blocks, AdamW, gradient clipping at "
        f"{cfg['smollm2']['max_grad_norm']:g}; {cfg['untimed_steps']} untimed + {cfg['steps']} timed steps per "
        f"arm. The truncation selection is the probe's (top_pct {cfg['top_pct']:g}, computed here as the training "
        f"benchmark computes it, probe {sm['probe']['seconds']:.1f} s): {_blocks(trunc['layers'])}, "
        f"{trunc_source}. LM head: {sm['head_share_of_forward']:.1%} of the forward FLOPs.",
        "",
        smollm2_table(sm),
        "",
        "Vs all = all-layer median step / arm median step (> 1 is faster); per-round = median of the per-round "
        "ratios (drift-free); vs uncached = the same blocks without the cache / with it. First-step peak growth: "
        "resident memory's peak over the first (untimed) step minus its value before, as the training benchmark "
        "measures it (the arms share one process; the cache's own bytes are held before that step and are listed "
        "apart). Break-even: cache build seconds / seconds saved per step.",
        *([""] + [f"Skipped: `{k}`, {v}." for k, v in sm["skipped_arms"].items()] if sm["skipped_arms"] else []),
        "",
        "### Build once, then every step cached",
        "",
        "The cache is built before training (one forward-only pass of the prefix per row, no autograd), not "
        "during the first epoch, so there is no slower first epoch followed by cached ones: every step, the "
        "first included, runs on cached rows. The first epoch costs the build plus cached steps, every later "
        "epoch cached steps only; the build is repaid once the steps' savings add up to it:",
        "",
        epochs_table(sm),
        "",
        "The loss column compares each cached arm's training losses step by step with the same blocks trained "
        "without the cache (same initial adapters, same batches): the cache is exact, the difference is float "
        "rounding in a different order of operations.",
        "",
        "## The 8 families (scaled random models)",
        "",
        f"The scaled random models of `bench/families.py` (`{cfg['families']['configs_from']}`: real layer "
        "counts, heads, key-value heads and experts; widths divided by the scale; random weights, as speed ratios "
        f"depend on shapes, not weights), batch {cfg['families']['batch_size']} x {cfg['families']['seq_len']} "
        f"random tokens, the same LoRA and steps; the top half of the blocks with and without the cache against "
        "LoRA on every block. LM head share: final norm and head / every block and the head, forward FLOPs "
        "(`CostModel.from_model`).",
        "",
        families_table(result),
        "",
        "## Reading",
        "",
        *_reading(result),
        "",
        "## How it was measured",
        "",
        f"- One process per model; each arm is a LoRA copy of the same base (`lora_copy`, adapters from seed "
        f"{cfg['seed']}); the arms step round-robin, one step each per round with the starting arm rotating. A "
        "step is `timed_step`: forward, backward, clipping where set, AdamW update. The cached arms' batches carry "
        "their row ids (`prefix_cache.ROW_IDS`) and their model is attached to its cache (`cache.attach`) for the "
        "whole run; the cache build is timed apart, never inside a step.",
        f"- Machine: {machine['processor']}, {machine['cpu_count']} CPUs"
        + (f", pinned to CPU {', '.join(map(str, affinity))}" if affinity else "")
        + f"; torch {result['versions'].get('torch')}, transformers {result['versions'].get('transformers')}, "
        f"peft {result['versions'].get('peft')}, Python {result['versions'].get('python')}; {result['created']}.",
        f"- Other processes kept {min(busy):.2f}-{max(busy):.2f} cores busy (median per part) during the rounds "
        "(`/proc/stat` minus this process); the interleaving spreads that noise over all arms.",
        "- No GPU was used; the ratios on a GPU will differ (the skipped prefix forward weighs less where small "
        "operations are launch-bound).",
        "",
    ]
    return "\n".join(lines)


def render_outputs(out: Path, docs: Path | None) -> list[Path]:
    """Write the page ``docs`` (unless None) from ``out/prefix_cache.json``; return the paths written."""
    result = load_result(Path(out) / f"{NAME}.json")
    if docs is None:
        return []
    Path(docs).parent.mkdir(parents=True, exist_ok=True)
    return [write_text(docs, render_docs(result, _rel(Path(out) / f"{NAME}.json")))]


def _rel(path: Path) -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        return str(path.resolve().relative_to(repo))
    except ValueError:
        return os.path.basename(path)
