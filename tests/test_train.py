import math

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel

from aletheia_lora import apply_aletheia_lora
from aletheia_lora.data import pad_collate
from aletheia_lora.train import (
    EMBEDDINGS,
    BackwardDepthMonitor,
    TrainConfig,
    count_input_require_grads_hooks,
    evaluate_loss,
    prepare_lora_model,
    train_lora,
)
from tiny_models import tiny_model, token_rows


def backward_depth(peft_model, rows):
    peft_model.train()
    with BackwardDepthMonitor(peft_model) as depth:
        peft_model(**pad_collate(rows, 0)).loss.backward()
    return depth.lowest


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_stops_at_the_lowest_selected_layer(arch, checkpointing):
    model = tiny_model(arch, n_layers=6)
    peft_model = prepare_lora_model(
        model, apply_aletheia_lora(model, [3, 5], r=2), gradient_checkpointing=checkpointing
    )
    assert count_input_require_grads_hooks(peft_model) == 0
    assert backward_depth(peft_model, token_rows(2)) == 3


def test_input_grad_hooks_are_removed_with_a_warning(caplog):
    model = tiny_model("llama", n_layers=4)
    model.enable_input_require_grads()
    model.enable_input_require_grads()
    assert count_input_require_grads_hooks(model) == 2
    peft_model = prepare_lora_model(model, apply_aletheia_lora(model, [2, 3], r=2), gradient_checkpointing=True)
    assert "2 input-require-grads hook(s)" in caplog.text
    assert count_input_require_grads_hooks(peft_model) == 0
    assert backward_depth(peft_model, token_rows(2)) == 2


def test_the_monitor_sees_a_backward_into_the_embeddings():
    model = tiny_model("llama", n_layers=4)
    peft_model = prepare_lora_model(model, apply_aletheia_lora(model, [2, 3], r=2))
    peft_model.enable_input_require_grads()
    assert backward_depth(peft_model, token_rows(2)) == EMBEDDINGS


def test_prepare_rejects_a_peft_model_and_a_bad_config():
    model = tiny_model("llama", n_layers=2)
    peft_model = prepare_lora_model(model, apply_aletheia_lora(model, [1], r=2))
    with pytest.raises(TypeError, match="model is already a PeftModel"):
        prepare_lora_model(peft_model, apply_aletheia_lora(model, [1], r=2))
    with pytest.raises(TypeError, match="lora_config must be a peft LoraConfig, got dict"):
        prepare_lora_model(tiny_model("llama", 2), {"r": 2})


def test_evaluate_loss_is_the_token_weighted_mean():
    model = tiny_model("llama", n_layers=2)
    rows = token_rows(5, vary=True)
    total, tokens = 0.0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        total += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        tokens += ids.shape[1] - 1
    result = evaluate_loss(model, rows, batch_size=2)
    assert result["tokens"] == tokens
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    with pytest.raises(ValueError, match="cannot evaluate on an empty dataset"):
        evaluate_loss(model, [])


def repetitive_rows(n=24, length=16):
    pattern = [5, 9, 13, 17, 21, 25, 29, 33]
    return [{"input_ids": (pattern * 4)[i % 8 : i % 8 + length]} for i in range(n)]


def test_train_lora_learns_saves_and_resumes(tmp_path):
    base = tiny_model("llama", n_layers=4)
    rows = repetitive_rows()
    before = evaluate_loss(base, rows[:8])["loss"]
    config = TrainConfig(max_steps=8, learning_rate=5e-3, batch_size=4, save_steps=4, logging_steps=2, progress=False)
    result = train_lora(base, apply_aletheia_lora(base, [2, 3], r=4), rows, rows[:8], config, output_dir=tmp_path)
    assert result.lowest_layer_reached == 2
    assert len(result.step_times) == 8
    assert result.trainable_parameters == sum(p.numel() for n, p in result.model.named_parameters() if "lora_" in n)
    after = evaluate_loss(result.model, rows[:8])["loss"]
    assert after < before - 0.05
    # the adapter reloads with plain PEFT and reproduces the trained model
    reloaded = PeftModel.from_pretrained(tiny_model("llama", n_layers=4), result.adapter_dir)
    batch = pad_collate(rows[:3], 0)
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, result.model(**batch).logits, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-8"]
    # resuming from the last checkpoint with more steps continues from step 8
    more = TrainConfig(max_steps=10, learning_rate=5e-3, batch_size=4, save_steps=4, logging_steps=2, progress=False)
    fresh = tiny_model("llama", n_layers=4)
    resumed = train_lora(
        fresh, apply_aletheia_lora(fresh, [2, 3], r=4), rows, None, more, output_dir=tmp_path, resume=True
    )
    assert len(resumed.step_times) == 2
    assert resumed.log_history[-1]["step"] == 10


def test_resume_without_checkpoint_fails_clearly(tmp_path):
    model = tiny_model("llama", n_layers=2)
    with pytest.raises(ValueError, match="--resume: no checkpoint found in"):
        train_lora(model, apply_aletheia_lora(model, [1]), token_rows(4), output_dir=tmp_path, resume=True)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"max_steps": 0}, ValueError, "--max-steps must be a positive integer, got 0"),
        ({"batch_size": 2.5}, TypeError, "--batch-size must be an integer, got 2.5"),
        ({"learning_rate": 0}, ValueError, "--learning-rate must be positive, got 0"),
        ({"learning_rate": "1e-4"}, TypeError, "--learning-rate must be a finite number, got '1e-4'"),
        ({"warmup_steps": -1}, ValueError, "--warmup-steps must be >= 0, got -1"),
        ({"lr_scheduler_type": "step"}, ValueError, "--lr-scheduler-type must be linear, cosine or constant"),
        ({"gradient_checkpointing": "yes"}, TypeError, "--gradient-checkpointing must be true or false, got 'yes'"),
    ],
)
def test_train_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        TrainConfig(**kwargs)
