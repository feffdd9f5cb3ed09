import math

import pytest
import torch
import transformers as T
from peft import get_peft_model

from aletheia_lora.calibrate import calibrate, default_placements
from aletheia_lora.config import apply_aletheia_lora
from aletheia_lora.cost import Calibration, CostModel, predict_speedup, step_cost
from tiny_models import ARCHITECTURES, tiny_model, token_rows


def llama_config(n_layers=4, hidden=32, intermediate=64, heads=4, kv_heads=2, vocab=96):
    return T.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=n_layers,
    )


SMOLLM2 = llama_config(30, 576, 1536, 9, 3, 49152)


def test_flops_match_a_hand_count_on_a_tiny_llama():
    h, inter, q, kv, vocab, s, b, r = 32, 64, 32, 16, 96, 8, 2, 4
    tokens = s * b
    linears = 2 * (h * q + h * kv + h * kv + q * h + 3 * h * inter)  # per token
    attention = 4 * s * q  # scores + weighted sum, per token
    block_fwd = (linears + attention) * tokens
    block_bwd = (linears + 2 * attention) * tokens  # activation grads only; both attention operands need grads
    head = 2 * h * vocab * tokens
    width = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + inter) + (inter + h)  # sum of in + out over 7 projections
    lora_fwd, lora_bwd, params = 2 * r * width * tokens, 4 * r * width * tokens, r * width

    cost = step_cost(llama_config(4), [3, 2], seq_len=s, batch_size=b, r=r, optimizer_flops_per_param=12)
    assert cost.forward == 4 * block_fwd + head
    assert cost.backward == head + 2 * block_bwd
    assert cost.recompute == 0
    assert cost.lora == 2 * (lora_fwd + lora_bwd)
    assert cost.trainable_params == 2 * params
    assert cost.optimizer == 12 * 2 * params
    assert (cost.lowest_layer, cost.backward_layers, cost.adapted_layers) == (2, 2, (2, 3))
    assert cost.total == cost.forward + cost.backward + cost.lora + cost.optimizer

    # Checkpointing (with the embedding hook transformers registers): every block runs backward and re-forward.
    ckpt = step_cost(llama_config(4), [2, 3], seq_len=s, batch_size=b, r=r, gradient_checkpointing=True)
    assert ckpt.backward == head + 4 * block_bwd
    assert ckpt.recompute == 4 * block_fwd + 2 * lora_fwd
    # Non-reentrant checkpointing with the hook removed: only the blocks from the lowest adapted one up.
    hookless = step_cost(
        llama_config(4), [2, 3], seq_len=s, batch_size=b, r=r, gradient_checkpointing=True,
        backward_to_embeddings=False,
    )  # fmt: skip
    assert hookless.backward == head + 2 * block_bwd
    assert hookless.recompute == 2 * block_fwd + 2 * lora_fwd


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_config_and_module_counts_agree_and_match_peft(arch):
    model = tiny_model(arch, n_layers=4)
    from_model = CostModel.from_model(model, seq_len=16, r=4)
    from_config = CostModel.from_model(model.config, seq_len=16, r=4)
    for field in ("block_forward", "block_backward", "head_forward", "lora_forward", "lora_backward", "lora_params"):
        assert getattr(from_model, field) == getattr(from_config, field), field
    assert from_model.speedup(range(4)) == 1.0
    assert 1 < from_model.speedup([2, 3]) < 2
    # the adapter parameter count is PEFT's own
    peft_model = get_peft_model(model, apply_aletheia_lora(model, [1, 3], r=4))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert from_model.step_cost([1, 3]).trainable_params == trainable
    # a PEFT-wrapped model is costed as its base model
    assert CostModel.from_model(peft_model, seq_len=16, r=4).block_forward == from_model.block_forward


def test_higher_lowest_layer_is_faster_at_equal_budget():
    cost = CostModel.from_model(SMOLLM2, seq_len=128, batch_size=2, r=8)
    speedups = [cost.speedup([m, *range(26, 30)]) for m in range(0, 26)]
    assert all(a < b for a, b in zip(speedups, speedups[1:]))
    # With layer 0 adapted the backward runs through everything: only the halved adapter cost is saved.
    every_other = cost.speedup(range(0, 30, 2))
    assert 1 < every_other < 1.03
    top_half = cost.speedup(range(15, 30))
    assert 1.2 < top_half < 1.35


def test_uniform_model():
    assert CostModel.uniform(8).speedup(range(4, 8)) == pytest.approx(1 / 0.75)
    assert CostModel.uniform(8).speedup([0, 7]) == 1.0
    assert CostModel.uniform(8).speedup(range(8)) == 1.0
    # a fixed share of 20 %: (0.2 + 0.8) / (0.2 + 0.8 * 0.75)
    assert CostModel.uniform(8, head_share=0.2).speedup(range(4, 8)) == pytest.approx(1 / 0.8)
    assert CostModel.uniform(8, backward_to_embeddings=True).speedup(range(4, 8)) == 1.0
    # checkpointing without the hook: all = 3 * 8, top half = 8 + 4 + 4
    assert CostModel.uniform(8, gradient_checkpointing=True).speedup(range(4, 8)) == pytest.approx(1.5)
    assert CostModel.uniform(8)(range(4, 8)) == CostModel.uniform(8).speedup(range(4, 8))


def test_gradient_checkpointing_slows_steps_like_the_measured_table():
    config = SMOLLM2
    plain = step_cost(config, range(30), seq_len=128, batch_size=2, r=8).total
    ckpt = step_cost(config, range(30), seq_len=128, batch_size=2, r=8, gradient_checkpointing=True).total
    assert 1.3 < ckpt / plain < 1.45  # measured on CPU: 1.42
    hooked = predict_speedup(config, range(15, 30), seq_len=128, batch_size=2, r=8, backward_to_embeddings=True)
    assert 1 < hooked < 1.02


def test_target_modules_match_by_suffix_as_peft_does():
    model = tiny_model("gpt2", n_layers=2)
    both = CostModel.from_model(model, target_modules=["c_proj"], r=2)
    attn = CostModel.from_model(model, target_modules=["attn.c_proj"], r=2)
    assert both.lora_params[0] == 2 * ((32 + 32) + (128 + 32))
    assert attn.lora_params[0] == 2 * (32 + 32)


def test_config_shapes_for_other_families():
    # Falcon multi-query: one key and one value head; GPT-2's n_inner defaults to 4 * hidden.
    falcon = T.FalconConfig(vocab_size=10, hidden_size=64, num_hidden_layers=1, num_attention_heads=8)
    gpt2 = T.GPT2Config(vocab_size=10, n_embd=64, n_layer=1, n_head=8)
    f = CostModel.from_model(falcon, seq_len=1, r=1)
    g = CostModel.from_model(gpt2, seq_len=1, r=1)
    assert f.block_forward[0] == 2 * (64 * (64 + 2 * 8) + 64 * 64 + 2 * 64 * 256) + 4 * 64
    assert g.block_forward[0] == 2 * (64 * 192 + 64 * 64 + 2 * 64 * 256) + 4 * 64


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((llama_config(), []), {}, ValueError, "selected_layers is empty"),
        ((llama_config(), [4]), {}, ValueError, "selected_layers holds 4, out of range for a model with 4"),
        ((llama_config(), "12"), {}, TypeError, "selected_layers must be a list of layer indices, got str"),
        ((llama_config(), [1, 1]), {}, ValueError, r"selected_layers holds duplicates: \[1\]"),
        ((llama_config(), [1]), {"seq_len": 0}, ValueError, "seq_len must be a positive integer, got 0"),
        ((llama_config(), [1]), {"r": "8"}, TypeError, r"r must be a positive integer, got '8' \(str\)"),
        ((llama_config(), [1]), {"batch_size": 1.5}, TypeError, "batch_size must be a positive integer"),
        ((llama_config(), [1]), {"gradient_checkpointing": 1}, TypeError, "gradient_checkpointing must be True"),
        ((llama_config(), [1]), {"optimizer_flops_per_param": -1}, ValueError, "optimizer_flops_per_param must"),
        ((llama_config(), [1]), {"target_modules": "q_proj"}, TypeError, "target_modules must be a list"),
        ((llama_config(), [1]), {"target_modules": ["qkv"]}, ValueError, "target module 'qkv' is not in llama"),
        (({"hidden_size": 8}, [1]), {}, TypeError, "model_or_config must be a torch model or a transformers"),
        ((T.PretrainedConfig(), [1]), {}, ValueError, r"sets none of \['hidden_size', 'n_embd', 'd_model'\]"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        predict_speedup(*args, **kwargs)


def test_uniform_bad_input():
    with pytest.raises(ValueError, match=r"head_share must be in \[0, 1\), got 1"):
        CostModel.uniform(4, head_share=1)
    with pytest.raises(TypeError, match="num_layers must be a positive integer, got '4'"):
        CostModel.uniform("4")


def test_calibration_fit_recovers_known_costs():
    fixed, per_block, per_adapter = 0.5, 0.01, 0.004

    def seconds(layers):
        return fixed + per_block * (30 - min(layers)) + per_adapter * len(layers)

    timings = {tuple(p): seconds(p) for p in default_placements(30)}
    cal = Calibration.fit(30, timings)
    assert (cal.fixed_s, cal.per_backward_block_s, cal.per_adapted_block_s) == pytest.approx(
        (fixed, per_block, per_adapter)
    )
    assert cal.speedup(range(15, 30)) == pytest.approx(seconds(range(30)) / seconds(range(15, 30)))
    assert cal(range(15, 30)) == cal.speedup(range(15, 30))
    assert cal.timings[0] == (tuple(range(30)), seconds(range(30)))


def test_calibration_fit_keeps_costs_non_negative_and_handles_unseparable_effects():
    # Noise that makes the free fit's per-adapter cost negative: it is dropped, the rest refitted.
    cal = Calibration.fit(4, {(0, 1, 2, 3): 1.0, (2, 3): 0.8, (1, 3): 1.0})
    assert min(cal.fixed_s, cal.per_backward_block_s, cal.per_adapted_block_s) >= 0
    # Every placement reaches the embeddings: the per-block backward is part of the fixed cost.
    hooked = Calibration.fit(4, {(0, 1, 2, 3): 1.0, (2, 3): 0.9}, backward_to_embeddings=True)
    assert hooked.per_backward_block_s == 0
    assert hooked.step_time([2, 3]) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="timings is empty"):
        Calibration.fit(4, {})


def test_predict_speedup_with_a_calibration():
    cal = Calibration.fit(4, {(0, 1, 2, 3): 1.0, (2, 3): 0.7, (1, 3): 0.8})
    config = llama_config(4)
    assert predict_speedup(config, [2, 3], calibration=cal) == pytest.approx(1 / 0.7)
    with pytest.raises(ValueError, match="the calibration was measured on 4 layers, the model has 6"):
        predict_speedup(llama_config(6), [2, 3], calibration=cal)
    with pytest.raises(ValueError, match="gradient_checkpointing=True, but the calibration was measured with"):
        predict_speedup(config, [2, 3], calibration=cal, gradient_checkpointing=True)
    with pytest.raises(TypeError, match="calibration must be a Calibration from calibrate"):
        predict_speedup(config, [2, 3], calibration={"fixed": 1})


def test_calibrate_runs_real_steps_and_leaves_the_model_as_it_was():
    model = tiny_model("llama", n_layers=4)
    before = {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    batch = {"input_ids": torch.tensor([row["input_ids"] for row in token_rows(2, 10)])}
    cal = calibrate(model, batch, steps=1, warmup=0, r=2)
    assert [layers for layers, _ in cal.timings] == [tuple(p) for p in default_placements(4)]
    assert all(t > 0 for _, t in cal.timings)
    assert (cal.num_layers, cal.backward_to_embeddings, cal.gradient_checkpointing) == (4, False, False)
    assert math.isfinite(predict_speedup(model, [2, 3], calibration=cal))
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], p) and after[n].requires_grad == grad for n, (p, grad) in before.items())
    assert not any("lora" in name for name, _ in model.named_modules())
    assert not model.training

    with pytest.raises(TypeError, match="batch must be a mapping with an 'input_ids' tensor"):
        calibrate(model, batch["input_ids"])
    peft_model = get_peft_model(model, apply_aletheia_lora(model, [3], r=2))
    with pytest.raises(ValueError, match="model already has LoRA adapters"):
        calibrate(peft_model, batch)
