"""The plan: probe -> :class:`~aletheia_lora.select.Selection` -> LoRA config, written once.

The command line (:mod:`aletheia_lora.pipeline`), the Trainer integration (:mod:`aletheia_lora.integrations`) and
re-probing (:mod:`aletheia_lora.reprobe`) all take these steps, and so share their defaults:

* **cost**: a selection's predicted speedup comes from the FLOP count of a LoRA step at the caller's training
  shape, ``seq_len`` x ``batch_size`` (the command line's ``--max-length`` x ``--batch-size``); with
  ``calibrate``, from LoRA steps timed on this hardware at that shape (:func:`selection_cost`). A caller that
  does not know its sequence length uses :data:`DEFAULT_SEQ_LEN`.
* **probe**: :func:`gradient_probe`, timed (:func:`probe_scores`); saved scores skip it.
* **selection**: :func:`make_selection` over the scores, with the cost above.
* **LoRA config**: :func:`apply_aletheia_lora` on the selected blocks at uniform rank, then, with
  ``rank_allocation="scores"``, the same parameter budget spread in proportion to the scores
  (:func:`allocate_for_config`). Re-probing puts LoRA on every block instead and trains the selected ones
  (:func:`lora_config_for` with ``every_block=True``).

Settings are given as the stage configs (:class:`ProbeConfig`, :class:`SelectConfig`, :class:`LoraSettings`) or as
mappings of the same keyword arguments (their ``kwargs()``), which the Trainer integration builds from its own
arguments (its LoRA arguments may hold any further ``LoraConfig`` field).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from peft import LoraConfig
from torch import nn

from aletheia_lora.allocator import allocator_state
from aletheia_lora.calibrate import calibrate as time_lora_steps
from aletheia_lora.config import apply_aletheia_lora
from aletheia_lora.cost import Calibration, CostModel
from aletheia_lora.data import pad_collate
from aletheia_lora.distributed import is_distributed
from aletheia_lora.layers import DecoderStack, resolve_stack
from aletheia_lora.probe import LayerScores, gradient_probe
from aletheia_lora.ranks import RankAllocation, allocate_for_config
from aletheia_lora.select import Selection, make_selection

logger = logging.getLogger(__name__)

# Sequence length the cost model prices a step at when the caller knows none (the Trainer integration given an
# iterable dataset and no seq_len): the command line's default --max-length.
DEFAULT_SEQ_LEN = 128

Cost = CostModel | Calibration
# Why calibration refuses several processes.
CALIBRATE_ONE_PROCESS = (
    "--calibrate times steps in one process: timings differ between ranks, and so could their selections"
)


@dataclass(frozen=True)
class Plan:
    """Which blocks get adapters, why, and the ``LoraConfig`` that adapts them.

    Attributes:
        scores: The probe's (or the given) per-block scores.
        selection: The selection and what it is predicted to save.
        lora_config: The PEFT config: LoRA on the selected blocks.
        cost: What predicted the speedups: a FLOP :class:`CostModel` or a :class:`Calibration`.
        rank_allocation: Per-block ranks with ``rank_allocation="scores"``, else None.
    """

    scores: LayerScores | None
    selection: Selection
    lora_config: LoraConfig
    cost: Cost | None
    rank_allocation: RankAllocation | None = None


def _settings(settings: Any) -> dict:
    """A stage config's keyword arguments (its ``kwargs()``), or a mapping of them, as a new dict."""
    if settings is None:
        return {}
    return dict(settings.kwargs()) if hasattr(settings, "kwargs") else dict(settings)


def check_rank_allocation(lora: Any) -> None:
    """Refuse LoRA settings that score-proportional ranks would override (before anything is probed).

    Args:
        lora: :class:`LoraSettings` or :func:`apply_aletheia_lora` keyword arguments.
    """
    kwargs = _settings(lora)
    if kwargs.get("rank_allocation", "uniform") != "scores":
        return
    if kwargs.get("attention_r") or kwargs.get("mlp_r"):
        raise ValueError(
            "rank_allocation='scores' sets every module's rank; it cannot be combined with attention_r/mlp_r"
        )
    if kwargs.get("attention_alpha") or kwargs.get("mlp_alpha"):
        raise ValueError(
            "rank_allocation='scores' sets every module's alpha; it cannot be combined with attention_alpha/mlp_alpha"
        )


def selection_cost(
    model: nn.Module,
    rows: Sequence | None = None,
    *,
    seq_len: int,
    batch_size: int = 1,
    calibrate: bool = False,
    lora: Any = None,
    gradient_checkpointing: bool = False,
    pad_token_id: int = 0,
    stack: DecoderStack | None = None,
) -> Cost:
    """What predicts the speedups of a selection, before any adapter exists.

    Args:
        model: The base model.
        rows: Tokenized training rows; with ``calibrate``, the first ``batch_size`` make the timed batch.
        seq_len: Tokens per training sequence.
        batch_size: Sequences per training step.
        calibrate: Time LoRA steps on this hardware (one process only) instead of counting FLOPs.
        lora: LoRA settings: the rank and target modules of the timed adapters.
        gradient_checkpointing: Whether training recomputes activations (calibration times steps without).
        pad_token_id: Padding id of the timed batch.
        stack: The model's decoder stack, when already found.

    Returns:
        The FLOP :class:`CostModel` at ``seq_len`` x ``batch_size``, or the fitted :class:`Calibration`.
    """
    if not calibrate:  # priced at the run's own rank, targets and checkpointing
        settings = _settings(lora)
        return CostModel.from_model(
            model,
            seq_len=seq_len,
            batch_size=batch_size,
            r=int(settings.get("r", 16)),
            target_modules=settings.get("target_modules"),
            attention_r=settings.get("attention_r"),
            mlp_r=settings.get("mlp_r"),
            gradient_checkpointing=gradient_checkpointing,
            stack=stack,
        )
    if is_distributed():
        raise ValueError(CALIBRATE_ONE_PROCESS)
    if gradient_checkpointing:
        logger.warning("--calibrate times steps without gradient checkpointing; the run trains with it")
    batch = pad_collate([rows[i] for i in range(min(len(rows), batch_size))], pad_token_id)
    logger.info("calibrating: timing LoRA steps of %d x %d tokens", *batch["input_ids"].shape)
    state = allocator_state()
    glibc_default = (state["libc"] or "").startswith("glibc") and not (state["tuned"] or state["environment"])
    if glibc_default and next(model.parameters()).device.type == "cpu":
        logger.info(
            "calibrating with glibc's default malloc thresholds: on some shapes they make a calibration overstate "
            "speedups (Qwen2.5 by up to 6%% in bench/results/families.md); --cpu-allocator tuned fixes them for the "
            "calibration and the run alike"
        )
    settings = _settings(lora)
    start = time.perf_counter()
    # the run's dropout too: on a CPU its masks over every adapted module's input are a measurable part of a step;
    # and its per-module ranks
    ranks = {k: settings[k] for k in ("attention_r", "mlp_r") if settings.get(k)}
    calibration = time_lora_steps(
        model,
        batch,
        r=int(settings.get("r", 16)),
        target_modules=settings.get("target_modules"),
        lora_kwargs={"lora_dropout": float(settings.get("lora_dropout", 0.0)), **ranks},
        stack=stack,
    )
    logger.info("calibrated in %.1f s: %s", time.perf_counter() - start, calibration.description)
    return calibration


def probe_scores(
    model: nn.Module,
    rows,
    probe: Any = None,
    *,
    seed: int | None = None,
    pad_token_id: int | None = None,
    progress: bool = False,
    stack: DecoderStack | None = None,
) -> tuple[LayerScores, float]:
    """Run the gradient probe and time it.

    Args:
        model: The model as it is now (a base model, or a PeftModel being re-probed).
        rows: Tokenized training rows, as for :func:`gradient_probe`.
        probe: :class:`ProbeConfig` or :func:`gradient_probe` keyword arguments (default: the probe's defaults).
        seed: Seed of the batch sampling, replacing the settings' one (re-probing varies it).
        pad_token_id: Padding id of the rows.
        progress: Show the probe's progress bar.
        stack: The model's decoder stack, when already found.

    Returns:
        The scores and the seconds the probe took.
    """
    kwargs = _settings(probe)
    if seed is not None:
        kwargs["seed"] = seed
    start = time.perf_counter()
    scores = gradient_probe(model, rows, pad_token_id=pad_token_id, progress=progress, stack=stack, **kwargs)
    return scores, time.perf_counter() - start


def choose_layers(
    model: nn.Module,
    rows,
    *,
    probe: Any = None,
    select: Any = None,
    lora: Any = None,
    seq_len: int,
    batch_size: int = 1,
    scores: Mapping[int, float] | None = None,
    cost: Cost | None = None,
    gradient_checkpointing: bool = False,
    pad_token_id: int | None = None,
    progress: bool = False,
    stack: DecoderStack | None = None,
) -> tuple[LayerScores, Selection, Cost]:
    """Cost, probe and selection: the blocks to adapt and what they are predicted to save.

    Args:
        model: The base model (no adapters yet).
        rows: Tokenized training rows: probed, and timed with ``calibrate``.
        probe: :class:`ProbeConfig` or :func:`gradient_probe` keyword arguments.
        select: :class:`SelectConfig` (its ``calibrate`` times steps instead of counting FLOPs) or
            :func:`make_selection` keyword arguments (optionally with ``calibrate``).
        lora: LoRA settings (the rank and targets of calibration's timed adapters).
        seq_len: Tokens per training sequence, for the cost model.
        batch_size: Sequences per training step, for the cost model.
        scores: Saved scores, one per block: the probe is skipped (``probe_seconds`` 0).
        cost: A cost already computed for this model and shape (:func:`selection_cost`).
        gradient_checkpointing: Whether training recomputes activations.
        pad_token_id: Padding id of the rows (None: the probe's default).
        progress: Show the probe's progress bar.
        stack: The model's decoder stack, when already found.

    Returns:
        ``(scores, selection, cost)``.
    """
    select_kwargs = _settings(select)
    calibrate = bool(select_kwargs.pop("calibrate", getattr(select, "calibrate", False)))
    stack = resolve_stack(model, stack)
    if cost is None:
        cost = selection_cost(
            model,
            rows,
            seq_len=seq_len,
            batch_size=batch_size,
            calibrate=calibrate,
            lora=lora,
            gradient_checkpointing=gradient_checkpointing,
            pad_token_id=0 if pad_token_id is None else pad_token_id,
            stack=stack,
        )
    if scores is None:
        scores, seconds = probe_scores(model, rows, probe, pad_token_id=pad_token_id, progress=progress, stack=stack)
    else:
        scores = scores if isinstance(scores, LayerScores) else LayerScores(scores)
        seconds = 0.0
    if isinstance(cost, Calibration) and "cache_cost" not in select_kwargs:
        # a calibration has no cache term: the cached and progressive predictions come from the FLOP count at the
        # run's rank, targets and checkpointing
        select_kwargs["cache_cost"] = selection_cost(
            model,
            seq_len=seq_len,
            batch_size=batch_size,
            lora=lora,
            gradient_checkpointing=gradient_checkpointing,
            stack=stack,
        )
    selection = make_selection(
        scores, model=model, seq_len=seq_len, batch_size=batch_size, cost=cost, stack=stack, **select_kwargs
    ).with_probe_seconds(seconds)
    return scores, selection, cost


def lora_config_for(
    model: nn.Module,
    layers: Sequence[int],
    lora: Any = None,
    *,
    scores: Mapping[int, float] | None = None,
    every_block: bool = False,
    stack: DecoderStack | None = None,
) -> tuple[LoraConfig, RankAllocation | None]:
    """The ``LoraConfig`` of a selection.

    Args:
        model: The base model.
        layers: The selected blocks.
        lora: :class:`LoraSettings` or :func:`apply_aletheia_lora` keyword arguments (``rank_allocation`` and
            ``rank_by`` included).
        scores: The probe scores, needed by ``rank_allocation="scores"``.
        every_block: For re-probing: LoRA on every block at uniform rank (the callback then trains ``layers``).
        stack: The model's decoder stack, when already found.

    Returns:
        The config, and the rank allocation with ``rank_allocation="scores"`` (else None).
    """
    kwargs = _settings(lora)
    ranks, by = kwargs.pop("rank_allocation", "uniform"), kwargs.pop("rank_by", "layer")
    check_rank_allocation({"rank_allocation": ranks, **kwargs})
    stack = resolve_stack(model, stack)
    if every_block:
        if ranks == "scores":
            raise ValueError(
                "rank_allocation='scores' does not combine with LoRA on every block (re-probing): ranks are fixed "
                "when the adapters are built, and re-probing moves training between blocks"
            )
        return apply_aletheia_lora(model, list(range(stack.num_layers)), stack=stack, **kwargs), None
    config = apply_aletheia_lora(model, list(layers), stack=stack, **kwargs)
    if ranks != "scores":
        return config, None
    if scores is None:
        raise ValueError("rank_allocation='scores' needs layer_scores (from gradient_probe)")
    return allocate_for_config(model, config, scores, by=by, stack=stack)


def make_plan(
    model: nn.Module,
    rows,
    *,
    probe: Any = None,
    select: Any = None,
    lora: Any = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 1,
    scores: Mapping[int, float] | None = None,
    pad_token_id: int | None = None,
    progress: bool = False,
    stack: DecoderStack | None = None,
) -> Plan:
    """Probe (unless ``scores`` are given), select and configure LoRA: :func:`choose_layers`, then
    :func:`lora_config_for`. The model is left as found.

    Args:
        model: The base model (not a PeftModel).
        rows: Tokenized training rows.
        probe: Probe settings, as :func:`probe_scores`.
        select: Selection settings, as :func:`choose_layers`.
        lora: LoRA settings, as :func:`lora_config_for`.
        seq_len: Tokens per training sequence, for the cost model.
        batch_size: Sequences per training step, for the cost model.
        scores: Saved scores, one per block.
        pad_token_id: Padding id of the rows.
        progress: Show the probe's progress bar.
        stack: The model's decoder stack, when already found.

    Returns:
        The :class:`Plan`.
    """
    stack = resolve_stack(model, stack)
    check_rank_allocation(lora)  # before the probe: a refused setting costs nothing
    scores, selection, cost = choose_layers(
        model,
        rows,
        probe=probe,
        select=select,
        lora=lora,
        seq_len=seq_len,
        batch_size=batch_size,
        scores=scores,
        pad_token_id=pad_token_id,
        progress=progress,
        stack=stack,
    )
    lora_config, allocation = lora_config_for(model, selection.layers, lora, scores=scores, stack=stack)
    return Plan(scores, selection, lora_config, cost, allocation)
