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

**The cost model.** :class:`CostModel` counts FLOPs from a model's real module shapes or from its config, and adds
what a step costs beyond them (:mod:`aletheia_lora.overheads`, where the constants and how they were measured are
documented): per adapted module, the adapters' memory-bound rank-r products, scaling and gradient additions, and
the optimizer's per-tensor work; per block, attention's work per score and the elementwise operations per unit of
width; per vocabulary entry, the loss. Both are counted in FLOP-equivalents, and a speedup is the ratio of
:attr:`StepCost.effective`. ``overheads=None`` counts FLOPs alone, which missed the committed measurements by up
to 12.4% (14% on the run before), always too low: the adapters cost 5-8 times their FLOPs on a CPU.
:meth:`CostModel.uniform` is the model-free approximation; a :class:`Calibration` predicts from step times measured
on the user's hardware (:func:`aletheia_lora.calibrate.calibrate`).

**Cached and progressive steps.** With the prefix cache (``--cache-prefix``) the embeddings and the blocks below the
lowest adapted block do not run at all: ``step_cost(layers, cached=True)``. Under progressive freezing the
adapters of frozen blocks still run forward, with no backward and no update (``frozen_layers``), and a cache may
sit below the lowest trainable block (``cache_block``). :mod:`aletheia_lora.timeline` turns a freeze timeline into
the predicted wall time of a run.

**How far to trust a prediction**: :data:`COST_MODEL_ERROR_BAND` and :data:`CALIBRATED_ERROR_BAND`, from the
committed benchmark; :func:`describe_prediction` words a speedup with its basis and band.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from torch import nn

from aletheia_lora.calibrate import Calibration
from aletheia_lora.checks import check_bool, check_int, check_names, check_number, validate_selected_layers
from aletheia_lora.frontier import StepTerms
from aletheia_lora.layers import (
    BlockShapes,
    DecoderStack,
    config_num_layers,
    config_value,
    looks_like_config,
    matches_target,
    resolve_stack,
    shapes_from_config,
    shapes_from_model,
    text_config,
    unwrap_model,
)
from aletheia_lora.overheads import CPU_OVERHEADS, Overheads, module_rank, step_overheads, target_ranks

logger = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 512
# AdamW: two moment updates, bias corrections, a square root, a division and weight decay per parameter.
DEFAULT_OPTIMIZER_FLOPS_PER_PARAM = 12.0
# How far predictions landed from measured step-time ratios on the committed benchmark: the largest
# |predicted / measured - 1| over every selection arm (score, probe-pattern, truncation, contiguous) of the 8 families
# and SmolLM2-135M in bench/results/families.json ("errors", and each arm's "prediction_error" and "calibrated_error";
# rendered in docs/EVIDENCE.md), rounded up to a whole percent. Shown next to every prediction (describe_prediction).
# The cost model's constants were measured on that benchmark's CPU: on other hardware, calibrate. Both bands hold the
# measurement's own noise. The committed run had the machine's other core idle; an earlier one beside another
# benchmark ran every step 30-45% slower and its calibrated errors reached 6.6% (the cost model's 3.8%). The largest
# calibrated error (Qwen2.5, 6.0%) is where the order of the timed steps matters most: see aletheia_lora.calibrate.
COST_MODEL_ERROR_BAND = 0.05
CALIBRATED_ERROR_BAND = 0.06
# Ends the description of a CostModel priced with overheads: how a saved selection tells which model it came from.
OVERHEADS_TAG = "FLOPs + measured CPU overheads"


@dataclass(frozen=True)
class StepCost:
    """What one training step with LoRA on a given set of blocks costs: its FLOPs, and what it costs beyond them.

    Attributes:
        forward: Base-model forward FLOPs: every block that runs (all of them, unless a cache skips the prefix) and
            the LM head.
        backward: Base-model backward: activation gradients of the head and of the blocks it reaches.
        recompute: Forward re-run by gradient checkpointing (blocks and their adapters); 0 without it.
        lora: Adapters: forward, input gradient and weight gradient of A and B in the adapted blocks (frozen
            adapters: forward only).
        optimizer: Optimizer update of the adapter weights.
        lowest_layer: The lowest trainable adapted block: the backward stops there.
        backward_layers: How many blocks the backward pass runs through.
        adapted_layers: The trainable adapted blocks, sorted.
        trainable_params: Adapter parameters.
        overhead: What the step costs beyond its FLOPs, in FLOP-equivalents (:mod:`aletheia_lora.overheads`); 0 for
            a FLOP-only or uniform model.
        skipped_layers: Blocks whose forward a prefix cache skips (the blocks below it).
        frozen_layers: Blocks whose adapters run forward only (progressive freezing), skipped ones excluded.
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
    overhead: float = 0.0
    skipped_layers: int = 0
    frozen_layers: tuple[int, ...] = ()

    @property
    def total(self) -> float:
        """All FLOPs of the step."""
        return self.forward + self.backward + self.recompute + self.lora + self.optimizer

    @property
    def effective(self) -> float:
        """The step's cost in FLOP-equivalents, FLOPs and overheads: what speedups are ratios of."""
        return self.total + self.overhead


_PER_BLOCK = ("block_forward", "block_backward", "lora_forward", "lora_backward", "lora_params")
_OVERHEAD_TUPLES = (
    "block_forward_overhead",
    "block_backward_overhead",
    "lora_forward_overhead",
    "lora_backward_overhead",
    "lora_update_overhead",
)


@dataclass(frozen=True)
class CostModel:
    """Per-step cost of each part of a LoRA step; turns a layer selection into a :class:`StepCost`.

    Build one with :meth:`from_model` (FLOPs and overheads from a model or its config) or :meth:`uniform` (no model
    needed). Per-block values are tuples indexed by block, so stacks whose blocks differ are costed block by block.
    The ``*_overhead`` values are FLOP-equivalents beyond the FLOPs (:mod:`aletheia_lora.overheads`); left out,
    they are 0. A cost model is also a callable: ``cost(layers)`` is :meth:`speedup`.

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
        block_forward_overhead: Forward overhead of each block (attention per score, elementwise operations).
        block_backward_overhead: Backward overhead of each block.
        head_forward_overhead: Forward overhead of the loss (log-softmax over the vocabulary).
        head_backward_overhead: Its backward.
        lora_forward_overhead: Forward overhead of the adapters of each block, when adapted.
        lora_backward_overhead: Backward overhead of the adapters of each block, when trained.
        lora_update_overhead: Optimizer overhead (per tensor and per parameter) of each block's adapters.
        batch_size: Rows per step, to price a cache build per row (:mod:`aletheia_lora.timeline`).
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
    block_forward_overhead: tuple[float, ...] = ()
    block_backward_overhead: tuple[float, ...] = ()
    head_forward_overhead: float = 0.0
    head_backward_overhead: float = 0.0
    lora_forward_overhead: tuple[float, ...] = ()
    lora_backward_overhead: tuple[float, ...] = ()
    lora_update_overhead: tuple[float, ...] = ()
    batch_size: int = 1

    def __post_init__(self) -> None:
        n = len(self.block_forward)
        if n == 0:
            raise ValueError("a cost model needs at least one block")
        for name in _OVERHEAD_TUPLES:
            if not getattr(self, name):  # left out: no overhead
                object.__setattr__(self, name, (0.0,) * n)
        for name in ("block_backward", "lora_forward", "lora_backward", "lora_params", *_OVERHEAD_TUPLES):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} blocks")
        check_int("batch_size", self.batch_size, minimum=1)

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
        attention_r: int | None = None,
        mlp_r: int | None = None,
        backward_to_embeddings: bool | None = None,
        gradient_checkpointing: bool = False,
        optimizer_flops_per_param: float = DEFAULT_OPTIMIZER_FLOPS_PER_PARAM,
        stack: DecoderStack | None = None,
        overheads: Overheads | None = CPU_OVERHEADS,
    ) -> CostModel:
        """Price a LoRA step of a model, or of a model described by its config: its FLOPs and its overheads.

        A linear layer costs ``2 * in * out`` FLOPs per token; attention scores and their weighted sum cost
        ``4 * seq_len * heads * head_dim`` per token (no discount for the causal mask, as in the unfused
        kernels); an adapter of rank ``r`` costs ``2 * r * (in + out)`` forward and twice that backward.
        Fused MoE experts count ``num_experts_per_tok`` experts per token. On top, ``overheads`` prices per
        token: ``seq_len * heads`` attention scores per block, the block's linear width (sum of ``in + out``),
        the adapted width, the vocabulary; and per step the adapter tensors and parameters.

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
            attention_r: Rank of the attention projections, mlp_r of the MLP's, where they differ from ``r``
                (as :func:`apply_aletheia_lora` gives them).
            backward_to_embeddings: The backward runs through every block whatever is adapted (an
                input-require-grads hook on the embeddings, or reentrant checkpointing). Default: the value
                of ``gradient_checkpointing``, because transformers' ``gradient_checkpointing_enable``
                registers that hook.
            gradient_checkpointing: Blocks re-run their forward (adapters included) before their backward.
            optimizer_flops_per_param: Optimizer FLOPs per adapter parameter and step.
            stack: The model's decoder stack, when the caller has found it already.
            overheads: What a step costs beyond its FLOPs (default: the constants measured on a CPU,
                :data:`~aletheia_lora.overheads.CPU_OVERHEADS`); None counts FLOPs alone.

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
        ranks = target_ranks(targets, r, attention_r, mlp_r, leaf_kinds=target_modules is None)
        all_names = {name for block in shapes.blocks for name, _, _, _ in block}
        for target in targets:
            if not any(matches_target(name, target) for name in all_names):
                raise ValueError(
                    f"target module {target!r} is not in {shapes.model_type}'s blocks; they have {sorted(all_names)}"
                )

        tokens = seq_len * batch_size
        attention = 4.0 * seq_len * shapes.attention_width * tokens
        per_block: dict[str, list[float]] = {name: [] for name in _PER_BLOCK}
        for block, experts in zip(shapes.blocks, shapes.expert_params):
            linear = sum(2.0 * fan_in * fan_out for _, fan_in, fan_out, _ in block) * tokens + 2.0 * experts * tokens
            # adapter width weighted by each module's rank: its FLOPs and parameters
            width = sum(module_rank(name, ranks, r) * (i + o) for name, i, o, _ in block
                        if any(matches_target(name, t) for t in targets))  # fmt: skip
            for name, value in zip(
                _PER_BLOCK, (linear + attention, linear + 2 * attention, 2.0 * width * tokens, 4.0 * width * tokens,
                             width)
            ):  # fmt: skip
                per_block[name].append(value)
        head = 2.0 * shapes.head_in * shapes.vocab_size * tokens
        heads = _heads(model_or_config, shapes)
        extra = step_overheads(
            shapes, targets, overheads, seq_len=seq_len, tokens=tokens, heads=heads, r=r, ranks=ranks
        )
        rank_text = f"r={r}" + "".join(f", {k}={v}" for k, v in (("attention_r", attention_r), ("mlp_r", mlp_r)) if v)
        basis = OVERHEADS_TAG if overheads is not None else "FLOPs only"
        return cls(
            head_forward=head,
            head_backward=head,
            optimizer_flops_per_param=optimizer_flops_per_param,
            backward_to_embeddings=backward_to_embeddings,
            gradient_checkpointing=gradient_checkpointing,
            batch_size=batch_size,
            description=f"{shapes.model_type} ({shapes.source}), {batch_size}x{seq_len} tokens, {rank_text}, {basis}",
            **{name: tuple(values) for name, values in per_block.items()},
            **extra,
        )

    def step_cost(
        self,
        selected_layers: Iterable[int],
        *,
        cached: bool = False,
        frozen_layers: Iterable[int] = (),
        cache_block: int | None = None,
    ) -> StepCost:
        """What one step with trainable adapters on ``selected_layers`` costs.

        Args:
            selected_layers: The blocks whose adapters train.
            cached: A prefix cache feeds the hidden state entering the lowest of them: the embeddings and the blocks
                below it (and their adapters) do not run.
            frozen_layers: Blocks whose adapters are frozen (progressive freezing): they run forward only. They
                must lie below the lowest trainable block (freezing moves upward).
            cache_block: The block a prefix cache feeds, when it is not the lowest trainable one (a progressive
                run's cache stays where it was built while freezing moves on): blocks below it are skipped. At most
                the lowest trainable block; implies ``cached``.

        Raises:
            TypeError, ValueError: a layer list is not a list of distinct block indices in range (the selection
                non-empty), frozen blocks overlap or lie above the trainable ones, or ``cache_block`` is above the
                lowest trainable block.
        """
        layers = validate_selected_layers(selected_layers, self.num_layers)
        lowest, n = layers[0], self.num_layers
        start = self._cache_start(cached, cache_block, lowest)
        frozen = [i for i in _frozen(frozen_layers, n, lowest) if i >= start]
        reached = range(start if self.backward_to_embeddings else lowest, n)
        ran = range(start, n)
        lora_forward = sum(self.lora_forward[i] for i in layers) + sum(self.lora_forward[i] for i in frozen)
        adapter_forward = sum(self.lora_forward_overhead[i] for i in layers)
        adapter_forward += sum(self.lora_forward_overhead[i] for i in frozen)
        overhead = sum(self.block_forward_overhead[i] for i in ran) + self.head_forward_overhead
        overhead += sum(self.block_backward_overhead[i] for i in reached) + self.head_backward_overhead
        overhead += adapter_forward
        overhead += sum(self.lora_backward_overhead[i] + self.lora_update_overhead[i] for i in layers)
        recompute = 0.0
        if self.gradient_checkpointing:
            # The adapted blocks lie in the reached range (frozen ones too, when the backward reaches them).
            in_reach = [i for i in frozen if i >= reached.start]
            recompute = sum(self.block_forward[i] for i in reached) + sum(self.lora_forward[i] for i in layers)
            recompute += sum(self.lora_forward[i] for i in in_reach)
            overhead += sum(self.block_forward_overhead[i] for i in reached)
            overhead += sum(self.lora_forward_overhead[i] for i in (*layers, *in_reach))
        params = sum(self.lora_params[i] for i in layers)
        return StepCost(
            forward=sum(self.block_forward[i] for i in ran) + self.head_forward,
            backward=self.head_backward + sum(self.block_backward[i] for i in reached),
            recompute=recompute,
            lora=lora_forward + sum(self.lora_backward[i] for i in layers),
            optimizer=self.optimizer_flops_per_param * params,
            lowest_layer=lowest,
            backward_layers=len(reached),
            adapted_layers=tuple(layers),
            trainable_params=params,
            overhead=overhead,
            skipped_layers=start,
            frozen_layers=tuple(frozen),
        )

    def _cache_start(self, cached: bool, cache_block: int | None, lowest: int) -> int:
        """The first block that runs: 0 without a cache."""
        cached = check_bool("cached", cached)
        if cache_block is None:
            return lowest if cached else 0
        check_int("cache_block", cache_block, minimum=0)
        if cache_block > lowest:
            raise ValueError(
                f"cache_block={cache_block} is above the lowest trainable block {lowest}: the cached blocks must be "
                "frozen"
            )
        return cache_block

    def step_terms(self) -> StepTerms:
        """The step's cost as ``by_lowest[lowest adapted block] + fsum(by_layer[i] for i in adapted blocks)``.

        In FLOP-equivalents, overheads included (:attr:`StepCost.effective` of a step without a cache or frozen
        adapters). :meth:`speedup` is computed from these, so a selection frontier can cost each of its candidates in
        O(1).
        """
        return self._terms

    @cached_property
    def _terms(self) -> StepTerms:
        n, recompute = self.num_layers, 1.0 if self.gradient_checkpointing else 0.0
        forward = [self.block_forward[i] + self.block_forward_overhead[i] for i in range(n)]
        reached = [self.block_backward[i] + self.block_backward_overhead[i] + recompute * forward[i] for i in range(n)]
        suffix, by_lowest = 0.0, [0.0] * n
        for i in range(n - 1, -1, -1):
            suffix += reached[i]
            by_lowest[i] = suffix
        fixed = sum(forward) + self.head_forward + self.head_backward
        fixed += self.head_forward_overhead + self.head_backward_overhead
        if self.backward_to_embeddings:
            by_lowest = [by_lowest[0]] * n
        by_layer = tuple(
            (1.0 + recompute) * (self.lora_forward[i] + self.lora_forward_overhead[i])
            + self.lora_backward[i]
            + self.lora_backward_overhead[i]
            + self.optimizer_flops_per_param * self.lora_params[i]
            + self.lora_update_overhead[i]
            for i in range(n)
        )
        return StepTerms(tuple(fixed + x for x in by_lowest), by_layer)

    def speedup(
        self,
        selected_layers: Iterable[int],
        *,
        cached: bool = False,
        frozen_layers: Iterable[int] = (),
        cache_block: int | None = None,
    ) -> float:
        """Predicted step-time ratio: LoRA on every block (uncached) / this step (> 1 is faster).

        The options are those of :meth:`step_cost`: ``cached=True`` predicts a step of the prefix cache.
        """
        if cached or cache_block is not None or not _is_empty(frozen_layers):
            every = self.step_cost(range(self.num_layers)).effective
            step = self.step_cost(selected_layers, cached=cached, frozen_layers=frozen_layers, cache_block=cache_block)
            return every / step.effective
        layers = validate_selected_layers(selected_layers, self.num_layers)
        terms = self._terms

        def cost(adapted: Sequence[int]) -> float:
            return terms.by_lowest[adapted[0]] + math.fsum(terms.by_layer[i] for i in adapted)

        return cost(range(self.num_layers)) / cost(layers)

    def prefix_forward(self, block: int) -> float:
        """FLOP-equivalents of one step's forward through the blocks below ``block``: what a prefix cache saves per
        step, and what building it costs per ``batch_size`` rows (no adapters run there when it is built)."""
        check_int("block", block, minimum=0, maximum=self.num_layers)
        return sum(self.block_forward[i] + self.block_forward_overhead[i] for i in range(block))

    def __call__(self, selected_layers: Iterable[int]) -> float:
        return self.speedup(selected_layers)


def _is_empty(layers: Iterable[int]) -> bool:
    return isinstance(layers, (list, tuple, range)) and len(layers) == 0


def _frozen(frozen_layers: Iterable[int], num_layers: int, lowest: int) -> list[int]:
    """The frozen blocks, checked: distinct, in range, below the lowest trainable block."""
    if _is_empty(frozen_layers):
        return []
    try:
        frozen = validate_selected_layers(frozen_layers, num_layers)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("selected_layers", "frozen_layers", 1)) from None
    if frozen[-1] >= lowest:
        raise ValueError(
            f"frozen_layers holds {frozen[-1]}, not below the lowest trainable block {lowest}: freezing moves upward"
        )
    return frozen


def _heads(model_or_config: nn.Module | Any, shapes: BlockShapes) -> int:
    """Attention heads per block (0 when the config names none: attention scores are then not priced)."""
    config = unwrap_model(model_or_config).config if isinstance(model_or_config, nn.Module) else model_or_config
    if config is None or not shapes.attention_width:
        return 0
    return int(config_value(text_config(config), "num_attention_heads", "n_head", "n_heads", default=0))


def prediction_basis(description: str | None = None, *, calibrated: bool = False) -> tuple[float | None, str]:
    """What a predicted speedup rests on: its error band (None: none measured) and its basis, in words.

    A :class:`Calibration` gets :data:`CALIBRATED_ERROR_BAND`; a :class:`CostModel` with overheads (its description
    ends with :data:`OVERHEADS_TAG`) :data:`COST_MODEL_ERROR_BAND`; anything else (the uniform approximation, FLOPs
    only, a selection saved before these bands) no band, its description as the basis.

    Args:
        description: The predicting cost's description (a selection's ``cost_model``).
        calibrated: The prediction came from a :class:`Calibration`.
    """
    if calibrated:
        return CALIBRATED_ERROR_BAND, "calibrated on this machine"
    if description and description.endswith(OVERHEADS_TAG):
        return COST_MODEL_ERROR_BAND, "cost model, not calibrated"
    return None, f"{description or 'no cost model'}; no measured error band"


def describe_prediction(speedup: float, description: str | None = None, *, calibrated: bool = False) -> str:
    """A predicted speedup with its band and basis: ``"1.29x ± 5% (cost model, not calibrated)"``,
    ``"1.29x ± 6% (calibrated on this machine)"``, or ``"1.25x (uniform blocks (no model); no measured error
    band)"`` (see :func:`prediction_basis`)."""
    band, basis = prediction_basis(description, calibrated=calibrated)
    return f"{speedup:.2f}x{'' if band is None else f' ± {band:.0%}'} ({basis})"


# --- functional entry points --------------------------------------------------------------------------------


def step_cost(model_or_config: nn.Module | Any, selected_layers: Iterable[int], **options: Any) -> StepCost:
    """What one LoRA training step with adapters on ``selected_layers`` costs (FLOPs and overheads).

    Args:
        model_or_config: A causal LM or its ``PretrainedConfig``.
        selected_layers: Adapted block indices.
        options: Keyword arguments of :meth:`CostModel.from_model` (``seq_len``, ``batch_size``, ``r``, ...).

    Returns:
        The step's :class:`StepCost`.
    """
    return CostModel.from_model(model_or_config, **options).step_cost(selected_layers)


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
    overheads: Overheads | None = CPU_OVERHEADS,
) -> float:
    """Predicted step-time ratio of LoRA on every block to LoRA on ``selected_layers`` (> 1 is faster).

    Args:
        model_or_config: A causal LM or its ``PretrainedConfig``.
        selected_layers: Adapted block indices.
        calibration: Times measured on this hardware (:func:`aletheia_lora.calibrate.calibrate`). They replace
            the cost model: the prediction is the calibration's, measured at its own batch, rank and checkpointing
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
            overheads=overheads,
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
