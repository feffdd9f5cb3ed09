import pytest
import torch
import transformers as T
from peft import LoraConfig, get_peft_model

from aletheia_lora.layers import ATTENTION, MLP, ROUTER, find_decoder_stack, unwrap_model
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
