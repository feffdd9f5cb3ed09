import math

import pytest
import torch
import transformers as T
from peft import get_peft_model

from aletheia_lora.calibrate import calibrate, default_placements
from aletheia_lora.config import apply_aletheia_lora
from aletheia_lora.cost import (
    CALIBRATED_ERROR_BAND,
    COST_MODEL_ERROR_BAND,
    Calibration,
    CostModel,
    describe_prediction,
    predict_speedup,
    step_cost,
)
from aletheia_lora.overheads import CPU_OVERHEADS, Overheads
from aletheia_lora.timeline import predict_timeline
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
    # FLOPs alone (overheads=None): the count before issue 19, its bounds unchanged
    cost = CostModel.from_model(SMOLLM2, seq_len=128, batch_size=2, r=8, overheads=None)
    speedups = [cost.speedup([m, *range(26, 30)]) for m in range(0, 26)]
    assert all(a < b for a, b in zip(speedups, speedups[1:]))
    # With layer 0 adapted the backward runs through everything: only the halved adapter cost is saved.
    every_other = cost.speedup(range(0, 30, 2))
    assert 1 < every_other < 1.03
    top_half = cost.speedup(range(15, 30))
    assert 1.2 < top_half < 1.35
    # with the overheads (the default) the same order; the adapters cost several times their FLOPs
    priced = CostModel.from_model(SMOLLM2, seq_len=128, batch_size=2, r=8)
    speedups = [priced.speedup([m, *range(26, 30)]) for m in range(0, 26)]
    assert all(a < b for a, b in zip(speedups, speedups[1:]))
    assert 1.05 < priced.speedup(range(0, 30, 2)) < 1.1
    assert top_half < priced.speedup(range(15, 30)) < 1.4


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
    hooked = predict_speedup(
        config, range(15, 30), seq_len=128, batch_size=2, r=8, backward_to_embeddings=True, overheads=None
    )
    assert 1 < hooked < 1.02
    # priced with overheads, the hooked top half still saves only its adapters: far less than the unhooked one
    hooked = predict_speedup(config, range(15, 30), seq_len=128, batch_size=2, r=8, backward_to_embeddings=True)
    assert 1.05 < hooked < 1.1 < predict_speedup(config, range(15, 30), seq_len=128, batch_size=2, r=8)


def test_target_modules_match_by_suffix_as_peft_does():
    model = tiny_model("gpt2", n_layers=2)
    both = CostModel.from_model(model, target_modules=["c_proj"], r=2)
    attn = CostModel.from_model(model, target_modules=["attn.c_proj"], r=2)
    assert both.lora_params[0] == 2 * ((32 + 32) + (128 + 32))
    assert attn.lora_params[0] == 2 * (32 + 32)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_module_ranks_price_the_adapters_peft_builds(arch):
    """attention_r / mlp_r (the paper's 16 / 64): the cost model counts the parameters PEFT injects, block by block,
    and prices the larger MLP adapters above a uniform rank's."""
    model = tiny_model(arch, n_layers=2)
    cost = CostModel.from_model(model, seq_len=8, r=4, attention_r=8, mlp_r=32)
    peft = get_peft_model(model, apply_aletheia_lora(model, [1], r=4, attention_r=8, mlp_r=32))
    injected = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    assert cost.lora_params[1] == injected
    uniform = CostModel.from_model(tiny_model(arch, n_layers=2), seq_len=8, r=4)
    assert cost.lora_forward[1] > uniform.lora_forward[1]
    assert cost.step_cost([1]).total > uniform.step_cost([1]).total
    assert "r=4, attention_r=8, mlp_r=32" in cost.description
    from_config = CostModel.from_model(model.config, seq_len=8, r=4, attention_r=8, mlp_r=32)  # qualified targets
    assert from_config.lora_params == cost.lora_params


def test_a_qualified_target_the_user_names_gets_the_rank_peft_gives_it():
    # apply_aletheia_lora looks a target's kind up by its exact name: "self_attn.q_proj" is of no known kind, so PEFT
    # gives it r, not attention_r; the cost model must price it so too
    model = tiny_model("llama", n_layers=2)
    targets = ["self_attn.q_proj", "v_proj"]
    cost = CostModel.from_model(model, seq_len=8, r=4, attention_r=8, target_modules=targets)
    peft = get_peft_model(model, apply_aletheia_lora(model, [1], r=4, attention_r=8, target_modules=targets))
    assert cost.lora_params[1] == sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="mlp_r"):
        CostModel.from_model(model, mlp_r=0)


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


# --- overheads: what a step costs beyond its FLOPs (issue 19) ------------------------------------------------

SIMPLE = Overheads(*range(1, 11))  # easy to count by hand: attention 1/2, elementwise 3/4, loss 5/6, adapters 7/8...


def test_overheads_match_a_hand_count_on_a_tiny_llama():
    h, q, kv, inter, vocab, s, b, r = 32, 32, 16, 64, 96, 8, 2, 4
    tokens, heads = s * b, 4
    width = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + inter) + (inter + h)  # every projection is adapted
    scores = s * heads * tokens  # attention scores per block: seq_len per token and head
    cost = CostModel.from_model(llama_config(4), seq_len=s, batch_size=b, r=r, overheads=SIMPLE)
    assert cost.block_forward_overhead == (1 * scores + 3 * width * tokens,) * 4
    assert cost.block_backward_overhead == (2 * scores + 4 * width * tokens,) * 4
    assert (cost.head_forward_overhead, cost.head_backward_overhead) == (5 * vocab * tokens, 6 * vocab * tokens)
    assert cost.lora_forward_overhead == (7 * width * tokens,) * 4
    assert cost.lora_backward_overhead == (8 * width * tokens,) * 4
    assert cost.lora_update_overhead == (9 * 2 * 7 + 10 * r * width,) * 4  # two tensors per adapted module
    assert cost.batch_size == b and cost.description.endswith("FLOPs + measured CPU overheads")

    step = cost.step_cost([3, 2])
    flops = step_cost(llama_config(4), [3, 2], seq_len=s, batch_size=b, r=r, overheads=None)
    assert (step.forward, step.backward, step.lora, step.total) == (
        flops.forward,
        flops.backward,
        flops.lora,
        flops.total,
    )
    blocks = 4 * cost.block_forward_overhead[0] + 2 * cost.block_backward_overhead[0]
    head = cost.head_forward_overhead + cost.head_backward_overhead
    adapters = 2 * (cost.lora_forward_overhead[0] + cost.lora_backward_overhead[0] + cost.lora_update_overhead[0])
    assert step.overhead == pytest.approx(blocks + head + adapters)
    assert step.effective == step.total + step.overhead and flops.overhead == 0 and flops.effective == flops.total
    # the default prices with the constants measured on the benchmarks' CPU
    default = CostModel.from_model(llama_config(4), seq_len=s, batch_size=b, r=r)
    assert default == CostModel.from_model(llama_config(4), seq_len=s, batch_size=b, r=r, overheads=CPU_OVERHEADS)
    assert (CPU_OVERHEADS.adapter_forward, CPU_OVERHEADS.adapter_backward) == (100, 200)


def test_overheads_none_is_the_flop_count_and_uniform_has_none():
    flops = CostModel.from_model(SMOLLM2, seq_len=128, batch_size=4, r=8, overheads=None)
    assert flops.description.endswith("FLOPs only")
    assert set(flops.block_forward_overhead) == {0.0} and flops.head_backward_overhead == 0
    layers = range(15, 30)
    assert flops.speedup(layers) == pytest.approx(flops.step_cost(range(30)).total / flops.step_cost(layers).total)
    uniform = CostModel.uniform(8)
    assert uniform.lora_update_overhead == (0.0,) * 8 and uniform.step_cost([4, 5]).overhead == 0
    with pytest.raises(ValueError, match="block_forward_overhead has 2 entries for 1 blocks"):
        CostModel((1.0,), (1.0,), 0.0, 0.0, (0.0,), (0.0,), (0,), block_forward_overhead=(1.0, 2.0))
    with pytest.raises(TypeError, match="overheads must be an Overheads or None, got dict"):
        CostModel.from_model(SMOLLM2, overheads={"adapter_forward": 1})
    with pytest.raises(ValueError, match="adapter_backward must be"):
        Overheads(adapter_backward=-1)


def test_cost_model_on_smollm2_shapes_lands_near_the_committed_measurements():
    # SmolLM2-135M's shapes at the training benchmark's batch 4 x 128, r=8, and the layers of its arms
    # (bench/results/train_smollm2.json measured 1.11x / 1.29x / 1.39x; the FLOP count said 1.01x / 1.15x / 1.27x)
    cost = CostModel.from_model(SMOLLM2, seq_len=128, batch_size=4, r=8)
    score = [0, 1, 2, 3, 4, 5, 6, 8, 9, 11, 12, 16, 17, 19, 29]
    truncation = [*range(9, 22), 23, 29]
    assert cost.speedup(score) == pytest.approx(1.074, abs=0.002)
    assert cost.speedup(truncation) == pytest.approx(1.212, abs=0.002)
    assert cost.speedup(range(15, 30)) == pytest.approx(1.325, abs=0.002)
    # the prefix cache of the top half (bench/results/prefix_cache.json measured 1.69x)
    assert cost.speedup(range(15, 30), cached=True) == pytest.approx(1.696, abs=0.002)
    # the adapters: a few percent of the FLOPs, far more of the time
    step = cost.step_cost(range(30))
    adapters = step.lora + sum(cost.lora_forward_overhead) + sum(cost.lora_backward_overhead)
    assert step.lora / step.total < 0.03 and 0.1 < adapters / step.effective < 0.2


@pytest.mark.parametrize("checkpointing, hooked", [(False, False), (True, True), (True, False)])
def test_speedup_from_step_terms_equals_the_step_costs(checkpointing, hooked):
    cost = CostModel.from_model(
        SMOLLM2, seq_len=64, batch_size=2, r=8, gradient_checkpointing=checkpointing, backward_to_embeddings=hooked
    )
    every = cost.step_cost(range(30)).effective
    for layers in ([0, 29], range(15, 30), [*range(9, 22), 23, 29], [29]):
        assert cost.speedup(layers) == pytest.approx(every / cost.step_cost(layers).effective, rel=1e-12)
    terms = cost.step_terms()
    assert terms.by_lowest[15] + sum(terms.by_layer[15:]) == pytest.approx(cost.step_cost(range(15, 30)).effective)


def test_cached_and_frozen_steps():
    cost = CostModel.from_model(llama_config(4), seq_len=8, batch_size=2, r=4, overheads=SIMPLE)
    plain, cached = cost.step_cost([2, 3]), cost.step_cost([2, 3], cached=True)
    # the embeddings and blocks 0-1 do not run: their forward and its overhead are gone, nothing else
    assert cached.forward == plain.forward - 2 * cost.block_forward[0]
    assert cached.overhead == pytest.approx(plain.overhead - 2 * cost.block_forward_overhead[0])
    assert (cached.backward, cached.lora, cached.skipped_layers, plain.skipped_layers) == (
        plain.backward,
        plain.lora,
        2,
        0,
    )
    assert cost.speedup([2, 3], cached=True) == pytest.approx(cost.step_cost(range(4)).effective / cached.effective)
    assert cost.speedup([2, 3], cached=True) > cost.speedup([2, 3]) > 1
    assert cost.prefix_forward(2) == 2 * (cost.block_forward[0] + cost.block_forward_overhead[0])

    # progressive: frozen adapters below run forward only; a cache at block 1 skips block 0 and its adapters
    frozen = cost.step_cost([2, 3], frozen_layers=[0, 1])
    assert frozen.lora == plain.lora + 2 * cost.lora_forward[0] and frozen.frozen_layers == (0, 1)
    assert frozen.overhead == pytest.approx(plain.overhead + 2 * cost.lora_forward_overhead[0])
    assert frozen.trainable_params == plain.trainable_params and frozen.backward == plain.backward
    below = cost.step_cost([2, 3], frozen_layers=[0, 1], cache_block=1)
    assert (below.skipped_layers, below.frozen_layers) == (1, (1,))
    assert below.effective == pytest.approx(frozen.effective - cost.prefix_forward(1) - cost.lora_forward[0]
                                            - cost.lora_forward_overhead[0])  # fmt: skip
    assert cost.step_cost([2, 3], cache_block=2).effective == cached.effective
    assert cost.speedup([2, 3], frozen_layers=[0, 1]) < cost.speedup([2, 3])

    with pytest.raises(ValueError, match="frozen_layers holds 2, not below the lowest trainable block 2"):
        cost.step_cost([2, 3], frozen_layers=[1, 2])
    with pytest.raises(ValueError, match="frozen_layers holds 7, out of range for a model with 4 layers"):
        cost.step_cost([2, 3], frozen_layers=[7])
    with pytest.raises(ValueError, match="cache_block=3 is above the lowest trainable block 2"):
        cost.step_cost([2, 3], cache_block=3)
    with pytest.raises(TypeError, match="cached must be True or False"):
        cost.step_cost([2, 3], cached="yes")


def test_describe_prediction_states_basis_and_band():
    cost = CostModel.from_model(llama_config(4), seq_len=8)
    assert describe_prediction(1.2912, cost.description) == "1.29x ± 5% (cost model, not calibrated)"
    assert describe_prediction(1.2912, calibrated=True) == "1.29x ± 6% (calibrated on this machine)"
    flops = CostModel.from_model(llama_config(4), seq_len=8, overheads=None)
    assert describe_prediction(1.1, flops.description).endswith("FLOPs only; no measured error band)")
    assert describe_prediction(1.25, "uniform blocks (no model)") == (
        "1.25x (uniform blocks (no model); no measured error band)"
    )
    assert (COST_MODEL_ERROR_BAND, CALIBRATED_ERROR_BAND) == (0.05, 0.06)


# --- timeline: progressive freezing and prefix caches over a run --------------------------------------------------


def test_timeline_of_a_static_cached_run():
    cost = CostModel.from_model(llama_config(4), seq_len=8, batch_size=2, r=4)
    every = cost.step_cost(range(4)).effective
    plan = predict_timeline(cost, [{"step": 0, "lowest_trainable": 2}], 10, blocks=[2, 3],
                            cache_builds=[{"step": 0, "block": 2}], rows=6)  # fmt: skip
    (phase,) = plan.phases
    assert (phase.start, phase.end, phase.steps, phase.lowest_trainable, phase.cache_block) == (0, 10, 10, 2, 2)
    assert phase.speedup == pytest.approx(cost.speedup([2, 3], cached=True))
    build = cost.prefix_forward(2) * 6 / 2 / every  # 6 rows = 3 steps' prefix forward
    assert plan.builds == ((0, 2, pytest.approx(build)),)
    assert plan.step_units == pytest.approx(10 * phase.step_cost + build)
    assert plan.relative_time == pytest.approx(plan.step_units / 10) and plan.speedup == pytest.approx(
        10 / plan.step_units
    )
    assert plan.seconds(2.0) == pytest.approx(2 * plan.step_units) and plan.cost_model == cost.description


def test_timeline_of_a_progressive_run():
    cost = CostModel.from_model(llama_config(4), seq_len=8, batch_size=2, r=4)
    every = cost.step_cost(range(4)).effective
    timeline = [{"step": 0, "lowest_trainable": 0, "frozen": []}, {"step": 4, "lowest_trainable": 2, "frozen": [0, 1]}]
    plan = predict_timeline(cost, timeline, 10)
    assert [(p.start, p.end, p.lowest_trainable, p.cache_block) for p in plan.phases] == [
        (0, 4, 0, None),
        (4, 10, 2, None),
    ]
    assert plan.phases[0].step_cost == 1.0
    assert plan.phases[1].step_cost == pytest.approx(cost.step_cost([2, 3], frozen_layers=[0, 1]).effective / every)
    assert plan.builds == () and 0.5 < plan.relative_time < 1
    # the frozen prefix cached after step 6: a third phase without its forward, plus the build
    cached = predict_timeline(cost, timeline, 10, cache_builds=[{"step": 6, "block": 2}], rows=8)
    assert [(p.start, p.end, p.cache_block) for p in cached.phases] == [(0, 4, None), (4, 6, None), (6, 10, 2)]
    assert cached.phases[2].step_cost < cached.phases[1].step_cost
    assert cached.step_units == pytest.approx(
        4
        + 6 * plan.phases[1].step_cost
        - 4 * (cached.phases[1].step_cost - cached.phases[2].step_cost)
        + cost.prefix_forward(2) * 4 / every
    )


START = [{"step": 0, "lowest_trainable": 1}]


@pytest.mark.parametrize(
    "timeline, kwargs, error, match",
    [
        ([{"step": 2, "lowest_trainable": 0}], {}, ValueError, "timeline must start with the run's starting entry"),
        ([], {}, ValueError, "timeline must start with the run's starting entry"),
        ([{"step": 0}], {}, ValueError, r"timeline\[0\] must be a mapping with 'step' and 'lowest_trainable'"),
        (START + [{"step": 11, "lowest_trainable": 2}], {}, ValueError, r"timeline\[1\]\['step'\] must be an int"),
        (START + [{"step": 5, "lowest_trainable": 2}, {"step": 3, "lowest_trainable": 2}], {}, ValueError,
         r"timeline must be in step order, got steps \[0, 5, 3\]"),
        ([{"step": 0, "lowest_trainable": 3}], {}, ValueError, r"lowest trainable block 3 carries no adapter"),
        (START, {"cache_builds": [{"step": 0, "block": 1}]}, ValueError, "cache_builds needs rows: how many"),
        (START, {"cache_builds": [{"step": 0, "block": 2}], "rows": 4}, ValueError,
         "a cache at block 2 lies above the lowest trainable block 1"),
        ("step 0", {}, TypeError, "timeline must be a list of mappings"),
    ],
)  # fmt: skip
def test_timeline_bad_input(timeline, kwargs, error, match):
    cost = CostModel.from_model(llama_config(4), seq_len=8)
    kwargs = {"blocks": [0, 1, 2], **kwargs}
    with pytest.raises(error, match=match):
        predict_timeline(cost, timeline, 10, **kwargs)


def test_run_summary_states_the_predictions_basis_and_band():
    from aletheia_lora.report import predicted_text
    from aletheia_lora.select import Selection

    cost = CostModel.from_model(llama_config(4), seq_len=8)
    sel = Selection(layers=(2, 3), strategy="contiguous", predicted_speedup=1.2912, cost_model=cost.description)
    assert predicted_text(sel) == "1.29x ± 5% faster per step than LoRA on all layers (cost model, not calibrated)"
    calibrated = Selection(layers=(2, 3), strategy="contiguous", predicted_speedup=1.3, calibration={"fixed_s": 1.0})
    assert (
        predicted_text(calibrated, "all blocks")
        == "1.30x ± 6% faster per step than all blocks (calibrated on this machine)"
    )
    old = Selection(
        layers=(2, 3), strategy="contiguous", predicted_speedup=1.2, cost_model="llama (modules), 1x128 tokens, r=16"
    )
    assert predicted_text(old).endswith("(llama (modules), 1x128 tokens, r=16; no measured error band)")
