"""Time real LoRA steps on this hardware and fit a :class:`Calibration` to them.

:class:`~aletheia_lora.cost.CostModel` prices a step from the model's shapes with constants measured on one CPU
(:mod:`aletheia_lora.overheads`); other hardware splits the time between matrix products and everything else
differently. :func:`calibrate` measures a few placements of the adapters instead, and the fitted
:class:`Calibration` predicts any selection's speedup as a cost model would (``aletheia-lora probe --calibrate``).
:class:`Calibration` is also importable from :mod:`aletheia_lora.cost`.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch
from peft import get_peft_model
from torch import nn

from aletheia_lora.checks import check_int, check_number, validate_selected_layers
from aletheia_lora.config import apply_aletheia_lora
from aletheia_lora.frontier import StepTerms
from aletheia_lora.layers import DecoderStack, is_adapter_name, resolve_stack, unwrap_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """Step time on this hardware as ``fixed + per_backward_block * blocks reached + per_adapted_block * adapted``.

    ``fixed`` holds everything a selection does not change: the forward of all blocks, the head, embeddings,
    loss, launch and optimizer overheads. ``per_backward_block`` is the backward of one block (and its
    re-forward under checkpointing); ``per_adapted_block`` is the adapters of one block, forward, backward
    and update. A calibration is also a callable: ``cal(layers)`` is :meth:`speedup`.

    Attributes:
        num_layers: Blocks of the calibrated model.
        fixed_s: Seconds per step that do not depend on the selection.
        per_backward_block_s: Seconds per block the backward pass runs through.
        per_adapted_block_s: Seconds per adapted block.
        backward_to_embeddings: The backward reached every block in the measured regime.
        gradient_checkpointing: The model had gradient checkpointing on.
        timings: The measured ``(layers, median seconds per step)`` the fit came from.
    """

    num_layers: int
    fixed_s: float
    per_backward_block_s: float
    per_adapted_block_s: float
    backward_to_embeddings: bool = False
    gradient_checkpointing: bool = False
    timings: tuple[tuple[tuple[int, ...], float], ...] = ()

    @property
    def description(self) -> str:
        """What the predictions come from, for logs and reports."""
        return (
            f"calibrated on this hardware from {len(self.timings)} timed placements: {self.fixed_s:.3f} s + "
            f"{self.per_backward_block_s:.4f} s per block the backward reaches + {self.per_adapted_block_s:.4f} s "
            "per adapted block"
        )

    def _features(self, layers: list[int]) -> tuple[int, int]:
        reached = self.num_layers if self.backward_to_embeddings else self.num_layers - layers[0]
        return reached, len(layers)

    def step_time(self, selected_layers: Iterable[int]) -> float:
        """Predicted seconds per step with adapters on ``selected_layers``."""
        reached, adapted = self._features(validate_selected_layers(selected_layers, self.num_layers))
        return self.fixed_s + self.per_backward_block_s * reached + self.per_adapted_block_s * adapted

    def speedup(self, selected_layers: Iterable[int]) -> float:
        """Predicted step-time ratio: every block adapted / ``selected_layers`` adapted."""
        return self.step_time(range(self.num_layers)) / self.step_time(selected_layers)

    def step_terms(self) -> StepTerms:
        """The step time as ``by_lowest[lowest adapted block] + fsum(by_layer[i] for i in adapted blocks)``: what
        :meth:`step_time` computes (``fsum`` of ``n`` equal terms rounds as their product does)."""
        n = self.num_layers
        reached = [n if self.backward_to_embeddings else n - m for m in range(n)]
        by_lowest = tuple(self.fixed_s + self.per_backward_block_s * r for r in reached)
        return StepTerms(by_lowest, (self.per_adapted_block_s,) * n)

    def __call__(self, selected_layers: Iterable[int]) -> float:
        return self.speedup(selected_layers)

    @classmethod
    def fit(
        cls,
        num_layers: int,
        timings: Mapping[Sequence[int], float] | Iterable[tuple[Sequence[int], float]],
        *,
        backward_to_embeddings: bool = False,
        gradient_checkpointing: bool = False,
    ) -> Calibration:
        """Fit the three coefficients to measured step times by least squares, keeping them non-negative.

        An effect the placements cannot tell apart (all placements reach the same blocks, or adapt as many)
        gets coefficient 0 and its time lands in the others; so does one whose free fit comes out negative
        (noise). Three placements such as all layers, the top half and every other layer from 1 separate
        all three.

        Args:
            num_layers: Blocks of the model.
            timings: ``layers -> seconds per step`` (a mapping or pairs).
            backward_to_embeddings: See :class:`Calibration`.
            gradient_checkpointing: See :class:`Calibration`.

        Returns:
            The calibration.
        """
        num_layers = check_int("num_layers", num_layers, minimum=1)
        pairs = list(timings.items()) if isinstance(timings, Mapping) else list(timings)
        if not pairs:
            raise ValueError("timings is empty: measure at least one placement")
        rows, seconds = [], []
        draft = cls(num_layers, 0.0, 0.0, 0.0, backward_to_embeddings, gradient_checkpointing)
        for layers, t in pairs:
            t = check_number(f"timings[{tuple(layers)}]", t, minimum=0)
            rows.append((1.0, *map(float, draft._features(validate_selected_layers(layers, num_layers)))))
            seconds.append(t)
        x = torch.tensor(rows, dtype=torch.float64)
        y = torch.tensor(seconds, dtype=torch.float64).unsqueeze(1)
        best = None
        # At most three columns: trying every subset is the simplest exact non-negative least squares.
        for size in (3, 2, 1):
            for columns in combinations(range(3), size):
                sub = x[:, list(columns)]
                if int(torch.linalg.matrix_rank(sub)) < size:
                    continue
                coef = torch.linalg.lstsq(sub, y).solution.squeeze(1)
                if (coef < 0).any():
                    continue
                residual = float(((sub @ coef.unsqueeze(1) - y) ** 2).sum())
                if best is None or residual < best[0] - 1e-12 * float((y**2).sum()):
                    values = [0.0, 0.0, 0.0]
                    for column, value in zip(columns, coef.tolist()):
                        values[column] = value
                    best = (residual, values)
        if best is None:
            raise ValueError(f"cannot fit step times {seconds}: no non-negative split explains them")
        fixed, per_backward, per_adapted = best[1]
        if per_backward == 0 and not backward_to_embeddings:
            logger.warning(
                "calibration: fitted no backward cost per block: the placements or noisy timings could not separate "
                "it from the fixed cost (more steps or a larger batch help)"
            )
        return cls(
            num_layers=num_layers,
            fixed_s=fixed,
            per_backward_block_s=per_backward,
            per_adapted_block_s=per_adapted,
            backward_to_embeddings=backward_to_embeddings,
            gradient_checkpointing=gradient_checkpointing,
            timings=tuple((tuple(validate_selected_layers(layers, num_layers)), float(t)) for layers, t in pairs),
        )


def default_placements(num_layers: int) -> list[list[int]]:
    """All layers, the top half, and every other layer from 1: they separate the three calibrated costs."""
    candidates = [list(range(num_layers)), list(range(num_layers // 2, num_layers)), list(range(1, num_layers, 2))]
    unique = []
    for layers in candidates:
        if layers and layers not in unique:
            unique.append(layers)
    return unique


def _is_checkpointing(model: nn.Module) -> bool:
    # transformers 5 renamed the flag; reading the old name there only emits a deprecation warning.
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or name in vars(model):
            return bool(getattr(model, name))
    return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    placements: Sequence[Sequence[int]] | None = None,
    steps: int = 3,
    warmup: int = 1,
    r: int = 16,
    target_modules: Sequence[str] | None = None,
    lr: float = 1e-4,
    lora_kwargs: Mapping[str, Any] | None = None,
    stack: DecoderStack | None = None,
) -> Calibration:
    """Time real LoRA steps for a few placements on this hardware and fit a :class:`Calibration`.

    For each placement, adapters are injected with :func:`apply_aletheia_lora` and ``peft.get_peft_model``,
    ``warmup + steps`` AdamW steps are run on ``batch`` and the median of the timed ones is kept; the adapters
    are then removed again. The model's regime is measured as it is: gradient checkpointing if it is on, and
    whether an input-require-grads hook makes the backward reach the embeddings.

    Args:
        model: A causal LM without adapters. Its weights are not changed; it is left in the training mode and
            with the ``requires_grad`` flags it came with.
        batch: Model inputs: ``input_ids`` (and optionally ``attention_mask``, ``labels``; labels default to
            the input ids), on any device: they are moved to the model's.
        placements: Layer selections to time. Default: :func:`default_placements`.
        steps: Timed steps per placement.
        warmup: Untimed steps before them.
        r: LoRA rank.
        target_modules: Adapted modules; default as :func:`apply_aletheia_lora`.
        lr: AdamW learning rate (the step's cost does not depend on it).
        lora_kwargs: Further ``LoraConfig`` arguments.
        stack: The model's decoder stack, when the caller has found it already.

    Returns:
        The fitted calibration; ``timings`` holds the medians.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(is_adapter_name(name) for name, _ in model.named_parameters()):
        raise ValueError("model already has LoRA adapters; calibrate the base model")
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
        raise TypeError(f"batch must be a mapping with an 'input_ids' tensor, got {type(batch).__name__}")
    steps = check_int("steps", steps, minimum=1)
    warmup = check_int("warmup", warmup, minimum=0)
    stack = resolve_stack(model, stack)
    num_layers = stack.num_layers
    if placements is None:
        placements = default_placements(num_layers)
    placements = [validate_selected_layers(layers, num_layers) for layers in placements]
    if not placements:
        raise ValueError("placements is empty: give at least one layer selection to time")

    device = next(model.parameters()).device
    inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    inputs.setdefault("labels", inputs["input_ids"].clone())
    inputs.setdefault("use_cache", False)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    gradient_checkpointing = _is_checkpointing(unwrap_model(model))
    reaches_embeddings = False
    timings = []
    model.train()
    try:
        for layers in placements:
            lora = dict(lora_kwargs or {})
            config = apply_aletheia_lora(model, layers, r=r, target_modules=target_modules, stack=stack, **lora)
            peft_model = get_peft_model(model, config)
            try:
                params = [p for p in peft_model.parameters() if p.requires_grad]
                optimizer = torch.optim.AdamW(params, lr=lr)
                probe = peft_model.get_input_embeddings()(inputs["input_ids"][:, :1])
                reaches_embeddings |= bool(probe.requires_grad)
                times = []
                for step in range(warmup + steps):
                    _sync(device)
                    start = time.perf_counter()
                    peft_model(**inputs).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    _sync(device)
                    if step >= warmup:
                        times.append(time.perf_counter() - start)
                timings.append((tuple(layers), statistics.median(times)))
                logger.info("calibrate: layers %s: %.4f s/step", _span(layers), timings[-1][1])
            finally:
                model = peft_model.unload()
    finally:
        for name, p in model.named_parameters():
            if name in requires_grad:
                p.requires_grad_(requires_grad[name])
        model.train(was_training)
    return Calibration.fit(
        num_layers,
        timings,
        backward_to_embeddings=reaches_embeddings,
        gradient_checkpointing=gradient_checkpointing,
    )


def _span(layers: Sequence[int]) -> str:
    """``15..29`` for a contiguous run, else the list."""
    if len(layers) > 2 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return str(list(layers))
