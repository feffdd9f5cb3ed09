"""Predictions for the training modes: a selection's cached epochs, and progressive freezing on a planned schedule
(the schedule of the quality protocol's progressive-fixed control), checked against the cost model's steps and
predict_timeline."""

import math
import time

import pytest

from aletheia_lora.cost import CostModel
from aletheia_lora.forecast import (
    DEFAULT_MAX_FROZEN_PCT,
    _phase_cost,
    cached_speedup,
    plan_progressive,
    planned_cache_builds,
    planned_freezes,
    predict_progressive,
)
from aletheia_lora.timeline import predict_timeline
from test_cost import SMOLLM2, llama_config

UNIFORM_30 = CostModel.uniform(30)


@pytest.mark.parametrize("cost", [UNIFORM_30, CostModel.from_model(SMOLLM2, seq_len=128, batch_size=4, r=8)])
def test_cached_speedup_is_the_cost_models_cached_step(cost):
    for layers in ([15, 20, 29], list(range(15, 30)), [1, 5], [29]):
        assert cached_speedup(cost, layers) == pytest.approx(cost.speedup(layers, cached=True), rel=1e-12)
        assert cached_speedup(cost, layers) > cost.speedup(layers)
    assert cached_speedup(cost, [0, 15, 29]) is None  # nothing below block 0 to cache
    # the top half of 30 uniform blocks: 15 forward + 15 backward of 30 + 30
    assert cached_speedup(UNIFORM_30, range(15, 30)) == pytest.approx(2.0)


@pytest.mark.parametrize("num_blocks", [1, 2, 7, 30, 61])
@pytest.mark.parametrize("steps", [1, 5, 16, 48, 200])
@pytest.mark.parametrize("pct", [0, 10, 33.3, 50, 75])
def test_planned_freezes_are_progressive_fixeds_schedule_up_to_the_floor(num_blocks, steps, pct):
    from aletheia_lora.freeze import max_frozen

    timeline = planned_freezes(num_blocks, steps, pct)
    count = max_frozen(num_blocks, pct)  # the gradient rule's floor, what the control freezes as many blocks as
    assert timeline[0] == {"step": 0, "lowest_trainable": 0}
    assert [e["lowest_trainable"] for e in timeline[1:]] == list(range(1, count + 1))
    # the k-th after step round(k * steps / (count + 1)), half up, at least 1: what progressive-fixed runs on
    assert [e["step"] for e in timeline[1:]] == [
        max(1, math.floor(k * steps / (count + 1) + 0.5)) for k in range(1, count + 1)
    ]


def test_planned_freezes_keep_a_block_training_and_the_default_floor_is_freezes():
    from aletheia_lora import freeze

    assert DEFAULT_MAX_FROZEN_PCT == freeze.DEFAULT_MAX_FROZEN_PCT
    assert planned_freezes(4, 10, 100)[-1] == {"step": 8, "lowest_trainable": 3}  # 3 of 4 frozen, at 2.5 -> 3, 5, 8
    assert planned_freezes(30, 16) == [{"step": k, "lowest_trainable": k} for k in range(16)]
    with pytest.raises(ValueError, match="max_frozen_pct"):
        planned_freezes(30, 16, 101)


def test_planned_cache_builds_wait_an_epoch_after_each_freeze():
    timeline = [
        {"step": 0, "lowest_trainable": 0},
        {"step": 10, "lowest_trainable": 1},
        {"step": 20, "lowest_trainable": 2},
    ]
    assert planned_cache_builds(timeline, 30, 5) == [{"step": 15, "block": 1}, {"step": 25, "block": 2}]
    # a freeze at the very step the prefix has stood an epoch comes first; the last step still builds (and serves none)
    assert planned_cache_builds(timeline, 30, 10) == [{"step": 30, "block": 2}]
    assert planned_cache_builds(timeline, 30, 11) == []
    # several freezes at one step: only the state after the last of them stands
    same_step = [
        {"step": 0, "lowest_trainable": 0},
        {"step": 4, "lowest_trainable": 1},
        {"step": 4, "lowest_trainable": 2},
    ]
    assert planned_cache_builds(same_step, 8, 2) == [{"step": 6, "block": 2}]


def test_predict_progressive_is_predict_timeline_on_the_planned_schedule():
    cost = CostModel.from_model(SMOLLM2, seq_len=128, batch_size=4, r=8)
    timeline = [{"step": 0, "lowest_trainable": 0}] + [{"step": 3 * k, "lowest_trainable": k} for k in range(1, 16)]
    assert predict_progressive(cost, 48) == predict_timeline(cost, timeline, 48)
    builds = [{"step": 3 * k + 2, "block": k} for k in range(1, 16)]  # 2 steps an epoch: after 2 of each 3 steps
    cached = predict_progressive(cost, 48, steps_per_epoch=2)
    assert cached == predict_timeline(cost, timeline, 48, cache_builds=builds, rows=2 * 4)


def _uniform_run(epochs: int, cached: bool) -> float:
    """30 uniform blocks, 15 frozen one per 1/16 of a run of ``epochs`` epochs of 16 steps, priced directly."""
    timeline = [{"step": 0, "lowest_trainable": 0}] + [
        {"step": epochs * k, "lowest_trainable": k} for k in range(1, 16)
    ]
    if not cached:
        return predict_timeline(UNIFORM_30, timeline, 16 * epochs).speedup
    builds = [{"step": epochs * k + 16, "block": k} for k in range(1, 16) if epochs * k + 16 < epochs * (k + 1)]
    builds += [{"step": epochs * 15 + 16, "block": 15}] if epochs == 16 else []  # built at the last step
    run = predict_timeline(UNIFORM_30, timeline, 16 * epochs, cache_builds=builds or (), rows=16 if builds else None)
    return run.speedup


def test_plan_progressive_on_uniform_blocks():
    plan = plan_progressive(UNIFORM_30)
    assert (plan.frozen_blocks, plan.max_frozen_pct) == (15, 50.0)
    # 16 equal phases; phase j: 30 blocks forward, 30 - j backward, of an all-layer step's 60
    assert plan.speedup == pytest.approx(16 * 60 / sum(60 - j for j in range(16))) == pytest.approx(8 / 7)
    assert plan.speedup == pytest.approx(_uniform_run(3, cached=False))
    # with the cache: nothing built while a phase lasts no longer than an epoch, then a build that is not yet repaid
    for epochs in (1, 3, 15):
        assert _uniform_run(epochs, cached=True) == pytest.approx(plan.speedup)
    assert plan.cache_from_epochs == 19
    assert _uniform_run(16, cached=True) < _uniform_run(17, cached=True) < plan.speedup < _uniform_run(19, cached=True)
    assert _uniform_run(18, cached=True) == pytest.approx(plan.speedup)  # here exactly even: 18 does not pay yet
    # each phase j fed by its own cache: 30 - j forward and 30 - j backward
    assert plan.cached_speedup_limit == pytest.approx(16 * 60 / (60 + sum(60 - 2 * j for j in range(1, 16))))
    assert _uniform_run(16 * 1000, cached=True) == pytest.approx(plan.cached_speedup_limit, rel=2e-3)


FLAGS = [{}, {"gradient_checkpointing": True}, {"backward_to_embeddings": True}]
FLAGS += [{"gradient_checkpointing": True, "backward_to_embeddings": False}]


@pytest.mark.parametrize("flags", FLAGS)
def test_the_plans_phase_costs_are_step_costs(flags):
    cost = CostModel.from_model(llama_config(7), seq_len=8, batch_size=2, **flags)
    step = _phase_cost(cost)
    for j in range(7):
        for s in range(j + 1):
            expected = cost.step_cost(range(j, 7), frozen_layers=range(j), cache_block=s).effective
            assert step(j, s) == pytest.approx(expected, rel=1e-12), (j, s)


@pytest.mark.parametrize("flags", FLAGS)
def test_plan_progressive_on_smollm2(flags):
    cost = CostModel.from_model(SMOLLM2, seq_len=128, batch_size=4, r=8, **flags)
    plan = plan_progressive(cost)
    assert plan.speedup == pytest.approx(predict_progressive(cost, 16).speedup)
    assert plan.speedup == pytest.approx(predict_progressive(cost, 16 * 7).speedup)  # any multiple of 16 steps
    epochs = plan.cache_from_epochs
    assert epochs > 16

    def cached(e):
        return predict_progressive(cost, 16 * e, steps_per_epoch=16).speedup

    assert cached(epochs - 1) <= plan.speedup < cached(epochs)
    # whether the cache pays depends on the epochs alone: every phase and build scales with an epoch's steps
    assert predict_progressive(cost, 32 * epochs, steps_per_epoch=32).speedup == pytest.approx(cached(epochs))
    every = cost.step_cost(range(30)).effective
    phases = [every] + [cost.step_cost(range(j, 30), cached=True).effective for j in range(1, 16)]
    assert plan.cached_speedup_limit == pytest.approx(16 * every / sum(phases))
    assert plan.speedup < plan.cached_speedup_limit < cost.speedup(range(15, 30), cached=True)


def test_plan_progressive_needs_a_block_to_freeze():
    assert plan_progressive(CostModel.uniform(1)) is None
    assert plan_progressive(UNIFORM_30, 0) is None
    assert plan_progressive(UNIFORM_30, 100).frozen_blocks == 29
    assert plan_progressive(CostModel.uniform(2)).frozen_blocks == 1


def test_plan_progressive_stays_linear_in_the_blocks():
    start = time.perf_counter()
    plan = plan_progressive(CostModel.uniform(20_000))
    assert time.perf_counter() - start < 10  # a phase at a time through predict_timeline was O(n^2): hours
    assert plan.frozen_blocks == 10_000 and 1 < plan.speedup < plan.cached_speedup_limit
