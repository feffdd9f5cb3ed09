"""Benchmark: selective LoRA with and without the prefix cache, against LoRA on every block, side by side.

With adapters only in blocks ``m`` and above, the embeddings and blocks ``0..m-1`` are a fixed function of a row;
:class:`~aletheia_lora.prefix_cache.PrefixCache` runs them once per training row before training and feeds the
stored hidden states to block ``m`` at every step. This script measures what that buys, in one process per model,
arms stepped round-robin (one step each per round, the starting arm rotating) on the same batches, so machine noise
hits all arms alike:

* **SmolLM2-135M** (the bundled model, float32, CPU) on the training benchmark's Python-source rows: ``all`` (LoRA
  on every block), ``contiguous`` (the top half) and ``contiguous+cache``, ``truncation`` (the probe's
  truncation-aware selection, computed as the training benchmark computes it) and ``truncation+cache``;
* **the 8 families** of ``bench/families.py`` (its scaled random models): ``all``, ``contiguous`` and
  ``contiguous+cache``, with each model's LM-head share of the forward FLOPs.

Per arm: median step seconds (forward, backward, optimizer; the first steps untimed), ratio to ``all``, the FLOP
model's prediction, first-step peak memory growth; per cached arm: build seconds, cache bytes, the ratio to the
same selection without the cache, the step after which the build has paid for itself, and the largest difference
of its training losses from the uncached twin's (the cache is exact: they train the same adapters).

    .venv/bin/python bench/prefix_cache.py [--config bench/configs/prefix_cache.yaml] [--out bench/results]
        [--docs docs/PREFIX_CACHE.md] [--families NAME,...|none] [--quick] [--render-only]

Writes ``prefix_cache.json`` into ``--out`` and the page ``--docs``, rendered from the JSON by the sibling
``prefix_cache_report.py`` (``--render-only`` re-renders the page without measuring). ``--quick`` is a smoke test
(a tiny random model, two shortened families, a few steps); it needs an ``--out`` other than ``bench/results``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers as T

# Siblings in bench/: on sys.path when this file runs as a script (the tests put bench/ there).
from families import hf_config, scaled_dims
from families import load_config as load_families_config
from prefix_cache_report import NAME, assess_targets, render_outputs

from aletheia_lora import apply_aletheia_lora, select_layers
from aletheia_lora.bench.config import BenchConfig, load_result, read_settings
from aletheia_lora.bench.measure import (
    MB,
    BackwardTrace,
    Memory,
    machine_info,
    own_cpu_s,
    package_versions,
    release_free_memory,
    system_busy_s,
    timed_step,
    wait_for_quiet,
)
from aletheia_lora.bench.workload import Batches, load_workload, lora_copy
from aletheia_lora.cost import CostModel
from aletheia_lora.data import pad_collate
from aletheia_lora.files import write_json
from aletheia_lora.layers import find_decoder_stack
from aletheia_lora.plan import probe_scores
from aletheia_lora.prefix_cache import ROW_IDS, PrefixCache
from aletheia_lora.train import EMBEDDINGS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "bench" / "configs" / "prefix_cache.yaml"
DEFAULT_OUT = REPO / "bench" / "results"
DEFAULT_DOCS = REPO / "docs" / "PREFIX_CACHE.md"
CACHED = "+cache"  # an arm named SELECTION+cache is SELECTION with the prefix cache
SELECTIONS = ("all", "contiguous", "truncation")
# --quick: a tiny random Llama instead of SmolLM2 and two families cut to 4 layers, a few steps (a smoke test).
QUICK = {
    "untimed_steps": 1,
    "steps": 2,
    "quiet": None,
    "smollm2": {
        "model": "tiny",
        "tiny_layers": 6,
        "tiny_hidden": 64,
        "tiny_vocab": 128,
        "max_length": 32,
        "batch_size": 2,
        "probe_batches": 2,
        "committed_from": None,
    },  # fmt: skip
    "families": {"seq_len": 16, "only": ["Llama-3.1", "Mixtral"], "layers": 4, "scale_factor": 4},
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Arms and the round-robin
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Arm:
    """One arm as it trains: its model and optimizer, its prefix cache (cached arms) and what was measured."""

    name: str
    layers: list[int]
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    cache: PrefixCache | None = None
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    measured: dict = field(default_factory=dict)

    @property
    def selection(self) -> str:
        return self.name.removesuffix(CACHED)


def arm_layers(name: str, layers: dict[str, list[int]]) -> list[int]:
    """The blocks of arm ``name`` (``contiguous+cache`` has ``contiguous``'s)."""
    selection = name.removesuffix(CACHED)
    if selection not in layers:
        raise SystemExit(f"unknown arm {name!r}: arms are {', '.join(SELECTIONS)}, each optionally with {CACHED}")
    return layers[selection]


def build_arms(base, names: list[str], layers: dict, rows: list, pad: int, cfg: dict, section: dict) -> tuple:
    """Each arm's LoRA copy of ``base`` (its cache built over ``rows`` for a cached arm); and the arms skipped.

    A cached arm whose lowest block is 0 has no prefix to skip: it is skipped, with the reason recorded.
    """
    arms, skipped = [], {}
    for name in names:
        blocks = arm_layers(name, layers)
        if name.endswith(CACHED) and min(blocks) == 0:
            skipped[name] = f"its lowest block is 0 ({blocks}): no frozen prefix to cache"
            continue
        lora = apply_aletheia_lora(base, blocks, r=cfg["r"], lora_alpha=cfg["lora_alpha"], lora_dropout=0.0)
        model, params, optimizer = lora_copy(
            base, lora, seed=cfg["seed"], learning_rate=cfg["learning_rate"], weight_decay=0.0
        )
        arm = Arm(name, blocks, model, params, optimizer)
        if name.endswith(CACHED):
            arm.cache = PrefixCache.build(
                model, rows, pad_token_id=pad, batch_size=section["cache_batch_size"], progress=False
            )
            log(f"  {name}: cache of blocks 0-{arm.cache.block - 1} built in {arm.cache.build_seconds:.1f} s")
        arms.append(arm)
    return arms, skipped


def run_round_robin(arms: list[Arm], batch, row_ids, total: int, max_grad_norm: float, label: str) -> list[float]:
    """``total`` rounds, one step of each arm per round, the starting arm rotating; returns the busy cores that
    other processes used per round (the timings' noise)."""
    memory = Memory(torch.device("cpu"))
    others = []
    with contextlib.ExitStack() as attached:
        for arm in arms:
            if arm.cache is not None:
                attached.enter_context(arm.cache.attach(arm.model))
        for step in range(total):
            busy0, own0, start = system_busy_s(), own_cpu_s(), time.perf_counter()
            k = step % len(arms)
            for arm in arms[k:] + arms[:k]:
                inputs = dict(batch(step))
                if arm.cache is not None:
                    inputs[ROW_IDS] = row_ids(step)
                with contextlib.ExitStack() as measuring:
                    if step == 0:  # the first, untimed step carries the measuring hooks (as the training bench)
                        trace = measuring.enter_context(BackwardTrace(arm.model))
                        peak_start = memory.start_peak()
                    loss, seconds = timed_step(
                        arm.model, inputs, arm.optimizer, params=arm.params, max_grad_norm=max_grad_norm
                    )
                if step == 0:
                    growth = memory.peak_growth(peak_start)
                    arm.measured = {
                        "lowest_layer_reached": "embeddings" if trace.lowest == EMBEDDINGS else trace.lowest,
                        "saved_activations_mb": trace.saved.bytes / MB,
                        "first_step_peak_growth_mb": None if growth is None else growth / MB,
                    }
                arm.times.append(seconds)
                arm.losses.append(float(loss.detach()))
            wall = time.perf_counter() - start
            others.append(max(system_busy_s() - busy0 - (own_cpu_s() - own0), 0.0) / wall)
            log(f"  {label}: round {step + 1}/{total}")
    return others


def flops_speedup(cost: CostModel, layers: list[int], cached: bool) -> float:
    """The FLOP model's step-time ratio all-layer LoRA / this arm; a cached arm skips the prefix's forward."""
    total = cost.step_cost(layers).total
    if cached:
        total -= sum(cost.block_forward[: min(layers)])
    return cost.step_cost(range(cost.num_layers)).total / total


def summarize(arms: list[Arm], cost: CostModel, untimed: int, tokens: int, steps_per_epoch: int) -> list[dict]:
    """Each arm's record: blocks, step times and ratios, memory; for a cached arm its cache and break-even."""
    by_name = {arm.name: arm for arm in arms}
    base = by_name["all"].times[untimed:]
    records = []
    for arm in arms:
        times = arm.times[untimed:]
        median = statistics.median(times)
        record = {
            "name": arm.name,
            "selection": arm.selection,
            "cached": arm.cache is not None,
            "layers": arm.layers,
            "num_adapted": len(arm.layers),
            "lowest_layer": min(arm.layers),
            **arm.measured,
            "median_step_seconds": median,
            "speedup_vs_all": statistics.median(base) / median,
            "paired_speedup_vs_all": statistics.median(b / t for b, t in zip(base, times)),
            "predicted_speedup_vs_all": flops_speedup(cost, arm.layers, arm.cache is not None),
            "tokens_per_second": tokens / median,
            "trainable_parameters": sum(p.numel() for p in arm.params),
            "step_seconds": arm.times,
            "losses": arm.losses,
        }
        twin = by_name.get(arm.selection) if arm.cache is not None else None
        if arm.cache is not None:
            build = arm.cache.build_seconds  # unrounded: the summary rounds it
            record["cache"] = {
                **arm.cache.summary(),
                "build_seconds": build,
                "seconds_per_row": build / len(arm.cache.lengths),
            }
        if twin is not None:
            uncached = statistics.median(twin.times[untimed:])
            saving = uncached - median
            build = arm.cache.build_seconds
            record["vs_uncached"] = {
                "uncached_median_step_seconds": uncached,
                "speedup": uncached / median,
                "paired_speedup": statistics.median(u / t for u, t in zip(twin.times[untimed:], times)),
                "saving_per_step_seconds": saving,
                # the build is repaid after this many steps (None: no step was saved)
                "break_even_steps": build / saving if saving > 0 else None,
                "break_even_epochs": build / saving / steps_per_epoch if saving > 0 else None,
                "max_loss_difference": max(abs(a - b) for a, b in zip(arm.losses, twin.losses)),
            }
            record["epochs"] = {
                "steps_per_epoch": steps_per_epoch,
                "first_epoch_seconds": build + steps_per_epoch * median,
                "later_epoch_seconds": steps_per_epoch * median,
                "uncached_epoch_seconds": steps_per_epoch * uncached,
            }
        records.append(record)
    return records


def head_share(cost: CostModel) -> float:
    """The LM head's share of the forward FLOPs (final norm and head / every block and the head)."""
    return cost.head_forward / cost.step_cost(range(cost.num_layers)).forward


# --------------------------------------------------------------------------------------------------------------
# SmolLM2
# --------------------------------------------------------------------------------------------------------------


def _committed_truncation(path: Path | None) -> dict | None:
    """The truncation arm's blocks in a committed training-benchmark result, if there is one."""
    if path is None or not path.is_file():
        return None
    data = load_result(path)
    for arm in data.get("arms", []):
        if arm.get("name") == "truncation":
            return {"file": os.path.relpath(path, REPO), "layers": arm["layers"], "command": data.get("command")}
    return None


def index_rows(n: int) -> list[dict]:
    """One-token rows whose token is their index: batched by :class:`Batches` with the seed and batch size of the
    training rows, they give each batch's row indices (Batches' order depends on the row count and seed only)."""
    return [{"input_ids": [i]} for i in range(n)]


def run_smollm2(cfg: dict) -> dict:
    """Load the model and rows, probe, build the arms, step them round-robin; return the record."""
    s = cfg["smollm2"]
    started = time.perf_counter()
    total = cfg["untimed_steps"] + cfg["steps"]
    tiny = {k: s[k] for k in ("tiny_layers", "tiny_hidden", "tiny_vocab") if k in s}
    workload = BenchConfig(
        model=s["model"], dtype=s["dtype"], device="cpu", threads=cfg["threads"], data=s["data"], general_data=None,
        max_length=s["max_length"], max_train_chars=s["max_train_chars"], max_eval_chars=s["max_eval_chars"],
        eval_blocks=1, batch_size=s["batch_size"], max_steps=max(total, 3), seed=cfg["seed"], r=cfg["r"],
        top_pct=cfg["top_pct"], probe_batches=s["probe_batches"], probe_batch_size=s["probe_batch_size"],
        progress=False, **tiny,
    )  # fmt: skip
    t0 = time.perf_counter()
    base, train_rows, _, _, pad = load_workload(workload, torch.device("cpu"))
    load_seconds = time.perf_counter() - t0
    base.eval()
    stack = find_decoder_stack(base)
    n, bs = stack.num_layers, s["batch_size"]
    probe = {"probe_batches": s["probe_batches"], "batch_size": s["probe_batch_size"], "seed": cfg["seed"]}
    scores, probe_seconds = probe_scores(base, train_rows, probe, pad_token_id=pad, stack=stack)
    cost = CostModel.from_model(base, seq_len=s["max_length"], batch_size=bs, r=cfg["r"], stack=stack)
    k = max(1, math.floor(n * cfg["top_pct"] / 100))
    layers = {
        "all": list(range(n)),
        "contiguous": list(range(n - k, n)),
        "truncation": select_layers(scores, cfg["top_pct"], strategy="truncation", cost=cost),
    }
    rows = train_rows[: total * bs]
    steps_per_epoch = math.ceil(len(rows) / bs)
    arms, skipped = build_arms(base, s["arms"], layers, rows, pad, cfg, s)
    parameters = sum(p.numel() for p in base.parameters())
    del base
    release_free_memory()
    batches = Batches(rows, bs, cfg["seed"], pad, torch.device("cpu"))
    ids = Batches(index_rows(len(rows)), bs, cfg["seed"], 0, torch.device("cpu"))
    others = run_round_robin(arms, batches, lambda i: ids(i)["input_ids"][:, 0], total, s["max_grad_norm"], "smollm2")
    committed = _committed_truncation(REPO / s["committed_from"] if s.get("committed_from") else None)
    return {
        "model": {"name": s["model"], "type": stack.model_type, "num_layers": n, "parameters": parameters},
        "rows": {
            "data": s["data"],
            "rows": len(rows),
            "tokens": sum(len(r["input_ids"]) for r in rows),
            "of_training_rows": len(train_rows),
            "steps_per_epoch": steps_per_epoch,
        },  # fmt: skip
        "batch_size": bs,
        "seq_len": s["max_length"],
        "head_share_of_forward": head_share(cost),
        "cost_model": cost.description,
        "probe": {"seconds": probe_seconds, "scores": {str(i): v for i, v in sorted(scores.items())}},
        "truncation": {
            "layers": layers["truncation"],
            "how": "select_layers(probe scores, top_pct, strategy='truncation', cost=CostModel.from_model(...)) on "
            "the training rows, as the training benchmark selects",
            "committed": committed,
            "same_as_committed": None if committed is None else committed["layers"] == layers["truncation"],
        },
        "skipped_arms": skipped,
        "other_cores_busy": {"median": statistics.median(others), "max": max(others)},
        "load_seconds": load_seconds,
        "arms": summarize(arms, cost, cfg["untimed_steps"], bs * s["max_length"], steps_per_epoch),
        "seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------------------------


def run_family(family: dict, cfg: dict) -> dict:
    """Build the family's scaled random model, its arms, step them round-robin; return the family's record."""
    f = cfg["families"]
    started = time.perf_counter()
    dims = scaled_dims(family["real"], family["scale"])
    torch.manual_seed(cfg["seed"])
    base = T.AutoModelForCausalLM.from_config(hf_config(family["arch"], dims), dtype=torch.float32).eval()
    stack = find_decoder_stack(base)
    n, bs, seq = stack.num_layers, f["batch_size"], f["seq_len"]
    total = cfg["untimed_steps"] + cfg["steps"]
    k = max(1, math.floor(n * cfg["top_pct"] / 100))
    layers = {"all": list(range(n)), "contiguous": list(range(n - k, n))}
    g = torch.Generator().manual_seed(cfg["seed"])
    rows = [{"input_ids": torch.randint(1, dims["vocab"], (seq,), generator=g).tolist()} for _ in range(total * bs)]
    cost = CostModel.from_model(base, seq_len=seq, batch_size=bs, r=cfg["r"], stack=stack)
    arms, skipped = build_arms(base, f["arms"], layers, rows, 0, cfg, f)
    parameters = sum(p.numel() for p in base.parameters())
    del base
    release_free_memory()
    batches = [pad_collate(rows[i * bs : (i + 1) * bs], 0) for i in range(total)]
    ids = [torch.arange(i * bs, (i + 1) * bs) for i in range(total)]
    others = run_round_robin(arms, batches.__getitem__, ids.__getitem__, total, f["max_grad_norm"], family["family"])
    return {
        "family": family["family"],
        "model": family["model"],
        "arch": family["arch"],
        "scale": family["scale"],
        "real": family["real"],
        "scaled": dims,
        "parameters": parameters,
        "head_share_of_forward": head_share(cost),
        "skipped_arms": skipped,
        "other_cores_busy": {"median": statistics.median(others), "max": max(others)},
        "arms": summarize(arms, cost, cfg["untimed_steps"], bs * seq, total),
        "seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------------------------------
# Config and main
# --------------------------------------------------------------------------------------------------------------


def _merge(cfg: dict, overrides: dict) -> dict:
    out = copy.deepcopy(cfg)
    for key, value in overrides.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) and key in out else value
    return out


def load_config(path: Path, *, quick: bool = False) -> dict:
    """The settings (``QUICK`` applied for ``--quick``) with the families' list read from their own config."""
    try:
        cfg = read_settings(path)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    required = ("threads", "seed", "top_pct", "r", "lora_alpha", "learning_rate", "untimed_steps", "steps",
                "targets", "smollm2", "families")  # fmt: skip
    missing = [key for key in required if key not in cfg]
    if missing:
        raise SystemExit(f"{path}: missing {missing}")
    if cfg["untimed_steps"] < 1 or cfg["steps"] < 1:
        raise SystemExit(f"{path}: untimed_steps and steps must be >= 1")
    if not 1 <= cfg["top_pct"] < 100:
        raise SystemExit(f"{path}: top_pct must be in [1, 100), got {cfg['top_pct']!r}")
    if quick:
        cfg = _merge(cfg, QUICK)
    for part in ("smollm2", "families"):
        if "all" not in cfg[part]["arms"]:
            raise SystemExit(f"{path}: {part}.arms must include 'all' (every ratio is taken against it)")
        for name in cfg[part]["arms"]:
            if name.removesuffix(CACHED) not in SELECTIONS:
                raise SystemExit(f"{path}: unknown arm {name!r} in {part}.arms")
    source = REPO / cfg["families"]["configs_from"]
    families = load_families_config(source)["families"]
    f = cfg["families"]
    if f.get("only"):
        families = [fam for fam in families if fam["family"] in f["only"]]
    if f.get("layers"):  # --quick: fewer layers, narrower (the scale multiplied)
        families = [{**fam, "real": {**fam["real"], "layers": f["layers"]}, "scale": fam["scale"] * f["scale_factor"]}
                    for fam in families]  # fmt: skip
    cfg["families"]["list"] = families
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="the page; 'none' to skip it")
    parser.add_argument("--families", help="comma-separated family names to run, or 'none' (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, two short families")
    parser.add_argument("--render-only", action="store_true", help="re-render the page from the existing JSON")
    args = parser.parse_args(argv)
    docs = None if str(args.docs) == "none" else args.docs
    if args.render_only:
        for path in render_outputs(args.out, docs):
            print(f"wrote {path}")
        return 0
    if args.quick and args.out.resolve() == DEFAULT_OUT.resolve():
        raise SystemExit(
            "--quick writes a smoke-test result, not a measurement: give an --out other than bench/results"
        )
    cfg = load_config(args.config, quick=args.quick)
    families = cfg["families"].pop("list")
    if args.families:
        wanted = [] if args.families == "none" else args.families.split(",")
        unknown = sorted(set(wanted) - {fam["family"] for fam in families})
        if unknown:
            raise SystemExit(f"unknown families {unknown}")
        families = [fam for fam in families if fam["family"] in wanted]

    torch.set_num_threads(cfg["threads"])
    T.logging.set_verbosity_error()
    quiet = None
    if cfg.get("quiet"):
        quiet = wait_for_quiet(cfg["quiet"]["max_wait_s"], cfg["quiet"]["threshold_cores"])
    started = time.perf_counter()
    load_before = list(os.getloadavg())
    log(f"smollm2 ({cfg['smollm2']['model']})")
    smollm2 = run_smollm2(cfg)
    log(", ".join(f"{a['name']} {a['speedup_vs_all']:.2f}x" for a in smollm2["arms"]))
    records = []
    for fam in families:
        log(f"{fam['family']}: {fam['real']['layers']} layers, scale /{fam['scale']}")
        records.append(run_family(fam, cfg))
        log(", ".join(f"{a['name']} {a['speedup_vs_all']:.2f}x" for a in records[-1]["arms"]))
    flags = argv if argv is not None else sys.argv[1:]
    result = {
        "name": NAME,
        "command": " ".join([".venv/bin/python", "bench/prefix_cache.py"] + [shlex.quote(a) for a in flags]),
        "quick": args.quick,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": cfg,
        "machine": {
            **machine_info(torch.device("cpu")),
            "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "gpu": None,
        },
        "versions": {"python": platform.python_version(), **package_versions()},
        "quiet_wait": quiet,
        "load_average": {"before": load_before, "after": list(os.getloadavg())},
        "wall_seconds": time.perf_counter() - started,
        "smollm2": smollm2,
        "families": records,
    }
    result["targets"] = assess_targets(result)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{NAME}.json", result)
    for path in [args.out / f"{NAME}.json", *render_outputs(args.out, docs)]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
