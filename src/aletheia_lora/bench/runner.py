"""The arms and how they train: built from one probe of the base model, then stepped round-robin through the three
views (equal steps, equal time, time to quality) by :func:`run_bench`."""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from aletheia_lora.bench.analysis import assess_targets, compare_arms, interpolate_loss
from aletheia_lora.bench.config import BASELINE, BEYOND_ARMS, COSINE_FLOOR, STRATEGY_ARMS, BenchConfig
from aletheia_lora.bench.measure import MB, BackwardTrace, Memory, machine_info, release_free_memory, timed_step
from aletheia_lora.bench.render import render_outputs
from aletheia_lora.bench.workload import Batches, load_workload, lora_copy
from aletheia_lora.calibrate import Calibration, calibrate
from aletheia_lora.cost import CostModel
from aletheia_lora.depth import EMBEDDINGS
from aletheia_lora.evaluation import evaluate_loss
from aletheia_lora.files import write_json
from aletheia_lora.layers import DecoderStack, find_decoder_stack
from aletheia_lora.pipeline import versions
from aletheia_lora.plan import choose_layers, lora_config_for, probe_scores, selection_cost
from aletheia_lora.probe import ProbeConfig
from aletheia_lora.reprobe import move_adapters, reselect, set_trainable_layers
from aletheia_lora.select import (
    SelectConfig,
    select_layers,
    selection_frontier,
    summarize_selection,
)

logger = logging.getLogger(__name__)


def learning_rate_at(step: int, config: BenchConfig) -> float:
    """Learning rate of the step with 0-based index ``step``: linear warm-up, then constant or cosine."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if config.lr_scheduler_type == "constant":
        return config.learning_rate
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.learning_rate * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Arm:
    """One arm as it trains: its model, optimizer, step times, losses, held-out curve and views."""

    name: str
    kind: str
    layers: list[int]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    views: dict[str, dict] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    lowest_reached: int | None = None
    charge: float | None = None  # seconds charged for each untimed step: the arm's median timed step
    extra: dict[int, float] = field(default_factory=dict)  # seconds spent after step k besides training (re-probes)
    info: dict[str, Any] = field(default_factory=dict)  # what the arm adds to its blocks (ranks, re-probe history)

    @property
    def steps(self) -> int:
        return len(self.times)

    def clock_at(self, step: int, untimed: int) -> float:
        """Training seconds after ``step`` steps, untimed steps charged at the arm's median."""
        timed = sum(self.times[untimed:step])
        charge = self.charge if self.charge is not None else statistics.median(self.times[:untimed] or [0.0])
        return timed + charge * min(step, untimed) + sum(s for k, s in self.extra.items() if k < step)


def _pick_frontier(points: list, taken: list[tuple[int, ...]], n: int) -> list:
    """``n`` frontier points dividing the frontier evenly from its lowest to its highest lowest block.

    Each is the point nearest to ``i / (n + 1)`` of the way along (``i = 1..n``) whose layers are not already an
    arm (``taken``) nor picked; the ends of the frontier are usually the score and contiguous arms.
    """
    free = [i for i, p in enumerate(points) if tuple(p.layers) not in taken]
    picked: list[int] = []
    for i in range(1, n + 1):
        remaining = [j for j in free if j not in picked]
        if not remaining:
            break
        aim = i * (len(points) - 1) / (n + 1)
        picked.append(min(remaining, key=lambda j: (abs(j - aim), j)))
    return [points[j] for j in sorted(picked)]


class Runner:
    """Holds the arms and trains, evaluates and times them."""

    def __init__(
        self,
        config: BenchConfig,
        batches: Batches,
        target_rows: list,
        general_rows: list | None,
        pad: int,
        device: torch.device,
        stack: DecoderStack,
    ) -> None:
        self.config, self.batches, self.target_rows, self.general_rows = config, batches, target_rows, general_rows
        self.pad, self.device, self.stack = pad, device, stack
        self.memory = Memory(device)
        self.arms: list[Arm] = []
        self.order: list[dict] = []  # every step of every arm, in the order they ran
        self.load: list[float] = []
        self.bar = tqdm(desc="bench", unit="step", disable=not config.progress)

    def loss(self, model: nn.Module, rows: list | None) -> float | None:
        """Mean loss of ``model`` on ``rows``; None without rows (no general corpus: forgetting not measured)."""
        if rows is None:
            return None
        return evaluate_loss(model, rows, batch_size=self.config.eval_batch_size, pad_token_id=self.pad)["loss"]

    def add_arm(self, base: nn.Module, name: str, kind: str, layers: list[int], scores=None) -> Arm:
        config = self.config
        release_free_memory()
        start = self.memory.current()
        lora_kwargs = {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": 0.0}
        lora_kwargs["rank_allocation"] = "scores" if kind == "ranks" else "uniform"
        info: dict[str, Any] = {}
        # reprobe: adapters on every block; set_trainable_layers picks those that train
        lora, allocation = lora_config_for(
            base, layers, lora_kwargs, scores=scores, every_block=kind == "reprobe", stack=self.stack
        )
        if allocation is not None:
            info = {
                "ranks": {str(layer): max(kinds.values()) for layer, kinds in sorted(allocation.ranks.items())},
                "lora_parameters": allocation.total_params,
                "uniform_parameters": allocation.uniform_params,
            }
        # reprobe: the optimizer holds every adapter (AdamW skips those without a gradient: the frozen ones)
        model, params, optimizer = lora_copy(
            base, lora, seed=config.seed, learning_rate=config.learning_rate, weight_decay=config.weight_decay
        )
        if kind == "reprobe":
            set_trainable_layers(model, layers)
            info = {"every": config.reprobe_every, "history": [{"step": 0, "layers": list(layers)}]}
        end = self.memory.current()
        arm = Arm(name, kind, list(layers), model, optimizer, params, info=info)
        arm.memory = {
            "kind": self.memory.kind,
            "build_mb": None if start is None or end is None else (end - start) / MB,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        self.arms.append(arm)
        return arm

    def reprobe(self, arm: Arm) -> None:
        """Probe the arm's model as trained so far, on other rows, and move its trainable adapters."""
        config = self.config
        scores, layers, seconds = reselect(
            arm.model,
            self.batches.rows,
            select=SelectConfig(top_pct=config.top_pct, strategy="score"),
            probe=ProbeConfig(probe_batches=config.probe_batches, probe_batch_size=config.probe_batch_size),
            seed=config.seed + arm.steps,
            pad_token_id=self.pad,
        )
        start = time.perf_counter()
        before = arm.info["history"][-1]["layers"]
        entry = move_adapters(arm.model, layers, before=before, scores=scores)
        arm.extra[arm.steps] = seconds + time.perf_counter() - start
        arm.info["history"].append({"step": arm.steps, **entry, "seconds": arm.extra[arm.steps]})

    def step(self, arm: Arm, phase: str) -> None:
        """One optimizer step of ``arm`` on the batch of its step index; evaluates on the cadence."""
        config, index = self.config, arm.steps
        batch = self.batches(index)
        for group in arm.optimizer.param_groups:
            group["lr"] = learning_rate_at(index, config)
        first = index == 0
        with contextlib.ExitStack() as measuring:
            if first:  # measured on the first (untimed) step only, so the timed steps carry no hooks
                trace = BackwardTrace(arm.model)
                peak_start = self.memory.start_peak()
                measuring.enter_context(trace)
            loss, seconds = timed_step(
                arm.model,
                batch,
                arm.optimizer,
                params=arm.params,
                max_grad_norm=config.max_grad_norm,
                device=self.device,
            )
        if first:
            arm.lowest_reached = trace.lowest
            growth = self.memory.peak_growth(peak_start)
            arm.memory["first_step_peak_mb"] = None if growth is None else growth / MB
            arm.memory["saved_activations_mb"] = trace.saved.bytes / MB
        arm.times.append(seconds)
        arm.losses.append(float(loss.detach()))
        self.order.append({"arm": arm.name, "step": arm.steps, "phase": phase})
        self.bar.update(1)
        self.bar.set_postfix(phase=phase, arm=arm.name)
        if arm.steps % config.eval_steps == 0:
            self.evaluate(arm, phase)
        if arm.kind == "reprobe" and arm.steps % config.reprobe_every == 0:
            self.reprobe(arm)

    def evaluate(self, arm: Arm, phase: str) -> float:
        """Held-out target loss of ``arm`` now (once per step count), added to its curve."""
        if arm.evals and arm.evals[-1]["step"] == arm.steps:
            return arm.evals[-1]["loss"]
        loss = self.loss(arm.model, self.target_rows)
        arm.evals.append({"step": arm.steps, "loss": loss, "phase": phase})
        return loss

    def view(self, arm: Arm, name: str, phase: str) -> None:
        """Record the target and general losses of ``arm`` now as the view ``name``."""
        arm.views[name] = {
            "steps": arm.steps,
            "target_loss": self.evaluate(arm, phase),
            "general_loss": self.loss(arm.model, self.general_rows),
            "interpolated": False,
        }

    def rounds(self, wants, phase: str, first_round: int) -> int:
        """Round-robin over the arms ``wants`` accepts, one step each per round, until none does."""
        round_index = first_round
        while True:
            stepping = [arm for arm in self.arms if wants(arm)]
            if not stepping:
                return round_index
            self.load.append(os.getloadavg()[0])
            k = round_index % len(stepping)
            for arm in stepping[k:] + stepping[:k]:
                self.step(arm, phase)
            round_index += 1


def _arm_specs(config: BenchConfig, scores, cost: CostModel, num_layers: int) -> tuple[list, list]:
    """``(name, kind, layers)`` of every arm in the configured order, and the whole selection frontier."""
    specs: list[tuple[str, str, list[int]]] = []
    for kind in config.arms:
        if kind == BASELINE:
            specs.append((kind, kind, list(range(num_layers))))
        elif kind in BEYOND_ARMS:
            specs.append((kind, kind, select_layers(scores, config.top_pct, strategy="score", cost=cost)))
        elif kind != "frontier":
            specs.append((kind, kind, select_layers(scores, config.top_pct, strategy=kind, cost=cost)))
    frontier = selection_frontier(scores, config.top_pct, cost=cost)
    if "frontier" in config.arms:
        picked = _pick_frontier(frontier, [tuple(layers) for _, _, layers in specs], config.frontier_points)
        at = config.arms.index("frontier")  # the named arms before it
        specs[at:at] = [(f"frontier-{p.lowest_layer}", "frontier", list(p.layers)) for p in picked]
    return specs, frontier


def _train_views(runner: Runner, base_target: float) -> tuple[float, float, float]:
    """Train the arms through the three views; return all-layer LoRA's time, its loss and the time cap."""
    config = runner.config
    baseline = next(arm for arm in runner.arms if arm.kind == BASELINE)
    untimed, steps = config.untimed_steps, config.max_steps

    # 1. equal steps
    logger.info("training %d arms round-robin for %d steps each", len(runner.arms), steps)
    runner.rounds(lambda arm: arm.steps < steps, "equal_steps", 0)
    for arm in runner.arms:
        arm.charge = statistics.median(arm.times[untimed:steps])
        runner.view(arm, "equal_steps", "equal_steps")
    all_seconds = baseline.clock_at(steps, untimed)

    # 2. equal time: step while that brings the clock nearer to the all-layer time
    def nearer(limit: float):
        return lambda arm: arm is not baseline and arm.clock_at(arm.steps, untimed) + arm.charge / 2 < limit

    logger.info("equal time: training the faster arms up to %.1f s each", all_seconds)
    next_round = runner.rounds(nearer(all_seconds), "equal_time", steps)
    for arm in runner.arms:
        if arm.steps == steps and arm.clock_at(steps, untimed) - all_seconds <= arm.charge / 2:
            arm.views["equal_time"] = dict(arm.views["equal_steps"])
        elif arm.steps > steps:
            runner.view(arm, "equal_time", "equal_time")
        else:  # slower than all-layer LoRA by over half a step: read its curve at the all-layer time
            curve = [(0.0, base_target)] + [(arm.clock_at(e["step"], untimed), e["loss"]) for e in arm.evals]
            arm.views["equal_time"] = {
                "steps": steps,
                "target_loss": interpolate_loss(curve, all_seconds),
                "general_loss": None,
                "interpolated": True,
            }

    # 3. time to quality: train on until the all-layer loss is reached or the cap
    goal = baseline.views["equal_steps"]["target_loss"]
    cap_seconds = config.quality_cap * all_seconds
    within_cap = nearer(cap_seconds)

    def unreached(arm: Arm) -> bool:
        return not any(e["loss"] <= goal for e in arm.evals) and within_cap(arm)

    logger.info("time to quality: training arms that have not reached loss %.4f, up to %.1f s", goal, cap_seconds)
    runner.rounds(unreached, "time_to_quality", next_round)
    for arm in runner.arms:
        runner.evaluate(arm, "time_to_quality")  # the curve ends where training ended
    runner.bar.close()
    return all_seconds, goal, cap_seconds


def run_bench(
    config: BenchConfig,
    out_dir: str | os.PathLike = "bench/results",
    *,
    command: str | None = None,
    docs: str | os.PathLike | None = None,
    render: bool = True,
) -> dict:
    """Run the benchmark and write ``train_NAME.json``, ``train_NAME.md`` and the plots into ``out_dir``.

    Args:
        config: The settings.
        out_dir: Output folder (created if needed; only this run's ``train_NAME.*`` files are written).
        command: The command line that ran this, recorded in the JSON and the tables.
        docs: Also write the benchmark page (e.g. ``docs/BENCHMARKS.md``) here.
        render: Write the Markdown, plots and page (:func:`render_outputs`); False writes the JSON only, for a
            caller that renders itself and wants the paths written.

    Returns:
        The result written to the JSON.
    """
    if not isinstance(config, BenchConfig):
        raise TypeError(f"config must be a BenchConfig, got {type(config).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    load_before = list(os.getloadavg())
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)

    base, train_rows, target_rows, general_rows, pad = load_workload(config, device)
    stack = find_decoder_stack(base)
    num_layers = stack.num_layers
    base.eval()
    batches = Batches(train_rows, config.batch_size, config.seed, pad, device)
    runner = Runner(config, batches, target_rows, general_rows, pad, device, stack)
    base_target = runner.loss(base, target_rows)
    base_general = runner.loss(base, general_rows)

    probe = {"probe_batches": config.probe_batches, "batch_size": config.probe_batch_size, "seed": config.seed}
    scores, probe_seconds = probe_scores(
        base, train_rows, probe, pad_token_id=pad, progress=config.progress, stack=stack
    )

    cost = CostModel.from_model(base, seq_len=config.max_length, batch_size=config.batch_size, r=config.r, stack=stack)
    specs, frontier = _arm_specs(config, scores, cost, num_layers)
    calibration, calibration_seconds = None, None
    if config.calibrate:
        # as `--calibrate` does (its placements and steps, on the first training batch), with the arms' LoRA; the
        # selections stay the cost model's, the calibration only predicts beside it
        start = time.perf_counter()
        lora_kwargs = {"lora_alpha": config.lora_alpha, "lora_dropout": 0.0}
        calibration = calibrate(base, batches(0), r=config.r, lora_kwargs=lora_kwargs, stack=stack)
        calibration_seconds = time.perf_counter() - start
    # What `aletheia-lora probe|train` would pick with each strategy (its cost model assumes its default rank).
    shape = {"seq_len": config.max_length, "batch_size": config.batch_size}
    cli_cost = selection_cost(base, **shape, stack=stack)
    cli_layers = {
        kind: list(
            choose_layers(
                base,
                None,
                select={"top_pct": config.top_pct, "strategy": kind},
                **shape,
                scores=scores,
                cost=cli_cost,
                stack=stack,
            )[1].layers
        )
        for kind in STRATEGY_ARMS
    }
    for name, kind, layers in specs:
        runner.add_arm(base, name, kind, layers, scores)
    del base
    release_free_memory()
    all_seconds, goal, cap_seconds = _train_views(runner, base_target)

    result = {
        "name": config.name,
        "command": command or f"run_bench(BenchConfig(name={config.name!r}), {str(out_dir)!r})",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
        "model": {"name": config.model, "type": stack.model_type, "num_layers": num_layers},
        "machine": machine_info(device),
        "versions": versions(),
        "load_average": {"before": load_before, "during": runner.load, "after": list(os.getloadavg())},
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "probe": {"seconds": probe_seconds, "scores": {str(k): v for k, v in sorted(scores.items())}},
        "cost_model": cost.description,
        "calibration": None
        if calibration is None
        else {
            "seconds": calibration_seconds,
            "description": calibration.description,
            "timings": [{"layers": list(layers), "seconds": t} for layers, t in calibration.timings],
        },
        "cli_layers": cli_layers,
        "frontier": [
            {
                "lowest_layer": p.lowest_layer,
                "layers": list(p.layers),
                "score_share": p.captured_share,
                "predicted_speedup": p.speedup,
                "pareto": p.pareto,
            }
            for p in frontier
        ],
        "base": {"target_loss": base_target, "general_loss": base_general},
        "equal_time_seconds": all_seconds,
        "quality": {"target_loss": goal, "cap": config.quality_cap, "cap_seconds": cap_seconds},
        "step_order": runner.order,
        "arms": [
            summarize_arm(arm, config, scores, cost, calibration, probe_seconds, base_target, base_general)
            for arm in runner.arms
        ],
    }
    compare_arms(result)
    result["targets"] = assess_targets(result)
    write_json(out / f"train_{config.name}.json", result)
    if render:
        render_outputs(out, config.name, docs=docs)
    return result


def summarize_arm(
    arm: Arm,
    config: BenchConfig,
    scores,
    cost: CostModel,
    calibration: Calibration | None,
    probe_seconds: float,
    base_target: float,
    base_general: float | None,
) -> dict:
    """An arm's record in the result: its blocks, step times, memory, views and held-out curve."""
    untimed = config.untimed_steps
    median = statistics.median(arm.times[untimed : config.max_steps])
    summary = summarize_selection(scores, arm.layers, cost=cost)
    curve = [{"step": 0, "seconds": 0.0, "loss": base_target, "phase": "base"}] + [
        {**e, "seconds": arm.clock_at(e["step"], untimed)} for e in arm.evals
    ]
    views = {}
    for name, view in arm.views.items():
        views[name] = {
            **view,
            "seconds": arm.clock_at(view["steps"], untimed),
            "forgetting": None
            if view["general_loss"] is None or base_general is None
            else view["general_loss"] - base_general,
        }
    if views.get("equal_time", {}).get("interpolated"):
        views["equal_time"]["seconds"] = None
    lowest = arm.lowest_reached
    return {
        "name": arm.name,
        "kind": arm.kind,
        "layers": arm.layers,
        "num_adapted": len(arm.layers),
        "lowest_layer": min(arm.layers),
        "lowest_layer_reached": "embeddings" if lowest == EMBEDDINGS else lowest,
        "score_share": summary.captured_share,
        "predicted_speedup": summary.speedup,
        "calibrated_speedup": None if calibration is None else calibration.speedup(arm.layers),
        "median_step_seconds": median,
        "tokens_per_second": config.batch_size * config.max_length / median,
        "memory": arm.memory,
        "probe_share": probe_seconds / (probe_seconds + views["equal_steps"]["seconds"]),
        "views": views,
        "curve": curve,
        "step_seconds": arm.times,
        "train_losses": arm.losses,
        **({"beyond": _beyond_info(arm, untimed)} if arm.kind in BEYOND_ARMS else {}),
    }


def _beyond_info(arm: Arm, untimed: int) -> dict:
    """What a ``ranks`` or ``reprobe`` arm did besides training its blocks with uniform rank."""
    info = dict(arm.info)
    if arm.kind == "reprobe":
        seconds = sum(arm.extra.values())
        info.update(
            probes=len(arm.extra),
            seconds=seconds,
            share_of_clock=seconds / arm.clock_at(arm.steps, untimed),
            layers_ever_trained=sorted({i for h in info["history"] for i in h["layers"]}),
            final_layers=info["history"][-1]["layers"],
        )
    return info
