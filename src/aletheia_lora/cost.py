"""What one LoRA training step costs, as a function of which decoder blocks carry adapters.

Autograd stops the backward pass at the lowest block that has a trainable parameter. With the base weights
frozen, a LoRA step is therefore:

* the forward pass through every block and the LM head;
* the backward pass of the head and of every block from the top down to the LOWEST adapted block, which
  computes activation gradients only (frozen weights get no weight gradient): about one forward's FLOPs per
  linear layer, twice the forward for the attention-score products (both operands need gradients);
* the adapters themselves in the adapted blocks (forward, input gradient and weight gradient of A and B);
* the optimizer update of the adapter weights.

So the lowest adapted block sets most of the price: half the layers scattered with layer 0 among them saves
a few percent of a step, the top contiguous half saves about a quarter. Two things make the backward reach
the embeddings whatever is adapted: an input-require-grads hook on the embeddings (``enable_input_require_grads``,
which PEFT's k-bit preparation and transformers' gradient checkpointing register) and reentrant checkpointing.
Gradient checkpointing also re-runs the forward of every checkpointed block whose backward runs.

:class:`CostModel` counts FLOPs from a model's real module shapes or from its config; :meth:`CostModel.uniform`
is the model-free approximation (every block costs 1 forward and 1 backward); a :class:`Calibration` predicts
from step times measured on the user's hardware (:func:`aletheia_lora.calibrate.calibrate` times them), which
captures what FLOPs miss (on CPUs the small rank-r products of the adapters cost far more than their FLOPs).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import combinations
from typing import Any

import torch
from torch import nn

from aletheia_lora.checks import check_bool, check_int, check_names, check_number, validate_selected_layers
from aletheia_lora.frontier import StepTerms
from aletheia_lora.layers import (
    DecoderStack,
    config_num_layers,
    looks_like_config,
    matches_target,
    resolve_stack,
    shapes_from_config,
    shapes_from_model,
)

logger = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 512
# AdamW: two moment updates, bias corrections, a square root, a division and weight decay per parameter.
DEFAULT_OPTIMIZER_FLOPS_PER_PARAM = 12.0


@dataclass(frozen=True)
class StepCost:
    """FLOPs of one training step with LoRA on a given set of blocks.

    Attributes:
        forward: Base-model forward (every block and the LM head).
        backward: Base-model backward: activation gradients of the head and of the blocks it reaches.
        recompute: Forward re-run by gradient checkpointing (blocks and their adapters); 0 without it.
        lora: Adapters: forward, input gradient and weight gradient of A and B in the adapted blocks.
        optimizer: Optimizer update of the adapter weights.
        lowest_layer: The lowest adapted block: the backward stops there.
        backward_layers: How many blocks the backward pass runs through.
        adapted_layers: The adapted blocks, sorted.
        trainable_params: Adapter parameters.
    """

    forward: float
    backward: float
    recompute: float
    lora: float
    optimizer: float
    lowest_layer: int
    backward_layers: int
    adapted_layers: tuple[int, ...]
    trainable_params: int

    @property
    def total(self) -> float:
        """All FLOPs of the step."""
        return self.forward + self.backward + self.recompute + self.lora + self.optimizer


@dataclass(frozen=True)
class CostModel:
    """Per-step FLOPs of each part of a LoRA step; turns a layer selection into a :class:`StepCost`.

    Build one with :meth:`from_model` (FLOPs from a model or its config) or :meth:`uniform` (no model needed).
    Per-block values are tuples indexed by block, so stacks whose blocks differ are costed block by block.
    A cost model is also a callable: ``cost(layers)`` is :meth:`speedup`.

    Attributes:
        block_forward: Forward FLOPs of each block.
        block_backward: Activation-gradient backward FLOPs of each block (frozen base weights).
        head_forward: Forward FLOPs of the final norm and LM head.
        head_backward: Backward FLOPs of the head (input gradient only).
        lora_forward: Forward FLOPs of the adapters of each block, when adapted.
        lora_backward: Backward FLOPs (input and weight gradients) of the adapters of each block, when adapted.
        lora_params: Adapter parameters of each block, when adapted.
        optimizer_flops_per_param: Optimizer FLOPs per adapter parameter and step.
        backward_to_embeddings: The backward runs through every block whatever is adapted.
        gradient_checkpointing: Every block the backward runs through re-runs its forward first.
        description: What the model was built from, for logs.
    """

    block_forward: tuple[float, ...]
    block_backward: tuple[float, ...]
    head_forward: float
    head_backward: float
    lora_forward: tuple[float, ...]
    lora_backward: tuple[float, ...]
    lora_params: tuple[int, ...]
    optimizer_flops_per_param: float = DEFAULT_OPTIMIZER_FLOPS_PER_PARAM
    backward_to_embeddings: bool = False
    gradient_checkpointing: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        n = len(self.block_forward)
        if n == 0:
            raise ValueError("a cost model needs at least one block")
        for name in ("block_backward", "lora_forward", "lora_backward", "lora_params"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} blocks")

    @property
    def num_layers(self) -> int:
        """Number of blocks."""
        return len(self.block_forward)

    @classmethod
    def uniform(
        cls,
        num_layers: int,
        *,
        head_share: float = 0.0,
        backward_to_embeddings: bool = False,
        gradient_checkpointing: bool = False,
    ) -> CostModel:
        """The model-free approximation: identical blocks costing 1 forward and 1 backward, adapters free.

        Args:
            num_layers: Number of blocks.
            head_share: Share of an all-layer step (without checkpointing) that does not depend on the
                selection: head, embeddings, loss, fixed overheads. In [0, 1). 0 counts the blocks only,
                which overstates speedups; a large-vocabulary model such as SmolLM2-135M spends about a
                fifth of its FLOPs in the head.
            backward_to_embeddings: See :class:`CostModel`.
            gradient_checkpointing: See :class:`CostModel`.

        Returns:
            The cost model.
        """
        n = check_int("num_layers", num_layers, minimum=1)
        share = check_number("head_share", head_share, minimum=0)
        if share >= 1:
            raise ValueError(f"head_share must be in [0, 1), got {head_share!r}")
        # fixed / (fixed + 2n) = share; the fixed part is split evenly between forward and backward.
        fixed = 2 * n * share / (1 - share)
        return cls(
            block_forward=(1.0,) * n,
            block_backward=(1.0,) * n,
            head_forward=fixed / 2,
            head_backward=fixed / 2,
            lora_forward=(0.0,) * n,
            lora_backward=(0.0,) * n,
            lora_params=(0,) * n,
            optimizer_flops_per_param=0.0,
            backward_to_embeddings=check_bool("backward_to_embeddings", backward_to_embeddings),
            gradient_checkpointing=check_bool("gradient_checkpointing", gradient_checkpointing),
            description=f"uniform {n} blocks, head share {share:g}",
        )

    @classmethod
    def from_model(
        cls,
        model_or_config: nn.Module | Any,
        *,
        seq_len: int = DEFAULT_SEQ_LEN,
        batch_size: int = 1,
        r: int = 16,
        target_modules: Sequence[str] | None = None,
        backward_to_embeddings: bool | None = None,
        gradient_checkpointing: bool = False,
        optimizer_flops_per_param: float = DEFAULT_OPTIMIZER_FLOPS_PER_PARAM,
        stack: DecoderStack | None = None,
    ) -> CostModel:
        """Count the FLOPs of a LoRA step of a model, or of a model described by its config.

        A linear layer costs ``2 * in * out`` FLOPs per token; attention scores and their weighted sum cost
        ``4 * seq_len * heads * head_dim`` per token (no discount for the causal mask, as in the unfused
        kernels); an adapter of rank ``r`` costs ``2 * r * (in + out)`` forward and twice that backward.
        Norms, activations and rotary embeddings are not counted. Fused MoE experts count
        ``num_experts_per_tok`` experts per token.

        Args:
            model_or_config: A transformers causal LM (or a PEFT/DDP wrapper): its blocks' real module shapes
                are counted, block by block. Or its ``PretrainedConfig``: shapes follow from the config
                (GPT-2, GPT-NeoX, Falcon, BLOOM, OPT, MPT, Phi, Phi-3 and Llama-style names; unknown model
                types are read as Llama-style), every block alike.
            seq_len: Tokens per sequence.
            batch_size: Sequences per step.
            r: LoRA rank.
            target_modules: Adapted module names, matched against the end of a module name as PEFT does.
                Default: the blocks' attention and MLP projections (what :func:`apply_aletheia_lora` adapts).
            backward_to_embeddings: The backward runs through every block whatever is adapted (an
                input-require-grads hook on the embeddings, or reentrant checkpointing). Default: the value
                of ``gradient_checkpointing``, because transformers' ``gradient_checkpointing_enable``
                registers that hook.
            gradient_checkpointing: Blocks re-run their forward (adapters included) before their backward.
            optimizer_flops_per_param: Optimizer FLOPs per adapter parameter and step.
            stack: The model's decoder stack, when the caller has found it already.

        Returns:
            The cost model.

        Raises:
            TypeError: ``model_or_config`` is neither a torch module nor a config, or an option has the wrong type.
            ValueError: an option is out of range, the config lacks a size, or a target module matches nothing.
        """
        seq_len = check_int("seq_len", seq_len, minimum=1)
        batch_size = check_int("batch_size", batch_size, minimum=1)
        r = check_int("r", r, minimum=1)
        gradient_checkpointing = check_bool("gradient_checkpointing", gradient_checkpointing)
        if backward_to_embeddings is None:
            backward_to_embeddings = gradient_checkpointing
        backward_to_embeddings = check_bool("backward_to_embeddings", backward_to_embeddings)
        optimizer_flops_per_param = check_number("optimizer_flops_per_param", optimizer_flops_per_param, minimum=0)
        target_modules = check_names("target_modules", target_modules)

        if isinstance(model_or_config, nn.Module):
            shapes = shapes_from_model(model_or_config, stack=stack)
        elif looks_like_config(model_or_config):
            shapes = shapes_from_config(model_or_config)
        else:
            raise TypeError(
                "model_or_config must be a torch model or a transformers PretrainedConfig, "
                f"got {type(model_or_config).__name__}"
            )
        targets = target_modules if target_modules is not None else shapes.default_targets
        if not targets:
            raise ValueError(f"{shapes.model_type}: no attention or MLP linear modules to adapt")
        all_names = {name for block in shapes.blocks for name, _, _, _ in block}
        for target in targets:
            if not any(matches_target(name, target) for name in all_names):
                raise ValueError(
                    f"target module {target!r} is not in {shapes.model_type}'s blocks; they have {sorted(all_names)}"
                )

        tokens = seq_len * batch_size
        attention = 4.0 * seq_len * shapes.attention_width * tokens
        block_forward, block_backward, lora_forward, lora_backward, lora_params = [], [], [], [], []
        for block, experts in zip(shapes.blocks, shapes.expert_params):
            linear = sum(2.0 * fan_in * fan_out for _, fan_in, fan_out, _ in block) * tokens + 2.0 * experts * tokens
            block_forward.append(linear + attention)
            block_backward.append(linear + 2 * attention)
            width = sum(
                fan_in + fan_out for name, fan_in, fan_out, _ in block if any(matches_target(name, t) for t in targets)
            )
            lora_forward.append(2.0 * r * width * tokens)
            lora_backward.append(4.0 * r * width * tokens)
            lora_params.append(r * width)
        head = 2.0 * shapes.head_in * shapes.vocab_size * tokens
        return cls(
            block_forward=tuple(block_forward),
            block_backward=tuple(block_backward),
            head_forward=head,
            head_backward=head,
            lora_forward=tuple(lora_forward),
            lora_backward=tuple(lora_backward),
            lora_params=tuple(lora_params),
            optimizer_flops_per_param=optimizer_flops_per_param,
            backward_to_embeddings=backward_to_embeddings,
            gradient_checkpointing=gradient_checkpointing,
            description=f"{shapes.model_type} ({shapes.source}), {batch_size}x{seq_len} tokens, r={r}",
        )

    def step_cost(self, selected_layers: Iterable[int]) -> StepCost:
        """FLOPs of one step with adapters on ``selected_layers``.

        Raises:
            TypeError, ValueError: ``selected_layers`` is not a non-empty list of distinct block indices in range.
        """
        layers = validate_selected_layers(selected_layers, self.num_layers)
        lowest = layers[0]
        reached = range(0 if self.backward_to_embeddings else lowest, self.num_layers)
        forward = sum(self.block_forward) + self.head_forward
        backward = self.head_backward + sum(self.block_backward[i] for i in reached)
        lora_forward = sum(self.lora_forward[i] for i in layers)
        recompute = 0.0
        if self.gradient_checkpointing:
            # Every adapted block lies in the reached range, so all adapters re-run their forward too.
            recompute = sum(self.block_forward[i] for i in reached) + lora_forward
        params = sum(self.lora_params[i] for i in layers)
        return StepCost(
            forward=forward,
            backward=backward,
            recompute=recompute,
            lora=lora_forward + sum(self.lora_backward[i] for i in layers),
            optimizer=self.optimizer_flops_per_param * params,
            lowest_layer=lowest,
            backward_layers=len(reached),
            adapted_layers=tuple(layers),
            trainable_params=params,
        )

    def step_terms(self) -> StepTerms:
        """The step's FLOPs as ``by_lowest[lowest adapted block] + fsum(by_layer[i] for i in adapted blocks)``.

        :meth:`speedup` is computed from these, so a selection frontier can cost each of its candidates in O(1).
        """
        return self._terms

    @cached_property
    def _terms(self) -> StepTerms:
        n, recompute = self.num_layers, 1.0 if self.gradient_checkpointing else 0.0
        reached = [self.block_backward[i] + recompute * self.block_forward[i] for i in range(n)]
        suffix, by_lowest = 0.0, [0.0] * n
        for i in range(n - 1, -1, -1):
            suffix += reached[i]
            by_lowest[i] = suffix
        fixed = sum(self.block_forward) + self.head_forward + self.head_backward
        if self.backward_to_embeddings:
            by_lowest = [by_lowest[0]] * n
        by_layer = tuple(
            (1.0 + recompute) * self.lora_forward[i]
            + self.lora_backward[i]
            + self.optimizer_flops_per_param * self.lora_params[i]
            for i in range(n)
        )
        return StepTerms(tuple(fixed + x for x in by_lowest), by_layer)

    def speedup(self, selected_layers: Iterable[int]) -> float:
        """Predicted step-time ratio: LoRA on every block / LoRA on ``selected_layers`` (> 1 is faster)."""
        layers = validate_selected_layers(selected_layers, self.num_layers)
        terms = self._terms

        def flops(adapted: Sequence[int]) -> float:
            return terms.by_lowest[adapted[0]] + math.fsum(terms.by_layer[i] for i in adapted)

        return flops(range(self.num_layers)) / flops(layers)

    def __call__(self, selected_layers: Iterable[int]) -> float:
        return self.speedup(selected_layers)


# --- functional entry points --------------------------------------------------------------------------------


def step_cost(
    model_or_config: nn.Module | Any,
    selected_layers: Iterable[int],
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 1,
    r: int = 16,
    target_modules: Sequence[str] | None = None,
    backward_to_embeddings: bool | None = None,
    gradient_checkpointing: bool = False,
    optimizer_flops_per_param: float = DEFAULT_OPTIMIZER_FLOPS_PER_PARAM,
    stack: DecoderStack | None = None,
) -> StepCost:
    """FLOPs of one LoRA training step with adapters on ``selected_layers``.

    Args:
        model_or_config: A causal LM or its ``PretrainedConfig``.
        selected_layers: Adapted block indices.
        Other arguments: as :meth:`CostModel.from_model`.

    Returns:
        The step's :class:`StepCost`.
    """
    model = CostModel.from_model(
        model_or_config,
        seq_len=seq_len,
        batch_size=batch_size,
        r=r,
        target_modules=target_modules,
        backward_to_embeddings=backward_to_embeddings,
        gradient_checkpointing=gradient_checkpointing,
        optimizer_flops_per_param=optimizer_flops_per_param,
        stack=stack,
    )
    return model.step_cost(selected_layers)


def predict_speedup(
    model_or_config: nn.Module | Any,
    selected_layers: Iterable[int],
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 1,
    r: int = 16,
    target_modules: Sequence[str] | None = None,
    backward_to_embeddings: bool | None = None,
    gradient_checkpointing: bool | None = None,
    optimizer_flops_per_param: float = DEFAULT_OPTIMIZER_FLOPS_PER_PARAM,
    calibration: Calibration | None = None,
    stack: DecoderStack | None = None,
) -> float:
    """Predicted step-time ratio of LoRA on every block to LoRA on ``selected_layers`` (> 1 is faster).

    Args:
        model_or_config: A causal LM or its ``PretrainedConfig``.
        selected_layers: Adapted block indices.
        calibration: Times measured on this hardware (:func:`aletheia_lora.calibrate.calibrate`). They replace
            the FLOP count: the prediction is the calibration's, measured at its own batch, rank and checkpointing
            regime, so ``seq_len``, ``batch_size``, ``r`` and ``target_modules`` do not enter.
            ``backward_to_embeddings`` and ``gradient_checkpointing``, when given, must match the regime it was
            measured in.
        Other arguments: as :meth:`CostModel.from_model` (``gradient_checkpointing=None`` means False).

    Returns:
        The speedup; 1.0 for every block adapted.
    """
    if calibration is None:
        model = CostModel.from_model(
            model_or_config,
            seq_len=seq_len,
            batch_size=batch_size,
            r=r,
            target_modules=target_modules,
            backward_to_embeddings=backward_to_embeddings,
            gradient_checkpointing=False if gradient_checkpointing is None else gradient_checkpointing,
            optimizer_flops_per_param=optimizer_flops_per_param,
            stack=stack,
        )
        return model.speedup(selected_layers)
    if not isinstance(calibration, Calibration):
        raise TypeError(f"calibration must be a Calibration from calibrate(), got {type(calibration).__name__}")
    for name, value in (
        ("backward_to_embeddings", backward_to_embeddings),
        ("gradient_checkpointing", gradient_checkpointing),
    ):
        if value is not None and value != getattr(calibration, name):
            raise ValueError(
                f"{name}={value!r}, but the calibration was measured with {name}={getattr(calibration, name)!r}"
            )
    num_layers = _num_layers(model_or_config, stack)
    if num_layers != calibration.num_layers:
        raise ValueError(
            f"the calibration was measured on {calibration.num_layers} layers, the model has {num_layers}"
        )
    return calibration.speedup(selected_layers)


def _num_layers(model_or_config: nn.Module | Any, stack: DecoderStack | None) -> int:
    if isinstance(model_or_config, nn.Module):
        return resolve_stack(model_or_config, stack).num_layers
    if looks_like_config(model_or_config):
        return config_num_layers(model_or_config)
    kind = type(model_or_config).__name__
    raise TypeError(f"model_or_config must be a torch model or a transformers PretrainedConfig, got {kind}")


# --- calibration --------------------------------------------------------------------------------------------


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
