import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from aletheia_lora import LayerScores, select_layers
from aletheia_lora.cost import CostModel
from aletheia_lora.select import (
    SelectConfig,
    SelectionSummary,
    default_target_speedup,
    selection_frontier,
    summarize_selection,
)
from test_cost import SMOLLM2


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


# --- strategies that take the cost of a step into account -------------------------------------------------------

# Shaped like the gradient-norm probe of SmolLM2-135M: layer 0 far ahead, the low layers ahead in general.
PROBE_LIKE = {i: 68.0 if i == 0 else 40.0 - i for i in range(30)}


def test_contiguous_is_the_top_block():
    scores = {i: float(-i) for i in range(10)}  # scores favour the bottom; contiguous ignores them
    assert select_layers(scores, top_pct=50, strategy="contiguous") == [5, 6, 7, 8, 9]
    assert select_layers(scores, top_k=1, strategy="contiguous") == [9]
    assert select_layers(scores, top_pct=100, strategy="contiguous") == list(range(10))


def test_frontier_endpoints_and_order():
    points = selection_frontier(PROBE_LIKE, top_pct=50)
    assert [p.lowest_layer for p in points] == list(range(16))
    # m = 0: the score selection itself, since layer 0 scores highest
    assert list(points[0].layers) == select_layers(PROBE_LIKE, top_pct=50) == list(range(15))
    # m = L - k: the contiguous top half, predicted at 1 / 0.75 by the model-free approximation
    assert list(points[-1].layers) == select_layers(PROBE_LIKE, strategy="contiguous") == list(range(15, 30))
    assert points[-1].speedup == pytest.approx(1 / 0.75)
    assert points[0].speedup == 1.0
    assert points[0].captured_share == pytest.approx(sum(PROBE_LIKE[i] for i in range(15)) / sum(PROBE_LIKE.values()))
    assert all(len(p.layers) == 15 and p.layers[0] == p.lowest_layer for p in points)
    assert all(a.speedup < b.speedup and a.captured_share > b.captured_share for a, b in zip(points, points[1:]))
    assert all(p.pareto for p in points)


def test_dominated_candidates_are_marked():
    # Layer 1 scores 0, so the candidate starting there captures less than the one from 2 and is no faster
    # under a cost that only looks at how many blocks are above layer 1.
    scores = {0: 5.0, 1: 0.0, 2: 3.0, 3: 2.0, 4: 1.0}
    points = selection_frontier(scores, top_k=2, cost=lambda layers: 1.0 if layers[0] < 2 else 1.5)
    assert [p.layers for p in points] == [(0, 2), (1, 2), (2, 3), (3, 4)]
    assert [p.pareto for p in points] == [True, False, True, False]


def test_truncation_honours_target_speedup():
    chosen = select_layers(PROBE_LIKE, strategy="truncation", target_speedup=1.2)
    points = selection_frontier(PROBE_LIKE)
    fast_enough = [p for p in points if p.speedup >= 1.2]
    best = max(fast_enough, key=lambda p: p.captured_share)
    assert chosen == list(best.layers)
    assert CostModel.uniform(30).speedup(chosen) >= 1.2
    # a target equal to the contiguous block's own speedup is reached by it
    assert select_layers(PROBE_LIKE, strategy="truncation", target_speedup=1 / 0.75) == list(range(15, 30))
    with pytest.raises(ValueError, match=r"target_speedup=1.5 is out of reach with 15 of 30 layers: .* 1\.333x"):
        select_layers(PROBE_LIKE, strategy="truncation", target_speedup=1.5)


def test_truncation_default_aims_at_half_the_achievable_gain():
    cost = CostModel.from_model(SMOLLM2, seq_len=128, batch_size=2, r=8)
    points = selection_frontier(PROBE_LIKE, cost=cost)
    target = default_target_speedup(points)
    assert target == pytest.approx((points[0].speedup + points[-1].speedup) / 2)
    chosen = select_layers(PROBE_LIKE, strategy="truncation", cost=cost)
    assert chosen == select_layers(PROBE_LIKE, strategy="truncation", cost=cost, target_speedup=target)
    # neither endpoint: it keeps the best layers above a cut that buys half the time the top block would
    assert chosen[0] not in (0, 15) and cost.speedup(chosen) >= target
    assert cost.speedup(select_layers(PROBE_LIKE, strategy="truncation", cost=cost)) == pytest.approx(
        min(p.speedup for p in points if p.speedup >= target)
    )
    # a flat profile gives nothing up by moving up: ties go to the faster candidate, the top block
    assert select_layers(dict.fromkeys(range(8), 1.0), strategy="truncation") == [4, 5, 6, 7]
    # no candidate is faster when the backward reaches the embeddings anyway: the score selection
    hooked = CostModel.uniform(30, backward_to_embeddings=True)
    assert select_layers(PROBE_LIKE, strategy="truncation", cost=hooked) == select_layers(PROBE_LIKE)


def test_summarize_selection():
    summary = summarize_selection({0: 3.0, 1: 1.0, 2: 1.0, 3: 5.0}, [2, 3])
    assert summary == SelectionSummary(layers=(2, 3), lowest_layer=2, captured_share=0.6, speedup=pytest.approx(8 / 6))
    cost = CostModel.from_model(SMOLLM2, seq_len=128)
    assert summarize_selection(PROBE_LIKE, range(15, 30), cost=cost).speedup == cost.speedup(range(15, 30))


def test_score_strategy_ignores_cost_arguments():
    scores = {i: float(s) for i, s in enumerate(np.random.default_rng(1).random(30))}
    cost = CostModel.from_model(SMOLLM2, seq_len=128)
    assert select_layers(scores, top_pct=50, strategy="score", cost=cost) == reference_select(scores, 50)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: select_layers(PROBE_LIKE, target_speedup=1.2), ValueError, "target_speedup applies to strategy="),
        (
            lambda: select_layers(PROBE_LIKE, strategy="truncation", target_speedup="fast"),
            TypeError,
            r"target_speedup must be a number, got 'fast' \(str\)",
        ),
        (
            lambda: select_layers(PROBE_LIKE, strategy="truncation", target_speedup=0),
            ValueError,
            "target_speedup must be a finite number > 0, got 0",
        ),
        (
            lambda: select_layers(PROBE_LIKE, strategy="truncation", cost=CostModel.uniform(20)),
            ValueError,
            "layer_scores holds layer 29, but the cost model has 20 layers",
        ),
        (lambda: selection_frontier(PROBE_LIKE, cost="flops"), TypeError, "cost must be a CostModel, a Calibration"),
        (
            lambda: selection_frontier(PROBE_LIKE, cost=lambda layers: math.nan),
            ValueError,
            r"cost returned nan for layers \[0, 1,",
        ),
        (lambda: selection_frontier({0: 1.0, 1: -1.0}, top_k=1), ValueError, "needs non-negative scores"),
        (lambda: selection_frontier({0: 0.0, 1: 0.0}, top_k=1), ValueError, "every layer score is 0"),
        (lambda: summarize_selection({0: 1.0}, [1]), ValueError, r"selected_layers holds \[1\], which have no score"),
        (lambda: summarize_selection({0: 1.0}, []), ValueError, "selected_layers is empty"),
    ],
)
def test_bad_input_for_cost_aware_strategies(call, error, match):
    with pytest.raises(error, match=match):
        call()


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.floats(0, 100), min_size=1, max_size=24),
    pct=st.floats(1, 100),
    target=st.one_of(st.none(), st.floats(1, 1.4)),
)
def test_truncation_keeps_the_budget_and_picks_a_frontier_point(scores, pct, target):
    scores = {i: s for i, s in enumerate(scores)}
    assume(sum(scores.values()) > 0)
    k = max(int(len(scores) * pct / 100), 1)
    points = selection_frontier(scores, top_pct=pct)
    try:
        chosen = select_layers(scores, top_pct=pct, strategy="truncation", target_speedup=target)
    except ValueError as e:
        assert "out of reach" in str(e) and max(p.speedup for p in points) < target
        return
    assert len(chosen) == k and chosen == sorted(set(chosen))
    assert tuple(chosen) in {p.layers for p in points}
    if target is not None:
        assert CostModel.uniform(len(scores)).speedup(chosen) >= target * (1 - 1e-9)


def test_select_config_holds_calibrate_but_does_not_pass_it_on():
    config = SelectConfig(top_k=3, calibrate=True)
    assert config.calibrate is True
    expected = {"top_pct": None, "top_k": 3, "strategy": "score", "target_speedup": None, "max_frozen_pct": 50.0}
    assert config.kwargs() == expected
    assert "calibrate" not in SelectConfig().kwargs()
    with pytest.raises(TypeError, match="--calibrate must be true or false, got 'yes'"):
        SelectConfig(calibrate="yes")
    with pytest.raises(ValueError, match="--strategy must be one of score, contiguous, truncation, got 'best'"):
        SelectConfig(strategy="best")
    with pytest.raises(ValueError, match="--top-k must be a positive integer, got 0"):
        SelectConfig(top_k=0)
    with pytest.raises(ValueError, match="--target-speedup must be a finite number > 0, got 0"):
        SelectConfig(strategy="truncation", target_speedup=0)
    with pytest.raises(ValueError, match=r"--top-pct must be between 1 and 100, got 0"):
        SelectConfig(top_pct=0)
