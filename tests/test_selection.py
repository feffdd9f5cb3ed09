"""The typed Selection: the JSON of selection.json byte for byte, read back, given layers, calibration folded in."""

import json

import pytest

from aletheia_lora import Selection, find_decoder_stack
from aletheia_lora.cost import Calibration, CostModel
from aletheia_lora.forecast import plan_progressive
from aletheia_lora.select import (
    STRATEGIES,
    FrontierPoint,
    SelectionSummary,
    make_selection,
    select_layers,
    selection_frontier,
    summarize_selection,
)
from test_select import PROBE_LIKE
from tiny_models import tiny_model


def old_describe_selection(
    scores,
    *,
    model=None,
    seq_len=128,
    batch_size=1,
    top_pct=50,
    top_k=None,
    strategy="score",
    target_speedup=None,
    cost=None,
) -> dict:
    """``describe_selection`` as it was before the typed Selection, plus what the pipeline added to it."""
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
    selection = {
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
    if isinstance(cost, Calibration):  # pipeline._describe
        selection["calibration"] = {
            "fixed_s": cost.fixed_s,
            "per_backward_block_s": cost.per_backward_block_s,
            "per_adapted_block_s": cost.per_adapted_block_s,
            "timings": [{"layers": list(layers), "seconds": seconds} for layers, seconds in cost.timings],
        }
    return selection


def with_cache_predictions(old: dict, cache_cost: CostModel | None) -> dict:
    """``old`` with what selection.json holds since the cached and progressive predictions: ``cached_speedup`` after
    ``predicted_speedup`` (and in each alternative, last), ``progressive_plan`` after ``alternatives``; None where no
    cost model priced them (a calibration without a model)."""

    def cached(layers):
        return None if cache_cost is None or min(layers) == 0 else cache_cost.speedup(layers, cached=True)

    out = {}
    for key, value in old.items():
        if key == "alternatives":
            value = {name: {**a, "cached_speedup": cached(a["layers"])} for name, a in value.items()}
        out[key] = value
        if key == "predicted_speedup":
            out["cached_speedup"] = cached(old["selected_layers"])
        if key == "alternatives":
            out["progressive_plan"] = None if cache_cost is None else _plan_json(plan_progressive(cache_cost))
    return out


def _plan_json(plan) -> dict:
    return {
        "frozen_blocks": plan.frozen_blocks,
        "max_frozen_pct": plan.max_frozen_pct,
        "predicted_speedup": plan.speedup,
        "cache_from_epochs": plan.cache_from_epochs,
        "cached_speedup_limit": plan.cached_speedup_limit,
    }


CALIBRATION = Calibration.fit(30, {tuple(range(30)): 1.0, tuple(range(15, 30)): 0.7, tuple(range(1, 30, 2)): 0.9})
COSTS = {
    "none": None,
    "uniform": CostModel.uniform(30, head_share=0.2),
    "calibration": CALIBRATION,
}


def _bytes(selection: dict) -> str:
    return json.dumps(selection, indent=2)


@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("budget", [{}, {"top_pct": 30}, {"top_pct": 30.0}, {"top_pct": None, "top_k": 4}])
def test_to_dict_is_the_old_layout_byte_for_byte(strategy, cost, budget):
    """The old layout, with the cached and progressive predictions added where they belong (nothing else moved)."""
    kwargs = {"strategy": strategy, "cost": COSTS[cost], **budget}
    cache_cost = {"none": CostModel.uniform(30), "uniform": COSTS["uniform"], "calibration": None}[cost]
    old = with_cache_predictions(old_describe_selection(PROBE_LIKE, **kwargs), cache_cost)
    selection = make_selection(PROBE_LIKE, **kwargs)
    assert _bytes(selection.to_dict()) == _bytes(old)
    old["probe_seconds"] = 1.25  # the pipeline's last key
    assert _bytes(selection.with_probe_seconds(1.25).to_dict()) == _bytes(old)


def test_to_dict_with_a_model_and_a_target_speedup():
    model = tiny_model("llama", n_layers=6)
    scores = {i: float(6 - i) for i in range(6)}
    kwargs = {"model": model, "seq_len": 16, "batch_size": 2, "strategy": "truncation", "target_speedup": 1.05}
    old = with_cache_predictions(
        old_describe_selection(scores, **kwargs), CostModel.from_model(model, seq_len=16, batch_size=2)
    )
    assert _bytes(make_selection(scores, **kwargs).to_dict()) == _bytes(old)
    # the stack found once gives the same selection
    stack = find_decoder_stack(model)
    assert make_selection(scores, **kwargs, stack=stack) == make_selection(scores, **kwargs)
    with pytest.raises(ValueError, match=r"stack \(model.layers\) is not the decoder stack of this LlamaForCausalLM"):
        make_selection(scores, **kwargs, stack=find_decoder_stack(tiny_model("llama", n_layers=6)))


def test_fields():
    selection = make_selection(PROBE_LIKE, top_k=10, strategy="truncation", cost=COSTS["uniform"])
    assert selection.layers == tuple(selection.to_dict()["selected_layers"])
    assert selection.lowest_layer == selection.layers[0]
    assert (selection.top_pct, selection.top_k, selection.target_speedup) == (50, 10, None)
    assert set(selection.alternatives) == set(STRATEGIES)
    assert all(type(s) is SelectionSummary for s in selection.alternatives.values())
    assert selection.alternatives["truncation"].layers == selection.layers
    assert all(isinstance(p, FrontierPoint) and p.layers for p in selection.frontier)
    assert selection.frontier == tuple(selection_frontier(PROBE_LIKE, top_k=10, cost=COSTS["uniform"]))
    assert selection.calibration is None and selection.probe_seconds is None


@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_from_dict_reads_to_dict_back(strategy, cost):
    selection = make_selection(PROBE_LIKE, strategy=strategy, cost=COSTS[cost]).with_probe_seconds(0.5)
    data = json.loads(json.dumps(selection.to_dict()))  # as read from selection.json
    back = Selection.from_dict(data)
    assert back.to_dict() == selection.to_dict()
    assert _bytes(back.to_dict()) == _bytes(selection.to_dict())
    # JSON keeps no frontier layers; everything else comes back as it was
    assert [p.layers for p in back.frontier] == [()] * len(selection.frontier)
    assert [(p.lowest_layer, p.captured_share, p.speedup, p.pareto) for p in back.frontier] == [
        (p.lowest_layer, p.captured_share, p.speedup, p.pareto) for p in selection.frontier
    ]
    expected = Selection(**{**vars(selection), "frontier": back.frontier})
    assert back == expected


def test_given_layers():
    selection = Selection.given([5, 1, 3])
    assert selection.layers == (1, 3, 5) and selection.lowest_layer == 1
    assert selection.score_share is None and selection.predicted_speedup is None
    # what the pipeline writes for --layers
    assert _bytes(selection.to_dict()) == _bytes(
        {"strategy": "given", "selected_layers": [1, 3, 5], "probe_seconds": 0.0}
    )
    assert Selection.from_dict(selection.to_dict()) == selection
    assert Selection.from_dict({"strategy": "given", "selected_layers": [2]}).to_dict() == {
        "strategy": "given",
        "selected_layers": [2],
    }
    with pytest.raises(ValueError, match=r"selected_layers holds duplicates: \[1\]"):
        Selection.given([1, 1])
    with pytest.raises(ValueError, match="selected_layers is empty"):
        Selection.given([])


def test_calibration_is_folded_in():
    selection = make_selection(PROBE_LIKE, strategy="truncation", cost=CALIBRATION)
    assert selection.cost_model == CALIBRATION.description
    assert selection.calibration == {
        "fixed_s": CALIBRATION.fixed_s,
        "per_backward_block_s": CALIBRATION.per_backward_block_s,
        "per_adapted_block_s": CALIBRATION.per_adapted_block_s,
        "timings": [{"layers": list(layers), "seconds": s} for layers, s in CALIBRATION.timings],
    }
    keys = list(selection.with_probe_seconds(2.0).to_dict())
    assert keys[-3:] == ["frontier", "calibration", "probe_seconds"]
    assert "calibration" not in make_selection(PROBE_LIKE, cost=COSTS["uniform"]).to_dict()


def test_bad_dicts_and_fields():
    with pytest.raises(ValueError, match=r"unknown keys \['layers'\], missing keys \['selected_layers'\]"):
        Selection.from_dict({"strategy": "score", "layers": [1]})
    with pytest.raises(ValueError, match=r"unknown keys \['score_share'\]"):
        Selection.from_dict({"strategy": "given", "selected_layers": [1], "score_share": 0.5})
    with pytest.raises(TypeError, match="a selection must be a mapping, got list"):
        Selection.from_dict([1, 2])
    with pytest.raises(ValueError, match=r"strategy must be one of \['score', .*'given'\], got 'best'"):
        Selection((1,), "best")


# --- cached epochs and the progressive plan in selection.json -------------------------------------------------------


def test_cached_and_progressive_predictions_are_kept_and_read_back():
    selection = make_selection(PROBE_LIKE, strategy="truncation", cost=COSTS["uniform"])
    cost = COSTS["uniform"]
    assert selection.lowest_layer > 0
    assert selection.cached_speedup == pytest.approx(cost.speedup(selection.layers, cached=True))
    for alternative in selection.alternatives.values():
        expected = None if alternative.lowest_layer == 0 else cost.speedup(alternative.layers, cached=True)
        assert alternative.cached_speedup == (expected if expected is None else pytest.approx(expected))
    assert selection.alternatives["score"].cached_speedup is None  # PROBE_LIKE's best-scored block is 0
    assert selection.progressive_plan == plan_progressive(cost)
    assert selection.cache_cost_model is None  # the cost model that priced the speedups priced these too
    data = json.loads(json.dumps(selection.to_dict()))
    assert data["progressive_plan"]["predicted_speedup"] == selection.progressive_plan.speedup
    assert data["alternatives"]["contiguous"]["cached_speedup"] == selection.alternatives["contiguous"].cached_speedup
    back = Selection.from_dict(data)
    assert back == Selection(**{**vars(selection), "frontier": back.frontier})


def test_a_selection_json_from_before_the_cached_predictions_still_loads():
    data = make_selection(PROBE_LIKE, strategy="contiguous").with_probe_seconds(1.0).to_dict()
    for key in ("cached_speedup", "progressive_plan"):
        del data[key]
    for alternative in data["alternatives"].values():
        del alternative["cached_speedup"]
    old = Selection.from_dict(json.loads(json.dumps(data)))
    assert old.cached_speedup is None and old.progressive_plan is None and old.cache_cost_model is None
    assert all(a.cached_speedup is None for a in old.alternatives.values())
    assert old.to_dict()["cached_speedup"] is None and old.to_dict()["progressive_plan"] is None


def test_beside_a_calibration_the_cost_model_prices_the_cached_steps():
    # a calibration without a model has no cache term and nothing to count: no cached predictions
    timed = make_selection(PROBE_LIKE, strategy="contiguous", cost=CALIBRATION)
    assert timed.cached_speedup is None and timed.progressive_plan is None
    assert all(a.cached_speedup is None for a in timed.alternatives.values())
    # with one, the cached figures are its; selection.json names it after cost_model
    cache_cost = CostModel.uniform(30, head_share=0.1)
    both = make_selection(PROBE_LIKE, strategy="contiguous", cost=CALIBRATION, cache_cost=cache_cost)
    assert both.predicted_speedup == CALIBRATION.speedup(both.layers)
    assert both.cached_speedup == pytest.approx(cache_cost.speedup(both.layers, cached=True))
    assert both.progressive_plan == plan_progressive(cache_cost)
    assert both.cache_cost_model == cache_cost.description
    keys = list(both.to_dict())
    assert keys[keys.index("cost_model") + 1] == "cache_cost_model"
    assert Selection.from_dict(json.loads(json.dumps(both.to_dict()))).cache_cost_model == cache_cost.description
    # a model's FLOP count, when no cache cost is given
    model = tiny_model("llama", n_layers=6)
    scores = {i: float(6 - i) for i in range(6)}
    calibration = Calibration.fit(6, {tuple(range(6)): 1.0, (3, 4, 5): 0.7, (1, 3, 5): 0.9})
    flops = CostModel.from_model(model, seq_len=16, batch_size=2)
    counted = make_selection(scores, model=model, seq_len=16, batch_size=2, strategy="contiguous", cost=calibration)
    assert counted.cached_speedup == pytest.approx(flops.speedup([3, 4, 5], cached=True))
    assert counted.cache_cost_model == flops.description
    with pytest.raises(TypeError, match="cache_cost must be a CostModel, got Calibration"):
        make_selection(PROBE_LIKE, cache_cost=CALIBRATION)
    with pytest.raises(ValueError, match="the cost model has 4 layers"):
        make_selection(PROBE_LIKE, cache_cost=CostModel.uniform(4))


def test_the_progressive_floor_is_passed_on_and_a_bad_plan_is_refused():
    assert make_selection(PROBE_LIKE, max_frozen_pct=20).progressive_plan == plan_progressive(
        CostModel.uniform(30), 20
    )
    data = make_selection(PROBE_LIKE).to_dict()
    data["progressive_plan"] = {"speedup": 1.1}
    with pytest.raises(ValueError, match=r"progressive_plan must be a mapping with keys \['frozen_blocks'"):
        Selection.from_dict(data)
