import pytest
import torch
import transformers as T
from peft import LoraConfig, get_peft_model

from aletheia_lora import layers
from aletheia_lora.layers import (
    ATTENTION,
    MLP,
    ROUTER,
    find_decoder_stack,
    is_adapter_name,
    linear_shape,
    matches_target,
    resolve_stack,
    shapes_from_config,
    shapes_from_model,
    unwrap_model,
)
from tiny_models import ARCHITECTURES, tiny_model

EXPECTED = {
    "llama": ("model.layers", {"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}),
    "phi3": ("model.layers", {"qkv_proj", "o_proj"}, {"gate_up_proj", "down_proj"}),
    "gpt2": ("transformer.h", {"c_attn", "attn.c_proj"}, {"c_fc", "mlp.c_proj"}),
    "gpt_neox": ("gpt_neox.layers", {"query_key_value", "dense"}, {"dense_h_to_4h", "dense_4h_to_h"}),
    "falcon": ("transformer.h", {"query_key_value", "dense"}, {"dense_h_to_4h", "dense_4h_to_h"}),
    "bloom": ("transformer.h", {"query_key_value", "dense"}, {"dense_h_to_4h", "dense_4h_to_h"}),
    "opt": ("model.decoder.layers", {"q_proj", "k_proj", "v_proj", "out_proj"}, {"fc1", "fc2"}),
    "mpt": ("transformer.blocks", {"Wqkv", "out_proj"}, {"up_proj", "down_proj"}),
    "mixtral": ("model.layers", {"q_proj", "k_proj", "v_proj", "o_proj"}, set()),
    "qwen2_moe": ("model.layers", {"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}),
}
for arch in ("qwen2", "mistral", "gemma2", "gemma3", "stablelm"):
    EXPECTED[arch] = EXPECTED["llama"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_stack_and_module_kinds(arch):
    model = tiny_model(arch, n_layers=3)
    stack = find_decoder_stack(model)
    path, attention, mlp = EXPECTED[arch]
    assert stack.path == path
    assert stack.num_layers == 3
    assert len(stack.blocks) == 3
    assert set(stack.attention_modules) == attention
    assert set(stack.mlp_modules) == mlp
    assert stack.fan_in_fan_out == (arch == "gpt2")
    # The stack's index is the one PEFT reads from module names.
    for i in range(3):
        assert stack.layer_of(f"{path}.{i}.{stack.default_target_modules[0]}") == i
    assert stack.layer_of("lm_head") is None


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_experts_and_routers(arch):
    stack = find_decoder_stack(tiny_model(arch, n_layers=2))
    assert stack.expert_parameters == ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    assert ROUTER not in {stack.modules[m] for m in stack.default_target_modules}
    if arch == "qwen2_moe":
        assert stack.modules["shared_expert_gate"] == ROUTER


def test_peft_wrapped_model_gives_the_base_stack():
    model = tiny_model("llama", n_layers=3)
    plain = find_decoder_stack(model)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    stack = find_decoder_stack(wrapped)
    assert unwrap_model(wrapped) is model
    assert stack.path == plain.path and stack.num_layers == 3
    assert stack.modules == plain.modules  # lora_A/lora_B and base_layer are not counted as modules


def test_encoder_decoder_uses_the_decoder_stack():
    config = T.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=2)
    stack = find_decoder_stack(T.T5ForConditionalGeneration(config))
    assert stack.path == "decoder.block"
    assert stack.num_layers == 3


class _TwoStacks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vision = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8)) for _ in range(4))
        self.text = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8)) for _ in range(3))


def test_competing_stacks_fail_clearly_unless_named():
    with pytest.raises(ValueError, match="several block stacks .*vision.*text.*path="):
        find_decoder_stack(_TwoStacks())
    stack = find_decoder_stack(_TwoStacks(), path="text")
    assert stack.num_layers == 3 and stack.layers_pattern == "text"


def test_no_stack_names_the_model_class():
    with pytest.raises(ValueError, match="no decoder-block stack found in Linear"):
        find_decoder_stack(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"path='model.nope' is not a non-empty block list in LlamaForCausalLM"):
        find_decoder_stack(tiny_model("llama", 2), path="model.nope")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        find_decoder_stack("llama")


def test_kinds_cover_attention_and_mlp():
    stack = find_decoder_stack(tiny_model("gpt2", 2))
    assert stack.modules == {"c_attn": ATTENTION, "attn.c_proj": ATTENTION, "c_fc": MLP, "mlp.c_proj": MLP}


def test_peft_rules():
    assert is_adapter_name("model.layers.0.self_attn.q_proj.lora_A.default")
    assert is_adapter_name("model.layers.0.self_attn.q_proj.base_layer")
    assert not is_adapter_name("model.layers.0.self_attn.q_proj.base_layer.weight")  # a parameter of the model
    assert not is_adapter_name("model.layers.0.self_attn.q_proj")
    assert matches_target("model.layers.0.mlp.c_proj", "c_proj") and matches_target("c_proj", "c_proj")
    assert matches_target("h.0.mlp.c_proj", "mlp.c_proj") and not matches_target("h.0.attn.c_proj", "mlp.c_proj")
    assert not matches_target("model.layers.0.self_attn.xq_proj", "q_proj")
    assert linear_shape(torch.nn.Linear(3, 5)) == (3, 5)
    assert linear_shape(T.pytorch_utils.Conv1D(5, 3)) == (3, 5)  # Conv1D(nf=out, nx=in)
    assert linear_shape(torch.nn.Embedding(4, 2)) is None
    wrapped = get_peft_model(tiny_model("gpt2", 1), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    c_attn = wrapped.get_submodule("base_model.model.transformer.h.0.attn.c_attn")
    assert linear_shape(c_attn) == (32, 96)  # the LoRA layer reads as the layer it wraps


def test_a_given_stack_is_checked_and_used():
    model = tiny_model("llama", n_layers=3)
    stack = find_decoder_stack(model)
    assert resolve_stack(model) == stack
    assert resolve_stack(model, stack) is stack
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert resolve_stack(wrapped, stack) is stack
    with pytest.raises(ValueError, match=r"stack \(model.layers\) is not the decoder stack of this LlamaForCausalLM"):
        resolve_stack(tiny_model("llama", n_layers=3), stack)
    with pytest.raises(ValueError, match="is not the decoder stack of this GPT2LMHeadModel"):
        resolve_stack(tiny_model("gpt2", n_layers=3), stack)
    with pytest.raises(TypeError, match="stack must be a DecoderStack from find_decoder_stack, got str"):
        resolve_stack(model, "model.layers")


def test_functions_given_the_stack_do_not_search_again(monkeypatch):
    from aletheia_lora import allocate_ranks, apply_aletheia_lora, predict_speedup
    from aletheia_lora.calibrate import calibrate
    from aletheia_lora.cost import CostModel, step_cost
    from aletheia_lora.select import make_selection
    from tiny_models import token_rows

    model = tiny_model("llama", n_layers=4)
    stack = find_decoder_stack(model)
    scores = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    batch = {"input_ids": torch.tensor([row["input_ids"] for row in token_rows(1, 6)])}
    calls = {
        "apply": lambda **kw: apply_aletheia_lora(model, [2, 3], rank_allocation="scores", layer_scores=scores, **kw),
        "cost": lambda **kw: CostModel.from_model(model, seq_len=8, **kw),
        "step": lambda **kw: step_cost(model, [2, 3], seq_len=8, **kw),
        "speedup": lambda **kw: predict_speedup(model, [2, 3], seq_len=8, **kw),
        "ranks": lambda **kw: allocate_ranks(model, scores, [2, 3], r=4, **kw),
        "select": lambda **kw: make_selection(scores, model=model, seq_len=8, **kw),
    }
    expected = {name: call() for name, call in calls.items()}
    searches = []
    monkeypatch.setattr(layers, "find_decoder_stack", lambda *a, **k: searches.append(a) or stack)
    for name, call in calls.items():
        assert call(stack=stack) == expected[name], name
    cal = calibrate(model, batch, placements=[[0, 1, 2, 3], [2, 3]], steps=1, warmup=0, r=2, stack=stack)
    assert cal.num_layers == 4
    assert searches == []


def test_block_shapes_from_the_model_and_from_its_config_agree():
    for arch in ("llama", "gpt2", "falcon", "opt", "phi3"):
        model = tiny_model(arch, n_layers=2)
        from_model, from_config = shapes_from_model(model), shapes_from_config(model.config)
        assert from_model.source == "modules" and from_config.source == "config"
        assert [sorted(row[:3] for row in block) for block in from_model.blocks] == [
            sorted(row[:3] for row in block) for block in from_config.blocks
        ], arch
        assert sorted(t.split(".")[-1] for t in from_model.default_targets) == sorted(
            t.split(".")[-1] for t in from_config.default_targets
        ), arch
        assert (from_model.head_in, from_model.vocab_size) == (from_config.head_in, from_config.vocab_size)
        assert from_model.attention_width == from_config.attention_width
