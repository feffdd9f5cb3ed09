"""The plan prices a selection at the run's own LoRA settings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from aletheia_lora.config import LoraSettings
from aletheia_lora.cost import CostModel
from aletheia_lora.plan import selection_cost
from tiny_models import tiny_model


@pytest.mark.parametrize("lora", [LoraSettings(r=4), {"r": 4}])
def test_selection_cost_uses_the_runs_rank_and_checkpointing(lora):
    model = tiny_model("llama", n_layers=6)
    cost = selection_cost(model, seq_len=16, batch_size=2, lora=lora, gradient_checkpointing=True)
    expected = CostModel.from_model(model, seq_len=16, batch_size=2, r=4, gradient_checkpointing=True)
    default = CostModel.from_model(model, seq_len=16, batch_size=2)
    top_half = [3, 4, 5]
    assert cost(top_half) == pytest.approx(expected(top_half))
    assert cost(top_half) != pytest.approx(default(top_half))


@pytest.mark.parametrize("lora", [LoraSettings(r=4, attention_r=8, mlp_r=32), {"r": 4, "attention_r": 8, "mlp_r": 32}])
def test_selection_cost_prices_per_module_ranks(lora):
    model = tiny_model("llama", n_layers=6)
    cost = selection_cost(model, seq_len=16, batch_size=2, lora=lora)
    expected = CostModel.from_model(model, seq_len=16, batch_size=2, r=4, attention_r=8, mlp_r=32)
    assert cost.lora_params == expected.lora_params
    assert cost.lora_params != CostModel.from_model(model, seq_len=16, batch_size=2, r=4).lora_params
    assert "attention_r=8, mlp_r=32" in cost.description


def test_calibration_times_the_runs_rank_targets_and_dropout(monkeypatch):
    import aletheia_lora.plan as plan

    seen = {}

    def fake_calibrate(model, batch, **kwargs):
        seen.update(kwargs, rows=batch["input_ids"].shape[0])
        return SimpleNamespace(description="timed")

    monkeypatch.setattr(plan, "time_lora_steps", fake_calibrate)
    model = tiny_model("llama", n_layers=6)
    rows = [{"input_ids": [1, 2, 3]}] * 5
    lora = LoraSettings(r=4, lora_dropout=0.1, target_modules=["q_proj"])
    assert selection_cost(model, rows, seq_len=16, batch_size=2, calibrate=True, lora=lora).description == "timed"
    assert seen["r"] == 4 and seen["target_modules"] == ["q_proj"] and seen["rows"] == 2
    assert seen["lora_kwargs"] == {"lora_dropout": 0.1}
    lora = LoraSettings(r=4, attention_r=8, mlp_r=32)
    selection_cost(model, rows, seq_len=16, batch_size=2, calibrate=True, lora=lora)
    assert seen["lora_kwargs"] == {"lora_dropout": 0.0, "attention_r": 8, "mlp_r": 32}


@pytest.mark.parametrize(
    ("state", "hint"),
    [
        ({"libc": "glibc-2.36", "tuned": None, "environment": {}}, True),
        ({"libc": "glibc-2.36", "tuned": {"mmap_threshold": 1}, "environment": {}}, False),
        ({"libc": "glibc-2.36", "tuned": None, "environment": {"MALLOC_TOP_PAD_": "1"}}, False),
        ({"libc": None, "tuned": None, "environment": {}}, False),
    ],
)
def test_a_cpu_calibration_under_glibcs_default_thresholds_points_to_the_tuned_allocator(monkeypatch, caplog, state,
                                                                                         hint):  # fmt: skip
    import aletheia_lora.plan as plan

    monkeypatch.setattr(plan, "time_lora_steps", lambda *a, **k: SimpleNamespace(description="timed"))
    monkeypatch.setattr(plan, "allocator_state", lambda: state)
    with caplog.at_level("INFO", logger="aletheia_lora.plan"):
        selection_cost(tiny_model("llama", n_layers=2), [{"input_ids": [1, 2]}], seq_len=4, calibrate=True)
    assert ("--cpu-allocator tuned" in caplog.text) is hint


def test_beside_a_calibration_the_cached_predictions_are_priced_at_the_runs_rank():
    from aletheia_lora.cost import Calibration
    from aletheia_lora.forecast import plan_progressive
    from aletheia_lora.plan import choose_layers

    model = tiny_model("llama", n_layers=6)
    calibration = Calibration.fit(6, {tuple(range(6)): 1.0, (3, 4, 5): 0.7, (1, 3, 5): 0.9})
    scores = {i: float(6 - i) for i in range(6)}
    shape = {"seq_len": 16, "batch_size": 2}
    _, selection, cost = choose_layers(
        model, None, select={"strategy": "contiguous"}, lora={"r": 4}, scores=scores, cost=calibration, **shape
    )
    assert cost is calibration and selection.predicted_speedup == calibration.speedup([3, 4, 5])
    flops = selection_cost(model, lora={"r": 4}, **shape)
    assert selection.cached_speedup == pytest.approx(flops.speedup([3, 4, 5], cached=True))
    assert selection.cache_cost_model == flops.description and "r=4" in flops.description
    assert selection.progressive_plan == plan_progressive(flops)
