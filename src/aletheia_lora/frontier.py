"""The ``truncation`` strategy's candidates in O(n log n) time and O(n) memory, for stacks of any depth.

A candidate is a lowest layer ``m`` plus the ``k - 1`` best-scoring layers above it (ties to the lower index).
Sweeping ``m`` down one scored layer at a time, the layer it leaves joins the pool above, so the ``k - 1`` best of
that pool (a min-heap, worst on top) change by at most one swap; the score sum, and a step's cost where it is a sum
over the adapted layers, follow each swap. A layer pushed out never returns: the ``k - 1`` that beat it stay.

Sums are exact (:func:`exact`): a share is the exact ratio rounded once, whatever order a sum was built in.
:mod:`aletheia_lora.select` turns the candidates into ``FrontierPoint``s; this module imports nothing from it.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

# A frontier holding at most this many layers in all (candidates x layers each) gives every candidate its layers as
# a tuple; a larger one builds a candidate's layers when first read, so that its memory stays linear.
EAGER_LAYERS = 1_000_000
# Every finite float is an integer multiple of 2**-1074: sums in that unit are exact.
_SHIFT = 1074


def exact(x: float) -> int:
    """``x * 2**1074`` as an exact integer."""
    numerator, denominator = float(x).as_integer_ratio()
    return numerator << (_SHIFT + 1 - denominator.bit_length())


def rounded(value: int) -> float:
    """An exact sum (:func:`exact` units) as a float, rounded once: what ``math.fsum`` gives."""
    return value / (1 << _SHIFT)  # int / int is correctly rounded


@dataclass(frozen=True)
class StepTerms:
    """A step's cost as ``by_lowest[min(S)] + fsum(by_layer[i] for i in S)`` for adapters on the blocks ``S``.

    A cost model that can say so (``step_terms()``) has its speedups computed per candidate in O(1) instead of
    being called with each candidate's list; its own speedup must be ``cost(all blocks) / cost(S)`` computed so.
    """

    by_lowest: Sequence[float]
    by_layer: Sequence[float]


@dataclass
class Candidates:
    """The frontier's candidates by ascending lowest layer: their lowest layers, shares, speedups and layers."""

    lowest: list[int]
    shares: list[float]
    speedups: list[float]
    layers: list[Sequence[int]]


def candidates(
    scores: Mapping[int, float],
    k: int,
    exact_scores: Mapping[int, int],
    total: int,
    speedup: Callable[[list[int]], float],
    terms: StepTerms | None = None,
) -> Candidates:
    """Every candidate of the ``truncation`` strategy at a budget of ``k`` layers.

    Args:
        scores: Layer index -> score (checked).
        k: Layers per candidate, 1 to ``len(scores)``.
        exact_scores: The scores as :func:`exact` integers.
        total: Their sum: the shares' denominator.
        speedup: The speedup of a sorted layer list (checked by the caller), called once per candidate unless
            ``terms`` are given.
        terms: The cost's :class:`StepTerms`, to compute the speedups without building each candidate's list.
    """
    ordered = sorted(scores)
    count = len(ordered) - k + 1
    eager = count * k <= EAGER_LAYERS
    keep_sorted = eager or terms is None  # a candidate's list is needed: to hold it, or to call the cost
    heap = [(scores[layer], -layer) for layer in ordered[count:]]  # the k - 1 layers above the highest lowest
    heapq.heapify(heap)
    above = list(ordered[count:])
    score_sum = sum(exact_scores[layer] for layer in above)
    if terms is not None:
        unit = [exact(x) for x in terms.by_layer]
        cost_sum = sum(unit[layer] for layer in above)
        reference = terms.by_lowest[0] + rounded(sum(unit))
    shared = None if eager else _Builder(scores, k)
    shares, speedups, layer_lists = [0.0] * count, [0.0] * count, [()] * count
    for position in range(count - 1, -1, -1):
        lowest = ordered[position]
        joining = ordered[position + 1] if position < count - 1 else None
        if joining is not None and heap and (scores[joining], -joining) > heap[0]:
            out = -heapq.heapreplace(heap, (scores[joining], -joining))[1]
            score_sum += exact_scores[joining] - exact_scores[out]
            if terms is not None:
                cost_sum += unit[joining] - unit[out]
            if keep_sorted:
                del above[bisect_left(above, out)]
                above.insert(0, joining)  # below every layer of the pool
        shares[position] = (exact_scores[lowest] + score_sum) / total
        layers = [lowest, *above] if keep_sorted else None
        if terms is None:
            if not eager:  # else below, in ascending order, as a cost that fails names the first candidate
                speedups[position] = speedup(layers)
        else:
            value = reference / (terms.by_lowest[lowest] + rounded(unit[lowest] + cost_sum))
            if not (math.isfinite(value) and value > 0):  # the caller's check words the message
                speedup(layers if layers is not None else list(shared.layers(lowest)))
            speedups[position] = value
        layer_lists[position] = tuple(layers) if eager else CandidateLayers(shared, lowest)
    if terms is None and eager:
        speedups = [speedup(list(layers)) for layers in layer_lists]
    return Candidates(ordered[:count], shares, speedups, layer_lists)


def pareto_flags(shares: Sequence[float], speedups: Sequence[float]) -> list[bool]:
    """Per point: whether no other captures at least as much at least as fast, and one of them more.

    A sweep by descending share: a point is dominated by a faster-or-equal point of higher share, or by a faster
    one of equal share. NaN values (only from a hand-edited selection.json) compare false: never dominated.
    """
    order = sorted((i for i in range(len(shares)) if shares[i] == shares[i]), key=lambda i: -shares[i])
    result = [True] * len(shares)
    best_above = -math.inf  # the fastest point of a strictly higher share
    start = 0
    while start < len(order):
        end = start
        while end < len(order) and shares[order[end]] == shares[order[start]]:
            end += 1
        fastest = max((speedups[i] for i in order[start:end] if speedups[i] == speedups[i]), default=-math.inf)
        for i in order[start:end]:
            result[i] = not (best_above >= speedups[i] or fastest > speedups[i])
        best_above = max(best_above, fastest)
        start = end
    return result


class _Builder:
    """Any candidate's layers from the scores: ``lowest`` plus the ``k - 1`` best-ranked layers above it."""

    def __init__(self, scores: Mapping[int, float], k: int) -> None:
        self.scores, self.k = scores, k
        self.ranked: list[int] | None = None

    def layers(self, lowest: int) -> tuple[int, ...]:
        if self.ranked is None:
            self.ranked = sorted(self.scores, key=lambda layer: (-self.scores[layer], layer))
        top: list[int] = []
        for layer in self.ranked if self.k > 1 else ():
            if layer > lowest:
                top.append(layer)
                if len(top) == self.k - 1:
                    break
        return (lowest, *sorted(top))


class CandidateLayers(Sequence):
    """A frontier candidate's layers, sorted, built when first read; reads, compares and hashes as their tuple.

    A frontier of thousands of layers holding every candidate's list would take memory quadratic in the number of
    layers (20,000 layers: 10,001 candidates of 10,000).
    """

    __slots__ = ("_builder", "_lowest", "_layers")

    def __init__(self, builder: _Builder, lowest: int) -> None:
        self._builder, self._lowest, self._layers = builder, lowest, None

    def _tuple(self) -> tuple[int, ...]:
        if self._layers is None:
            self._layers = self._builder.layers(self._lowest)
        return self._layers

    def __len__(self) -> int:
        return self._builder.k

    def __getitem__(self, index):
        return self._tuple()[index]

    def __iter__(self):
        return iter(self._tuple())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (tuple, CandidateLayers)):
            return self._tuple() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._tuple())

    def __repr__(self) -> str:
        return repr(self._tuple())
