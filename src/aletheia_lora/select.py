"""Layer selection: turn per-block probe scores into the list of blocks that get LoRA adapters."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

STRATEGIES = ("score",)


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


def select_layers(
    layer_scores: Mapping[int, float],
    top_pct: float | None = 50,
    *,
    top_k: int | None = None,
    strategy: str = "score",
) -> list[int]:
    """Select the most informative layers.

    Args:
        layer_scores: Layer index -> score, as returned by :func:`gradient_probe`.
        top_pct: Share of layers to keep, in [1, 100]: ``k = floor(n * top_pct / 100)``, at least 1.
        top_k: Number of layers to keep instead of ``top_pct``.
        strategy: ``score``: the ``k`` highest-scoring layers, ties going to the lower index.

    Returns:
        The selected layer indices, sorted.
    """
    scores = validate_scores(layer_scores)
    if top_k is not None and top_pct not in (None, 50):
        raise ValueError(f"give top_pct or top_k, not both (top_pct={top_pct!r}, top_k={top_k!r})")
    k = budget_from(len(scores), None if top_k is not None else top_pct, top_k)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    ranked = sorted(scores, key=lambda layer: (-scores[layer], layer))
    return sorted(ranked[:k])
