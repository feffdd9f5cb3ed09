"""calibrate(): placements timed round-robin in one PeftModel, the model left exactly as it came."""

import importlib
from types import SimpleNamespace

import pytest
import torch

from aletheia_lora.calibrate import calibrate, default_placements
from aletheia_lora.depth import count_input_require_grads_hooks
from aletheia_lora.layers import is_adapter_name
from tiny_models import tiny_model, token_rows

calibrate_module = importlib.import_module("aletheia_lora.calibrate")


def _batch(rows: int = 2, length: int = 10) -> dict:
    return {"input_ids": torch.tensor([row["input_ids"] for row in token_rows(rows, length)])}


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "state": {name: tensor.clone() for name, tensor in model.state_dict().items()},
        "types": [(name, type(module)) for name, module in model.named_modules()],
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "training": [(name, module.training) for name, module in model.named_modules()],
        "hooks": [
            (name, attr, list(hooks))
            for name, module in model.named_modules()
            for attr, hooks in vars(module).items()
            if "_hooks" in attr and isinstance(hooks, dict)
        ],
        "attributes": set(vars(model)),
    }


def _assert_same(before: dict, after: dict) -> None:
    assert after["state"].keys() == before["state"].keys()
    for name, tensor in before["state"].items():
        assert torch.equal(after["state"][name], tensor), name  # bit-identical
    for key in ("types", "requires_grad", "training", "hooks", "attributes"):
        assert after[key] == before[key], key


@pytest.mark.parametrize("training", [False, True])
def test_the_model_is_exactly_as_before(training):
    model = tiny_model("llama", n_layers=4).train(training)
    model.get_input_embeddings().weight.requires_grad_(False)  # a flag the caller set, kept
    before = _snapshot(model)
    cal = calibrate(model, _batch(), steps=2, warmup=1, r=2)
    assert [layers for layers, _ in cal.timings] == [tuple(p) for p in default_placements(4)]
    assert all(t > 0 for _, t in cal.timings)
    _assert_same(before, _snapshot(model))
    assert not hasattr(model, "peft_config")
    assert not any(is_adapter_name(name) for name, _ in model.named_modules())


def test_hooks_peft_adds_to_a_checkpointing_model_are_taken_off_again():
    model = tiny_model("llama", n_layers=4)
    # transformers 5 renamed it; its checkpointing registers an input-require-grads hook, PEFT then another
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    hooks = count_input_require_grads_hooks(model)
    handles = getattr(model, "_require_grads_hooks", None)
    before = _snapshot(model)
    cal = calibrate(model, _batch(), steps=1, warmup=0, r=2)
    assert cal.gradient_checkpointing
    assert cal.backward_to_embeddings == (hooks > 0)
    assert count_input_require_grads_hooks(model) == hooks
    assert getattr(model, "_require_grads_hooks", None) is handles
    _assert_same(before, _snapshot(model))


def test_placements_are_timed_round_robin_one_adapter_trainable_at_a_time(monkeypatch):
    model = tiny_model("llama", n_layers=4)
    placements = [[0, 1, 2, 3], [2, 3], [1, 3]]
    seen = []  # per step: the layers whose adapters are trainable, and those that got a gradient

    def layers_of(names):
        return sorted({int(n.split(".layers.")[1].split(".")[0]) for n in names})

    def record(module, args, kwargs):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert all(is_adapter_name(n) for n in trainable)
        assert len({n.split("lora_")[1].split(".")[1] for n in trainable}) == 1  # one adapter's parameters
        seen.append(layers_of(trainable))

    step = torch.optim.AdamW.step

    def checked_step(self, *args, **kwargs):
        with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
        assert layers_of(with_grad) == seen[-1]  # no inactive adapter took part in the backward pass
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", checked_step)
    model.register_forward_pre_hook(record, with_kwargs=True)
    calibrate(model, _batch(), placements=placements, steps=2, warmup=1, r=2)
    # the starting placement rotates round by round, warm-up round included
    order = [0, 1, 2, 1, 2, 0, 2, 0, 1]
    assert seen == [placements[i] for i in order]


def test_medians_per_placement_leave_the_warm_up_rounds_out(monkeypatch):
    model = tiny_model("llama", n_layers=4)
    placements = [[0, 1, 2, 3], [2, 3]]
    cost = {4: 2.0, 2: 1.0}  # fake seconds per step by the number of adapted blocks
    clock = SimpleNamespace(now=0.0, calls=0)

    def advance(module, args, kwargs):
        adapted = {int(n.split(".layers.")[1].split(".")[0]) for n, p in model.named_parameters() if p.requires_grad}
        clock.calls += 1
        # warm-up steps are slow, timed ones drift a little
        clock.now += 100.0 if clock.calls <= len(placements) else cost[len(adapted)] * (1 + clock.calls / 1000)

    model.register_forward_pre_hook(advance, with_kwargs=True)
    monkeypatch.setattr(calibrate_module, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    cal = calibrate(model, _batch(), placements=placements, steps=3, warmup=1, r=2)
    assert [layers for layers, _ in cal.timings] == [(0, 1, 2, 3), (2, 3)]
    # rounds (the start rotating): warm-up (all 1, top 2), then (top 3, all 4), (all 5, top 6), (top 7, all 8)
    assert dict(cal.timings)[(0, 1, 2, 3)] == pytest.approx(2.0 * 1.005)
    assert dict(cal.timings)[(2, 3)] == pytest.approx(1.0 * 1.006)


def test_a_failing_step_still_leaves_the_model_as_it_was():
    model = tiny_model("llama", n_layers=4)
    before = _snapshot(model)
    calls = []

    def fail_on_the_third(module, args, kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory, say")

    handle = model.register_forward_pre_hook(fail_on_the_third, with_kwargs=True)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="out of memory, say"):
        calibrate(model, _batch(), steps=1, warmup=1, r=2)
    _assert_same(before, _snapshot(model))
    handle.remove()
    cal = calibrate(model, _batch(), steps=1, warmup=0, r=2)  # and it can be calibrated again
    assert len(cal.timings) == 3


def test_empty_placements_are_refused():
    with pytest.raises(ValueError, match="placements is empty"):
        calibrate(tiny_model("llama", n_layers=4), _batch(), placements=[], r=2)
