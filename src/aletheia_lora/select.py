"""Layer selection: turn per-block probe scores into the list of blocks that get LoRA adapters.

All strategies keep the same number of blocks ``k``; they differ in where the lowest one lies, which sets
most of a step's cost (see :mod:`aletheia_lora.cost`): autograd stops the backward pass at the lowest
adapted block. Gradient-norm probes rank the low blocks highest, so the top-``k`` by score nearly always
keeps block 0 and saves little time.

* ``score``: the ``k`` highest-scoring blocks (the reference rule).
* ``contiguous``: the top ``k`` blocks, ``[L - k, L)``: the fastest placement, blind to the scores.
* ``truncation``: for each candidate lowest block ``m``, ``m`` plus the ``k - 1`` best-scoring blocks above
  it; these points trace the trade-off between captured score and speed (:func:`selection_frontier`), and
  the strategy picks one of them (see :func:`select_layers`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from aletheia_lora.config import validate_selected_layers
from aletheia_lora.cost import Calibration, CostModel

STRATEGIES = ("score", "contiguous", "truncation")

# A relative slack so that a target equal to a point's own speedup (e.g. read off the frontier) is reached.
_SPEEDUP_TOLERANCE = 1e-9
# The share of the achievable speedup gain the truncation strategy aims at by default (see select_layers).
DEFAULT_GAIN_SHARE = 0.5

Cost = Callable[[Sequence[int]], float]


def validate_scores(layer_scores: Mapping[int, float]) -> dict[int, float]:
    """Check that scores map integer block indices to finite numbers; return them as a plain dict."""
    if not isinstance(layer_scores, Mapping):
        raise TypeError(f"layer_scores must be a mapping of layer index -> score, got {type(layer_scores).__name__}")
    if not layer_scores:
        raise ValueError("layer_scores is empty: it must contain at least one layer score")
    scores = {}
    for layer, score in layer_scores.items():
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
            raise ValueError(f"layer_scores key {layer!r} is not a layer index (a non-negative integer)")
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            raise TypeError(f"layer_scores[{layer}] = {score!r} is not a number")
        if not math.isfinite(score):
            raise ValueError(f"layer_scores[{layer}] = {score!r} is not finite; re-run the probe")
        scores[int(layer)] = float(score)
    return scores


def budget_from(num_layers: int, top_pct: float | None, top_k: int | None) -> int:
    """Number of layers to keep: ``top_k``, or ``floor(num_layers * top_pct / 100)`` but at least 1."""
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
            raise TypeError(f"top_k must be an integer, got {top_k!r} ({type(top_k).__name__})")
        if not 1 <= top_k <= num_layers:
            raise ValueError(f"top_k must be between 1 and the number of layers ({num_layers}), got {top_k}")
        return int(top_k)
    if isinstance(top_pct, bool) or not isinstance(top_pct, numbers.Real):
        raise TypeError(f"top_pct must be a number between 1 and 100, got {top_pct!r} ({type(top_pct).__name__})")
    if not 1 <= top_pct <= 100:
        raise ValueError(f"top_pct must be between 1 and 100, got {top_pct!r}")
    return max(int(num_layers * top_pct / 100), 1)


def _budget(scores: dict[int, float], top_pct: float | None, top_k: int | None) -> int:
    if top_k is not None and top_pct not in (None, 50):
        raise ValueError(f"give top_pct or top_k, not both (top_pct={top_pct!r}, top_k={top_k!r})")
    return budget_from(len(scores), None if top_k is not None else top_pct, top_k)


def _top_by_score(scores: Mapping[int, float], layers, k: int) -> list[int]:
    """The ``k`` best-scoring of ``layers``, ties going to the lower index."""
    return sorted(layers, key=lambda layer: (-scores[layer], layer))[:k]


@dataclass(frozen=True)
class SelectionSummary:
    """What a layer selection keeps and what it is predicted to save.

    Attributes:
        layers: The selected blocks, sorted.
        lowest_layer: The lowest selected block: the backward pass stops there.
        captured_share: Share of the total probe score held by the selected blocks, in [0, 1].
        speedup: Predicted step-time ratio of LoRA on every block to LoRA on these (> 1 is faster).
    """

    layers: tuple[int, ...]
    lowest_layer: int
    captured_share: float
    speedup: float


@dataclass(frozen=True)
class FrontierPoint(SelectionSummary):
    """One candidate of the ``truncation`` strategy: a lowest block plus the best-scoring blocks above it.

    Attributes:
        pareto: No other candidate captures at least as much score at least as fast (and one of them more).
    """

    pareto: bool = True


def _check_cost(cost) -> None:
    if cost is not None and not isinstance(cost, (CostModel, Calibration)) and not callable(cost):
        raise TypeError(
            "cost must be a CostModel, a Calibration or a callable mapping a layer list to a speedup, "
            f"got {type(cost).__name__}"
        )


def _cost_fn(cost: CostModel | Calibration | Cost | None, scores: Mapping[int, float]) -> Cost:
    """The speedup function for ``cost``, checked against the scored layers."""
    _check_cost(cost)
    needed = max(scores) + 1
    if cost is None:
        return CostModel.uniform(needed)
    if isinstance(cost, (CostModel, Calibration)) and cost.num_layers < needed:
        raise ValueError(
            f"layer_scores holds layer {needed - 1}, but the cost model has {cost.num_layers} layers; "
            "build it from the same model as the scores"
        )
    return cost


def _speedup(cost: Cost, layers: list[int]) -> float:
    value = cost(list(layers))
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"cost returned {value!r} for layers {layers}; it must return a finite speedup > 0")
    return float(value)


def _total_score(scores: Mapping[int, float]) -> float:
    negative = {layer: s for layer, s in scores.items() if s < 0}
    if negative:
        raise ValueError(f"a captured score share needs non-negative scores; got negative ones: {negative}")
    total = sum(scores.values())
    if total == 0:
        raise ValueError("every layer score is 0: there is no score share to capture")
    return total


def summarize_selection(
    layer_scores: Mapping[int, float],
    selected_layers: Sequence[int],
    *,
    cost: CostModel | Calibration | Cost | None = None,
) -> SelectionSummary:
    """Captured score share and predicted speedup of any layer selection.

    Args:
        layer_scores: Layer index -> non-negative score, as returned by :func:`gradient_probe`.
        selected_layers: The selection to describe; every layer must have a score.
        cost: What predicts the speedup: a :class:`CostModel` (FLOPs of the model), a :class:`Calibration`
            (measured times), or any callable ``layers -> speedup``. Default: the model-free
            approximation, :meth:`CostModel.uniform` over ``max(layer) + 1`` blocks.

    Returns:
        The summary.
    """
    scores = validate_scores(layer_scores)
    layers = validate_selected_layers(selected_layers)
    missing = [layer for layer in layers if layer not in scores]
    if missing:
        raise ValueError(f"selected_layers holds {missing}, which have no score in layer_scores")
    total = _total_score(scores)
    speedup = _speedup(_cost_fn(cost, scores), layers)
    return SelectionSummary(tuple(layers), layers[0], sum(scores[i] for i in layers) / total, speedup)


def selection_frontier(
    layer_scores: Mapping[int, float],
    top_pct: float | None = 50,
    *,
    top_k: int | None = None,
    cost: CostModel | Calibration | Cost | None = None,
) -> list[FrontierPoint]:
    """Every candidate of the ``truncation`` strategy at a budget of ``k`` layers.

    For each scored layer ``m`` with at least ``k - 1`` scored layers above it, the candidate is ``m`` plus the
    ``k - 1`` best-scoring layers above ``m`` (ties to the lower index). The first point is the unconstrained
    best that still contains the lowest layer; the last, ``m = L - k``, is the contiguous top block.

    Args:
        layer_scores: Layer index -> non-negative score.
        top_pct: Share of layers to keep, as :func:`select_layers`.
        top_k: Number of layers to keep instead of ``top_pct``.
        cost: As :func:`summarize_selection`.

    Returns:
        The candidates, by ascending lowest layer.
    """
    scores = validate_scores(layer_scores)
    k = _budget(scores, top_pct, top_k)
    total = _total_score(scores)
    speedup_of = _cost_fn(cost, scores)
    ordered = sorted(scores)
    points = []
    for position in range(len(ordered) - k + 1):
        lowest = ordered[position]
        layers = sorted([lowest, *_top_by_score(scores, ordered[position + 1 :], k - 1)])
        share = sum(scores[i] for i in layers) / total
        points.append((tuple(layers), lowest, share, _speedup(speedup_of, layers)))
    frontier = []
    for layers, lowest, share, speedup in points:
        dominated = any(s >= share and v >= speedup and (s > share or v > speedup) for _, _, s, v in points)
        frontier.append(FrontierPoint(layers, lowest, share, speedup, pareto=not dominated))
    return frontier


def default_target_speedup(points: Sequence[SelectionSummary]) -> float:
    """The speedup the ``truncation`` strategy aims at when none is given: half the achievable gain.

    That is ``slowest + DEFAULT_GAIN_SHARE * (fastest - slowest)`` over the candidates' predicted speedups.
    """
    speedups = [p.speedup for p in points]
    return min(speedups) + DEFAULT_GAIN_SHARE * (max(speedups) - min(speedups))


def _pick(points: list[FrontierPoint], target_speedup: float | None, k: int, num_scored: int) -> FrontierPoint:
    if target_speedup is None:
        target_speedup = default_target_speedup(points)
    reachable = [p for p in points if p.speedup >= target_speedup * (1 - _SPEEDUP_TOLERANCE)]
    if not reachable:
        fastest = max(points, key=lambda p: (p.speedup, p.captured_share))
        raise ValueError(
            f"target_speedup={target_speedup!r} is out of reach with {k} of {num_scored} layers: the fastest "
            f"candidate (lowest layer {fastest.lowest_layer}) is predicted at {fastest.speedup:.3f}x; "
            "lower target_speedup or keep fewer layers"
        )
    return max(reachable, key=lambda p: (p.captured_share, p.speedup))


def select_layers(
    layer_scores: Mapping[int, float],
    top_pct: float | None = 50,
    *,
    top_k: int | None = None,
    strategy: str = "score",
    target_speedup: float | None = None,
    cost: CostModel | Calibration | Cost | None = None,
) -> list[int]:
    """Select the layers that get LoRA adapters.

    Args:
        layer_scores: Layer index -> score, as returned by :func:`gradient_probe`.
        top_pct: Share of layers to keep, in [1, 100]: ``k = floor(n * top_pct / 100)``, at least 1.
        top_k: Number of layers to keep instead of ``top_pct``.
        strategy: All strategies keep ``k`` layers.

            * ``score``: the ``k`` highest-scoring layers, ties going to the lower index.
            * ``contiguous``: the ``k`` highest-index layers (``[L - k, L)``): the fastest placement.
            * ``truncation``: the point of :func:`selection_frontier` that captures the most score among
              those predicted at least ``target_speedup`` fast (ties to the faster one).
        target_speedup: Wanted speedup over LoRA on every layer (``truncation`` only). Default
            (:func:`default_target_speedup`): half of the gain the candidates allow, halfway between the
            slowest candidate (usually the score selection, which keeps layer 0) and the fastest (the
            contiguous top block). A rule that trades score share against speed directly (e.g. maximising
            ``captured_share * speedup``) falls back to the score selection on gradient-norm scores: they
            inflate the low layers (SmolLM2's layer 0 scores 2-3x the others), so the top-by-score half
            captures ~1.6x the score of the top half but was measured to give only ~1.25x its loss drop.
            Aiming at half the achievable gain always buys real time, and keeps the best-scoring layers
            that fit above the cut. Where no candidate is faster than another (the backward reaches the
            embeddings anyway), it is the score selection.
        cost: What predicts speedups for ``truncation``: a :class:`CostModel`, a :class:`Calibration` or a
            callable ``layers -> speedup``. Default: the model-free approximation (uniform blocks, no head).

    Returns:
        The selected layer indices, sorted.

    Raises:
        ValueError: bad scores or budget, an unknown strategy, ``target_speedup`` without ``truncation`` or
            out of reach (the message names the fastest candidate's speedup).
    """
    scores = validate_scores(layer_scores)
    k = _budget(scores, top_pct, top_k)
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    _check_cost(cost)  # also where the strategy ignores it: a wrong argument is a mistake either way
    if target_speedup is not None:
        if strategy != "truncation":
            raise ValueError(f"target_speedup applies to strategy='truncation', not {strategy!r}")
        if isinstance(target_speedup, bool) or not isinstance(target_speedup, numbers.Real):
            raise TypeError(
                f"target_speedup must be a number, got {target_speedup!r} ({type(target_speedup).__name__})"
            )
        if not (math.isfinite(target_speedup) and target_speedup > 0):
            raise ValueError(f"target_speedup must be a finite number > 0, got {target_speedup!r}")
    if strategy == "score":
        return sorted(_top_by_score(scores, scores, k))
    if strategy == "contiguous":
        return sorted(scores)[-k:]
    points = selection_frontier(scores, top_k=k, cost=cost)
    return list(_pick(points, target_speedup, k, len(scores)).layers)


@dataclass
class SelectConfig:
    """Layer-selection settings. Field help strings are shared by the CLI and the docs."""

    top_pct: float = field(default=50, metadata={"help": "Share of layers to adapt, in [1, 100]."})
    top_k: int | None = field(default=None, metadata={"help": "Number of layers to adapt (instead of --top-pct)."})
    strategy: str = field(
        default="score",
        metadata={
            "help": "score: the top layers by probe score (the reference); contiguous: the top block of layers; "
            "truncation: the best-scoring layers above a lowest layer moved up until half the achievable speed-up "
            "is predicted (or --target-speedup)"
        },
    )
    target_speedup: float | None = field(
        default=None, metadata={"help": "With --strategy truncation: the predicted speedup to reach at least."}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, str) or self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.top_k is not None:  # the upper bound (the number of layers) is checked at selection
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
                raise TypeError(f"--top-k must be an integer, got {self.top_k!r} ({type(self.top_k).__name__})")
            if self.top_k < 1:
                raise ValueError(f"--top-k must be a positive integer, got {self.top_k!r}")
        else:
            try:
                budget_from(100, self.top_pct, None)
            except (TypeError, ValueError) as exc:  # the same check as select_layers, named by the flag
                raise type(exc)("--top-pct" + str(exc).removeprefix("top_pct")) from None
        if self.target_speedup is not None:
            value = self.target_speedup
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(f"--target-speedup must be a finite number > 0, got {value!r}")
            if self.strategy != "truncation":
                raise ValueError(f"--target-speedup applies to --strategy truncation, not {self.strategy!r}")

    def kwargs(self) -> dict:
        """Keyword arguments for :func:`select_layers` / :func:`describe_selection`."""
        return {
            "top_pct": None if self.top_k is not None else self.top_pct,
            "top_k": self.top_k,
            "strategy": self.strategy,
            "target_speedup": self.target_speedup,
        }


def describe_selection(
    scores,
    *,
    model=None,
    seq_len: int = 128,
    batch_size: int = 1,
    top_pct: float | None = 50,
    top_k: int | None = None,
    strategy: str = "score",
    target_speedup: float | None = None,
    cost: CostModel | Calibration | None = None,
) -> dict:
    """Select layers and describe the choice: score captured, predicted speedup, and every strategy side by side.

    The speedups come from ``cost`` when given (e.g. a :class:`Calibration` timed on this hardware); else, with
    ``model``, from its FLOP count at ``seq_len`` x ``batch_size``; without either, from the model-free
    approximation (uniform blocks).
    """
    if cost is None and model is not None:
        cost = CostModel.from_model(model, seq_len=seq_len, batch_size=batch_size)
    budget = {"top_pct": top_pct, "top_k": top_k}
    layers = select_layers(scores, **budget, strategy=strategy, target_speedup=target_speedup, cost=cost)
    summary = summarize_selection(scores, layers, cost=cost)
    alternatives = {}
    for name in STRATEGIES:
        other = summarize_selection(scores, select_layers(scores, **budget, strategy=name, cost=cost), cost=cost)
        alternatives[name] = {
            "layers": list(other.layers),
            "score_share": other.captured_share,
            "predicted_speedup": other.speedup,
            "lowest_layer": other.lowest_layer,
        }
    frontier = [
        {"lowest_layer": p.lowest_layer, "score_share": p.captured_share, "predicted_speedup": p.speedup}
        for p in selection_frontier(scores, **budget, cost=cost)
    ]
    return {
        "strategy": strategy,
        **budget,
        "target_speedup": target_speedup,
        "selected_layers": layers,
        "lowest_layer": summary.lowest_layer,
        "score_share": summary.captured_share,
        "predicted_speedup": summary.speedup,
        "cost_model": cost.description if cost is not None else "uniform blocks (no model)",
        "alternatives": alternatives,
        "frontier": frontier,
    }
