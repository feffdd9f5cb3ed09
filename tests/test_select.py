import math

import numpy as np
import pytest

from aletheia_lora import LayerScores, select_layers


def reference_select(scores, top_pct):
    """The reference package's rule, written out: floor(n * pct / 100) but at least 1, highest scores first."""
    k = max(int(len(scores) * top_pct / 100), 1)
    return sorted(i for i, _ in sorted(scores.items(), key=lambda kv: kv[1], reverse=True)[:k])


@pytest.mark.parametrize("top_pct", [1, 10, 33.3, 50, 66, 99, 100])
def test_matches_the_reference_rule(top_pct):
    rng = np.random.default_rng(0)
    scores = {i: float(s) for i, s in enumerate(rng.random(30))}
    assert select_layers(scores, top_pct=top_pct) == reference_select(scores, top_pct)


def test_budget_rounding():
    scores = {i: float(i) for i in range(30)}
    assert select_layers(scores, top_pct=50) == list(range(15, 30))
    assert select_layers(scores, top_pct=1) == [29]  # floor(0.3) = 0 -> at least 1
    assert select_layers(scores, top_pct=100) == list(range(30))
    assert select_layers(scores, top_k=3) == [27, 28, 29]


def test_ties_go_to_the_lower_index_and_output_is_sorted():
    assert select_layers({0: 1.0, 1: 2.0, 2: 2.0, 3: 2.0}, top_k=2) == [1, 2]
    assert select_layers({3: 5.0, 0: 1.0, 2: 9.0, 1: 7.0}, top_k=3) == [1, 2, 3]


def test_accepts_layer_scores_and_numpy_numbers():
    scores = LayerScores({0: np.float32(1.0), 1: np.float64(3.0)}, {"metric": "grad_norm"})
    assert select_layers(scores, top_k=1) == [1]
    assert select_layers({np.int64(0): 2.0, np.int64(1): 1.0}, top_k=np.int64(1)) == [0]


@pytest.mark.parametrize(
    "scores, kwargs, error, match",
    [
        ({}, {}, ValueError, "layer_scores is empty"),
        ([1.0, 2.0], {}, TypeError, "layer_scores must be a mapping of layer index -> score, got list"),
        ({0: math.nan, 1: 1.0}, {}, ValueError, r"layer_scores\[0\] = nan is not finite"),
        ({0: math.inf}, {}, ValueError, r"layer_scores\[0\] = inf is not finite"),
        ({0: "1.0"}, {}, TypeError, r"layer_scores\[0\] = '1.0' is not a number"),
        ({"0": 1.0}, {}, ValueError, "layer_scores key '0' is not a layer index"),
        ({-1: 1.0}, {}, ValueError, "layer_scores key -1 is not a layer index"),
        ({0: 1.0}, {"top_pct": 0}, ValueError, "top_pct must be between 1 and 100, got 0"),
        ({0: 1.0}, {"top_pct": 100.5}, ValueError, "top_pct must be between 1 and 100, got 100.5"),
        ({0: 1.0}, {"top_pct": "50"}, TypeError, r"top_pct must be a number between 1 and 100, got '50' \(str\)"),
        ({0: 1.0}, {"top_pct": math.nan}, ValueError, "top_pct must be between 1 and 100, got nan"),
        ({0: 1.0}, {"top_pct": True}, TypeError, "top_pct must be a number"),
        ({0: 1.0, 1: 2.0}, {"top_k": 3}, ValueError, r"top_k must be between 1 and the number of layers \(2\), got 3"),
        ({0: 1.0}, {"top_k": 0}, ValueError, "top_k must be between 1"),
        ({0: 1.0}, {"top_k": 1.0}, TypeError, r"top_k must be an integer, got 1.0"),
        ({0: 1.0}, {"top_k": 1, "top_pct": 30}, ValueError, "give top_pct or top_k, not both"),
        ({0: 1.0}, {"strategy": "best"}, ValueError, r"strategy must be one of \['score'"),
    ],
)
def test_bad_input(scores, kwargs, error, match):
    with pytest.raises(error, match=match):
        select_layers(scores, **kwargs)
