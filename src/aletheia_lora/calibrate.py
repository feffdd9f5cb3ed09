"""Time real LoRA steps on this hardware and fit a :class:`Calibration` to them.

:class:`~aletheia_lora.cost.CostModel` prices a step from the model's shapes with constants measured on one CPU
(:mod:`aletheia_lora.overheads`); other hardware splits the time between matrix products and everything else
differently. :func:`calibrate` measures a few placements of the adapters instead, and the fitted
:class:`Calibration` predicts any selection's speedup as a cost model would (``aletheia-lora probe --calibrate``).
:class:`Calibration` is also importable from :mod:`aletheia_lora.cost`.

How the steps are timed: every placement is injected once, as its own named adapter of one ``PeftModel`` with its
own AdamW, and the placements take turns, one step each per round (only that adapter active and trainable; the
placement that starts a round rotates), untimed warm-up rounds first; each placement keeps the median of its timed
steps. Round-robin, because the fit lives on the differences between placements: timed one after the other, a
placement would also carry whatever the machine's load did meanwhile (a shared CPU drifts by several percent within
a minute), and that drift lands in the fitted costs; interleaved, it hits every placement alike, as it does the
arms of a benchmark trained round-robin. A LoRA layer whose adapter is inactive only runs its base layer (and a
little Python around it).

On Linux CPUs, glibc's default allocator returns freed memory to the system and faults it in again, by an amount
that depends on what ran before: interleaved with smaller steps, a large step can pay more than in a run of its own
steps. It can show where a step's largest tensors lie below glibc's 32 MiB ceiling for that behaviour: on the families
benchmark's scaled Qwen2.5 (19 MB of logits per step) the contiguous top half ran 1.52x all-layer LoRA's step rate
timed round-robin but 1.46x timed in runs of consecutive steps (one process, a scratch run), calibrations gave
1.51-1.59x, and its calibrated error (+6.0%) is the committed benchmark's largest; the 7 other families and
SmolLM2-135M were within 2.8%. ``--cpu-allocator tuned`` fixes the thresholds (:mod:`aletheia_lora.allocator`) for the
calibration and the run alike: the same benchmark run so (``bench/results/families_tuned``) measured Qwen2.5's top
half at 1.46x and calibrated every arm of every family within 1.7% (median 0.5%; a scratch run, within 4.9%). This
module leaves the process's allocator as it is; the command line says so when it calibrates on a CPU without them.
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


# transformers keeps the handles of the input-require-grads hooks it registers under these attribute names
_HOOK_HANDLES = ("_require_grads_hook", "_require_grads_hooks")


def _hook_snapshot(model: nn.Module) -> list[tuple[dict, set]]:
    """Every hook dict of every module with the keys it holds now (PEFT may register hooks: see :func:`calibrate`)."""
    return [
        (hooks, set(hooks))
        for module in model.modules()
        for name, hooks in vars(module).items()
        if "_hooks" in name and isinstance(hooks, dict)  # also ``_forward_hooks_with_kwargs`` and its kind
    ]


def _restore_hooks(snapshot: list[tuple[dict, set]]) -> None:
    for hooks, keys in snapshot:
        for key in [k for k in hooks if k not in keys]:
            del hooks[key]


def _adapter_parameters(peft_model: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of adapter ``name`` (PEFT names them ``...lora_A.<name>.weight``)."""
    return [p for n, p in peft_model.named_parameters() if is_adapter_name(n) and f".{name}." in f".{n}."]


def _activate(peft_model: Any, params: Mapping[str, list[nn.Parameter]], name: str) -> None:
    """Make adapter ``name`` the only active and the only trainable one."""
    peft_model.set_adapter(name)
    # PEFT's set_adapter already freezes the others; set the flags here too, so that no version of it can leave an
    # inactive adapter trainable and make the backward pass run deeper than the active placement's
    for other, tensors in params.items():
        for p in tensors:
            p.requires_grad_(other == name)


def calibrate(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    placements: Sequence[Sequence[int]] | None = None,
    steps: int = 6,
    warmup: int = 1,
    r: int = 16,
    target_modules: Sequence[str] | None = None,
    lr: float = 1e-4,
    lora_kwargs: Mapping[str, Any] | None = None,
    stack: DecoderStack | None = None,
) -> Calibration:
    """Time real LoRA steps for a few placements on this hardware and fit a :class:`Calibration`.

    Every placement is injected once, as its own named adapter of one ``PeftModel`` (configs from
    :func:`apply_aletheia_lora`), with its own AdamW over its own parameters. The placements are then timed
    round-robin: per round, one step of each placement with only its adapter active and trainable, the placement
    that starts a round rotating from round to round; ``warmup`` untimed rounds, then ``steps`` timed ones, and the
    median of each placement's timed steps is kept. All adapters are removed again afterwards. The model's regime is
    measured as it is: gradient checkpointing if it is on, and whether an input-require-grads hook makes the
    backward reach the embeddings.

    Args:
        model: A causal LM without adapters. It is left as it came: weights, ``requires_grad`` flags, training
            mode, modules and hooks.
        batch: Model inputs: ``input_ids`` (and optionally ``attention_mask``, ``labels``; labels default to
            the input ids), on any device: they are moved to the model's.
        placements: Layer selections to time. Default: :func:`default_placements`.
        steps: Timed rounds: timed steps per placement. Six, because a median of three still moved a fitted
            speedup by up to 19% between calibrations on a busy shared CPU, a median of six by 6.5%.
        warmup: Untimed rounds before them.
        r: LoRA rank.
        target_modules: Adapted modules; default as :func:`apply_aletheia_lora`.
        lr: AdamW learning rate (the step's cost does not depend on it).
        lora_kwargs: Further ``LoraConfig`` arguments.
        stack: The model's decoder stack, when the caller has found it already.

    Returns:
        The fitted calibration; ``timings`` holds the medians, in the order of ``placements``.
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
    # every config is built from the bare model: once PEFT has wrapped it, its module names change
    configs = [
        apply_aletheia_lora(model, layers, r=r, target_modules=target_modules, stack=stack, **dict(lora_kwargs or {}))
        for layers in placements
    ]

    device = next(model.parameters()).device
    inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    inputs.setdefault("labels", inputs["input_ids"].clone())
    inputs.setdefault("use_cache", False)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    bare = unwrap_model(model)
    gradient_checkpointing = _is_checkpointing(bare)
    # PEFT registers an input-require-grads hook on a checkpointing model: taken off again afterwards
    hooks = _hook_snapshot(model)
    owners = [model] if bare is model else [model, bare]
    handles = [{name: vars(m)[name] for name in _HOOK_HANDLES if name in vars(m)} for m in owners]
    names = [f"calib{i}" for i in range(len(placements))]
    times: dict[str, list[float]] = {name: [] for name in names}
    model.train()
    peft_model = None
    try:
        peft_model = get_peft_model(model, configs[0], adapter_name=names[0])
        for name, config in zip(names[1:], configs[1:]):
            peft_model.add_adapter(name, config)
        params = {name: _adapter_parameters(peft_model, name) for name in names}
        optimizers = {name: torch.optim.AdamW(params[name], lr=lr) for name in names}
        probe = peft_model.get_input_embeddings()(inputs["input_ids"][:, :1])
        reaches_embeddings = bool(probe.requires_grad)
        for round_ in range(warmup + steps):
            # the placement that starts a round rotates, as the measured arms of a benchmark do
            first = round_ % len(names)
            for name in names[first:] + names[:first]:
                _activate(peft_model, params, name)
                _sync(device)
                start = time.perf_counter()
                peft_model(**inputs).loss.backward()
                optimizers[name].step()
                optimizers[name].zero_grad(set_to_none=True)
                _sync(device)
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    finally:
        if peft_model is not None:
            # unload() puts every LoRA layer's base layer back, whichever adapters it held
            model = peft_model.unload()
        _restore_hooks(hooks)
        for owner, held in zip(owners, handles):
            for name in _HOOK_HANDLES:
                if name in held:
                    setattr(owner, name, held[name])
                elif name in vars(owner):
                    delattr(owner, name)
        for name, p in model.named_parameters():
            if name in requires_grad:
                p.requires_grad_(requires_grad[name])
        model.train(was_training)
    timings = [(tuple(layers), statistics.median(times[name])) for layers, name in zip(placements, names)]
    for layers, seconds in timings:
        logger.info("calibrate: layers %s: %.4f s/step", _span(layers), seconds)
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
