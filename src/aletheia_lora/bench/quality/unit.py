"""One unit of the protocol: a task, an arm, a learning rate and a seed, trained for the configured epochs.

The clock is the sum of the measured step times (:func:`~aletheia_lora.bench.measure.timed_step`: forward,
backward, clipping, optimizer step); evaluation is off the clock. Validation and test losses are taken every
``eval_steps`` steps and at the end; only the validation loss takes part in any choice.

An arm's :attr:`~aletheia_lora.bench.quality.arms.ArmChoice.training` adds to plain LoRA:

* ``prefix_cache``: :class:`~aletheia_lora.prefix_cache.PrefixCache` is built over the training rows after the
  adapters are made (the whole ``PrefixCache.build`` call is timed and charged to the clock at step 0: the curve
  starts at that many seconds, and ``train_seconds`` includes it); the batches carry their row ids, so training
  forwards skip the blocks below the lowest adapted one; evaluation forwards (no row ids) run the whole model.
* ``freeze: gradient`` (progressive): :class:`~aletheia_lora.freeze.FreezeCallback`, the code behind ``--strategy
  progressive``, driven step by step: its per-block LoRA gradient sums are taken in an optimizer pre-step hook
  (after clipping, where the Trainer calls ``on_pre_optimizer_step``: on the clock), and its decision runs after
  each step (on the clock too, added to that step). Its rule is ``aletheia_lora.freeze.settled_prefix``, looked up
  when it decides.
* ``freeze: fixed`` (the control): as many blocks as the unit it runs after froze, on
  :func:`aletheia_lora.forecast.even_freeze_steps`.
* ``prefix_cache: settled`` (with ``freeze: gradient``): :class:`~aletheia_lora.freeze.FrozenPrefixCache`, the
  code behind ``--strategy progressive --cache-prefix``, driven after each step: once the frozen prefix has not
  changed for an epoch it is cached (the build on the clock, in the step it happens) and later steps skip it.

Frozen blocks stop requiring grad, leave the optimizer with their state
(:func:`~aletheia_lora.freeze.drop_from_optimizer`), and the backward pass stops above them. The unit records each
block's freezing step and checks that a frozen block's adapters did not change afterwards.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers import TrainerControl, TrainerState

from aletheia_lora import freeze
from aletheia_lora.bench.measure import MB, Memory, timed_step
from aletheia_lora.bench.quality.arms import ArmChoice
from aletheia_lora.bench.quality.tasks import TaskData
from aletheia_lora.bench.workload import Batches, lora_copy
from aletheia_lora.evaluation import evaluate_loss
from aletheia_lora.forecast import even_freeze_steps
from aletheia_lora.layers import find_decoder_stack
from aletheia_lora.plan import lora_config_for
from aletheia_lora.prefix_cache import PrefixCache
from aletheia_lora.reprobe import set_trainable_layers

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


def _lora_parameters(block: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in block.named_parameters() if "lora_" in name]


class _Freezer:
    """What both freezing arms share: the record of when each block froze, and the check that it stayed frozen."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.stack = find_decoder_stack(model)
        self.device = next(model.parameters()).device
        self.frozen_at: dict[str, int] = {}
        self._snapshots: dict[int, list[tuple[nn.Parameter, torch.Tensor]]] = {}

    def step_end(self, step: int) -> float:
        """After step ``step`` (1-based): decide and freeze; returns the seconds it took (charged to the clock)."""
        start = time.perf_counter()
        newly = self._decide(step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        for block in newly:  # off the clock: the snapshot only serves the check
            self.frozen_at[str(block)] = step
            self._snapshots[block] = [(p, p.detach().clone()) for p in _lora_parameters(self.stack.blocks[block])]
        return seconds

    def _decide(self, step: int) -> list[int]:
        raise NotImplementedError

    def record(self) -> dict:
        in_optimizer = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        frozen = [p for pairs in self._snapshots.values() for p, _ in pairs]
        return {
            "frozen_at": self.frozen_at,
            "frozen_unchanged": all(torch.equal(p, was) for pairs in self._snapshots.values() for p, was in pairs),
            "frozen_out_of_optimizer": not any(id(p) in in_optimizer or p in self.optimizer.state for p in frozen),
            "frozen_still_trainable": any(p.requires_grad for p in frozen),
            "trainable_parameters_end": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
        }

    def close(self) -> None:
        pass


class _GradientFreezer(_Freezer):
    """``progressive``: :class:`~aletheia_lora.freeze.FreezeCallback` driven as a Trainer would drive it."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, rule: dict) -> None:
        super().__init__(model, optimizer)
        self.callback = freeze.FreezeCallback(rule["every"], rule["max_frozen_pct"])
        self.state, self.control = TrainerState(), TrainerControl()
        self.callback.on_train_begin(None, self.state, self.control, model=model, optimizer=optimizer)
        # the gradients of the step, after clipping and before the update: where the Trainer calls the callback
        self._hook = optimizer.register_step_pre_hook(
            lambda *_: self.callback.on_pre_optimizer_step(None, self.state, self.control)
        )

    def _decide(self, step: int) -> list[int]:
        before = self.callback.frozen
        self.state.global_step = step
        self.callback.on_step_end(None, self.state, self.control, model=self.model, optimizer=self.optimizer)
        return self.callback.blocks[before : self.callback.frozen]

    def record(self) -> dict:
        summary = self.callback.summary()
        summary.pop("reached")  # the backward depth is not monitored here (its hooks would cost step time)
        return {"rule": "gradient", **super().record(), **summary}

    def close(self) -> None:
        self._hook.remove()


class _FixedFreezer(_Freezer):
    """``progressive-fixed``: ``count`` blocks from the bottom, each at its
    :func:`~aletheia_lora.forecast.even_freeze_steps` step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, count: int, total: int) -> None:
        super().__init__(model, optimizer)
        self.blocks = list(range(self.stack.num_layers))
        self.schedule = [{"block": b, "step": s} for b, s in zip(self.blocks, even_freeze_steps(count, total))]
        self.frozen = 0
        self.timeline = [{"step": 0, "lowest_trainable": self.blocks[0], "frozen": []}]

    def _decide(self, step: int) -> list[int]:
        due = [entry["block"] for entry in self.schedule if entry["step"] == step]
        if not due:
            return []
        self.frozen += len(due)
        # the same mechanics as FreezeCallback: the blocks above train, the ones below keep their adapters frozen
        set_trainable_layers(self.model, self.blocks[self.frozen :], stack=self.stack)
        gone = [p for group in self.optimizer.param_groups for p in group["params"] if not p.requires_grad]
        freeze.drop_from_optimizer(self.optimizer, gone)
        for p in gone:
            p.grad = None
        frozen = self.blocks[: self.frozen]
        self.timeline.append({"step": step, "lowest_trainable": self.blocks[self.frozen], "frozen": frozen})
        logger.info("step %d: froze blocks %s (fixed schedule)", step, due)
        return due

    def record(self) -> dict:
        return {"rule": "fixed", **super().record(), "schedule": self.schedule, "timeline": self.timeline,
                "blocks": self.blocks, "frozen": self.frozen}  # fmt: skip


def _freezer(choice: ArmChoice, model: nn.Module, optimizer, total: int, after: dict | None) -> _Freezer | None:
    rule = choice.training.get("freeze")
    if rule is None:
        return None
    if rule == "gradient":
        return _GradientFreezer(model, optimizer, choice.training)
    if rule == "fixed":
        if after is None or "freeze" not in after:
            raise ValueError("a fixed-schedule freezing unit needs the freezing unit it runs after (its 'after' arm)")
        return _FixedFreezer(model, optimizer, len(after["freeze"]["frozen_at"]), total)
    raise ValueError(f"unknown freezing rule {rule!r}")


def _prefix_cache(model: nn.Module, data: TaskData, choice: ArmChoice, config: Any, device: torch.device):
    """The cache of the frozen prefix and the seconds its build took (the whole call), or (None, 0.0, why)."""
    if min(choice.layers) == 0:
        why = "the lowest adapted block is 0: no frozen prefix to cache (trained without the cache)"
        logger.warning("prefix cache: %s", why)
        return None, 0.0, why
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    cache = PrefixCache.build(model, data.train, pad_token_id=data.pad, batch_size=config.eval_batch_size)
    if cuda:
        torch.cuda.synchronize(device)
    return cache, time.perf_counter() - start, None


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
    after: dict | None = None,
) -> dict:
    """Train one unit and return its record (the unit's JSON).

    ``after``: the record of the unit this one runs after (an arm registered with ``after=``), e.g. the
    ``progressive`` unit whose number of frozen blocks ``progressive-fixed`` freezes.
    """
    started = time.perf_counter()
    memory = Memory(device)
    lora, _ = lora_config_for(base, choice.layers, choice.lora)
    model, params, default = lora_copy(base, lora, seed=seed, learning_rate=rate, weight_decay=config.weight_decay)
    optimizer = _optimizer(model, params, config, rate, default)
    peaks = [group["lr"] for group in optimizer.param_groups]
    per_epoch = len(data.train) // config.batch_size
    total = per_epoch * config.epochs
    warmup = round(config.warmup_ratio * total)
    cache, build_seconds, no_cache = None, 0.0, None
    settled = choice.training.get("prefix_cache") == "settled"
    if choice.training.get("prefix_cache") and not settled:
        cache, build_seconds, no_cache = _prefix_cache(model, data, choice, config, device)
    batches = Batches(data.train, config.batch_size, seed, data.pad, device, row_ids=cache is not None or settled)
    freezer = _freezer(choice, model, optimizer, total, after)
    late = None
    if settled:
        late = freeze.FrozenPrefixCache(freezer.callback, data.train, stable_steps=per_epoch, output_dir=None,
                                        pad_token_id=data.pad, batch_size=config.eval_batch_size)  # fmt: skip
        late.on_train_begin(SimpleNamespace(gradient_accumulation_steps=1), freezer.state, freezer.control,
                            model=model)  # fmt: skip

    def loss(rows: list | None) -> float | None:
        if rows is None:
            return None
        model.eval()
        value = evaluate_loss(model, rows, batch_size=config.eval_batch_size, pad_token_id=data.pad)["loss"]
        model.train()
        return value

    times: list[float] = []
    train_losses: list[float] = []
    # a cached arm's clock starts at its build time: the cache is paid for before the first step
    curve = [{"step": 0, "seconds": build_seconds, **{k: base_losses[k] for k in ("validation_loss", "test_loss")}}]
    first_peak = None
    try:
        with cache.attach(model) if cache is not None else nullcontext():
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
                done = step + 1
                if freezer is not None:
                    seconds += freezer.step_end(done)  # the decision and the freezing are part of training
                if late is not None:
                    seconds += _timed(late.on_step_end, device, None, freezer.state, freezer.control)
                times.append(seconds)
                train_losses.append(float(value.detach()))
                if done % config.eval_steps == 0 or done == total:
                    point = {"step": done, "seconds": None, "epoch": done / per_epoch}  # seconds: set at the end
                    point.update(validation_loss=loss(data.validation), test_loss=loss(data.test))
                    curve.append(point)
                    if config.progress:
                        logger.info("%s %s lr=%g seed=%d step %d/%d: validation %.4f", data.name, arm, rate, seed,
                                    done, total, point["validation_loss"])  # fmt: skip
            general = loss(data.general)
    finally:
        if late is not None:
            late.close()
        if freezer is not None:
            freezer.close()
        cache_summary = cache.summary() if cache is not None else None
        if cache is not None:
            cache.close()
    for point in curve[1:]:
        point["seconds"] = _clock(times, point["step"]) + build_seconds
    base_general = base_losses.get("general_loss")
    trainable = sum(p.numel() for p in params)
    extra: dict = {}
    if choice.training:
        extra["training"] = choice.training
    if late is not None:
        extra["prefix_cache"] = late.summary()
    elif choice.training.get("prefix_cache"):
        extra.update(cache_build_seconds=build_seconds, prefix_cache=cache_summary)
        if no_cache:
            extra["prefix_cache_skipped"] = no_cache
    if freezer is not None:
        extra["freeze"] = freezer.record()
        if after is not None:
            extra["freeze"]["count_from"] = {"arm": after["arm"], "frozen": len(after["freeze"]["frozen_at"])}
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
        "train_seconds": _clock(times, total) + build_seconds,
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
        **extra,
    }


def _timed(fn, device: torch.device, *args) -> float:
    """Seconds ``fn(*args)`` took (the GPU queue drained)."""
    start = time.perf_counter()
    fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _clock(times: list[float], steps: int) -> float:
    """Training seconds after ``steps`` steps; the first step (one-off allocations) is charged at the median of the
    others."""
    if len(times) < 2:
        return sum(times[:steps])
    return statistics.median(times[1:]) + sum(times[1:steps])
