import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model

from aletheia_lora import apply_aletheia_lora, find_decoder_stack
from aletheia_lora.probe import LayerScores
from aletheia_lora.ranks import RankAllocation, allocate_ranks, with_rank_allocation
from tiny_models import tiny_model

ARCHS = ["llama", "gpt2", "qwen2_moe", "phi3"]
SCORES = {0: 10.0, 1: 5.0, 2: 3.0, 3: 2.0, 4: 1.0, 5: 0.5}
SELECTED = [0, 1, 3, 5]


def lora_modules(peft_model):
    """Module name (relative to the base model) -> (rank, scaling) of every LoRA layer."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "r", {}):
            out[name.removeprefix("base_model.model.")] = (module.r["default"], module.scaling["default"])
    return out


def peft_matches(key, name):
    """PEFT's own rule for rank_pattern keys (peft.utils.other.get_pattern_key)."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


@pytest.mark.parametrize("by", ["layer", "layer_and_kind"])
@pytest.mark.parametrize("arch", ARCHS)
def test_budget_keys_and_peft_ranks(arch, by):
    model = tiny_model(arch, n_layers=6)
    allocation = allocate_ranks(model, SCORES, SELECTED, r=8, lora_alpha=16, by=by)
    assert isinstance(allocation, RankAllocation)
    # the budget: never above uniform rank 8, and here filled exactly
    assert allocation.total_params <= allocation.uniform_params
    assert allocation.total_params == allocation.uniform_params
    # every key matches exactly one module of the model, under PEFT's own matching rule
    names = [n for n, _ in model.named_modules() if n]
    for key in allocation.rank_pattern:
        assert sum(peft_matches(key, n) for n in names) == 1, key
    assert allocation.rank_pattern.keys() == allocation.alpha_pattern.keys()
    assert sorted(re.escape(n) for n in allocation.module_ranks) == sorted(allocation.rank_pattern)

    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=find_decoder_stack(model).default_target_modules,
        layers_to_transform=SELECTED,
        layers_pattern=find_decoder_stack(model).layers_pattern,
        rank_pattern=allocation.rank_pattern,
        alpha_pattern=allocation.alpha_pattern,
        fan_in_fan_out=arch == "gpt2",
    )
    peft_model = get_peft_model(model, config)
    built = lora_modules(peft_model)
    assert {n: rank for n, (rank, _) in built.items()} == allocation.module_ranks
    for name, (_, scaling) in built.items():
        assert scaling == pytest.approx(16 / 8), name  # alpha follows rank: the scale stays lora_alpha / r
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == allocation.total_params


@pytest.mark.parametrize("arch", ARCHS)
def test_higher_score_never_gets_a_lower_rank(arch):
    model = tiny_model(arch, n_layers=6)
    allocation = allocate_ranks(model, SCORES, SELECTED, r=8)
    by_layer = {layer: max(kinds.values()) for layer, kinds in allocation.ranks.items()}
    ordered = sorted(SELECTED, key=lambda layer: SCORES[layer])
    assert [by_layer[layer] for layer in ordered] == sorted(by_layer[layer] for layer in ordered)
    assert by_layer[0] > by_layer[5]


def test_ranks_are_proportional_to_scores_on_a_known_case():
    # 4 equal blocks, budget 4 x 8 = 32 rank units; scores 10:5:2:0.5 give 18.3, 9.1, 3.7, 0.9 before rounding
    allocation = allocate_ranks(tiny_model("llama", 6), SCORES, SELECTED, r=8)
    assert {layer: kinds["attention"] for layer, kinds in allocation.ranks.items()} == {0: 18, 1: 8, 3: 4, 5: 2}
    assert all(len(set(kinds.values())) == 1 for kinds in allocation.ranks.values())
    assert allocation.alpha_pattern[re.escape("model.layers.0.self_attn.q_proj")] == 32 * 18 / 8


def test_equal_scores_give_the_uniform_rank():
    allocation = allocate_ranks(tiny_model("gpt2", 4), dict.fromkeys(range(4), 1.0), [0, 2, 3], r=6)
    assert set(allocation.module_ranks.values()) == {6}
    assert allocation.total_params == allocation.uniform_params


def test_gpt2_conv1d_parameters_count_in_and_out_features():
    # c_attn 32->96, attn.c_proj 32->32, c_fc 32->128, mlp.c_proj 128->32 (Conv1D stores weights transposed)
    allocation = allocate_ranks(tiny_model("gpt2", 4), dict.fromkeys(range(4), 1.0), [1, 2], r=4)
    assert allocation.uniform_params == 4 * 2 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))


def test_keys_name_one_block_each_and_not_its_neighbours():
    model = tiny_model("llama", 12)
    allocation = allocate_ranks(model, dict.fromkeys(range(12), 1.0), [1, 11], r=4)
    key = re.escape("model.layers.1.self_attn.q_proj")
    assert key in allocation.rank_pattern
    assert not peft_matches(key, "model.layers.11.self_attn.q_proj")
    assert peft_matches(key, "base_model.model.model.layers.1.self_attn.q_proj")


def test_min_and_max_rank_clip_and_the_rest_is_shared_out():
    model = tiny_model("llama", 6)
    allocation = allocate_ranks(model, SCORES, SELECTED, r=8, max_rank=12, min_rank=4)
    ranks = {layer: kinds["mlp"] for layer, kinds in allocation.ranks.items()}
    assert ranks[0] == 12
    assert min(ranks.values()) == 4
    assert all(4 <= rank <= 12 and rank % 2 == 0 for rank in ranks.values())
    assert allocation.total_params == allocation.uniform_params


def test_multiple_of_rounds_every_rank():
    allocation = allocate_ranks(tiny_model("llama", 6), SCORES, SELECTED, r=16, multiple_of=8, min_rank=1)
    assert all(rank % 8 == 0 and rank >= 8 for rank in allocation.module_ranks.values())
    assert allocation.total_params <= allocation.uniform_params


def test_kind_scores_split_attention_and_mlp():
    model = tiny_model("llama", 4)
    kind_scores = {0: {"attention": 3.0, "mlp": 1.0}, 1: {"attention": 1.0, "mlp": 1.0}}
    allocation = allocate_ranks(model, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}, [0, 1], r=8, by="layer_and_kind",
                                kind_scores=kind_scores)  # fmt: skip
    assert allocation.ranks[0]["attention"] > allocation.ranks[0]["mlp"]
    assert allocation.ranks[0]["attention"] > allocation.ranks[1]["attention"]
    assert allocation.total_params <= allocation.uniform_params


def test_a_peft_model_or_a_stack_gives_the_same_allocation():
    model = tiny_model("llama", 6)
    plain = allocate_ranks(model, SCORES, SELECTED, r=8)
    from_stack = allocate_ranks(find_decoder_stack(model), SCORES, SELECTED, r=8)
    wrapped = get_peft_model(model, apply_aletheia_lora(model, SELECTED, r=8))
    from_peft = allocate_ranks(wrapped, LayerScores(SCORES), SELECTED, r=8)
    assert plain.rank_pattern == from_stack.rank_pattern == from_peft.rank_pattern
    assert plain.total_params == from_peft.total_params


def test_with_rank_allocation_builds_a_config_that_saves_and_reloads(tmp_path):
    model = tiny_model("qwen2_moe", 6)
    allocation = allocate_ranks(model, SCORES, SELECTED, r=8, lora_alpha=16)
    uniform = apply_aletheia_lora(model, SELECTED, r=8, lora_alpha=16)
    config = with_rank_allocation(uniform, allocation)
    assert uniform.rank_pattern == {}  # the input is left unchanged
    peft_model = get_peft_model(model, config)
    assert {n: r for n, (r, _) in lora_modules(peft_model).items()} == allocation.module_ranks
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("qwen2_moe", 6), tmp_path)
    assert {n: r for n, (r, _) in lora_modules(reloaded).items()} == allocation.module_ranks
    assert json.loads(json.dumps(allocation.to_dict()))["ranks"]["0"] == allocation.ranks[0]


def test_with_rank_allocation_refuses_a_mismatched_config():
    model = tiny_model("llama", 6)
    allocation = allocate_ranks(model, SCORES, SELECTED, r=8, lora_alpha=16)
    with pytest.raises(ValueError, match="r=4"):
        with_rank_allocation(apply_aletheia_lora(model, SELECTED, r=4, lora_alpha=16), allocation)
    with pytest.raises(ValueError, match=r"adapts layers \[0, 1\]"):
        with_rank_allocation(apply_aletheia_lora(model, [0, 1], r=8, lora_alpha=16), allocation)
    with pytest.raises(ValueError, match="already has rank_pattern"):
        with_rank_allocation(apply_aletheia_lora(model, SELECTED, r=8, lora_alpha=16, mlp_r=4), allocation)
    with pytest.raises(ValueError, match="targets"):
        with_rank_allocation(
            apply_aletheia_lora(model, SELECTED, r=8, lora_alpha=16, target_modules=["q_proj"]), allocation
        )
    with pytest.raises(TypeError, match="LoraConfig"):
        with_rank_allocation({"r": 8}, allocation)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"by": "module"}, ValueError, "by must be one of"),
        ({"min_rank": 10}, ValueError, "min_rank=10 .* above r=8"),
        ({"max_rank": 6}, ValueError, "max_rank=6 .* below r=8"),
        (
            {"r": 10, "max_rank": 11, "multiple_of": 4},
            ValueError,
            r"max_rank=11 \(as a multiple of 4: 8\) is below r=10",
        ),
        ({"r": 0}, ValueError, "r must be an integer >= 1"),
        ({"r": 8.0}, TypeError, "r must be an integer"),
        ({"multiple_of": True}, TypeError, "multiple_of must be an integer"),
        ({"lora_alpha": -1}, ValueError, "lora_alpha must be"),
        ({"kind_scores": {0: {"mlp": 1.0}}}, ValueError, "kind_scores apply to by='layer_and_kind'"),
        ({"target_modules": ["nope_proj"]}, ValueError, "holds none of target_modules"),
        ({"target_modules": "q_proj"}, TypeError, "target_modules must be a list"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        allocate_ranks(tiny_model("llama", 6), SCORES, SELECTED, **{"r": 8, **kwargs})


def test_bad_scores_and_inputs_are_named():
    model = tiny_model("llama", 4)
    with pytest.raises(ValueError, match=r"selected_layers holds \[3\], which have no score"):
        allocate_ranks(model, {0: 1.0, 1: 1.0}, [1, 3])
    with pytest.raises(ValueError, match="scores >= 0"):
        allocate_ranks(model, {0: 1.0, 1: -1.0}, [0, 1])
    with pytest.raises(ValueError, match="every score of the selected layers"):
        allocate_ranks(model, {0: 0.0, 1: 0.0, 2: 5.0}, [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        allocate_ranks(model, dict.fromkeys(range(8), 1.0), [7])
    with pytest.raises(ValueError, match="selected_layers is empty"):
        allocate_ranks(model, {0: 1.0}, [])
    with pytest.raises(TypeError, match="model_or_stack must be"):
        allocate_ranks("llama", {0: 1.0}, [0])
    with pytest.raises(ValueError, match="no score for the 'mlp' modules"):
        allocate_ranks(model, {0: 1.0}, [0], by="layer_and_kind", kind_scores={0: {"attention": 1.0}})
    with pytest.raises(ValueError, match="no {kind: score} mapping for selected layer 1"):
        allocate_ranks(model, {0: 1.0, 1: 1.0}, [0, 1], by="layer_and_kind", kind_scores={0: {"attention": 1.0}})


def test_zero_scored_layer_gets_the_minimum_even_when_max_rank_is_r():
    allocation = allocate_ranks(tiny_model("llama", 4), {0: 1.0, 1: 0.0}, [0, 1], r=8, max_rank=8)
    assert allocation.ranks == {0: {"attention": 8, "mlp": 8}, 1: {"attention": 2, "mlp": 2}}


_MODEL = tiny_model("gpt2", 6)  # Conv1D modules of four different widths: units of unequal cost


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.floats(0, 100, allow_nan=False), min_size=6, max_size=6),
    selected=st.sets(st.integers(0, 5), min_size=1),
    r=st.integers(1, 24),
    step=st.sampled_from([1, 2, 4]),
    by=st.sampled_from(["layer", "layer_and_kind"]),
    cap=st.sampled_from([None, 1, 2]),
)
def test_allocation_properties(scores, selected, r, step, by, cap):
    scores = dict(enumerate(scores))
    layers = sorted(selected)
    max_rank = None if cap is None else cap * r + step - 1  # r or 2r, rounded up to a multiple of step
    kwargs = dict(r=r, multiple_of=step, min_rank=1, max_rank=max_rank, by=by)
    if all(scores[layer] == 0 for layer in layers) or step > r:
        with pytest.raises(ValueError):
            allocate_ranks(_MODEL, scores, layers, **kwargs)
        return
    allocation = allocate_ranks(_MODEL, scores, layers, **kwargs)
    assert allocation.total_params <= allocation.uniform_params
    ranks = allocation.ranks
    rank_values = [rank for kinds in ranks.values() for rank in kinds.values()]
    assert all(rank % step == 0 and step <= rank <= (max_rank or rank) for rank in rank_values)
    # monotone: a block with a higher score never has a lower rank (by layer; by kind both kinds share the score)
    for a in layers:
        for b in layers:
            if scores[a] > scores[b]:
                assert min(ranks[a].values()) >= max(ranks[b].values())
    # nearly all of the budget is used: less than one rank step of one block is left (every block costs the same),
    # unless the cap stops the scored blocks and zero-scored ones (below 1e-12 of the top: zero) may not grow
    block_cost = allocation.uniform_params // (r * len(layers))
    top = max(scores[layer] for layer in layers)
    if cap is None or all(scores[layer] > 0 and scores[layer] >= 1e-12 * top for layer in layers):
        assert allocation.uniform_params - allocation.total_params < block_cost * step
