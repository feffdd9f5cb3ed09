"""Re-probing: moving the trainable adapters between blocks, the Trainer callback, and `run --reprobe-every`."""

import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file

import aletheia_lora.reprobe as reprobe_module
from aletheia_lora import apply_aletheia_lora, find_decoder_stack
from aletheia_lora.cli import main
from aletheia_lora.data import pad_collate
from aletheia_lora.integrations import AletheiaCallback
from aletheia_lora.reprobe import ReprobeCallback, reselect, set_trainable_layers, uncovered_layers
from aletheia_lora.select import SelectConfig
from aletheia_lora.train import BackwardDepthMonitor, TrainConfig, prepare_lora_model, train_lora
from test_cli import TRAIN, reloaded_eval_loss, tiny_args
from test_integrations import train
from tiny_models import tiny_model, token_rows


def lora_everywhere(arch="llama", n_layers=4, seed=0):
    model = tiny_model(arch, n_layers, seed=seed)
    return prepare_lora_model(model, apply_aletheia_lora(model, list(range(n_layers)), r=4, lora_alpha=8))


def block_state(model):
    """Per block: (adapters switched on, every adapter parameter trainable, any trainable)."""
    stack = find_decoder_stack(model)
    out = []
    for block in stack.blocks:
        tuners = [m for m in block.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A")]
        params = [p for n, p in block.named_parameters() if "lora_" in n]
        out.append(
            (not any(m.disable_adapters for m in tuners), all(p.requires_grad for p in params),
             any(p.requires_grad for p in params))
        )  # fmt: skip
    return out


def lora_b(model, layer):
    stack = find_decoder_stack(model)
    return {n: p.detach().clone() for n, p in stack.blocks[layer].named_parameters() if "lora_B" in n}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "mixtral"])
def test_moving_trains_the_chosen_blocks_freezes_trained_ones_and_switches_off_untouched_ones(arch):
    model = lora_everywhere(arch)
    rows = pad_collate(token_rows(2), 0)
    with torch.no_grad():
        before = model(**rows).logits
    states = set_trainable_layers(model, [2, 3])
    assert states == {"trainable": [2, 3], "frozen": [], "disabled": [0, 1]}
    assert block_state(model) == [(False, False, False), (False, False, False), (True, True, True), (True, True, True)]
    with torch.no_grad():  # adapters with lora_B = 0 change nothing, on or off
        assert torch.equal(model(**rows).logits, before)
    # block 2 learns something, then the selection moves to blocks 1 and 3
    with torch.no_grad():
        for n, p in find_decoder_stack(model).blocks[2].named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    with torch.no_grad():
        learned = model(**rows).logits
    states = set_trainable_layers(model, [1, 3])
    assert states == {"trainable": [1, 3], "frozen": [2], "disabled": [0]}
    assert block_state(model) == [(False, False, False), (True, True, True), (True, False, False), (True, True, True)]
    with torch.no_grad():  # the frozen block still applies what it learned
        assert torch.equal(model(**rows).logits, learned)
    model.train()
    with BackwardDepthMonitor(model) as depth:
        model(**rows).loss.backward()
    assert depth.lowest == 1  # frozen and switched-off adapters below need no gradient
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    layers_with_grads = {find_decoder_stack(model).layer_of(n.removeprefix("base_model.model.")) for n in grads}
    assert layers_with_grads == {1, 3}


def test_moving_refuses_blocks_without_adapters_and_bad_layers():
    model = tiny_model("llama", 4)
    peft_model = prepare_lora_model(model, apply_aletheia_lora(model, [2, 3], r=4, lora_alpha=8))
    assert uncovered_layers(peft_model) == [0, 1]
    with pytest.raises(ValueError, match=r"layers \[1\] hold no LoRA adapter"):
        set_trainable_layers(peft_model, [1, 3])
    with pytest.raises(ValueError, match="selected_layers"):
        set_trainable_layers(peft_model, [7])


def test_reselect_probes_the_adapted_model_and_leaves_it_as_found():
    model = lora_everywhere()
    set_trainable_layers(model, [0, 1])
    flags = [p.requires_grad for p in model.parameters()]
    scores, layers, seconds = reselect(model, token_rows(6), select=SelectConfig(top_k=2), seed=3)
    assert sorted(scores) == [0, 1, 2, 3] and len(layers) == 2 and seconds >= 0
    assert layers == sorted(sorted(scores, key=lambda i: (-scores[i], i))[:2])
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_callback_checks_its_settings():
    with pytest.raises(ValueError, match=r"every \(--reprobe-every\) must be a positive integer, got 0"):
        ReprobeCallback(token_rows(4), 0)
    with pytest.raises(TypeError, match="select must be a SelectConfig, got dict"):
        ReprobeCallback(token_rows(4), 2, select={"top_k": 2})


def test_callback_refuses_several_processes_uncovered_blocks_and_an_optimizer_without_the_adapters():
    rows = token_rows(4)
    state = SimpleNamespace(global_step=0, max_steps=4)
    model = lora_everywhere()
    with pytest.raises(ValueError, match="runs in one process, not 2"):
        ReprobeCallback(rows, 2).on_train_begin(SimpleNamespace(world_size=2), state, None, model=model)
    base = tiny_model("llama", 4)
    partial = prepare_lora_model(base, apply_aletheia_lora(base, [3], r=4, lora_alpha=8))
    with pytest.raises(ValueError, match=r"blocks \[0, 1, 2\] have none"):
        ReprobeCallback(rows, 2).on_train_begin(SimpleNamespace(world_size=1), state, None, model=partial)
    # an optimizer built after freezing all but block 3 could never train another block
    set_trainable_layers(model, [3])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match=r"does not hold the adapters of blocks \[0, 1, 2\]"):
        ReprobeCallback(rows, 2, layers=[3]).on_train_begin(
            SimpleNamespace(world_size=1), state, None, model=model, optimizer=optimizer
        )


def test_train_lora_needs_the_callback_for_reprobe_every(tmp_path):
    model = tiny_model("llama", 4)
    config = apply_aletheia_lora(model, list(range(4)), r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="--reprobe-every 2 needs a ReprobeCallback"):
        train_lora(model, config, token_rows(4), config=TrainConfig(reprobe_every=2), output_dir=tmp_path)
    with pytest.raises(ValueError, match="--reprobe-every must be >= 0, got -1"):
        TrainConfig(reprobe_every=-1)


def cycling_selection(monkeypatch, selections):
    """Make every re-probe's selection the next of ``selections`` (the probe still runs)."""
    picks = iter(selections)
    monkeypatch.setattr(reprobe_module, "select_layers", lambda scores, **kwargs: next(picks))


def test_trainer_with_the_callback_moves_adapters_and_frozen_blocks_keep_what_they_learned(tmp_path, monkeypatch):
    """A plain transformers Trainer plus the callback: probe at the start, then a move every 2 steps."""
    model = tiny_model("llama", 4)
    peft_model = get_peft_model(model, apply_aletheia_lora(model, list(range(4)), r=4, lora_alpha=8))
    cycling_selection(monkeypatch, [[0, 1], [2, 3], [2, 3]])
    callback = ReprobeCallback(token_rows(8), 2, select=SelectConfig(top_k=2), history_path=tmp_path / "h.json")
    seen = {}

    class Watch(ReprobeCallback.__mro__[1]):  # a TrainerCallback recording block 0's B after each step
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = lora_b(peft_model, 0)

    train(peft_model, token_rows(8), tmp_path / "t", [callback, Watch()], steps=5, learning_rate=0.05)
    history = json.loads((tmp_path / "h.json").read_text())
    assert [h["step"] for h in history["history"]] == [0, 2, 4]
    assert [h["layers"] for h in history["history"]] == [[0, 1], [2, 3], [2, 3]]
    assert history["history"][1]["moved_in"] == [2, 3] and history["history"][1]["moved_out"] == [0, 1]
    assert history["probes"] == 2 and history["layers_ever_trained"] == [0, 1, 2, 3]
    # block 0 trained for steps 1-2, then stayed frozen with what it learned
    assert any(bool(torch.any(v != 0)) for v in seen[2].values())
    for step in (3, 4, 5):
        assert all(torch.equal(seen[step][n], seen[2][n]) for n in seen[2])
    assert block_state(peft_model) == [(True, False, False), (True, False, False), (True, True, True),
                                       (True, True, True)]  # fmt: skip


def test_callback_without_layers_probes_at_the_start(tmp_path):
    model = tiny_model("llama", 4)
    peft_model = get_peft_model(model, apply_aletheia_lora(model, list(range(4)), r=4, lora_alpha=8))
    callback = ReprobeCallback(token_rows(8), 10, select=SelectConfig(top_k=1))
    train(peft_model, token_rows(8), tmp_path, [callback], steps=2)
    first = callback.history[0]
    assert first["step"] == 0 and len(first["layers"]) == 1 and first["scores"] is not None
    assert callback.summary()["probes"] == 0  # no re-probe within 2 steps of 10
    assert [s[2] for s in block_state(peft_model)] == [i in first["layers"] for i in range(4)]


def test_run_with_reprobe_every_reports_the_moves_and_the_adapter_reproduces_the_model(
    tiny_checkpoint, tiny_corpus, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    cycling_selection(monkeypatch, [[2, 3], [1, 2]])
    args = tiny_args(tiny_checkpoint, tiny_corpus, out, *TRAIN, "--top-pct", "50", "--reprobe-every", "2")
    assert main(["run", *args, "--max-steps", "5", "--learning-rate", "0.01"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    first = report["selection"]["selected_layers"]
    history = report["reprobe"]["history"]
    assert [h["step"] for h in history] == [0, 2, 4]
    assert [h["layers"] for h in history] == [first, [2, 3], [1, 2]]
    assert report["reprobe"] == json.loads((out / "reprobe.json").read_text())
    assert (out / "reprobe.png").stat().st_size > 0
    assert report["train"]["lowest_layer_reached"] == min(min(h["layers"]) for h in history)
    assert report["train"]["trainable_parameters"] > 0
    # the adapter covers every block; blocks never trained hold lora_B = 0, and plain PEFT reproduces the model
    model, loss = reloaded_eval_loss(tiny_checkpoint, tiny_corpus, out / "adapter")
    assert loss == pytest.approx(report["eval_after"]["target"]["loss"], rel=1e-5)
    trained = set(report["reprobe"]["layers_ever_trained"])
    for layer in range(4):
        nonzero = any(bool(torch.any(v != 0)) for v in lora_b(model, layer).values())
        assert nonzero == (layer in trained)


def test_resumed_reprobing_run_ends_where_an_uninterrupted_one_does(tiny_checkpoint, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny_checkpoint, tiny_corpus, out, *TRAIN, "--top-k", "2", "--reprobe-every", "2")
    args += ["--max-steps", "6", "--learning-rate", "0.01", "--strategy", "score"]
    assert main(["train", *args]) == 0
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    history = json.loads((out / "reprobe.json").read_text())["history"]
    # lose the end of the run: the last checkpoint and the adapter; resume from step 4
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    shutil.rmtree(out / "adapter")
    assert main(["train", *args, "--resume"]) == 0
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert final.keys() == resumed.keys()
    for name in final:
        torch.testing.assert_close(resumed[name], final[name], rtol=1e-6, atol=1e-6)
    assert json.loads((out / "reprobe.json").read_text())["history"] == history


def test_run_refuses_reprobing_with_score_ranks(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    args = tiny_args(tiny_checkpoint, tiny_corpus, tmp_path / "r", *TRAIN, "--reprobe-every", "2")
    assert main(["run", *args, "--rank-allocation", "scores"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reprobe-every does not combine with --rank-allocation scores" in err[0]


def test_with_aletheia_callback_and_checkpointing_each_step_stops_at_the_current_lowest_block(
    tmp_path, monkeypatch, caplog
):
    """Re-probing beside AletheiaCallback under activation checkpointing: hooks removed, depth follows the moves."""
    model = tiny_model("llama", 4)
    peft_model = get_peft_model(model, apply_aletheia_lora(model, list(range(4)), r=4, lora_alpha=8))
    cycling_selection(monkeypatch, [[2, 3], [1, 3], [2, 3]])
    watch = AletheiaCallback()
    reprobe = ReprobeCallback(token_rows(8), 2, select=SelectConfig(top_k=2))
    with caplog.at_level(logging.WARNING, logger="aletheia_lora"):
        train(peft_model, token_rows(8), tmp_path, [reprobe, watch], steps=5, activation_checkpointing=True)
    assert watch.removed_hooks >= 1
    assert watch.backward_depths == [(1, 2), (2, 2), (3, 1), (4, 1), (5, 2)]
    assert not [r for r in caplog.records if "below the lowest adapted block" in r.getMessage()]
