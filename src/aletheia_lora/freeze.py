"""Progressive freezing: LoRA on every block from step 0, frozen from the bottom as blocks settle.

A one-shot selection gives up the lower blocks' learning from the first step. Progressive freezing (``--strategy
progressive``, or :class:`FreezeCallback` with any transformers ``Trainer``) keeps it early and buys a shorter
backward pass later. The signal is the training's own gradients: no extra probe pass.

**The rule** (AutoFreeze's, Liu et al. 2021, on LoRA gradients), applied by :func:`settled_prefix`:

1. Every optimizer step, before the optimizer steps, the squared norm of each trainable block's LoRA gradients is
   added to a per-block sum (read from ``.grad``: after the Trainer's clipping, which rescales every block alike).
2. Every ``every`` steps (``--freeze-every``, default :data:`DEFAULT_FREEZE_EVERY`) the sums are all-reduced
   across ranks (so every rank decides alike) and each block's interval norm is their square root.
3. From the second interval on, each trainable block's relative change ``|g_prev - g_cur| / g_prev`` is compared
   with the median change over the trainable blocks. Starting at the lowest trainable block and moving up, blocks
   whose change is below the median (settled) are frozen; the first block that is not settled stops the walk.
   So freezing is contiguous from the bottom and only moves upward.
4. Never more than ``max_frozen_pct`` (``--max-frozen-pct``, default :data:`DEFAULT_MAX_FROZEN_PCT`) percent of
   the starting blocks are frozen (rounded down).

**Frozen means frozen**: the adapters of a frozen block keep applying what they learned, stop requiring grad
(:func:`~aletheia_lora.reprobe.set_trainable_layers`), leave the optimizer's parameter groups and have their AdamW
state deleted (:func:`drop_from_optimizer`); the groups themselves stay, so the learning-rate schedule goes on
unchanged. The backward pass then stops at the new lowest trainable block.

**Resume**: the state (frozen blocks, last interval's norms, the running sums) is written as ``freeze.json`` into
each checkpoint folder. A resumed run must freeze those blocks *before* the Trainer builds its optimizer, so the
saved optimizer state matches it: :func:`~aletheia_lora.train.train_lora` calls :meth:`FreezeCallback.restore`;
with a Trainer of your own, call it yourself before ``trainer.train(resume_from_checkpoint=...)``.

**With the prefix cache** (``--cache-prefix``, :class:`FrozenPrefixCache`): once the frozen prefix (blocks below
:attr:`FreezeCallback.lowest_trainable`) has not changed for an epoch (:attr:`FreezeCallback.prefix_stable_since`),
its output is cached (:class:`~aletheia_lora.prefix_cache.PrefixCache`) and later steps skip it; a later freeze
keeps that cache (still exact: the blocks below it did not change) until the new prefix has been stable for an
epoch too, then builds the cache at the new boundary. Callables in ``on_freeze`` are called with
``(step, frozen_blocks)`` at each freeze.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from aletheia_lora.checks import check_int, check_number, read_data_file, validate_selected_layers
from aletheia_lora.distributed import collective_device, is_distributed, world_size
from aletheia_lora.files import write_json
from aletheia_lora.forecast import DEFAULT_MAX_FROZEN_PCT
from aletheia_lora.layers import DecoderStack, find_decoder_stack
from aletheia_lora.prefix_cache import PrefixCache, check_cacheable, dropout_modules, strip_row_ids
from aletheia_lora.reprobe import _adapter_modules, _adapter_parameters, set_trainable_layers, uncovered_layers

logger = logging.getLogger(__name__)

DEFAULT_FREEZE_EVERY = 20  # the hand trial froze at steps 60-100 of 200; 20 gives 3-5 decisions by then
STATE_NAME = "freeze.json"  # in each checkpoint folder


def max_frozen(num_blocks: int, max_frozen_pct: float) -> int:
    """How many of ``num_blocks`` starting blocks may be frozen at most: ``floor(num_blocks * pct / 100)``."""
    return int(num_blocks * max_frozen_pct / 100)


def relative_changes(previous: Sequence[float], current: Sequence[float]) -> list[float]:
    """``|g_prev - g_cur| / g_prev`` per block; a block with no gradient in either interval has changed 0, one that
    had none before and has some now has changed without bound."""
    out = []
    for prev, cur in zip(previous, current, strict=True):
        if prev > 0:
            out.append(abs(prev - cur) / prev)
        else:
            out.append(0.0 if cur == 0 else math.inf)
    return out


def settled_prefix(previous: Sequence[float], current: Sequence[float], frozen: int, limit: int) -> int:
    """The rule: how many of the starting blocks (bottom first) are frozen after this interval.

    Args:
        previous: The previous interval's gradient norm of each starting block, bottom first (the entries of
            blocks already frozen are ignored).
        current: This interval's, the same way.
        frozen: How many of the lowest blocks are frozen already.
        limit: The most that may be frozen (:func:`max_frozen`).

    Returns:
        The new number of frozen blocks, ``>= frozen`` and ``<= max(frozen, limit)``: blocks above ``frozen`` whose
        relative change is below the median change over the trainable blocks, contiguously from the bottom.
    """
    if len(previous) != len(current):
        raise ValueError(f"norms of {len(previous)} and {len(current)} blocks: give one per starting block in both")
    if frozen >= min(limit, len(current) - 1):  # at least one block keeps training
        return frozen
    changes = relative_changes(previous[frozen:], current[frozen:])
    median = statistics.median(changes)
    new = frozen
    for change in changes:
        if new >= min(limit, len(current) - 1) or not change < median:
            break
        new += 1
    return new


def drop_from_optimizer(optimizer, params: Sequence[nn.Parameter]) -> int:
    """Remove ``params`` from ``optimizer``'s parameter groups and delete their state (AdamW's moments).

    The groups stay (possibly empty), with their learning rates, so a learning-rate scheduler goes on unchanged.
    An accelerate or other wrapper is unwrapped through its ``optimizer`` attribute. Returns how many were removed.
    """
    while hasattr(getattr(optimizer, "optimizer", None), "param_groups"):  # accelerate's AcceleratedOptimizer
        optimizer = optimizer.optimizer
    gone = {id(p) for p in params}
    removed = 0
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if id(p) not in gone]
        removed += len(group["params"]) - len(kept)
        group["params"] = kept
    for p in params:
        optimizer.state.pop(p, None)
    return removed


class FreezeCallback(TrainerCallback):
    """Progressive freezing for a transformers ``Trainer`` (or TRL trainer); the rule is the module's.

    Build the LoRA config on every block (``apply_aletheia_lora(model, list(range(num_layers)))``) and the
    Trainer with the adapters trainable (PEFT's default).

    Args:
        every: Steps per interval (``--freeze-every``).
        max_frozen_pct: The most of the starting blocks that may be frozen, in percent (``--max-frozen-pct``).
        layers: The starting blocks (default: every block); the others' adapters are frozen or switched off.
        on_freeze: Called with ``(step, frozen_blocks)`` at each freeze (e.g. a prefix cache).
    """

    def __init__(
        self,
        every: int = DEFAULT_FREEZE_EVERY,
        max_frozen_pct: float = DEFAULT_MAX_FROZEN_PCT,
        *,
        layers: Sequence[int] | None = None,
        on_freeze: Sequence[Callable[[int, list[int]], None]] = (),
    ) -> None:
        self.every = check_int("every (--freeze-every)", every, minimum=1)
        self.max_frozen_pct = float(
            check_number("max_frozen_pct (--max-frozen-pct)", max_frozen_pct, minimum=0, maximum=100)
        )
        self.start_layers = None if layers is None else validate_selected_layers(layers)
        self.on_freeze = list(on_freeze)
        self.depth_monitor = None  # set by train_lora: a BackwardDepthMonitor whose take() gives each step's depth
        self.blocks: list[int] = []  # the starting blocks, bottom first
        self.frozen = 0  # how many of them are frozen
        self.previous: list[float] | None = None  # the last interval's norms
        self.decisions: list[dict] = []
        self.timeline: list[dict] = []  # {"step", "lowest_trainable", "frozen"} at the start and at each freeze
        self.reached: list[list[int]] = []  # [step, lowest block the backward pass reached] per step
        self.frozen_blocks: dict[str, dict] = {}  # block -> the step it froze, its last norm and change
        self._stack: DecoderStack | None = None
        self._params: list[list[nn.Parameter]] = []
        self._sums: torch.Tensor | None = None
        self._restored = False

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def lowest_trainable(self) -> int | None:
        """The lowest block whose adapters train now."""
        return self.blocks[self.frozen] if self.blocks else None

    @property
    def prefix_stable_since(self) -> int:
        """The step since which the set of frozen blocks has not changed (0: nothing frozen yet)."""
        return self.timeline[-1]["step"] if self.timeline else 0

    def state(self) -> dict:
        """What a checkpoint holds (``freeze.json``)."""
        return {
            "every": self.every,
            "max_frozen_pct": self.max_frozen_pct,
            "blocks": self.blocks,
            "frozen": self.frozen,
            "previous": self.previous,
            "sums": None if self._sums is None else [float(x) for x in self._sums.tolist()],
            "decisions": self.decisions,
            "timeline": self.timeline,
            "reached": self.reached,
            "frozen_blocks": self.frozen_blocks,
        }

    def summary(self) -> dict:
        """The report's ``freeze`` part: the settings, the timeline, each decision and each frozen block."""
        out = self.state()
        out.pop("sums")
        out.pop("previous")
        out["lowest_trainable"] = self.lowest_trainable
        out["prefix_stable_since"] = self.prefix_stable_since
        return out

    def restore(self, model: nn.Module, checkpoint: str | os.PathLike) -> None:
        """Read ``freeze.json`` from the ``checkpoint-N`` folder and freeze its blocks, before the optimizer is built.

        Raises:
            ValueError: the file is missing or unreadable, or was written with other settings.
        """
        path = Path(checkpoint) / STATE_NAME
        if not path.is_file():
            raise ValueError(
                f"resuming with --strategy progressive needs the freeze state {str(path)!r}, which is missing: the "
                "checkpoint was not written by a progressive run"
            )
        try:
            data = read_data_file(path, fmt="json")
            blocks, frozen = [int(b) for b in data["blocks"]], int(data["frozen"])
            previous = None if data["previous"] is None else [float(x) for x in data["previous"]]
            sums = None if data["sums"] is None else [float(x) for x in data["sums"]]
            history = (data["decisions"], data["timeline"], data["reached"], data["frozen_blocks"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read the freeze state {str(path)!r}: {exc}") from None
        if data.get("every") != self.every or self.start_layers not in (None, blocks):
            raise ValueError(
                f"the freeze state {str(path)!r} was written with --freeze-every {data.get('every')} and starting "
                f"blocks {blocks}; this run has --freeze-every {self.every}: resume with the run's settings"
            )
        self._setup(model, blocks)
        self.frozen, self.previous = frozen, previous
        self.decisions, self.timeline, self.reached, self.frozen_blocks = (list(h) if isinstance(h, list) else
                                                                           dict(h) for h in history)  # fmt: skip
        if sums is not None:
            self._sums = torch.tensor(sums, dtype=torch.float64, device=self._sums.device)
        self._apply(model)
        self._restored = True
        logger.info("progressive freezing resumed: blocks %s frozen", self.blocks[: self.frozen])

    def _setup(self, model: nn.Module, blocks: Sequence[int] | None) -> None:
        self._stack = find_decoder_stack(model)
        missing = uncovered_layers(model, stack=self._stack)
        if missing:
            raise ValueError(
                f"progressive freezing needs LoRA on every block; blocks {missing} have none: build the config with "
                "apply_aletheia_lora(model, list(range(num_layers)))"
            )
        per_block = _adapter_modules(model, self._stack)
        self.blocks = list(validate_selected_layers(blocks if blocks is not None else range(len(per_block)),
                                                    len(per_block)))  # fmt: skip
        self._params = [[p for m in per_block[i] for p in _adapter_parameters(m)] for i in self.blocks]
        device = self._params[0][0].device
        self._sums = torch.zeros(len(self.blocks), dtype=torch.float64, device=device)

    # -- Trainer events ------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._restored:
            return
        if state.global_step > 0:
            raise ValueError(
                "resuming with progressive freezing: call FreezeCallback.restore(model, checkpoint) before "
                "trainer.train(resume_from_checkpoint=...), so the optimizer is built without the frozen blocks"
            )
        self._setup(model, self.start_layers)
        set_trainable_layers(model, self.blocks, stack=self._stack)
        self.timeline = [{"step": 0, "lowest_trainable": self.lowest_trainable, "frozen": []}]
        limit = max_frozen(len(self.blocks), self.max_frozen_pct)
        logger.info(
            "progressive freezing: blocks %s train; every %d steps up to %d of them freeze from the bottom",
            self.blocks,
            self.every,
            limit,
        )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # The gradients the backward pass computed anyway; summed on the device, no host sync.
        grads = [
            [p.grad for p in params if p.grad is not None] if i >= self.frozen else []
            for i, params in enumerate(self._params)
        ]
        squares = [
            torch.stack([g.detach().float().pow(2).sum() for g in gs]).sum().to(self._sums) if gs else None
            for gs in grads
        ]
        for i, sq in enumerate(squares):
            if sq is not None:
                self._sums[i] += sq

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if self.depth_monitor is not None:
            lowest = self.depth_monitor.take()
            if lowest is not None:
                self.reached.append([step, lowest])
        if step % self.every:
            return
        norms = self._interval_norms()
        limit = max_frozen(len(self.blocks), self.max_frozen_pct)
        before = self.frozen
        if self.previous is not None:
            self.frozen = settled_prefix(self.previous, norms, before, limit)
        changes = relative_changes(self.previous, norms) if self.previous is not None else None
        self.decisions.append(
            {
                "step": step,
                "norms": {str(b): n for b, n in zip(self.blocks, norms)},
                "changes": None if changes is None else {str(b): c for b, c in zip(self.blocks, changes)},
                "frozen": self.frozen,
            }
        )
        self.previous = norms
        if self.frozen > before:
            self._freeze(model, optimizer, step, before, norms, changes)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            write_json(folder / STATE_NAME, self.state())

    # -- internals -----------------------------------------------------------------------------------------------
    def _apply(self, model: nn.Module) -> None:
        """Train the blocks above the frozen ones; the frozen ones keep applying their adapters.

        set_trainable_layers switches off adapters that have not learned (``lora_B`` all zero); a frozen block is
        switched on whatever its weights, since a resumed run freezes before the checkpoint's weights are loaded.
        """
        set_trainable_layers(model, self.blocks[self.frozen :], stack=self._stack)
        per_block = _adapter_modules(model, self._stack)
        for i in self.blocks[: self.frozen]:
            for module in per_block[i]:
                module.enable_adapters(True)  # PEFT makes the adapter trainable here: frozen again below
                for p in _adapter_parameters(module):
                    p.requires_grad_(False)

    def _interval_norms(self) -> list[float]:
        sums = self._sums
        if is_distributed():
            # sums of squares add up over shards; under DDP every rank holds the same gradients, and the mean
            # over ranks keeps the norms' scale (the rule is scale-free either way)
            sums = sums.to(collective_device(sums.device), torch.float64)
            dist.all_reduce(sums)
            sums = sums / world_size()
        norms = [math.sqrt(max(float(x), 0.0)) for x in sums.tolist()]
        self._sums.zero_()
        return norms

    def _freeze(self, model, optimizer, step: int, before: int, norms: list[float], changes) -> None:
        newly = self.blocks[before : self.frozen]
        self._apply(model)
        params = [p for i in range(before, self.frozen) for p in self._params[i]]
        removed = drop_from_optimizer(optimizer, params) if optimizer is not None else 0
        for p in params:
            p.grad = None
        for k, block in zip(range(before, self.frozen), newly):
            self.frozen_blocks[str(block)] = {"step": step, "score": norms[k], "change": changes[k]}
        frozen_now = self.blocks[: self.frozen]
        self.timeline.append({"step": step, "lowest_trainable": self.lowest_trainable, "frozen": frozen_now})
        logger.info(
            "step %d: froze blocks %s (settled); %d parameters left the optimizer; training blocks %d-%d",
            step,
            newly,
            removed,
            self.lowest_trainable,
            self.blocks[-1],
        )
        for hook in self.on_freeze:
            hook(step, frozen_now)


class FrozenPrefixCache(TrainerCallback):
    """Progressive freezing with ``--cache-prefix``: the frozen prefix is cached once it has been stable for
    ``stable_steps`` optimizer steps (default: an epoch), and rebuilt higher after later freezes (see the module).

    The training rows must carry their row ids (:func:`~aletheia_lora.prefix_cache.index_rows` and
    :func:`~aletheia_lora.prefix_cache.row_id_collator`); until a cache exists the ids are dropped before the forward.

    Args:
        freezing: The run's :class:`FreezeCallback` (listed before this callback).
        rows: The training rows, un-indexed, in the order their ids refer to.
        stable_steps: Steps the prefix must stay unchanged before it is cached (None: one epoch, from the Trainer's
            dataloader and gradient accumulation).
        build: Keyword arguments of :meth:`PrefixCache.for_run` (``output_dir``, ``pad_token_id``, ``budget_gib``...).
    """

    def __init__(self, freezing: FreezeCallback, rows, *, stable_steps: int | None = None, **build) -> None:
        self.freezing, self.rows, self.build = freezing, rows, build
        self.stable_steps = None if stable_steps is None else check_int("stable_steps", stable_steps, minimum=1)
        self.cache: PrefixCache | None = None
        self.builds: list[dict] = []  # {"step", "block", "build_seconds"} per cache built
        self.hits = 0  # batches served by earlier caches (the current one counts its own)
        self._model: nn.Module | None = None
        self._strip = None
        self._attached = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._model = model
        self._strip = strip_row_ids(model)
        if self.stable_steps is None:
            batches = len(train_dataloader) if train_dataloader is not None else 1
            accumulation = getattr(args, "gradient_accumulation_steps", 1) or 1
            self.stable_steps = max(1, math.ceil(batches / accumulation))
        # refused now rather than after an epoch: anything random in the blocks that may freeze (LoRA dropout too)
        limit = max_frozen(len(self.freezing.blocks), self.freezing.max_frozen_pct)
        if limit:
            dropouts = dropout_modules(self.freezing._stack, self.freezing.blocks[limit - 1] + 1)
            if dropouts:
                raise ValueError(
                    f"--cache-prefix with --strategy progressive: a dropout of p={dropouts[0].p:g} runs in the "
                    "blocks that may freeze; set --lora-dropout (and the model's dropout) to 0"
                )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        block = self.freezing.lowest_trainable
        if not block or (self.cache is not None and self.cache.block == block):
            return
        if state.global_step - self.freezing.prefix_stable_since < self.stable_steps:
            return
        check_cacheable(self._model, block, self.freezing._stack)
        self._release()
        self.cache = PrefixCache.for_run(self._model, self.rows, stack=self.freezing._stack, **self.build)
        self._attached = self.cache.attach(self._model)
        self._attached.__enter__()
        self.builds.append(
            {"step": state.global_step, "block": block, "build_seconds": round(self.cache.build_seconds, 3)}
        )
        logger.info("step %d: blocks below %d cached; later steps skip them", state.global_step, block)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def _release(self) -> None:
        if self._attached is not None:
            self._attached.__exit__(None, None, None)
            self._attached = None
        if self.cache is not None:
            self.hits += self.cache.hits
            self.cache.close(keep=False)
            self.cache = None

    def close(self) -> None:
        """Detach and drop the cache and the row-id hook (idempotent; also after a failed run)."""
        self._release()
        if self._strip is not None:
            self._strip.remove()
            self._strip = None

    def summary(self) -> dict:
        """The report's ``prefix_cache`` part for a progressive run."""
        current = self.cache.hits if self.cache is not None else 0
        return {"progressive": True, "stable_steps": self.stable_steps, "builds": self.builds,
                "batches_served": self.hits + current}  # fmt: skip
