"""The protocol's summary, computed from the unit files alone: each arm's rate chosen on validation, its test
losses per seed, and its time to all-layer LoRA's quality, read off the units' curves. Given the cost model the
arms were selected with, each seed also holds its training time as predicted before training (the unit's blocks,
freeze timeline and cache builds, :func:`~aletheia_lora.timeline.predict_timeline`) beside the measured one, both over
all-layer LoRA's in the same seed.

An arm registered with ``rate_from`` (:func:`~aletheia_lora.bench.quality.arms.rate_source`) has no sweep: its entry
shows the rate its source chose, ``rate_from`` (the source) and ``sweep: {}``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aletheia_lora.bench.analysis import interpolate_loss, interpolate_time
from aletheia_lora.bench.quality.arms import rate_source
from aletheia_lora.checks import read_data_file
from aletheia_lora.cost import CostModel
from aletheia_lora.select import SelectConfig
from aletheia_lora.timeline import predict_timeline

BASELINE = "all"
# (r, attention_r, mlp_r) -> the cost model at those ranks
CostAt = Callable[[int, int | None, int | None], CostModel]
# The gap the issue asks about: the default reaches all-layer LoRA's best test loss in this share of its time.
GAP_TIME = 0.8


def rate_key(rate: float) -> str:
    """A learning rate as it appears in file names and JSON keys (``0.0003``, ``1.5e-05``)."""
    return f"{rate:g}"


def unit_path(root: Path, task: str, arm: str, rate: float, seed: int) -> Path:
    """Where the unit's JSON lives: ``ROOT/TASK/ARM/lrRATE_seedSEED.json``."""
    return root / task / arm / f"lr{rate_key(rate)}_seed{seed}.json"


def read_unit(path: Path) -> dict | None:
    """A finished unit's record, or None when the unit has not run (no file)."""
    if not path.is_file():
        return None
    return read_data_file(path, label="quality unit", fmt="json")


def choose_rate(sweep: dict[str, float | None]) -> float | None:
    """The validation argmin of a sweep (rate key -> validation loss); ties go to the lower rate. None if empty."""
    done = [(loss, float(key)) for key, loss in sweep.items() if loss is not None and math.isfinite(loss)]
    return min(done)[1] if done else None


def sweep_losses(config: Any, root: Path, task: str, arm: str) -> dict[str, float | None]:
    """``arm``'s sweep on the first seed: rate key -> validation loss (None: that unit has not run).

    The configured rates, then, while the sweep is complete and best at its lowest or highest rate, one rate further
    out by the sweep's ratio at that end (``config.sweep_extensions`` at most): the units the protocol runs next.
    """
    sweep: dict[str, float | None] = {}

    def add(rate: float) -> None:
        unit = read_unit(unit_path(root, task, arm, rate, config.seeds[0]))
        sweep[rate_key(rate)] = None if unit is None else unit["validation_loss"]

    rates = sorted(config.learning_rates)
    for rate in rates:
        add(rate)
    low, high = rates[0], rates[-1]
    for _ in range(getattr(config, "sweep_extensions", 0) if len(rates) > 1 else 0):
        if any(v is None for v in sweep.values()):
            break
        best = choose_rate(sweep)
        if best == high:
            high *= rates[-1] / rates[-2]
            add(high)
        elif best == low:
            low /= rates[1] / rates[0]
            add(low)
        else:
            break
    return sweep


def shared_rate(config: Any, root: Path, task: str, arm: str) -> tuple[float | None, bool]:
    """The rate an arm registered with ``rate_from`` trains at (None until its source's sweep is complete), and
    whether that sweep is complete."""
    sweep = sweep_losses(config, root, task, rate_source(arm))
    complete = all(v is not None for v in sweep.values())
    return (choose_rate(sweep) if complete else None), complete


def _stats(values: list[float | None]) -> dict:
    got = [v for v in values if v is not None]
    if not got:
        return {"mean": None, "sd": None, "sem": None, "n": 0}
    sd = statistics.stdev(got) if len(got) > 1 else None
    return {"mean": statistics.fmean(got), "sd": sd, "sem": None if sd is None else sd / math.sqrt(len(got)),
            "n": len(got)}  # fmt: skip


def _curve(unit: dict) -> list[tuple[float, float]]:
    return [(p["seconds"], p["test_loss"]) for p in unit["curve"]]


def _reference(unit: dict, share: float) -> dict:
    """All-layer LoRA's targets in one seed: its best test loss and when it got there, and the bounded loss."""
    curve = _curve(unit)
    best = min(loss for _, loss in curve)
    base = unit["base"]["test_loss"]
    bounded = base - share * (base - best)
    return {
        "best_test_loss": best,
        "seconds_to_best": interpolate_time(curve, best),
        "bounded_test_loss": bounded,
        "seconds_to_bounded": interpolate_time(curve, bounded),
        "final_test_loss": unit["test_loss"],
        "train_seconds": unit["train_seconds"],
        "steps": unit["steps"],
        "median_step_seconds": unit["median_step_seconds"],
    }


def predicted_time(
    unit: dict, cost: CostModel, train_rows: int | None = None, reference: CostModel | None = None
) -> float:
    """The unit's training time over all-layer LoRA's for as many steps, as the cost model predicts it from the
    unit's blocks, its freeze timeline (progressive arms) and its cache builds (a static cache is built before the
    first step; a progressive one where a freeze has stood an epoch). ``train_rows``: the rows a progressive cache
    build runs over (a static cache records its own; default: the rows of an epoch's steps). ``cost`` prices the
    unit at its own rank; ``reference``, all-layer LoRA's when that differs (default: ``cost``'s all-layer step)."""
    freeze = unit.get("freeze") or {}
    timeline = [{"step": e["step"], "lowest_trainable": e["lowest_trainable"]} for e in freeze.get("timeline", [])]
    cache = unit.get("prefix_cache") or {}
    if "builds" in cache:
        builds = [{"step": b["step"], "block": b["block"]} for b in cache["builds"]]
    else:
        builds = [{"step": 0, "block": cache["block"]}] if "block" in cache else []
    prediction = predict_timeline(
        cost,
        timeline or [{"step": 0, "lowest_trainable": min(unit["layers"])}],
        unit["steps"],
        blocks=unit["layers"],
        cache_builds=builds,
        rows=cache.get("rows") or train_rows or _rows_per_epoch(unit),
    )
    if reference is None:
        return prediction.relative_time
    every = range(cost.num_layers)
    return prediction.relative_time * cost.step_cost(every).effective / reference.step_cost(every).effective


def _predicted(unit: dict, cost_at: CostAt | None, r: int, train_rows: int | None) -> float | None:
    if cost_at is None:
        return None
    lora = unit.get("lora") or {}
    ranks = (int(lora.get("r", r)), lora.get("attention_r"), lora.get("mlp_r"))
    return predicted_time(unit, cost_at(*ranks), train_rows, reference=cost_at(r, None, None))


def _rows_per_epoch(unit: dict) -> int | None:
    batch_size = (unit.get("config") or {}).get("batch_size")
    return unit["steps_per_epoch"] * batch_size if batch_size and "steps_per_epoch" in unit else None


def _ratio(unit: dict, loss: float, reference_seconds: float | None) -> float | None:
    reached = interpolate_time(_curve(unit), loss)
    if reached is None or not reference_seconds:
        return None
    return reached / reference_seconds


def _seed_record(unit: dict, ref: dict | None, predicted: float | None = None) -> dict:
    record = {
        "seed": unit["seed"],
        "layers": unit["layers"],
        "test_loss": unit["test_loss"],
        "validation_loss": unit["validation_loss"],
        "best_test_loss": min(loss for _, loss in _curve(unit)),
        "forgetting": unit["forgetting"],
        "train_seconds": unit["train_seconds"],
        "median_step_seconds": unit["median_step_seconds"],
        "first_step_peak_mb": unit["first_step_peak_mb"],
        "trainable_parameters": unit["trainable_parameters"],
        "time_to_all_quality": None,
        "time_to_bounded_quality": None,
        "equal_time_test_loss_vs_all": None,
        "step_speedup": None,
    }
    # only units of the arms that have them carry these (the older arms' records stay as they were)
    if "freeze" in unit:
        record["frozen_at"] = unit["freeze"]["frozen_at"]
    if "cache_build_seconds" in unit:
        record["cache_build_seconds"] = unit["cache_build_seconds"]
    if ref is None:
        return record
    all_seconds = ref["train_seconds"]
    # A faster arm that finished its epochs before all-layer LoRA's time is read at its end (it stopped there).
    ended_early = unit["train_seconds"] < all_seconds
    at_time = unit["test_loss"] if ended_early else interpolate_loss(_curve(unit), all_seconds)
    record.update(
        time_to_all_quality=_ratio(unit, ref["best_test_loss"], ref["seconds_to_best"]),
        time_to_bounded_quality=_ratio(unit, ref["bounded_test_loss"], ref["seconds_to_bounded"]),
        equal_time_test_loss=at_time,
        equal_time_ended_early=ended_early,
        equal_time_test_loss_vs_all=at_time / ref["final_test_loss"],
        step_speedup=ref["median_step_seconds"] / unit["median_step_seconds"],
    )
    if predicted is not None:
        measured = (unit["train_seconds"] / unit["steps"]) / (all_seconds / ref["steps"])
        record.update(predicted_time_vs_all=predicted, time_vs_all=measured,
                      time_prediction_error=predicted / measured - 1)  # fmt: skip
    return record


def _mean_curve(units: list[dict]) -> list[dict]:
    """The held-out curve over the seeds: mean seconds and losses at each evaluated step, and the test spread."""
    steps = sorted(set.intersection(*({p["step"] for p in u["curve"]} for u in units)))
    points = []
    for step in steps:
        at = [next(p for p in u["curve"] if p["step"] == step) for u in units]
        tests = [p["test_loss"] for p in at]
        points.append({
            "step": step,
            "epoch": at[0].get("epoch", 0.0),
            "seconds": statistics.fmean(p["seconds"] for p in at),
            "validation_loss": statistics.fmean(p["validation_loss"] for p in at),
            "test_loss": statistics.fmean(tests),
            "test_loss_sd": statistics.stdev(tests) if len(tests) > 1 else 0.0,
        })  # fmt: skip
    return points


def _beats(seeds: list[dict], ref_seeds: dict[int, dict]) -> bool | None:
    """Whether the arm's test loss beats all-layer LoRA's: lower in every seed, or by over two standard errors."""
    diffs = [s["test_loss"] - ref_seeds[s["seed"]]["final_test_loss"] for s in seeds if s["seed"] in ref_seeds]
    if not diffs:
        return None
    if all(d < 0 for d in diffs):
        return True
    if len(diffs) > 1:
        sem = statistics.stdev(diffs) / math.sqrt(len(diffs))
        return statistics.fmean(diffs) < -2 * sem
    return False


def summarize(config: Any, root: Path, cost_at: CostAt | None = None) -> dict:
    """The summary of the units under ``root`` (``quality.json``'s content), complete or not; with ``cost_at`` (the
    cost model the arms were selected with, at given ranks: ``r``, ``attention_r``, ``mlp_r``), every seed's
    predicted and measured training time."""
    tasks: dict[str, dict] = {}
    missing: list[str] = []
    for task in config.tasks:
        arms: dict[str, dict] = {}
        for arm in config.arms:
            source = rate_source(arm)
            if source is not None:  # no sweep: every seed at the rate its source chose
                chosen, complete = shared_rate(config, root, task, arm)
                units = []
                for seed in config.seeds if chosen is not None else []:
                    path = unit_path(root, task, arm, chosen, seed)
                    unit = read_unit(path)
                    units.append(unit) if unit is not None else missing.append(str(path.relative_to(root)))
                arms[arm] = {"learning_rate": chosen, "rate_from": source, "sweep": {}, "sweep_complete": complete,
                             "units": units}  # fmt: skip
                continue
            sweep = sweep_losses(config, root, task, arm)
            missing += [
                str(unit_path(root, task, arm, float(key), config.seeds[0]).relative_to(root))
                for key, loss in sweep.items()
                if loss is None
            ]
            complete = all(v is not None for v in sweep.values())
            chosen = choose_rate(sweep) if complete else None
            units = []
            if chosen is not None:
                for seed in config.seeds:
                    path = unit_path(root, task, arm, chosen, seed)
                    unit = read_unit(path)
                    units.append(unit) if unit is not None else missing.append(str(path.relative_to(root)))
            arms[arm] = {"learning_rate": chosen, "sweep": sweep, "sweep_complete": complete, "units": units}
        ref_seeds = {u["seed"]: _reference(u, config.bounded_share) for u in arms[BASELINE]["units"]}
        splits = read_unit(root / task / "splits.json") or {}
        train_rows = splits.get("rows", {}).get("train")
        for name, entry in arms.items():
            units = entry.pop("units")
            predicted = [_predicted(u, cost_at, config.r, train_rows) for u in units]
            seeds = [_seed_record(u, ref_seeds.get(u["seed"]), p) for u, p in zip(units, predicted)]
            entry["seeds"] = seeds
            entry["summary"] = {
                key: _stats([s.get(key) for s in seeds])
                for key in ("test_loss", "time_to_all_quality", "time_to_bounded_quality",
                            "equal_time_test_loss_vs_all", "step_speedup", "forgetting", "first_step_peak_mb",
                            "predicted_time_vs_all", "time_vs_all")
            }  # fmt: skip
            entry["beats_all"] = None if name == BASELINE else _beats(seeds, ref_seeds)
            if units:
                entry["layers"] = units[0]["layers"]
                entry["curve"] = _mean_curve(units)
        tasks[task] = {"arms": arms, "reference": {str(k): v for k, v in sorted(ref_seeds.items())}}
    default = SelectConfig().strategy
    summary = {
        "name": config.name,
        "complete": not missing,
        "missing_units": missing,
        "default_arm": default,
        "tasks": tasks,
    }
    if cost_at is not None:
        errors = [s["time_prediction_error"] for t in tasks.values() for name, a in t["arms"].items()
                  if name != BASELINE for s in a["seeds"] if "time_prediction_error" in s]  # fmt: skip
        summary["time_prediction"] = {
            "cost_model": cost_at(config.r, None, None).description,
            "max_error": max(map(abs, errors)) if errors else None,
            "median_error": statistics.median(map(abs, errors)) if errors else None,
        }
    summary["gap"] = gap(summary, config)
    return summary


def gap(summary: dict, config: Any) -> dict:
    """Does the default arm reach all-layer LoRA's best test loss in <= 0.8x its time on every task, with an
    equal-time test loss no worse, in every seed? ``met`` is None until every unit it needs has run."""
    arm = summary["default_arm"]
    if arm not in config.arms:
        return {"arm": arm, "time_limit": GAP_TIME, "met": None, "tasks": {}, "why": f"arm {arm!r} was not run"}
    per_task = {}
    verdicts = []
    for task, entry in summary["tasks"].items():
        seeds = entry["arms"].get(arm, {}).get("seeds", []) if arm else []
        if len(seeds) < len(config.seeds) or not entry["reference"]:
            per_task[task] = {"met": None, "seeds": []}
            verdicts.append(None)
            continue
        rows = [
            {"seed": s["seed"], "time_to_all_quality": s["time_to_all_quality"],
             "equal_time_test_loss_vs_all": s["equal_time_test_loss_vs_all"],
             "met": s["time_to_all_quality"] is not None and s["time_to_all_quality"] <= GAP_TIME
             and s["equal_time_test_loss_vs_all"] <= 1.0}
            for s in seeds
        ]  # fmt: skip
        met = all(r["met"] for r in rows)
        per_task[task] = {"met": met, "seeds": rows}
        verdicts.append(met)
    met = None if any(v is None for v in verdicts) else all(verdicts)
    return {"arm": arm, "time_limit": GAP_TIME, "met": met, "tasks": per_task}
