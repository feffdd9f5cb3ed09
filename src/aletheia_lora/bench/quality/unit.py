"""One unit of the protocol: a task, an arm, a learning rate and a seed, trained for the configured epochs.

The clock is the sum of the measured step times (:func:`~aletheia_lora.bench.measure.timed_step`: forward,
backward, clipping, optimizer step); evaluation is off the clock. Validation and test losses are taken every
``eval_steps`` steps and at the end; only the validation loss takes part in any choice.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from typing import Any

import torch
from torch import nn

from aletheia_lora.bench.measure import MB, Memory, timed_step
from aletheia_lora.bench.quality.arms import ArmChoice
from aletheia_lora.bench.quality.tasks import TaskData
from aletheia_lora.bench.workload import Batches, lora_copy
from aletheia_lora.evaluation import evaluate_loss
from aletheia_lora.plan import lora_config_for

logger = logging.getLogger(__name__)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The cosine schedule with linear warm-up (``transformers``' ``cosine``): factor of the peak rate at ``step``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model: nn.Module, params: list, config: Any, rate: float, default: torch.optim.Optimizer):
    if not config.loraplus:
        return default
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model=model,
        optimizer_cls=torch.optim.AdamW,
        lr=rate,
        loraplus_lr_ratio=config.loraplus_lr_ratio,
        weight_decay=config.weight_decay,
    )


def run_unit(
    base: nn.Module,
    data: TaskData,
    choice: ArmChoice,
    *,
    arm: str,
    rate: float,
    seed: int,
    config: Any,
    device: torch.device,
    base_losses: dict,
) -> dict:
    """Train one unit and return its record (the unit's JSON)."""
    started = time.perf_counter()
    memory = Memory(device)
    lora, _ = lora_config_for(base, choice.layers, choice.lora)
    model, params, default = lora_copy(base, lora, seed=seed, learning_rate=rate, weight_decay=config.weight_decay)
    optimizer = _optimizer(model, params, config, rate, default)
    peaks = [group["lr"] for group in optimizer.param_groups]
    batches = Batches(data.train, config.batch_size, seed, data.pad, device)
    per_epoch = len(data.train) // config.batch_size
    total = per_epoch * config.epochs
    warmup = round(config.warmup_ratio * total)

    def loss(rows: list | None) -> float | None:
        if rows is None:
            return None
        model.eval()
        value = evaluate_loss(model, rows, batch_size=config.eval_batch_size, pad_token_id=data.pad)["loss"]
        model.train()
        return value

    times: list[float] = []
    train_losses: list[float] = []
    curve = [{"step": 0, "seconds": 0.0, **{k: base_losses[k] for k in ("validation_loss", "test_loss")}}]
    first_peak = None
    for step in range(total):
        for group, peak in zip(optimizer.param_groups, peaks):
            group["lr"] = peak * lr_factor(step, total, warmup)
        if step == 0:
            start = memory.start_peak()
        value, seconds = timed_step(
            model, batches(step), optimizer, params=params, max_grad_norm=config.max_grad_norm, device=device
        )
        if step == 0:
            growth = memory.peak_growth(start)
            first_peak = None if growth is None else growth / MB
        times.append(seconds)
        train_losses.append(float(value.detach()))
        done = step + 1
        if done % config.eval_steps == 0 or done == total:
            point = {"step": done, "seconds": None, "epoch": done / per_epoch}  # seconds: set at the end
            point.update(validation_loss=loss(data.validation), test_loss=loss(data.test))
            curve.append(point)
            if config.progress:
                logger.info("%s %s lr=%g seed=%d step %d/%d: validation %.4f", data.name, arm, rate, seed, done,
                            total, point["validation_loss"])  # fmt: skip
    general = loss(data.general)
    for point in curve[1:]:
        point["seconds"] = _clock(times, point["step"])
    base_general = base_losses.get("general_loss")
    trainable = sum(p.numel() for p in params)
    return {
        "task": data.name,
        "arm": arm,
        "learning_rate": rate,
        "seed": seed,
        "layers": choice.layers,
        "lora": {k: v for k, v in choice.lora.items() if k != "lora_dropout"},
        "info": choice.info,
        "trainable_parameters": trainable,
        "steps": total,
        "steps_per_epoch": per_epoch,
        "warmup_steps": warmup,
        "loraplus": config.loraplus,
        "median_step_seconds": statistics.median(times[1:] or times),
        "train_seconds": _clock(times, total),
        "first_step_peak_mb": first_peak,
        "memory_kind": memory.kind,
        "base": base_losses,
        "curve": curve,
        "validation_loss": curve[-1]["validation_loss"],
        "test_loss": curve[-1]["test_loss"],
        "general_loss": general,
        "forgetting": None if general is None or base_general is None else general - base_general,
        "train_losses": train_losses,
        "step_seconds": times,
        "wall_seconds": time.perf_counter() - started,
    }


def _clock(times: list[float], steps: int) -> float:
    """Training seconds after ``steps`` steps; the first step (one-off allocations) is charged at the median of the
    others."""
    if len(times) < 2:
        return sum(times[:steps])
    return statistics.median(times[1:]) + sum(times[1:steps])
