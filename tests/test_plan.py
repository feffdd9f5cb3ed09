"""The plan prices a selection at the run's own LoRA settings."""

from __future__ import annotations

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
