"""The typed Selection: the JSON of selection.json byte for byte, read back, given layers, calibration folded in."""

import json

import pytest

from aletheia_lora import Selection, find_decoder_stack
from aletheia_lora.cost import Calibration, CostModel
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
    kwargs = {"strategy": strategy, "cost": COSTS[cost], **budget}
    old = old_describe_selection(PROBE_LIKE, **kwargs)
    selection = make_selection(PROBE_LIKE, **kwargs)
    assert _bytes(selection.to_dict()) == _bytes(old)
    old["probe_seconds"] = 1.25  # the pipeline's last key
    assert _bytes(selection.with_probe_seconds(1.25).to_dict()) == _bytes(old)


def test_to_dict_with_a_model_and_a_target_speedup():
    model = tiny_model("llama", n_layers=6)
    scores = {i: float(6 - i) for i in range(6)}
    kwargs = {"model": model, "seq_len": 16, "batch_size": 2, "strategy": "truncation", "target_speedup": 1.05}
    old = old_describe_selection(scores, **kwargs)
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
