"""Per-layer LoRA ranks from probe scores, under the parameter budget of a uniform rank.

Layer selection decides *where* adapters go; this module decides *how large* each one is. The selected
blocks share the LoRA parameters that uniform rank ``r`` would give them, in proportion to their probe
scores: a block whose weights want to move more gets a larger rank, a quiet one a smaller rank, and the
total never exceeds the uniform budget (so memory and optimizer state stay those of the uniform run).

The ranks reach PEFT as ``rank_pattern`` / ``alpha_pattern``. PEFT reads each key as a regex matched against
the end of a module name (``(.*\\.)?KEY$``), so a bare ``q_proj`` would hit every block; here every key is the
escaped full name of one module (``model\\.layers\\.3\\.self_attn\\.q_proj``) and matches that module only,
which is checked against the model before the allocation is returned.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from peft import LoraConfig
from torch import nn

from aletheia_lora.checks import (
    check_choice,
    check_int,
    check_names,
    check_number,
    validate_scores,
    validate_selected_layers,
)
from aletheia_lora.layers import (
    OTHER,
    DecoderStack,
    is_adapter_name,
    linear_shape,
    matches_target,
    resolve_stack,
    unwrap_model,
)

logger = logging.getLogger(__name__)

BY = ("layer", "layer_and_kind")
# Bisection steps for the proportionality constant: far below one rank step for any realistic model.
_BISECTION_STEPS = 200
# Scores below this fraction of the highest one count as zero when ranks are made proportional.
_NEGLIGIBLE_SHARE = 1e-12


@dataclass(frozen=True)
class RankAllocation:
    """LoRA ranks per selected block (and per attention/MLP group), ready for a PEFT ``LoraConfig``.

    Attributes:
        rank_pattern: Escaped full module name -> rank; each key matches exactly one module of the model.
        alpha_pattern: The same keys -> alpha, ``lora_alpha * rank / r``, so every module keeps the scale
            ``alpha / rank = lora_alpha / r`` of the uniform configuration.
        ranks: Block index -> module kind (``attention``, ``mlp``) -> rank. With ``by="layer"`` both kinds
            of a block hold the same rank.
        module_ranks: Full module name (relative to the unwrapped model) -> rank.
        total_params: LoRA parameters of the allocation (``rank * (in_features + out_features)`` summed).
        uniform_params: LoRA parameters of uniform rank ``r`` on the same modules: the budget.
        r: The uniform rank the budget comes from.
        lora_alpha: The uniform alpha the alphas are scaled from.
        by: ``"layer"`` or ``"layer_and_kind"``.
        layers: The selected blocks, sorted.
        target_modules: The target names the allocation covers.
    """

    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    ranks: dict[int, dict[str, int]]
    module_ranks: dict[str, int]
    total_params: int
    uniform_params: int
    r: int
    lora_alpha: float
    by: str
    layers: tuple[int, ...] = ()
    target_modules: tuple[str, ...] = field(default=())

    @property
    def budget_used(self) -> float:
        """``total_params / uniform_params``: at most 1."""
        return self.total_params / self.uniform_params

    def to_dict(self) -> dict:
        """A JSON-ready description (block keys as strings)."""
        return {
            "by": self.by,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "layers": list(self.layers),
            "target_modules": list(self.target_modules),
            "ranks": {str(layer): dict(kinds) for layer, kinds in self.ranks.items()},
            "total_params": self.total_params,
            "uniform_params": self.uniform_params,
            "budget_used": self.budget_used,
        }


@dataclass
class _Unit:
    """A group of modules that share one rank: a block, or one kind of module in a block."""

    layer: int
    kind: str | None
    score: float
    modules: list[tuple[str, str, int]]  # (full name, kind, in_features + out_features)
    target: float = 0.0
    rank: int = 0

    @property
    def cost(self) -> int:
        """LoRA parameters per unit of rank."""
        return sum(width for _, _, width in self.modules)


# The requirement these checks have always named (tests pin "r must be an integer >= 1").
_AT_LEAST_ONE = "an integer >= 1"


def _features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear module; any other module with a 2-D weight is read as (out, in)."""
    shape = linear_shape(module)
    if shape is not None:
        return shape
    layer = getattr(module, "base_layer", None)
    layer = layer if isinstance(layer, nn.Module) else module
    weight = getattr(layer, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"{type(layer).__name__} has no 2-D weight: LoRA ranks apply to linear modules")
    return int(weight.shape[1]), int(weight.shape[0])


def _kind_of(relative: str, stack: DecoderStack) -> str:
    for name, kind in stack.modules.items():
        if matches_target(relative, name):
            return kind
    return OTHER


def _block_modules(stack: DecoderStack, layer: int, targets: list[str]) -> list[tuple[str, str, int]]:
    """Modules of one block that PEFT's suffix match on ``targets`` adapts: (full name, kind, in + out)."""
    found = []
    for relative, module in stack.blocks[layer].named_modules():
        if not relative or is_adapter_name(relative):
            continue
        if any(matches_target(relative, t) for t in targets):
            n_in, n_out = _features(module)
            found.append((f"{stack.path}.{layer}.{relative}", _kind_of(relative, stack), n_in + n_out))
    return found


def _check_kind_scores(kind_scores, layers: list[int]) -> dict[int, dict[str, float]] | None:
    if kind_scores is None:
        return None
    if not isinstance(kind_scores, Mapping):
        raise TypeError(f"kind_scores must map layer -> {{kind: score}}, got {type(kind_scores).__name__}")
    checked = {}
    for layer in layers:
        per_kind = kind_scores.get(layer)
        if not isinstance(per_kind, Mapping):
            raise ValueError(f"kind_scores has no {{kind: score}} mapping for selected layer {layer}")
        checked[layer] = {}
        for kind, score in per_kind.items():
            if isinstance(score, bool) or not isinstance(score, numbers.Real) or not math.isfinite(score) or score < 0:
                raise ValueError(f"kind_scores[{layer}][{kind!r}] = {score!r} is not a finite number >= 0")
            checked[layer][kind] = float(score)
    return checked


def _fit_targets(units: list[_Unit], budget: float, low: int, high: float) -> None:
    """Continuous ranks ``clip(lam * score, low, high)`` whose parameter count equals ``budget``."""
    top = max(u.score for u in units)
    # In [0, 1]; a share too small to ever lift a rank above min_rank is zero, so lam stays finite.
    shares = [share if (share := u.score / top) >= _NEGLIGIBLE_SHARE else 0.0 for u in units]

    def used(lam: float) -> float:
        return sum(u.cost * min(max(lam * share, low), high) for u, share in zip(units, shares))

    reachable = sum(u.cost * (high if share > 0 else low) for u, share in zip(units, shares))
    if reachable <= budget:  # max_rank == r with zero scores: every scored unit at the cap is all that fits
        for u, share in zip(units, shares):
            u.target = high if share > 0 else low
        return
    lo_lam, hi_lam = 0.0, 1.0
    while used(hi_lam) < budget:
        hi_lam *= 2
    for _ in range(_BISECTION_STEPS):
        mid = (lo_lam + hi_lam) / 2
        lo_lam, hi_lam = (mid, hi_lam) if used(mid) < budget else (lo_lam, mid)
    for u, share in zip(units, shares):
        u.target = min(max(lo_lam * share, low), high)


def _round(units: list[_Unit], budget: int, step: int, low: int, high: float) -> None:
    """Round down to multiples of ``step``, then hand out the leftover budget one step at a time.

    Each step goes to the unit furthest below its continuous target (only units still below it) whose step
    fits the budget and ``high``, and only if no unit with a strictly higher score would end up with a smaller
    rank. The highest-scored unit below its target always qualifies, so less than one step of the costliest
    unit is left over.
    """
    for u in units:
        u.rank = max(low, min(int(math.floor(u.target / step + 1e-9)) * step, int(min(high, 1 << 30))))
    left = budget - sum(u.cost * u.rank for u in units)
    while True:
        candidates = [
            u
            for u in units
            if u.rank < u.target - 1e-9  # never more than one step above the continuous rank
            and u.cost * step <= left
            and u.rank + step <= high
            and all(v.rank >= u.rank + step for v in units if v.score > u.score)
        ]
        if not candidates:
            return
        best = max(candidates, key=lambda u: (u.target - u.rank, u.score, -u.layer))
        best.rank += step
        left -= best.cost * step


def _check_patterns(base: nn.Module, rank_pattern: Mapping[str, int]) -> None:
    """Every key must match exactly one module of the model, as PEFT matches it (end of the name)."""
    names = [n for n, _ in base.named_modules() if n and not is_adapter_name(n)]
    for key in rank_pattern:
        pattern = re.compile(rf"(.*\.)?({key})$")
        hits = [n for n in names if pattern.match(n)]
        if len(hits) != 1:
            raise ValueError(f"rank_pattern key {key!r} matches {len(hits)} modules ({hits[:4]}), not exactly one")


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def allocate_ranks(
    model_or_stack: nn.Module | DecoderStack,
    layer_scores: Mapping[int, float],
    selected_layers: Sequence[int],
    *,
    r: int = 16,
    lora_alpha: float = 32,
    by: str = "layer",
    min_rank: int = 2,
    max_rank: int | None = None,
    multiple_of: int = 2,
    target_modules: Sequence[str] | None = None,
    kind_scores: Mapping[int, Mapping[str, float]] | None = None,
    stack: DecoderStack | None = None,
) -> RankAllocation:
    """Share the LoRA parameters of uniform rank ``r`` among the selected blocks in proportion to their scores.

    The continuous ranks ``clip(lam * score, min_rank, max_rank)`` use the whole budget; they are rounded
    down to multiples of ``multiple_of``, and the parameters left over go one step at a time to the units
    furthest below their continuous rank (never taking a unit a whole step above it). So the allocation
    holds at most the parameters of uniform rank ``r`` (counted from each module's in and out features),
    less than one rank step of one unit below it (where ``max_rank`` allows), and a unit with a higher score
    never gets a lower rank.

    Args:
        model_or_stack: The model the adapters are for (or a PeftModel/DDP wrapper around it), or its
            :class:`DecoderStack` (from :func:`find_decoder_stack`, with its blocks).
        layer_scores: Block index -> non-negative score, as returned by :func:`gradient_probe`. Scores below
            1e-12 of the highest selected one count as zero.
        selected_layers: The blocks that get adapters (from :func:`select_layers`); each needs a score.
        r: The uniform rank whose parameter count is the budget.
        lora_alpha: The uniform alpha; each module's alpha is ``lora_alpha * rank / r`` so that the update
            scale ``alpha / rank`` stays that of the uniform configuration.
        by: ``"layer"``: one rank per block, shared by all its target modules. ``"layer_and_kind"``: one rank
            per block and kind (attention, MLP). The kinds' scores come from ``kind_scores``; without them
            both kinds take the block's score, and the finer units only let the rounding fill the budget
            more closely (attention and MLP of a block may then differ by one ``multiple_of`` step).
        min_rank: Smallest rank of any unit (rounded up to a multiple of ``multiple_of``); at most ``r``.
        max_rank: Largest rank of any unit (rounded down to a multiple of ``multiple_of``); at least ``r``.
            None: no cap.
        multiple_of: Every rank is a multiple of this.
        target_modules: Module names to adapt, as for :func:`apply_aletheia_lora`; default: the blocks'
            attention and MLP projections.
        kind_scores: Block index -> {``"attention"``/``"mlp"``: score}, per-kind gradient information for
            ``by="layer_and_kind"``.
        stack: The model's decoder stack, when the caller has found it already (with a model only).

    Returns:
        The :class:`RankAllocation`; its ``rank_pattern`` / ``alpha_pattern`` go into the ``LoraConfig``
        (see :func:`with_rank_allocation`).

    Raises:
        TypeError: a wrong argument type.
        ValueError: bad scores (negative, missing for a selected block, all zero), an unknown ``by``,
            ``min_rank`` above or ``max_rank`` below ``r``, a target module absent from the blocks.
    """
    if isinstance(model_or_stack, DecoderStack):
        stack, base = model_or_stack, None
        if stack.blocks is None:
            raise ValueError("model_or_stack is a DecoderStack without its blocks; pass the model instead")
    elif isinstance(model_or_stack, nn.Module):
        stack, base = resolve_stack(model_or_stack, stack), unwrap_model(model_or_stack)
    else:
        raise TypeError(f"model_or_stack must be a torch model or a DecoderStack, got {type(model_or_stack).__name__}")
    scores = validate_scores(layer_scores)
    layers = validate_selected_layers(selected_layers, stack.num_layers)
    missing = [layer for layer in layers if layer not in scores]
    if missing:
        raise ValueError(f"selected_layers holds {missing}, which have no score in layer_scores")
    negative = {layer: scores[layer] for layer in layers if scores[layer] < 0}
    if negative:
        raise ValueError(f"ranks proportional to scores need scores >= 0; got negative ones: {negative}")
    r = check_int("r", r, minimum=1, expected=_AT_LEAST_ONE)
    check_number("lora_alpha", lora_alpha, above=0)
    check_choice("by", by, BY)
    step = check_int("multiple_of", multiple_of, minimum=1, expected=_AT_LEAST_ONE)
    min_rank = check_int("min_rank", min_rank, minimum=1, expected=_AT_LEAST_ONE)
    max_rank = check_int("max_rank", max_rank, minimum=1, allow_none=True, expected=_AT_LEAST_ONE)
    low = -(-min_rank // step) * step
    high = math.inf if max_rank is None else (max_rank // step) * step
    if low > r:
        raise ValueError(
            f"min_rank={min_rank} (as a multiple of {step}: {low}) is above r={r}: "
            "the smallest ranks alone would exceed the budget of uniform rank r"
        )
    if high < r:
        raise ValueError(
            f"max_rank={max_rank} (as a multiple of {step}: {high}) is below r={r}: "
            "the budget of uniform rank r could not be used"
        )
    if kind_scores is not None and by != "layer_and_kind":
        raise ValueError(f"kind_scores apply to by='layer_and_kind', not by={by!r}")
    kinds_given = _check_kind_scores(kind_scores, layers)
    targets = check_names("target_modules", target_modules)
    if targets is None:
        targets = stack.default_target_modules
    if not targets:
        raise ValueError(f"{stack.model_type}: no target modules to allocate ranks to")

    units: list[_Unit] = []
    for layer in layers:
        modules = _block_modules(stack, layer, targets)
        if not modules:
            raise ValueError(f"block {layer} of {stack.path} holds none of target_modules={targets}")
        if by == "layer":
            units.append(_Unit(layer, None, scores[layer], modules))
            continue
        for kind in dict.fromkeys(kind for _, kind, _ in modules):
            score = scores[layer]
            if kinds_given is not None:
                if kind not in kinds_given[layer]:
                    raise ValueError(f"kind_scores[{layer}] has no score for the {kind!r} modules")
                score = kinds_given[layer][kind]
            units.append(_Unit(layer, kind, score, [m for m in modules if m[1] == kind]))
    if all(u.score == 0 for u in units):
        raise ValueError(f"every score of the selected layers {layers} is 0: there is nothing to be proportional to")

    uniform = r * sum(u.cost for u in units)
    _fit_targets(units, uniform, low, high)
    _round(units, uniform, step, low, high)

    rank_pattern, alpha_pattern, module_ranks = {}, {}, {}
    ranks: dict[int, dict[str, int]] = {}
    for u in units:
        for name, kind, _ in u.modules:
            key = re.escape(name)
            rank_pattern[key] = u.rank
            alpha_pattern[key] = _number(lora_alpha * u.rank / r)
            module_ranks[name] = u.rank
            ranks.setdefault(u.layer, {})[kind] = u.rank
    if base is not None:
        _check_patterns(base, rank_pattern)
    total = sum(u.cost * u.rank for u in units)
    logger.info(
        "rank allocation by %s over layers %s: ranks %s, %d LoRA parameters (uniform r=%d: %d)",
        by,
        layers,
        {layer: sorted(set(k.values())) for layer, k in ranks.items()},
        total,
        r,
        uniform,
    )
    return RankAllocation(
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        ranks=ranks,
        module_ranks=module_ranks,
        total_params=total,
        uniform_params=uniform,
        r=r,
        lora_alpha=_number(lora_alpha),
        by=by,
        layers=tuple(layers),
        target_modules=tuple(targets),
    )


def with_rank_allocation(config: LoraConfig, allocation: RankAllocation) -> LoraConfig:
    """A copy of ``config`` (from :func:`apply_aletheia_lora`) whose modules take the allocated ranks and alphas.

    Args:
        config: The uniform-rank ``LoraConfig`` for the same model, blocks, targets, ``r`` and ``lora_alpha``.
        allocation: From :func:`allocate_ranks`.

    Returns:
        The new ``LoraConfig``; ``config`` is left unchanged.

    Raises:
        TypeError: not a ``LoraConfig`` / ``RankAllocation``.
        ValueError: the config already has a rank or alpha pattern (``attention_r``/``mlp_r``), or its
            rank, alpha, blocks or target modules differ from the allocation's.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft LoraConfig, got {type(config).__name__}")
    if not isinstance(allocation, RankAllocation):
        raise TypeError(f"allocation must be a RankAllocation, got {type(allocation).__name__}")
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError(
            "config already has rank_pattern/alpha_pattern (attention_r/mlp_r?): a rank allocation replaces them, "
            "build the config with uniform ranks"
        )
    if config.r != allocation.r or float(config.lora_alpha) != float(allocation.lora_alpha):
        raise ValueError(
            f"config has r={config.r}, lora_alpha={config.lora_alpha}; the allocation was made for "
            f"r={allocation.r}, lora_alpha={allocation.lora_alpha}"
        )
    layers = config.layers_to_transform
    layers = [layers] if isinstance(layers, int) else sorted(layers or [])
    if layers != list(allocation.layers):
        raise ValueError(f"config adapts layers {layers}, the allocation covers {list(allocation.layers)}")
    targets = config.target_modules
    if isinstance(targets, str) or set(targets or ()) != set(allocation.target_modules):
        raise ValueError(
            f"config targets {targets!r}, the allocation covers target_modules={list(allocation.target_modules)}"
        )
    new = copy.deepcopy(config)
    new.rank_pattern = dict(allocation.rank_pattern)
    new.alpha_pattern = dict(allocation.alpha_pattern)
    return new


def allocate_for_config(
    model: nn.Module,
    config: LoraConfig,
    layer_scores: Mapping[int, float],
    *,
    by: str = "layer",
    stack: DecoderStack | None = None,
) -> tuple[LoraConfig, RankAllocation]:
    """Score-proportional ranks for a uniform-rank ``config`` of ``model``: its r, alpha, layers and targets.

    ``stack`` is ``model``'s decoder stack, when the caller has found it already.

    Returns:
        The config with the allocation's rank and alpha patterns, and the allocation.
    """
    allocation = allocate_ranks(
        model,
        layer_scores,
        list(config.layers_to_transform),
        r=config.r,
        lora_alpha=config.lora_alpha,
        by=by,
        target_modules=list(config.target_modules),
        stack=stack,
    )
    return with_rank_allocation(config, allocation), allocation
