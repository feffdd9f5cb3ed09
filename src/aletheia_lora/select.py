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
from dataclasses import dataclass, field, replace
from typing import Any

from aletheia_lora import forecast
from aletheia_lora.checks import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    shown,
    validate_scores,
    validate_selected_layers,
)
from aletheia_lora.cost import Calibration, CostModel
from aletheia_lora.forecast import DEFAULT_MAX_FROZEN_PCT, ProgressivePlan, cached_speedup, plan_progressive
from aletheia_lora.frontier import candidates, exact, pareto_flags
from aletheia_lora.layers import DecoderStack

STRATEGIES = ("score", "contiguous", "truncation")
# Not a selection but a way of training (aletheia_lora.freeze): LoRA on every block, frozen from the bottom as blocks
# settle. SelectConfig and Selection admit it so that `--strategy progressive` names it; select_layers does not.
PROGRESSIVE = "progressive"

# A relative slack so that a target equal to a point's own speedup (e.g. read off the frontier) is reached.
_SPEEDUP_TOLERANCE = 1e-9
# The share of the achievable speedup gain the truncation strategy aims at by default (see select_layers).
DEFAULT_GAIN_SHARE = 0.5

Cost = Callable[[Sequence[int]], float]


def budget_from(num_layers: int, top_pct: float | None, top_k: int | None) -> int:
    """Number of layers to keep: ``top_k``, or ``floor(num_layers * top_pct / 100)`` but at least 1."""
    if top_k is not None:
        check_int("top_k", top_k)
        if not 1 <= top_k <= num_layers:
            raise ValueError(f"top_k must be between 1 and the number of layers ({num_layers}), got {top_k}")
        return int(top_k)
    if isinstance(top_pct, bool) or not isinstance(top_pct, numbers.Real):
        raise TypeError(f"top_pct must be a number between 1 and 100, got {shown(top_pct)} ({type(top_pct).__name__})")
    if not 1 <= top_pct <= 100:
        raise ValueError(f"top_pct must be between 1 and 100, got {shown(top_pct)}")
    return max(int(num_layers * top_pct / 100), 1)


def _budget(scores: dict[int, float], top_pct: float | None, top_k: int | None) -> int:
    if top_k is not None and top_pct not in (None, 50):
        raise ValueError(f"give top_pct or top_k, not both (top_pct={shown(top_pct)}, top_k={shown(top_k)})")
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
        cached_speedup: The same for a step fed by the prefix cache (``--cache-prefix``: the blocks below
            ``lowest_layer`` skipped), from a :class:`CostModel`; None when ``lowest_layer`` is 0 or none priced it.
    """

    layers: tuple[int, ...]
    lowest_layer: int
    captured_share: float
    speedup: float
    cached_speedup: float | None = None


@dataclass(frozen=True)
class FrontierPoint(SelectionSummary):
    """One candidate of the ``truncation`` strategy: a lowest block plus the best-scoring blocks above it.

    Its ``layers`` are a tuple, or in a frontier of thousands of layers a :class:`CandidateLayers`, built when
    first read, that reads, compares and hashes as that tuple.

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
        raise ValueError(
            f"cost returned {shown(value)} for layers {shown(layers)}; it must return a finite speedup > 0"
        )
    return float(value)


def _exact_scores(scores: Mapping[int, float]) -> tuple[dict[int, int], int]:
    """The scores as exact integers (:func:`aletheia_lora.frontier.exact`) and their total, which must be positive.

    Shares are exact ratios rounded once: the same however a candidate's sum was built up.
    """
    negative = {layer: s for layer, s in scores.items() if s < 0}
    if negative:
        raise ValueError(f"a captured score share needs non-negative scores; got negative ones: {shown(negative)}")
    exact_scores = {layer: exact(s) for layer, s in scores.items()}
    total = sum(exact_scores.values())
    if total == 0:
        raise ValueError("every layer score is 0: there is no score share to capture")
    return exact_scores, total


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
        raise ValueError(f"selected_layers holds {shown(missing)}, which have no score in layer_scores")
    exact_scores, total = _exact_scores(scores)
    speedup = _speedup(_cost_fn(cost, scores), layers)
    return SelectionSummary(tuple(layers), layers[0], sum(exact_scores[i] for i in layers) / total, speedup)


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
    return _frontier(scores, k, _cost_fn(cost, scores))


def _frontier(scores: dict[int, float], k: int, speedup_of: Cost) -> list[FrontierPoint]:
    """The candidates (:func:`aletheia_lora.frontier.candidates`, O(n log n)) as points."""
    exact_scores, total = _exact_scores(scores)
    # a CostModel or Calibration that splits its cost by layer is costed per candidate in O(1), not called
    terms = getattr(speedup_of, "step_terms", None) if isinstance(speedup_of, (CostModel, Calibration)) else None
    found = candidates(
        scores, k, exact_scores, total, lambda layers: _speedup(speedup_of, layers), terms() if terms else None
    )
    pareto = pareto_flags(found.shares, found.speedups)
    return [
        FrontierPoint(layers, lowest, share, speedup, pareto=flag)
        for layers, lowest, share, speedup, flag in zip(
            found.layers, found.lowest, found.shares, found.speedups, pareto
        )
    ]


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
    _check_strategy(strategy, target_speedup, cost)
    points = _frontier(scores, k, _cost_fn(cost, scores)) if strategy == "truncation" else []
    return _choose(scores, k, strategy, target_speedup, points)


def _check_strategy(strategy: str, target_speedup: float | None, cost) -> None:
    check_choice("strategy", strategy, STRATEGIES)
    _check_cost(cost)  # also where the strategy ignores it: a wrong argument is a mistake either way
    if target_speedup is not None:
        if strategy != "truncation":
            raise ValueError(f"target_speedup applies to strategy='truncation', not {shown(strategy)}")
        check_number("target_speedup", target_speedup, above=0)


def _choose(
    scores: dict[int, float], k: int, strategy: str, target_speedup: float | None, points: list[FrontierPoint]
) -> list[int]:
    """The layers of a checked strategy; ``points`` is the frontier, needed by ``truncation`` only."""
    if strategy == "score":
        return sorted(_top_by_score(scores, scores, k))
    if strategy == "contiguous":
        return sorted(scores)[-k:]
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
            "is predicted (or --target-speedup); progressive: no probe, LoRA on every block (or --layers), the "
            "lowest frozen during training as their gradients settle (--freeze-every, --max-frozen-pct)"
        },
    )
    target_speedup: float | None = field(
        default=None, metadata={"help": "With --strategy truncation: the predicted speedup to reach at least."}
    )
    calibrate: bool = field(
        default=False,
        metadata={
            "help": "Predict speedups from LoRA steps timed on this hardware (3 placements, 1 untimed + 6 timed steps "
            "each, round-robin at the training batch) instead of the cost model, whose per-module overheads were "
            "measured on another CPU; on a CPU, with --cpu-allocator tuned glibc's thresholds cannot skew it"
        },
    )
    max_frozen_pct: float = field(default=DEFAULT_MAX_FROZEN_PCT, metadata={"help": forecast.MAX_FROZEN_PCT_HELP})

    def __post_init__(self) -> None:
        if self.strategy != PROGRESSIVE:  # the choices listed as the pinned messages have them (ERRORS.md)
            check_choice("--strategy", self.strategy, STRATEGIES)
        if self.top_k is not None:  # the upper bound (the number of layers) is checked at selection
            check_int("--top-k", self.top_k, minimum=1)
            if self.top_pct not in (None, 50):  # as select_layers: 50 is also what "not given" reads as
                raise ValueError(
                    f"give --top-pct or --top-k, not both (--top-pct {shown(self.top_pct)}, --top-k {self.top_k})"
                )
        else:
            try:
                budget_from(100, self.top_pct, None)
            except (TypeError, ValueError) as exc:  # the same check as select_layers, named by the flag
                raise type(exc)("--top-pct" + str(exc).removeprefix("top_pct")) from None
        if self.target_speedup is not None:
            check_number("--target-speedup", self.target_speedup, above=0)
            if self.strategy != "truncation":
                raise ValueError(f"--target-speedup applies to --strategy truncation, not {shown(self.strategy)}")
        check_bool("--calibrate", self.calibrate)
        check_number("--max-frozen-pct", self.max_frozen_pct, minimum=0, maximum=100)

    def kwargs(self) -> dict:
        """Keyword arguments for :func:`make_selection` (without ``max_frozen_pct``, :func:`select_layers`'s;
        ``calibrate`` is not one of them: it decides which ``cost`` the caller passes)."""
        return {
            "top_pct": None if self.top_k is not None else self.top_pct,
            "top_k": self.top_k,
            "strategy": self.strategy,
            "target_speedup": self.target_speedup,
            "max_frozen_pct": self.max_frozen_pct,
        }


GIVEN = "given"
# Written for a selection costed without a model: the model-free approximation.
UNIFORM_DESCRIPTION = "uniform blocks (no model)"


@dataclass(frozen=True)
class Selection:
    """The pipeline's central result: which blocks get adapters, why, and what it is predicted to save.

    Build one with :func:`make_selection` (from probe scores) or :meth:`given` (blocks named by the user);
    :meth:`to_dict` is what selection.json and a run's report hold, :meth:`from_dict` reads it back.

    Attributes:
        layers: The selected blocks, sorted (JSON: ``selected_layers``).
        strategy: ``score``, ``contiguous``, ``truncation``, or ``given`` for blocks named by the user.
        top_pct: The budget as a share of the blocks, as requested (None when ``top_k`` was).
        top_k: The budget as a number of blocks, as requested.
        target_speedup: The requested speedup (``truncation``).
        lowest_layer: The lowest selected block (the backward pass stops there); default ``layers[0]``.
        score_share: Share of the total probe score held by the selected blocks; None without scores.
        predicted_speedup: Predicted step-time ratio of LoRA on every block to LoRA on these.
        cost_model: What predicted the speedups (the cost model's or calibration's description).
        alternatives: Every strategy's selection at the same budget, by strategy name.
        frontier: Every candidate of the ``truncation`` strategy. JSON keeps a point's lowest block, score
            share and speedup; read back, its ``layers`` are empty and ``pareto`` is recomputed from the points.
        calibration: The numbers of the :class:`Calibration` the speedups came from, if any.
        probe_seconds: Time the probe took (0.0 for given blocks and saved scores); None when not recorded.
        cached_speedup: Predicted speedup of a step fed by the prefix cache (``--cache-prefix``); None when the
            lowest selected block is 0 or no cost model priced it.
        cache_cost_model: What priced the cached and progressive predictions when it is not ``cost_model``: a
            calibration has no cache term, so the model's cost model prices them; None: ``cost_model`` did.
        progressive_plan: What ``--strategy progressive`` is predicted to save on a planned schedule.
    """

    layers: tuple[int, ...]
    strategy: str
    top_pct: float | None = None
    top_k: int | None = None
    target_speedup: float | None = None
    lowest_layer: int | None = None
    score_share: float | None = None
    predicted_speedup: float | None = None
    cost_model: str | None = None
    alternatives: Mapping[str, SelectionSummary] = field(default_factory=dict)
    frontier: tuple[FrontierPoint, ...] = ()
    calibration: Mapping[str, Any] | None = None
    probe_seconds: float | None = None
    cached_speedup: float | None = None
    cache_cost_model: str | None = None
    progressive_plan: ProgressivePlan | None = None

    def __post_init__(self) -> None:
        layers = tuple(validate_selected_layers(self.layers))
        if self.strategy != PROGRESSIVE:
            check_choice("strategy", self.strategy, (*STRATEGIES, GIVEN))
        object.__setattr__(self, "layers", layers)
        if self.lowest_layer is None:
            object.__setattr__(self, "lowest_layer", layers[0])
        object.__setattr__(self, "alternatives", dict(self.alternatives))
        object.__setattr__(self, "frontier", tuple(self.frontier))

    @classmethod
    def given(cls, layers: Sequence[int]) -> Selection:
        """Blocks named by the user: no scores, no prediction, no probe (``probe_seconds`` 0.0)."""
        return cls(layers=tuple(layers), strategy=GIVEN, probe_seconds=0.0)

    @classmethod
    def progressive(cls, layers: Sequence[int]) -> Selection:
        """The starting blocks of progressive freezing (:mod:`aletheia_lora.freeze`): no scores, no probe."""
        return cls(layers=tuple(layers), strategy=PROGRESSIVE, probe_seconds=0.0)

    def with_probe_seconds(self, seconds: float | None) -> Selection:
        """A copy that records how long the probe took."""
        return replace(self, probe_seconds=seconds)

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of selection.json and of a report's ``selection``, keys in this order."""
        if self.strategy in (GIVEN, PROGRESSIVE):
            out: dict[str, Any] = {"strategy": self.strategy, "selected_layers": list(self.layers)}
        else:
            out = {
                "strategy": self.strategy,
                "top_pct": self.top_pct,
                "top_k": self.top_k,
                "target_speedup": self.target_speedup,
                "selected_layers": list(self.layers),
                "lowest_layer": self.lowest_layer,
                "score_share": self.score_share,
                "predicted_speedup": self.predicted_speedup,
                "cached_speedup": self.cached_speedup,
                "cost_model": self.cost_model,
                **({} if self.cache_cost_model is None else {"cache_cost_model": self.cache_cost_model}),
                "alternatives": {name: _summary_dict(s) for name, s in self.alternatives.items()},
                "progressive_plan": None if self.progressive_plan is None else self.progressive_plan.to_dict(),
                "frontier": [
                    {"lowest_layer": p.lowest_layer, "score_share": p.captured_share, "predicted_speedup": p.speedup}
                    for p in self.frontier
                ],
            }
            if self.calibration is not None:
                out["calibration"] = dict(self.calibration)
        if self.probe_seconds is not None:
            out["probe_seconds"] = self.probe_seconds
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Selection:
        """Read :meth:`to_dict`'s layout back (e.g. a selection.json, or a report's ``selection``).

        Raises:
            TypeError: ``data`` is not a mapping.
            ValueError: a key the layout does not have, a missing ``strategy``/``selected_layers``, bad layers.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"a selection must be a mapping, got {type(data).__name__}")
        known = {"strategy", "selected_layers", "probe_seconds"}
        if data.get("strategy") not in (GIVEN, PROGRESSIVE):
            known |= {*_SCORED_KEYS, "calibration"}
        unknown = sorted(set(data) - known)
        missing = sorted({"strategy", "selected_layers"} - set(data))
        if unknown or missing:
            raise ValueError(f"not a selection: unknown keys {unknown}, missing keys {missing}")
        if data["strategy"] in (GIVEN, PROGRESSIVE):
            made = cls.given if data["strategy"] == GIVEN else cls.progressive
            return replace(made(data["selected_layers"]), probe_seconds=data.get("probe_seconds"))
        points = [(p["lowest_layer"], p["score_share"], p["predicted_speedup"]) for p in data.get("frontier", [])]
        pareto = pareto_flags([share for _, share, _ in points], [speedup for _, _, speedup in points])
        frontier = tuple(
            FrontierPoint((), lowest, share, speedup, pareto=flag)
            for (lowest, share, speedup), flag in zip(points, pareto)
        )
        alternatives = {  # selection.json files written before the cached predictions have none: None
            name: SelectionSummary(
                tuple(a["layers"]),
                a["lowest_layer"],
                a["score_share"],
                a["predicted_speedup"],
                a.get("cached_speedup"),
            )
            for name, a in data.get("alternatives", {}).items()
        }
        plan = data.get("progressive_plan")
        return cls(
            layers=tuple(data["selected_layers"]),
            strategy=data["strategy"],
            top_pct=data.get("top_pct"),
            top_k=data.get("top_k"),
            target_speedup=data.get("target_speedup"),
            lowest_layer=data.get("lowest_layer"),
            score_share=data.get("score_share"),
            predicted_speedup=data.get("predicted_speedup"),
            cost_model=data.get("cost_model"),
            alternatives=alternatives,
            frontier=frontier,
            calibration=data.get("calibration"),
            probe_seconds=data.get("probe_seconds"),
            cached_speedup=data.get("cached_speedup"),
            cache_cost_model=data.get("cache_cost_model"),
            progressive_plan=None if plan is None else ProgressivePlan.from_dict(plan),
        )


_SCORED_KEYS = ("top_pct", "top_k", "target_speedup", "lowest_layer", "score_share", "predicted_speedup")
_SCORED_KEYS += ("cached_speedup", "cost_model", "cache_cost_model", "alternatives", "progressive_plan", "frontier")


def _summary_dict(summary: SelectionSummary) -> dict[str, Any]:
    return {
        "layers": list(summary.layers),
        "score_share": summary.captured_share,
        "predicted_speedup": summary.speedup,
        "lowest_layer": summary.lowest_layer,
        "cached_speedup": summary.cached_speedup,
    }


def calibration_numbers(calibration: Calibration) -> dict[str, Any]:
    """What a selection records of the :class:`Calibration` its speedups came from: the fit and its timings."""
    return {
        "fixed_s": calibration.fixed_s,
        "per_backward_block_s": calibration.per_backward_block_s,
        "per_adapted_block_s": calibration.per_adapted_block_s,
        "timings": [{"layers": list(layers), "seconds": seconds} for layers, seconds in calibration.timings],
    }


def make_selection(
    scores: Mapping[int, float],
    *,
    model=None,
    seq_len: int = 128,
    batch_size: int = 1,
    top_pct: float | None = 50,
    top_k: int | None = None,
    strategy: str = "score",
    target_speedup: float | None = None,
    cost: CostModel | Calibration | None = None,
    stack: DecoderStack | None = None,
    cache_cost: CostModel | None = None,
    max_frozen_pct: float = DEFAULT_MAX_FROZEN_PCT,
) -> Selection:
    """Select layers and describe the choice: score captured, predicted speedup, and every strategy side by side.

    The speedups come from ``cost`` when given (e.g. a :class:`Calibration` timed on this hardware, whose
    numbers the selection then records); else, with ``model``, from its FLOP count at ``seq_len`` x
    ``batch_size``; without either, from the model-free approximation (uniform blocks). The cached-step and
    progressive predictions (:func:`cached_speedup`, :func:`plan_progressive`) need a :class:`CostModel`:
    ``cache_cost`` when given, else the one that priced the speedups, else (beside a :class:`Calibration`, which has
    no cache term) the FLOP count of ``model``; without any, they are None.

    Args:
        scores: Layer index -> score, as returned by :func:`gradient_probe`.
        model: The model the scores are for, to count its FLOPs (unused when ``cost`` is given).
        seq_len: Tokens per sequence of the FLOP count.
        batch_size: Sequences per step of the FLOP count.
        top_pct, top_k, strategy, target_speedup: As :func:`select_layers`.
        cost: What predicts the speedups.
        stack: ``model``'s decoder stack, when the caller has found it already.
        cache_cost: What prices the cached and progressive predictions (e.g. beside a :class:`Calibration`, the
            FLOP count at the run's rank and checkpointing).
        max_frozen_pct: The ``--max-frozen-pct`` floor of the progressive prediction.

    Returns:
        The :class:`Selection`.
    """
    if cost is None and model is not None:
        cost = CostModel.from_model(model, seq_len=seq_len, batch_size=batch_size, stack=stack)
    checked = validate_scores(scores)
    k = _budget(checked, top_pct, top_k)
    _check_strategy(strategy, target_speedup, cost)
    # the frontier once (every alternative and the selection.json list use it), in O(n log n)
    frontier = _frontier(checked, k, _cost_fn(cost, checked))
    layers = _choose(checked, k, strategy, target_speedup, frontier)
    summary = summarize_selection(checked, layers, cost=cost)
    alternatives = {
        name: summarize_selection(checked, _choose(checked, k, name, None, frontier), cost=cost) for name in STRATEGIES
    }
    priced = _cost_fn(cost, checked)  # the cost itself, or the uniform blocks that priced the speedups
    if cache_cost is not None:
        if not isinstance(cache_cost, CostModel):
            raise TypeError(f"cache_cost must be a CostModel, got {type(cache_cost).__name__}")
        _cost_fn(cache_cost, checked)  # checked against the scored layers
    elif isinstance(priced, CostModel):
        cache_cost = priced
    elif model is not None:  # a calibration has no cache term: the model's FLOP count prices the cached steps
        cache_cost = CostModel.from_model(model, seq_len=seq_len, batch_size=batch_size, stack=stack)
    if cache_cost is not None:
        alternatives = {
            n: replace(a, cached_speedup=cached_speedup(cache_cost, a.layers)) for n, a in alternatives.items()
        }
    description = cost.description if cost is not None else UNIFORM_DESCRIPTION
    return Selection(
        layers=tuple(layers),
        strategy=strategy,
        top_pct=top_pct,
        top_k=top_k,
        target_speedup=target_speedup,
        lowest_layer=summary.lowest_layer,
        score_share=summary.captured_share,
        predicted_speedup=summary.speedup,
        cost_model=description,
        alternatives=alternatives,
        frontier=tuple(frontier),
        calibration=calibration_numbers(cost) if isinstance(cost, Calibration) else None,
        cached_speedup=None if cache_cost is None else cached_speedup(cache_cost, layers),
        cache_cost_model=None if cache_cost is None or cache_cost is priced else cache_cost.description,
        progressive_plan=None if cache_cost is None else plan_progressive(cache_cost, max_frozen_pct),
    )
