"""What the training modes are predicted to save, beside the static selections: cached epochs and progressive freezing.

* **Cached epochs** (``--cache-prefix``): :func:`cached_speedup` is a selection's step once the prefix cache feeds it
  (:meth:`CostModel.speedup` with ``cached=True``); a selection whose lowest block is 0 has nothing to cache.
* **Progressive freezing** (``--strategy progressive``): its real freezes are decided by the gradient rule during
  training (:mod:`aletheia_lora.freeze`), so a prediction before training needs a planned schedule. The plan is the
  quality protocol's ``progressive-fixed`` control: the ``--max-frozen-pct`` floor of blocks frozen one by one at even
  intervals over the run (:func:`planned_freezes`). :func:`predict_progressive` prices a run of given steps on it with
  :func:`~aletheia_lora.timeline.predict_timeline`, with or without the cache (built once a freeze has stood an epoch,
  :func:`planned_cache_builds`); :func:`plan_progressive` sums it up for ``probe`` and ``select``: the speedup over
  the run, and from how many epochs the cache makes it faster.

All predictions come from a :class:`~aletheia_lora.cost.CostModel`: a calibration has no cache term.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aletheia_lora.checks import check_int, check_number, validate_selected_layers
from aletheia_lora.cost import CostModel
from aletheia_lora.timeline import TimelinePrediction, predict_timeline

# --max-frozen-pct's default, here rather than in freeze (which imports it): freeze imports this module's importers
# (reprobe -> select). The hand trial froze 15 of 30 blocks (0-14) and reached all-layer quality.
DEFAULT_MAX_FROZEN_PCT = 50.0
# One flag in two groups (SelectConfig prices the prediction with it, TrainConfig freezes by it): one help string.
MAX_FROZEN_PCT_HELP = (
    "With --strategy progressive: the most of the blocks that may be frozen, in percent (also the floor of the "
    "progressive prediction that probe and select print)."
)
# A relative slack: a cached run exactly as fast as the uncached one does not pay.
_TIE = 1e-9


def cached_speedup(cost: CostModel, layers: Sequence[int]) -> float | None:
    """``cost.speedup(layers, cached=True)``: LoRA on every block (uncached) over a step that the prefix cache feeds
    (``--cache-prefix``: embeddings and blocks below the lowest of ``layers`` skipped); None when that is block 0."""
    layers = validate_selected_layers(layers, cost.num_layers)
    if layers[0] == 0:
        return None
    return cost.speedup(layers, cached=True)


def even_freeze_steps(count: int, steps: int) -> list[int]:
    """The steps after which ``count`` blocks freeze one at a time, evenly over ``steps``: the ``k``-th (k = 1..count)
    after step ``round(k * steps / (count + 1))`` (half up, at least 1), so ``count + 1`` phases of equal length. The
    schedule of :func:`planned_freezes` and of the quality protocol's ``progressive-fixed`` control."""
    return [max(1, math.floor(k * steps / (count + 1) + 0.5)) for k in range(1, count + 1)]


def planned_freezes(num_blocks: int, steps: int, max_frozen_pct: float = DEFAULT_MAX_FROZEN_PCT) -> list[dict]:
    """The freeze timeline a progressive prediction plans with: the schedule of the quality protocol's
    ``progressive-fixed`` control, up to the ``--max-frozen-pct`` floor.

    Every block starts adapted; the lowest ``count = floor(num_blocks * max_frozen_pct / 100)`` blocks (at most all but
    one) freeze one at a time on :func:`even_freeze_steps`, linear in time. A real run's gradient rule decides its own
    freezes.

    Returns:
        ``{"step", "lowest_trainable"}`` entries for :func:`~aletheia_lora.timeline.predict_timeline`.
    """
    num_blocks, steps = check_int("num_blocks", num_blocks, minimum=1), check_int("steps", steps, minimum=1)
    check_number("max_frozen_pct", max_frozen_pct, minimum=0, maximum=100)
    count = min(int(num_blocks * max_frozen_pct / 100), num_blocks - 1)
    at = even_freeze_steps(count, steps)
    return [{"step": 0, "lowest_trainable": 0}, *({"step": s, "lowest_trainable": k} for k, s in enumerate(at, 1))]


def planned_cache_builds(timeline: Sequence[Mapping], steps: int, steps_per_epoch: int) -> list[dict]:
    """Where ``--cache-prefix`` builds caches in a progressive run with this freeze ``timeline``: a frozen prefix is
    cached once it has stood for an epoch (:class:`~aletheia_lora.freeze.FrozenPrefixCache`), so ``steps_per_epoch``
    steps after its freeze, unless the next freeze comes first (one at that very step does).

    Returns:
        ``{"step", "block"}`` entries for :func:`~aletheia_lora.timeline.predict_timeline`.
    """
    builds = []
    for entry, after in zip(timeline, [*(e["step"] for e in timeline[1:]), steps + 1]):
        at = entry["step"] + steps_per_epoch
        if entry["lowest_trainable"] and at < after:
            builds.append({"step": at, "block": entry["lowest_trainable"]})
    return builds


def predict_progressive(
    cost: CostModel,
    steps: int,
    *,
    max_frozen_pct: float = DEFAULT_MAX_FROZEN_PCT,
    steps_per_epoch: int | None = None,
) -> TimelinePrediction:
    """A progressive run's predicted time on the planned schedule (:func:`planned_freezes`), every block adapted.

    Args:
        cost: The cost model of a step at the run's shape.
        steps: Optimizer steps of the run.
        max_frozen_pct: The ``--max-frozen-pct`` floor.
        steps_per_epoch: With ``--cache-prefix``, optimizer steps per epoch: caches are built where
            :func:`planned_cache_builds` says, each a forward of the prefix over an epoch's rows
            (``steps_per_epoch * cost.batch_size``). None: no cache.
    """
    timeline = planned_freezes(cost.num_layers, steps, max_frozen_pct)
    if steps_per_epoch is None:
        return predict_timeline(cost, timeline, steps)
    steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, minimum=1)
    builds = planned_cache_builds(timeline, steps, steps_per_epoch)
    return predict_timeline(cost, timeline, steps, cache_builds=builds, rows=steps_per_epoch * cost.batch_size)


@dataclass(frozen=True)
class ProgressivePlan:
    """What ``--strategy progressive`` is predicted to save on its planned schedule (:func:`plan_progressive`).

    Attributes:
        frozen_blocks: Blocks ``0`` to ``frozen_blocks - 1`` freeze, one at a time at even intervals over the run
            (:func:`planned_freezes`).
        max_frozen_pct: The ``--max-frozen-pct`` floor they come from.
        speedup: All-layer LoRA's time over the run's, without the prefix cache (the same for any run length).
        cache_from_epochs: With ``--cache-prefix``, the fewest whole epochs from which the run is predicted faster
            than without it: a freeze must stand an epoch before its prefix is cached, and a build costs a forward of
            the prefix over the rows. None: never.
        cached_speedup_limit: With ``--cache-prefix``, as the epochs grow: each phase fed by its own cache.
    """

    frozen_blocks: int
    max_frozen_pct: float
    speedup: float
    cache_from_epochs: int | None
    cached_speedup_limit: float

    def to_dict(self) -> dict[str, Any]:
        """Its JSON in a selection.json: the fields in order, ``speedup`` as ``predicted_speedup``."""
        return dict(zip(_PLAN_KEYS, vars(self).values()))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProgressivePlan:
        """Read :meth:`to_dict` back.

        Raises:
            ValueError: not a mapping with exactly its keys.
        """
        if not isinstance(data, Mapping) or set(data) != set(_PLAN_KEYS):
            raise ValueError(f"not a selection: progressive_plan must be a mapping with keys {list(_PLAN_KEYS)}")
        return cls(*(data[key] for key in _PLAN_KEYS))


_PLAN_KEYS = ("frozen_blocks", "max_frozen_pct", "predicted_speedup", "cache_from_epochs", "cached_speedup_limit")


def _suffix(values) -> list[float]:
    """``out[k] = sum(values[k:])``, with ``out[len(values)] = 0``."""
    out = [0.0] * (len(values) + 1)
    for i in range(len(values) - 1, -1, -1):
        out[i] = out[i + 1] + values[i]
    return out


def _phase_cost(cost: CostModel) -> Callable[[int, int], float]:
    """``(j, s) -> step_cost(range(j, n), frozen_layers=range(j), cache_block=s).effective`` in O(1) after O(n): a
    step with the blocks below ``j`` frozen and the blocks below ``s <= j`` cached (``s = 0``: no cache). The same
    sum as :meth:`CostModel.step_cost`, by block suffixes (tested against it), so that a plan over thousands of blocks
    stays linear."""
    c, n, checkpointing = cost, cost.num_layers, float(cost.gradient_checkpointing)
    ran = _suffix([c.block_forward[i] + c.block_forward_overhead[i] for i in range(n)])  # blocks that run
    adapters = _suffix([c.lora_forward[i] + c.lora_forward_overhead[i] for i in range(n)])  # adapters that run
    reached = _suffix([c.block_backward[i] + c.block_backward_overhead[i] for i in range(n)])
    trained = [c.lora_backward[i] + c.lora_backward_overhead[i] + c.lora_update_overhead[i] for i in range(n)]
    trained = _suffix([t + c.optimizer_flops_per_param * c.lora_params[i] for i, t in enumerate(trained)])
    head = c.head_forward + c.head_backward + c.head_forward_overhead + c.head_backward_overhead

    def step(j: int, s: int) -> float:
        r = s if c.backward_to_embeddings else j  # where the backward stops
        recompute = ran[r] + adapters[j] + (adapters[s] - adapters[j] if c.backward_to_embeddings else 0.0)
        return head + ran[s] + adapters[s] + reached[r] + trained[j] + checkpointing * recompute

    return step


def plan_progressive(cost: CostModel, max_frozen_pct: float = DEFAULT_MAX_FROZEN_PCT) -> ProgressivePlan | None:
    """The progressive prediction a selection shows beside the static strategies; None when no block may freeze.

    What :func:`predict_progressive` predicts (tested against it), in closed form. The run is priced in ``count + 1``
    equal phases (exact for any multiple of ``count + 1`` steps); with the cache, over ``E`` epochs of ``count + 1``
    steps: every phase and build scales with an epoch's length, so whether the cache pays depends on ``E`` alone. No
    cache is built until a phase outlasts an epoch (``E > count + 1``; at ``E = count + 1`` one is built at the last
    step, for nothing); from there on a run takes ``E * (u_0 + sum(c_k)) + sum((count + 1) * (p_k - c_k) + b_k)``
    all-layer steps against ``E * sum(u_k)`` uncached, where phase ``k`` steps cost ``u_k`` uncached, ``p_k`` on the
    previous phase's cache (its first epoch), ``c_k`` on its own, and ``b_k`` is its cache's build.
    """
    count = len(planned_freezes(cost.num_layers, 1, max_frozen_pct)) - 1
    if count == 0:
        return None
    phases, step = count + 1, _phase_cost(cost)
    every = cost.step_cost(range(cost.num_layers)).effective
    uncached = [step(k, 0) / every for k in range(phases)]
    own = [step(k, k) / every for k in range(1, phases)]
    previous = [step(k, k - 1) / every for k in range(1, phases)]  # k = 1: cache_block 0, no cache
    # a build: the prefix's forward over an epoch's rows (cost.prefix_forward(k) per step), summed as it grows
    prefix = itertools.accumulate(cost.block_forward[i] + cost.block_forward_overhead[i] for i in range(count))
    builds = [phases * forward / every for forward in prefix]
    gain = sum(uncached[1:]) - sum(own)  # per epoch, once every phase has its cache
    price = sum(phases * (p - c) + b for p, c, b in zip(previous, own, builds))
    # the first whole E > count + 1 with E * gain > price; a tie does not pay (as predict_progressive's would not)
    first = max(phases + 1, math.floor(price / gain * (1 + _TIE)) + 1) if gain > 0 else None
    limit = phases / (uncached[0] + sum(own))
    return ProgressivePlan(count, float(max_frozen_pct), phases / sum(uncached), first, limit)
