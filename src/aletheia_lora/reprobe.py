"""Re-probing: run the gradient probe again every N training steps and move the trainable adapters to its selection.

One probe before training picks the blocks whose weights want to move most on the task as it looks to the base
model. Training changes that picture; re-probing follows it, in the spirit of periodic layer switching (LISA
trains a few random blocks at a time; here the probe chooses them). LoRA goes on every block once, and
re-probing only changes which adapters train:

* selected blocks: adapters applied and trainable;
* blocks selected earlier and not now: adapters applied (what they learned stays in the model) and frozen;
* blocks never selected: adapters switched off. Their ``lora_B`` is still zero, so this changes no output and
  saves their forward cost.

Frozen adapters need no gradient, so the backward pass still stops at the lowest *selected* block. The
optimizer must hold every adapter parameter from the start: a Trainer built while all adapters are trainable
(``get_peft_model``'s default) does, and AdamW skips parameters without a gradient, so frozen adapters neither
move nor decay. The saved adapter covers every block and loads with ``PeftModel.from_pretrained`` unchanged
(blocks never selected carry ``lora_B = 0``). Re-probing runs in one process: DDP and FSDP fix the set of
trainable parameters when they wrap the model.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import TrainerCallback

from aletheia_lora.checks import check_int, read_data_file, validate_selected_layers
from aletheia_lora.files import write_json
from aletheia_lora.layers import DecoderStack, find_decoder_stack, resolve_stack
from aletheia_lora.plan import probe_scores
from aletheia_lora.probe import LayerScores, ProbeConfig
from aletheia_lora.select import SelectConfig, select_layers

logger = logging.getLogger(__name__)


def _adapter_modules(model: nn.Module, stack: DecoderStack | None = None) -> list[list[BaseTunerLayer]]:
    """Per decoder block, its PEFT adapter layers."""
    stack = resolve_stack(model, stack)
    return [[m for m in block.modules() if isinstance(m, BaseTunerLayer)] for block in stack.blocks]


def _adapter_parameters(module: BaseTunerLayer) -> list[nn.Parameter]:
    return [p for name in module.adapter_layer_names for p in getattr(module, name).parameters()]


def _has_learned(module: BaseTunerLayer) -> bool:
    """Whether the adapter changes the layer's output: some ``lora_B`` (or embedding B) weight is non-zero."""
    for name in ("lora_B", "lora_embedding_B"):
        if hasattr(module, name) and any(bool(torch.any(p.detach() != 0)) for p in getattr(module, name).parameters()):
            return True
    return False


def uncovered_layers(model: nn.Module, *, stack: DecoderStack | None = None) -> list[int]:
    """Decoder blocks of ``model`` that hold no PEFT adapter (re-probing needs adapters on every block)."""
    return [i for i, modules in enumerate(_adapter_modules(model, stack)) if not modules]


def set_trainable_layers(
    model: nn.Module, layers: Sequence[int], *, stack: DecoderStack | None = None
) -> dict[str, list[int]]:
    """Train the adapters of ``layers`` only: freeze the other blocks' adapters, switch off those never trained.

    Args:
        model: A PeftModel (or a wrapper of one) with LoRA on every block ``layers`` names.
        layers: The blocks whose adapters train from now on.
        stack: The model's decoder stack, when already found.

    Returns:
        ``{"trainable": [...], "frozen": [...], "disabled": [...]}``: the blocks in each state. Frozen blocks
        keep applying what their adapters learned; disabled blocks have adapters that change nothing
        (``lora_B`` all zero) and are skipped in the forward pass.

    Raises:
        ValueError: bad ``layers`` (named by value), or a block in ``layers`` without an adapter.
    """
    per_block = _adapter_modules(model, stack)
    chosen = set(validate_selected_layers(layers, len(per_block)))
    missing = sorted(i for i in chosen if not per_block[i])
    if missing:
        raise ValueError(
            f"layers {missing} hold no LoRA adapter: moving adapters needs LoRA on every block, "
            "e.g. apply_aletheia_lora(model, list(range(num_layers)))"
        )
    states: dict[str, list[int]] = {"trainable": [], "frozen": [], "disabled": []}
    for i, modules in enumerate(per_block):
        if not modules:
            continue
        if i in chosen:
            state = "trainable"
        elif any(_has_learned(m) for m in modules):
            state = "frozen"
        else:
            state = "disabled"
        for module in modules:
            module.enable_adapters(state != "disabled")
            for p in _adapter_parameters(module):
                p.requires_grad_(state == "trainable")
        states[state].append(i)
    return states


def move_adapters(
    model: nn.Module,
    layers: Sequence[int],
    *,
    before: Sequence[int] | None = None,
    scores=None,
    stack: DecoderStack | None = None,
) -> dict:
    """:func:`set_trainable_layers`, described as one entry of a re-probing history.

    Args:
        model: As for :func:`set_trainable_layers`.
        layers: The blocks that train from now on.
        before: The blocks that trained until now (None at the start: nothing moved in or out).
        scores: The probe scores the move follows, if any.
        stack: The model's decoder stack, when already found.

    Returns:
        ``layers``, ``moved_in``, ``moved_out``, ``frozen`` (blocks that keep what they learned) and ``scores``
        (block as a string -> score, or None).
    """
    states = set_trainable_layers(model, layers, stack=stack)
    moved = before is not None
    return {
        "layers": list(layers),
        "moved_in": sorted(set(layers) - set(before)) if moved else [],
        "moved_out": sorted(set(before) - set(layers)) if moved else [],
        "frozen": states["frozen"],
        "scores": None if scores is None else {str(k): float(v) for k, v in sorted(scores.items())},
    }


def reselect(
    model: nn.Module,
    dataset,
    *,
    select: SelectConfig | None = None,
    probe: ProbeConfig | None = None,
    seed: int | None = None,
    cost=None,
    pad_token_id: int | None = None,
    progress: bool = False,
    stack: DecoderStack | None = None,
) -> tuple[LayerScores, list[int], float]:
    """Probe ``model`` as it is now (adapters applied) and select layers again, with the plan's probe
    (:func:`~aletheia_lora.plan.probe_scores`) and the selection rule of :func:`select_layers`.

    Args:
        model: The model being trained (e.g. a PeftModel); left as found by the probe.
        dataset: Tokenized training rows, as for :func:`gradient_probe`.
        select: Selection settings (default :class:`SelectConfig`).
        probe: Probe settings (default :class:`ProbeConfig`).
        seed: Seed of the probe's batch sampling (default: ``probe.probe_seed``); vary it to see other rows.
        cost: What predicts speedups for ``strategy="truncation"`` (see :func:`select_layers`).
        pad_token_id: Padding id of the rows.
        progress: Show the probe's progress bar.
        stack: The model's decoder stack, when already found.

    Returns:
        The scores, the selected layers and the seconds the probe and selection took.
    """
    start = time.perf_counter()
    scores, _ = probe_scores(
        model, dataset, probe or ProbeConfig(), seed=seed, pad_token_id=pad_token_id, progress=progress, stack=stack
    )
    kwargs = (select or SelectConfig()).kwargs()
    kwargs.pop("max_frozen_pct")  # prices make_selection's progressive prediction; no part of choosing layers
    layers = select_layers(scores, cost=cost, **kwargs)
    return scores, layers, time.perf_counter() - start


class ReprobeCallback(TrainerCallback):
    """Re-probe every ``every`` steps of a transformers ``Trainer`` (or TRL trainer) and move the trainable adapters.

    Build the LoRA config on every block (``apply_aletheia_lora(model, list(range(num_layers)))``) and the
    Trainer with all adapters trainable (PEFT's default), so its optimizer holds them all; at the start of
    training this callback leaves only ``layers`` (or, without ``layers``, a fresh probe's selection)
    trainable. Every ``every`` steps it probes again, on other rows (seed ``probe_seed + step``), and moves.
    The history goes to ``history_path`` (JSON) when given; a resumed run reads its selection from there.

    Args:
        dataset: Tokenized training rows for the probe.
        every: Steps between probes (>= 1).
        layers: The blocks to train first (e.g. the selection of the probe made before training).
        select: Selection settings applied at every re-probe.
        probe: Probe settings.
        cost: What predicts speedups for ``strategy="truncation"``.
        pad_token_id: Padding id of the rows.
        history_path: JSON file of the selections, written after each move.
        progress: Show the probe's progress bar.
    """

    def __init__(
        self,
        dataset,
        every: int,
        *,
        layers: Sequence[int] | None = None,
        select: SelectConfig | None = None,
        probe: ProbeConfig | None = None,
        cost=None,
        pad_token_id: int | None = None,
        history_path: str | os.PathLike | None = None,
        progress: bool = False,
    ) -> None:
        every = check_int("every (--reprobe-every)", every, minimum=1)
        if select is not None and not isinstance(select, SelectConfig):
            raise TypeError(f"select must be a SelectConfig, got {type(select).__name__}")
        if probe is not None and not isinstance(probe, ProbeConfig):
            raise TypeError(f"probe must be a ProbeConfig, got {type(probe).__name__}")
        self.dataset, self.every = dataset, every
        self.layers = None if layers is None else validate_selected_layers(layers)
        self.select, self.probe = select or SelectConfig(), probe or ProbeConfig()
        self.cost, self.pad_token_id, self.progress = cost, pad_token_id, progress
        self.history_path = None if history_path is None else Path(history_path)
        self.history: list[dict] = []
        self._stack: DecoderStack | None = None  # the trained model's, found when training begins

    @property
    def current_layers(self) -> list[int] | None:
        """The blocks training now."""
        return self.history[-1]["layers"] if self.history else self.layers

    def summary(self) -> dict:
        """Steps between probes, the selections in order, and the seconds re-probing took."""
        return {
            "every": self.every,
            "probes": sum(1 for h in self.history if h["step"] > 0),
            "seconds": sum(h["probe_seconds"] for h in self.history if h["step"] > 0),
            "layers_ever_trained": sorted({i for h in self.history for i in h["layers"]}),
            "history": self.history,
        }

    def _write(self) -> None:
        if self.history_path is not None:
            write_json(self.history_path, self.summary())

    def _move(self, model: nn.Module, step: int, layers: list[int], scores, seconds: float) -> None:
        before = self.current_layers if step else None
        entry = move_adapters(model, layers, before=before, scores=scores, stack=self._stack)
        self.history.append({"step": step, **entry, "probe_seconds": seconds})
        self._write()

    def _resume_history(self, step: int) -> list[dict]:
        if self.history_path is None or not self.history_path.is_file():
            raise ValueError(
                f"resuming at step {step} with re-probing needs the selection history "
                f"({str(self.history_path) if self.history_path else 'history_path'}), which is missing"
            )
        try:
            history = read_data_file(self.history_path, fmt="json")["history"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read the re-probing history {str(self.history_path)!r}: {exc}") from None
        kept = [h for h in history if isinstance(h, dict) and h.get("step", step + 1) <= step]
        if not kept:
            raise ValueError(f"the re-probing history {str(self.history_path)!r} holds no selection up to step {step}")
        return kept

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.world_size > 1:
            raise ValueError(
                f"re-probing (--reprobe-every) runs in one process, not {args.world_size}: DDP and FSDP fix which "
                "parameters train when they wrap the model"
            )
        self._stack = find_decoder_stack(model)
        missing = uncovered_layers(model, stack=self._stack)
        if missing:
            raise ValueError(
                f"re-probing needs LoRA on every block; blocks {missing} have none: build the config with "
                "apply_aletheia_lora(model, list(range(num_layers)))"
            )
        if optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            left_out = sorted(
                i
                for i, modules in enumerate(_adapter_modules(model, self._stack))
                if any(id(p) not in held for m in modules for p in _adapter_parameters(m))
            )
            if left_out:
                raise ValueError(
                    f"the optimizer does not hold the adapters of blocks {left_out}: build the Trainer while every "
                    "adapter is trainable (get_peft_model's default), so re-probing can move to any block"
                )
        if state.global_step > 0:
            self.history = self._resume_history(state.global_step)
            set_trainable_layers(model, self.history[-1]["layers"], stack=self._stack)
            self._write()
            logger.info("re-probing resumed at step %d: training layers %s", state.global_step, self.current_layers)
            return
        self.history = []
        if self.layers is None:
            scores, layers, seconds = self._reselect(model, state.global_step)
            self._move(model, 0, layers, scores, seconds)
        else:
            self._move(model, 0, self.layers, None, 0.0)
        logger.info("re-probing every %d steps; training layers %s first", self.every, self.current_layers)

    def _reselect(self, model: nn.Module, step: int):
        return reselect(
            model,
            self.dataset,
            select=self.select,
            probe=self.probe,
            seed=self.probe.probe_seed + step,
            cost=self.cost,
            pad_token_id=self.pad_token_id,
            progress=self.progress,
            stack=self._stack,
        )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.every or (state.max_steps and step >= state.max_steps):
            return
        scores, layers, seconds = self._reselect(model, step)
        before = self.current_layers
        self._move(model, step, layers, scores, seconds)
        logger.info(
            "step %d: re-probed in %.1f s; %s",
            step,
            seconds,
            "selection unchanged" if layers == before else f"training layers {layers} (was {before})",
        )
