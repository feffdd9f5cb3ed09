"""The wall time of a training run whose adapted blocks change as it goes: progressive freezing, a prefix cache.

A static selection's step costs the same from the first step to the last (:meth:`CostModel.speedup`). Under
progressive freezing (:mod:`aletheia_lora.freeze`) the lowest trainable block moves up at each freeze, and each
phase between two freezes has its own step cost: the backward stops higher, while the frozen adapters below still
run forward. With ``--cache-prefix`` a cache built at some step (a forward of the blocks below its block over every
training row) removes that forward from every later step. :func:`predict_timeline` adds it all up from the run's
freeze timeline (``FreezeCallback.timeline``, in ``metrics.json["freeze"]["timeline"]``) and cache builds
(``FrozenPrefixCache.builds``, ``metrics.json["prefix_cache"]["builds"]``), or from a schedule you plan. A static
``--cache-prefix`` run is the one-phase case: ``timeline=[{"step": 0, "lowest_trainable": m}]`` and a build at step
0.

Times come out in units of one all-layer LoRA step (uncached, nothing frozen) of the same shape: multiply by its
seconds (timed, or :meth:`~aletheia_lora.calibrate.Calibration.step_time` of every block) for seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aletheia_lora.checks import check_int, check_number, validate_selected_layers
from aletheia_lora.cost import CostModel


@dataclass(frozen=True)
class Phase:
    """Steps of a run with the same trainable blocks and the same cache.

    Attributes:
        start: The step before the phase's first (steps ``start + 1`` to ``end`` belong to it).
        end: Its last step.
        lowest_trainable: The lowest block whose adapters train.
        cache_block: The block a prefix cache feeds (blocks below it are skipped), or None.
        step_cost: One step's cost, in all-layer steps (the inverse of its speedup).
    """

    start: int
    end: int
    lowest_trainable: int
    cache_block: int | None
    step_cost: float

    @property
    def steps(self) -> int:
        """Steps in the phase."""
        return self.end - self.start

    @property
    def speedup(self) -> float:
        """All-layer step time / this phase's step time."""
        return 1.0 / self.step_cost


@dataclass(frozen=True)
class TimelinePrediction:
    """A run's predicted time, phase by phase, in all-layer steps.

    Attributes:
        steps: Optimizer steps of the run.
        phases: Its phases, in order.
        builds: Each cache build as ``(step, block, cost in all-layer steps)``.
        cost_model: The description of the cost model that priced it.
    """

    steps: int
    phases: tuple[Phase, ...]
    builds: tuple[tuple[int, int, float], ...]
    cost_model: str

    @property
    def step_units(self) -> float:
        """The run's time in all-layer steps: every phase's steps and every cache build."""
        return sum(p.steps * p.step_cost for p in self.phases) + sum(cost for _, _, cost in self.builds)

    @property
    def relative_time(self) -> float:
        """The run's time over all-layer LoRA's for as many steps (< 1 is faster)."""
        return self.step_units / self.steps

    @property
    def speedup(self) -> float:
        """All-layer LoRA's time for as many steps over the run's."""
        return self.steps / self.step_units

    def seconds(self, all_layer_step_seconds: float) -> float:
        """The run's predicted seconds, given one all-layer step's."""
        return self.step_units * check_number("all_layer_step_seconds", all_layer_step_seconds, above=0)


def _entries(name: str, items: Sequence[Mapping], key: str, steps: int, num_layers: int) -> list[tuple[int, int]]:
    """``(step, block)`` pairs of a timeline or build list, checked and in step order."""
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise TypeError(f"{name} must be a list of mappings with 'step' and {key!r}, got {type(items).__name__}")
    pairs = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or "step" not in item or key not in item:
            raise ValueError(f"{name}[{i}] must be a mapping with 'step' and {key!r}, got {item!r}")
        step = check_int(f"{name}[{i}]['step']", item["step"], minimum=0, maximum=steps)
        block = check_int(f"{name}[{i}][{key!r}]", item[key], minimum=0, maximum=num_layers - 1)
        pairs.append((step, block))
    if [s for s, _ in pairs] != sorted(s for s, _ in pairs):
        raise ValueError(f"{name} must be in step order, got steps {[s for s, _ in pairs]}")
    return pairs


def predict_timeline(
    cost: CostModel,
    timeline: Sequence[Mapping],
    steps: int,
    *,
    blocks: Sequence[int] | None = None,
    cache_builds: Sequence[Mapping] = (),
    rows: int | None = None,
) -> TimelinePrediction:
    """Predict a run's time from its freeze timeline and cache builds.

    Args:
        cost: The cost model of a step at the run's shape (:meth:`CostModel.from_model`, its ``batch_size`` the
            run's rows per step).
        timeline: ``{"step": s, "lowest_trainable": m}`` entries in step order, the first at step 0: from step
            ``s + 1`` on, the adapters of blocks below ``m`` are frozen (``FreezeCallback.timeline``).
        steps: Optimizer steps of the run.
        blocks: The blocks that carry adapters from the start (default: every block).
        cache_builds: ``{"step": s, "block": c}`` entries: after step ``s`` a prefix cache is built at block ``c``
            (every training row's forward through the blocks below it) and feeds every later step; a later build
            replaces it (``FrozenPrefixCache.builds``; a static ``--cache-prefix`` run builds at step 0).
        rows: Training rows the cache holds; needed with ``cache_builds``.

    Returns:
        The :class:`TimelinePrediction`.

    Raises:
        TypeError, ValueError: a malformed entry, steps out of order or past ``steps``, a lowest trainable block
            that carries no adapter, a cache above the lowest trainable block, or ``cache_builds`` without ``rows``.
    """
    if not isinstance(cost, CostModel):
        raise TypeError(f"cost must be a CostModel, got {type(cost).__name__}")
    steps = check_int("steps", steps, minimum=1)
    n = cost.num_layers
    adapted = validate_selected_layers(range(n) if blocks is None else blocks, n)
    freezes = _entries("timeline", timeline, "lowest_trainable", steps, n)
    if not freezes or freezes[0][0] != 0:
        raise ValueError("timeline must start with the run's starting entry, at step 0")
    builds = _entries("cache_builds", cache_builds, "block", steps, n)
    if builds:
        if rows is None:
            raise ValueError("cache_builds needs rows: how many training rows each build runs the prefix over")
        rows = check_int("rows", rows, minimum=1)
    every = cost.step_cost(range(n)).effective
    bounds = sorted({0, steps, *(s for s, _ in freezes), *(s for s, _ in builds)})
    phases = []
    for start, end in zip(bounds, bounds[1:]):
        lowest = [m for s, m in freezes if s <= start][-1]
        cache = next((c for s, c in reversed(builds) if s <= start), None)
        trainable = [b for b in adapted if b >= lowest]
        if lowest not in adapted:
            raise ValueError(f"timeline: lowest trainable block {lowest} carries no adapter (blocks {adapted})")
        if cache is not None and cache > lowest:
            raise ValueError(f"cache_builds: a cache at block {cache} lies above the lowest trainable block {lowest}")
        frozen = [b for b in adapted if b < lowest]
        step = cost.step_cost(trainable, frozen_layers=frozen, cache_block=cache).effective
        phases.append(Phase(start, end, lowest, cache, step / every))
    priced = tuple((s, c, cost.prefix_forward(c) * rows / cost.batch_size / every) for s, c in builds)
    return TimelinePrediction(steps, tuple(phases), priced, cost.description)
