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
the per-round ratios, tokens/s, the lowest block the backward pass reached (``BackwardDepthMonitor``), the bytes
autograd saved for the backward pass on the first step, and three predictions of the speedup with the error of
each: FLOPs alone (``CostModel.from_model(..., overheads=None)``), the cost model (``CostModel.from_model``: FLOPs
and the CPU overheads of ``aletheia_lora.overheads``, never fitted to this run) and a ``Calibration`` timed in the
same process before the arms, as ``aletheia-lora probe --calibrate`` does (``aletheia_lora.calibrate.calibrate``,
its default placements and steps). Per arm whose lowest block is above 0, and for the layers of the cached arms of
``bench/results/prefix_cache.json``, the cost model's prediction of a prefix-cached step (``cached=True``), which the
rendered page sets against that file's measured cached speedups.

The config's ``smollm2`` entry runs the bundled SmolLM2-135M (real weights, its own shapes, the training
benchmark's batch 4 x 128) the same way, after the 8 families.

    .venv/bin/python bench/families.py [--config bench/configs/families.yaml] [--out bench/results]
        [--docs docs/EVIDENCE.md] [--families NAME,...] [--render-only]

Writes ``families.json``, ``families.md`` and ``families.png`` into ``--out`` and the evidence page ``--docs``,
all rendered from the JSON by the sibling ``families_report.py`` (``--render-only`` re-renders them without
measuring).
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

# The sibling module in bench/: on sys.path when this file runs as a script (tests put bench/ there).
from families_report import ARMS, NAME, PAPER_RANGE, render_outputs, repo_relative

from aletheia_lora import apply_aletheia_lora, gradient_probe, select_layers
from aletheia_lora.allocator import CPU_ALLOCATORS, tune_cpu_allocator
from aletheia_lora.bench.config import RENAMED_SETTINGS, read_settings, renamed_hint
from aletheia_lora.bench.measure import MB, BackwardTrace, launch_prefix, machine_info, package_versions, timed_step
from aletheia_lora.bench.workload import lora_copy
from aletheia_lora.calibrate import calibrate
from aletheia_lora.cost import CostModel
from aletheia_lora.files import write_text
from aletheia_lora.layers import find_decoder_stack
from aletheia_lora.models import ModelConfig
from aletheia_lora.train import EMBEDDINGS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "bench" / "configs" / "families.yaml"
DEFAULT_OUT = REPO / "bench" / "results"
DEFAULT_DOCS = REPO / "docs" / "EVIDENCE.md"
PAPER_MEAN = 1.231  # the paper's mean speedup, recorded in the JSON
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
            where = repo_relative(source)
            how = f"top {k} of the {len(scores)}-layer {model} probe scores ({where}) resampled by depth"
            return sorted(top), how
    return list(range(0, num_layers, 2))[:k], "every other layer from 0 (no real-model probe scores on disk)"


def _random_rows(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, vocab, (length,), generator=g).tolist()} for _ in range(n)]


def build_model(family: dict, cfg: dict) -> tuple[torch.nn.Module, dict, dict]:
    """The family's model in eval mode, its real dims and the dims it was built with.

    A family with ``bundled`` loads that bundled model (real weights, its own shapes); any other is built from its
    real config with the widths divided by its ``scale`` (random weights).
    """
    if family.get("bundled"):
        base = ModelConfig(model=family["bundled"], dtype="float32", device="cpu").load()[0].eval()
        c = base.config
        real = {
            "layers": c.num_hidden_layers, "hidden": c.hidden_size, "intermediate": c.intermediate_size,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "vocab": c.vocab_size, "tied_embeddings": bool(c.tie_word_embeddings),
        }  # fmt: skip
        return base, real, dict(real)
    real = family["real"]
    dims = scaled_dims(real, family["scale"])
    torch.manual_seed(cfg["seed"])
    return T.AutoModelForCausalLM.from_config(hf_config(family["arch"], dims), dtype=torch.float32).eval(), real, dims


def _error(predicted: float, measured: float) -> float:
    return predicted / measured - 1


def cached_layer_sets(family: str, layers: dict[str, list[int]], cached_from: Path | None) -> list[list[int]]:
    """The layer sets whose prefix-cached step the run predicts: every arm whose lowest block is above 0, and the
    cached arms of ``cached_from`` (bench/prefix_cache.py's JSON) for this model."""
    wanted = [v for v in layers.values() if min(v) > 0]
    if cached_from is not None and cached_from.is_file():
        try:
            data = json.loads(cached_from.read_text())
        except (OSError, ValueError):
            data = {}
        records = [data.get("smollm2") or {}] if family == "SmolLM2" else data.get("families") or []
        for record in records:
            if family == "SmolLM2" or record.get("family") == family:
                wanted += [a["layers"] for a in record.get("arms", []) if a.get("cached")]
    unique: list[list[int]] = []
    for v in wanted:
        if sorted(v) not in unique:
            unique.append(sorted(v))
    return unique


def run_family(family: dict, cfg: dict, log=print) -> dict:
    """Build the family's model, probe and calibrate it, train its arms round-robin; return the family's record."""
    started = time.perf_counter()
    base, real, dims = build_model(family, cfg)
    stack = find_decoder_stack(base)
    n = stack.num_layers
    if n != real["layers"]:
        raise RuntimeError(f"{family['family']}: built {n} layers, the real model has {real['layers']}")
    k = max(1, math.floor(n * cfg["top_pct"] / 100))
    seq, bs = cfg["seq_len"], family.get("batch_size", cfg["batch_size"])
    total_steps = cfg["untimed_steps"] + cfg["steps"]

    probe_rows = _random_rows(cfg["probe_batches"], seq, dims["vocab"], cfg["seed"] + 1)
    t0 = time.perf_counter()
    scores = gradient_probe(base, probe_rows, probe_batches=cfg["probe_batches"], seed=cfg["seed"], progress=False)
    probe_seconds = time.perf_counter() - t0
    cost = CostModel.from_model(base, seq_len=seq, batch_size=bs, r=cfg["r"])
    flops = CostModel.from_model(base, seq_len=seq, batch_size=bs, r=cfg["r"], overheads=None)
    g = torch.Generator().manual_seed(cfg["seed"])
    batches = [torch.randint(1, dims["vocab"], (bs, seq), generator=g) for _ in range(total_steps)]
    # as `--calibrate` does: its default placements and steps, on one training batch, before any arm trains
    log(f"  {family['family']}: calibrating")
    t0 = time.perf_counter()
    lora_kwargs = {"lora_alpha": cfg["lora_alpha"], "lora_dropout": 0.0}
    calibration = calibrate(base, {"input_ids": batches[0]}, r=cfg["r"], lora_kwargs=lora_kwargs, stack=stack)
    calibration_seconds = time.perf_counter() - t0
    base.eval()
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
    parameters = sum(p.numel() for p in base.parameters())
    del base

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
        measured = base_median / median
        predicted, flop, calibrated = (c.speedup(layers[name]) for c in (cost, flops, calibration))
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
                "prediction_error": _error(predicted, measured),
                "flop_speedup": flop,
                "flop_error": _error(flop, measured),
                "calibrated_speedup": calibrated,
                "calibrated_error": _error(calibrated, measured),
                "tokens_per_second": bs * seq / median,
                "saved_activations_mb": arm["saved_mb"],
                "trainable_parameters": sum(p.numel() for p in arm["params"]),
                "step_seconds": arm["times"],
            }
        )
    head = flops.step_cost(range(n))
    cached_from = REPO / cfg["cached_from"] if cfg.get("cached_from") else None
    return {
        "family": family["family"],
        "model": family["model"],
        "arch": family.get("arch", real.get("arch", "")),
        "scale": family.get("scale", 1),
        "bundled": bool(family.get("bundled")),
        "batch_size": bs,
        "real": real,
        "scaled": dims,
        "ratio_drift": ratio_drift(real, dims),
        "parameters": parameters,
        "head_share_of_forward": flops.head_forward / head.forward,
        "budget": k,
        "probe": {"seconds": probe_seconds, "scores": {str(i): v for i, v in sorted(scores.items())}},
        "probe_pattern_source": pattern_how,
        "cost_model": cost.description,
        "flop_model": flops.description,
        "calibration": {
            "seconds": calibration_seconds,
            "description": calibration.description,
            "fixed_s": calibration.fixed_s,
            "per_backward_block_s": calibration.per_backward_block_s,
            "per_adapted_block_s": calibration.per_adapted_block_s,
            "timings": [{"layers": list(lay), "seconds": t} for lay, t in calibration.timings],
        },
        "cached_predictions": [
            {
                "layers": lay,
                "predicted_speedup": cost.speedup(lay, cached=True),
                "flop_speedup": flops.speedup(lay, cached=True),
            }
            for lay in cached_layer_sets(family["family"], layers, cached_from)
        ],
        "arms": records,
        "seconds": time.perf_counter() - started,
    }


def error_summary(records: list[dict]) -> dict:
    """Per predictor: the largest and the median |error| over every selection arm (the bands of aletheia_lora.cost
    are the largest, rounded up)."""
    out = {}
    for key in ("flop_error", "prediction_error", "calibrated_error"):
        errors = [abs(a[key]) for fam in records for a in fam["arms"] if a["name"] != "all"]
        out[key] = {"max": max(errors), "median": statistics.median(errors)}
    return out


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
    if cfg.setdefault("cpu_allocator", "default") not in CPU_ALLOCATORS:
        raise SystemExit(f"{path}: cpu_allocator must be one of {list(CPU_ALLOCATORS)}, got {cfg['cpu_allocator']!r}")
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
    cached = REPO / cfg["cached_from"] if cfg.get("cached_from") else None
    tuned = REPO / cfg["tuned_from"] if cfg.get("tuned_from") else None
    if args.render_only:
        for path in render_outputs(args.out, docs, quality, cached, tuned):
            print(f"wrote {path}")
        return 0

    torch.set_num_threads(cfg.get("threads") or 1)
    if cfg["cpu_allocator"] == "tuned":
        tune_cpu_allocator()
    families = list(cfg["families"])
    reference = cfg.get("smollm2")
    if args.families:
        wanted = args.families.split(",")
        unknown = set(wanted) - {f["family"] for f in families} - ({reference["family"]} if reference else set())
        if unknown:
            raise SystemExit(f"unknown families {sorted(unknown)}")
        families = [f for f in families if f["family"] in wanted]
        reference = reference if reference and reference["family"] in wanted else None
    started = time.perf_counter()
    load_before = list(os.getloadavg())
    records = []
    for fam in families + ([reference] if reference else []):
        what = (
            f"bundled {fam['bundled']}"
            if fam.get("bundled")
            else f"{fam['real']['layers']} layers, scale /{fam['scale']}"
        )
        print(f"{fam['family']}: {what}", file=sys.stderr, flush=True)
        records.append(run_family(fam, cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True)))
        rec = records[-1]
        summary = ", ".join(
            f"{a['name']} {a['measured_speedup']:.2f}/{a['predicted_speedup']:.2f}/{a['calibrated_speedup']:.2f}"
            for a in rec["arms"]
        )
        print(f"{fam['family']} ({rec['seconds']:.0f} s), measured/model/calibrated: {summary}", file=sys.stderr,
              flush=True)  # fmt: skip
    flags = argv if argv is not None else sys.argv[1:]
    command = " ".join([*launch_prefix(), ".venv/bin/python", "bench/families.py"] + [shlex.quote(a) for a in flags])
    result = {
        "name": NAME,
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: v for k, v in cfg.items() if k not in ("families", "smollm2")},
        "scaled_dimensions": list(SCALED_KEYS),
        "kept_dimensions": ["layers", "heads", "kv_heads", "tied_embeddings", *EXPERT_KEYS],
        "paper": {"speedup_range": list(PAPER_RANGE), "mean_speedup": PAPER_MEAN, "budget_pct": 50},
        "machine": {**machine_info(torch.device("cpu")), "gpu": None},
        "versions": {"python": platform.python_version(), **package_versions()},
        "load_average": {"before": load_before, "after": list(os.getloadavg())},
        "wall_seconds": time.perf_counter() - started,
        "errors": error_summary(records),
        "families": [r for r in records if not r["bundled"]],
        "smollm2": next((r for r in records if r["bundled"]), None),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / f"{NAME}.json", json.dumps(result, indent=1) + "\n")
    for path in [args.out / f"{NAME}.json", *render_outputs(args.out, docs, quality, cached, tuned)]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
