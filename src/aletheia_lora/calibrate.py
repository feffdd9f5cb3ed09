"""Time real LoRA steps on this hardware and fit a :class:`~aletheia_lora.cost.Calibration` to them.

FLOPs miss what the hardware makes of them (on CPUs the small rank-r products of the adapters cost far more
than their FLOPs); :func:`calibrate` measures a few placements of the adapters instead, and the fitted
calibration predicts any selection's speedup as a :class:`~aletheia_lora.cost.CostModel` would.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft import get_peft_model
from torch import nn

from aletheia_lora.checks import check_int, validate_selected_layers
from aletheia_lora.config import apply_aletheia_lora
from aletheia_lora.cost import Calibration
from aletheia_lora.layers import DecoderStack, is_adapter_name, resolve_stack, unwrap_model

logger = logging.getLogger(__name__)


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
