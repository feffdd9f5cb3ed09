import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from aletheia_lora import aletheia_lora_config, apply_aletheia_lora, find_decoder_stack, gradient_probe, select_layers
from aletheia_lora.data import pad_collate
from tiny_models import ARCHITECTURES, tiny_model, token_rows


def adapted_layers(peft_model, stack):
    names = {n.split(".lora_")[0] for n, _ in peft_model.named_parameters() if ".lora_" in n}
    return sorted({stack.layer_of(n.removeprefix("base_model.model.")) for n in names}), names


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_adapters_land_in_exactly_the_selected_layers(arch):
    model = tiny_model(arch, n_layers=4)
    stack = find_decoder_stack(model)
    config = apply_aletheia_lora(model, [1, 3], r=4, lora_alpha=8)
    assert isinstance(config, LoraConfig)
    assert config.layers_to_transform == [1, 3]
    peft_model = get_peft_model(model, config)
    layers, names = adapted_layers(peft_model, stack)
    assert layers == [1, 3]
    # every default target module of the architecture is adapted in each selected layer
    per_layer = {m for n in names for m in stack.default_target_modules if n.endswith("." + m)}
    assert per_layer == set(stack.default_target_modules)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "gpt_neox"])
def test_attention_and_mlp_ranks_with_alpha_following_rank(arch):
    model = tiny_model(arch, n_layers=2)
    stack = find_decoder_stack(model)
    peft_model = get_peft_model(model, apply_aletheia_lora(model, [0, 1], r=4, lora_alpha=8, attention_r=2, mlp_r=8))
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        kind = stack.modules[next(m for m in stack.modules if name.endswith("." + m))]
        rank = module.r["default"]
        assert rank == (2 if kind == "attention" else 8), name
        assert module.scaling["default"] == pytest.approx(8 / 4), name  # alpha / r kept at 2 in both groups


def test_explicit_alphas_win():
    config = aletheia_lora_config([0], r=16, lora_alpha=32, attention_r=16, mlp_r=64, mlp_alpha=16)
    assert config.rank_pattern == {
        "gate_proj": 64,
        "up_proj": 64,
        "down_proj": 64,
        **{m: 16 for m in ["q_proj", "k_proj", "v_proj", "o_proj"]},
    }
    assert config.alpha_pattern["down_proj"] == 16
    assert config.alpha_pattern["q_proj"] == 32


def test_config_without_a_model_is_the_reference_config():
    config = aletheia_lora_config([5, 1, 3])
    assert config.layers_to_transform == [1, 3, 5]
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (16, 32, 0.0, "none")
    assert config.task_type == "CAUSAL_LM"
    assert config.rank_pattern == {} and config.alpha_pattern == {}


def test_gpt2_ranks_are_keyed_per_group_on_its_own_names():
    config = apply_aletheia_lora(tiny_model("gpt2", 2), [0], attention_r=2, mlp_r=6, r=4, lora_alpha=4)
    assert config.fan_in_fan_out is True
    assert config.rank_pattern == {"c_attn": 2, r"attn\.c_proj": 2, "c_fc": 6, r"mlp\.c_proj": 6}


def test_layers_pattern_names_only_the_decoder_stack():
    model = tiny_model("opt", n_layers=3)
    config = apply_aletheia_lora(model, [2])
    assert config.layers_pattern == r"model\.decoder\.layers"


def test_moe_experts_when_asked(caplog):
    model = tiny_model("mixtral", n_layers=3)
    config = apply_aletheia_lora(model, [1], r=2)
    assert "not adapted" in caplog.text
    assert not config.target_parameters
    config = apply_aletheia_lora(model, [1], r=2, target_experts=True)
    assert config.target_parameters == [
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.down_proj",
    ]
    peft_model = get_peft_model(model, config)
    expert_lora = [n for n, _ in peft_model.named_parameters() if "experts" in n and "lora_" in n]
    assert expert_lora and all(".layers.1." in n for n in expert_lora)


@pytest.mark.parametrize(
    "layers, error, match",
    [
        ([], ValueError, "selected_layers is empty; PEFT would read an empty list as 'all layers'"),
        ([1, 1], ValueError, r"selected_layers holds duplicates: \[1\]"),
        ([-1], ValueError, "selected_layers holds a negative index: -1"),
        ([4], ValueError, "selected_layers holds 4, out of range for a model with 4 layers"),
        ("0,1", TypeError, "selected_layers must be a list of layer indices, got str"),
        ([0.5], TypeError, r"selected_layers must hold integers, got 0.5"),
        (None, TypeError, "selected_layers must be a list of layer indices, got NoneType"),
    ],
)
def test_bad_selections(layers, error, match):
    with pytest.raises(error, match=match):
        apply_aletheia_lora(tiny_model("llama", n_layers=4), layers)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"target_modules": ["q_proj", "qkv"]}, ValueError, "target module 'qkv' is not in LlamaForCausalLM"),
        ({"target_modules": "q_proj"}, TypeError, "target_modules must be a list of module names"),
        ({"r": 0}, ValueError, "r must be positive, got 0"),
        ({"r": "8"}, TypeError, "r must be a number, got '8'"),
        ({"attention_r": 2.5}, TypeError, "attention_r must be an integer, got 2.5"),
        ({"mlp_alpha": -1}, ValueError, "mlp_alpha must be positive, got -1"),
        ({"lora_dropout": 1.0}, ValueError, r"lora_dropout must be a number in \[0, 1\), got 1.0"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        apply_aletheia_lora(tiny_model("llama", n_layers=2), [0], **kwargs)


def test_unsorted_selection_is_sorted():
    assert apply_aletheia_lora(tiny_model("llama", 4), (3, 0, 2)).layers_to_transform == [0, 2, 3]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "falcon"])
def test_quick_start_end_to_end(arch, tmp_path):
    """The reference quick start, unchanged: probe -> select -> config -> get_peft_model -> a training step."""
    model = tiny_model(arch, n_layers=6)
    train_dataset = token_rows(10)
    scores = gradient_probe(model=model, dataset=train_dataset, num_layers=6, probe_batches=5, chunk_size=8)
    selected = select_layers(scores, top_pct=50)
    assert len(selected) == 3
    peft_config = apply_aletheia_lora(model=model, selected_layers=selected, r=16, lora_alpha=32)
    model = get_peft_model(model, peft_config)
    stack = find_decoder_stack(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = pad_collate(train_dataset[:4], 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model(**batch).loss
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert {stack.layer_of(n.removeprefix("base_model.model.")) for n in trainable} == set(selected)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable and "lora_B" in n)
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    # the adapter saves and reloads with plain PEFT
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_model(arch, n_layers=6), tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, model(**batch).logits, atol=1e-5)


def test_mlp_and_attention_rank_quick_start_form():
    model = tiny_model("qwen2", n_layers=4)
    config = apply_aletheia_lora(model=model, selected_layers=[2, 3], attention_r=16, mlp_r=64)
    assert config.rank_pattern["q_proj"] == 16 and config.rank_pattern["down_proj"] == 64
    assert config.alpha_pattern["q_proj"] == 32 and config.alpha_pattern["down_proj"] == 128


def test_rank_allocation_from_scores_keeps_the_budget():
    model = tiny_model("llama", n_layers=4)
    scores = {0: 1.0, 1: 1.0, 2: 4.0, 3: 2.0}
    config = apply_aletheia_lora(model, [2, 3], r=8, lora_alpha=16, rank_allocation="scores", layer_scores=scores)
    peft_model = get_peft_model(model, config)
    ranks = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "r") and "default" in getattr(module, "r", {}):
            layer = int(name.split(".layers.")[1].split(".")[0])
            ranks.setdefault(layer, set()).add(module.r["default"])
            assert module.scaling["default"] == pytest.approx(2.0)  # alpha follows the rank
    assert set(ranks) == {2, 3}
    assert max(ranks[2]) > max(ranks[3])  # the higher-scoring layer gets the larger rank
    uniform = get_peft_model(tiny_model("llama", n_layers=4), apply_aletheia_lora(tiny_model("llama", 4), [2, 3], r=8))
    count = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert count <= sum(p.numel() for n, p in uniform.named_parameters() if "lora_" in n)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank_allocation": "scores"}, "rank_allocation='scores' needs layer_scores"),
        ({"rank_allocation": "fancy"}, "rank_allocation must be 'uniform' or 'scores', got 'fancy'"),
        ({"rank_allocation": "scores", "layer_scores": {0: 1.0, 1: 2.0}, "mlp_r": 4}, "do not give mlp_r=4"),
    ],
)
def test_rank_allocation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_aletheia_lora(tiny_model("llama", n_layers=2), [1], **kwargs)
