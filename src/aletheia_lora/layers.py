"""Find a causal LM's decoder-block stack and classify the modules inside one block.

Every later stage works on this description: the probe scores the blocks, the selection picks block
indices, and the PEFT config targets modules inside the picked blocks. The stack's index is the one
PEFT reads from module names (``<path>.<index>.``), so the selection and PEFT's injection agree.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

ATTENTION = "attention"
MLP = "mlp"
ROUTER = "router"
OTHER = "other"

# --- per-architecture names ----------------------------------------------------------------------------------

# Path components that mark a module as part of attention or of the feed-forward network.
_ATTENTION_HINTS = ("attn", "attention")
_MLP_HINTS = ("mlp", "ffn", "feed_forward", "moe", "expert")
# Leaf names of attention projections, whatever their parent is called.
ATTENTION_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv")
# Leaf names of feed-forward projections that some architectures keep directly in the block (OPT's fc1/fc2).
MLP_LEAVES = (
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
    "fc1",
    "fc2",
    "c_fc",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "w1",
    "w2",
    "w3",
)
# MoE routers: tiny, and adapting them changes which experts fire, so they are never default targets.
ROUTER_LEAVES = ("gate", "router", "shared_expert_gate", "classifier")
# The Llama/Qwen/Mistral projections: the targets when no model is given (aletheia_lora_config).
LLAMA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Target name -> kind across the supported architectures, for configs built without a model.
KNOWN_MODULE_KINDS = {
    **dict.fromkeys(ATTENTION_LEAVES, ATTENTION),
    **dict.fromkeys(["out_proj", "dense", "attn.c_proj", "self_attention.dense", "attention.dense"], ATTENTION),
    **dict.fromkeys(MLP_LEAVES, MLP),
    "mlp.c_proj": MLP,
}


# --- PEFT's rules ---------------------------------------------------------------------------------------------


def is_adapter_name(name: str) -> bool:
    """A PEFT adapter module or parameter (``lora_A``...), or the base layer a LoRA layer wraps: not the model's."""
    return "lora_" in name or name.endswith(".base_layer")


def matches_target(name: str, target: str) -> bool:
    """PEFT's rule for a list ``target_modules``: the module name equals the target or ends with ``.target``."""
    return name == target or name.endswith("." + target)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored transposed, as (in, out)."""
    return type(module).__name__ == "Conv1D"


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear layer (``nn.Linear`` or ``Conv1D``, or a LoRA layer around one).

    Returns:
        The shape, or None for any other module.
    """
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Module):
        module = base
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        fan_in, fan_out = module.weight.shape
        return int(fan_in), int(fan_out)
    return None


@dataclass(frozen=True)
class DecoderStack:
    """The repeated decoder blocks of a causal LM.

    Attributes:
        path: Dotted path of the block list inside the (unwrapped) model, e.g. ``"model.layers"``.
        num_layers: Number of blocks.
        layers_pattern: Regex PEFT uses to read the block index from a module name; it names this
            stack only, so no other numbered list (a vision tower, MoE experts) can be matched.
        block_class: Class name of one block, e.g. ``"LlamaDecoderLayer"``.
        model_type: ``config.model_type`` of the model, or its class name.
        modules: Target name -> kind (``attention``, ``mlp``, ``router`` or ``other``) for every
            linear module of a block. A target name is the shortest dotted suffix that is unique inside
            a block (``q_proj``; ``attn.c_proj`` vs ``mlp.c_proj`` for GPT-2), the form PEFT matches.
        expert_parameters: Names, relative to a block, of fused 3-D MoE expert weights (not modules,
            so ``target_modules`` cannot reach them).
        fan_in_fan_out: True when the blocks use GPT-2 style ``Conv1D`` (weights stored transposed).
        blocks: The block list itself.
    """

    path: str
    num_layers: int
    layers_pattern: str
    block_class: str
    model_type: str
    modules: dict[str, str]
    expert_parameters: tuple[str, ...] = ()
    fan_in_fan_out: bool = False
    blocks: nn.ModuleList = field(default=None, repr=False, compare=False)

    @property
    def attention_modules(self) -> list[str]:
        """Target names of the attention projections."""
        return [name for name, kind in self.modules.items() if kind == ATTENTION]

    @property
    def mlp_modules(self) -> list[str]:
        """Target names of the feed-forward (MLP, shared-expert) projections."""
        return [name for name, kind in self.modules.items() if kind == MLP]

    @property
    def default_target_modules(self) -> list[str]:
        """Attention and MLP projections: what LoRA adapts unless told otherwise."""
        return [name for name, kind in self.modules.items() if kind in (ATTENTION, MLP)]

    def layer_of(self, name: str) -> int | None:
        """Block index of a module or parameter name (relative to the unwrapped model), read as PEFT reads it."""
        match = re.match(rf"(?:^|.*?\.){self.layers_pattern}\.(?P<idx>\d+)(?:\.|$)", name)
        return int(match.group("idx")) if match else None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain transformers model inside PEFT, DDP/FSDP (``.module``) or torch.compile wrappers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, FSDP, DeepSpeed
            model = model.module
    return model


def _classify(relative_name: str) -> str:
    parts = relative_name.split(".")
    leaf = parts[-1]
    if leaf in ROUTER_LEAVES:
        return ROUTER
    if any(hint in part.lower() for part in parts[:-1] for hint in _ATTENTION_HINTS):
        return ATTENTION
    if any(hint in part.lower() for part in parts[:-1] for hint in _MLP_HINTS) or leaf in MLP_LEAVES:
        return MLP
    if leaf in ATTENTION_LEAVES:
        return ATTENTION
    return OTHER


def _unique_suffixes(names: list[str]) -> dict[str, str]:
    """Shortest dotted suffix of each name that no other name in the list ends with."""
    result = {}
    for name in names:
        parts = name.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            clashes = [o for o in names if o != name and (o == suffix or o.endswith("." + suffix))]
            if not clashes:
                result[name] = suffix
                break
        else:
            result[name] = name
    return result


def _block_lists(root: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """ModuleLists whose children are all of one class and hold parameters: candidate block stacks."""
    found = []
    for name, module in root.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) == 1 and any(True for _ in module[0].parameters()):
            found.append((name, module))
    return found


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_decoder_stack(model: nn.Module, path: str | None = None) -> DecoderStack:
    """Find the decoder-block stack of a causal LM (or of a PEFT/DDP/FSDP wrapper around one).

    Args:
        model: A transformers causal LM, or a wrapper around one.
        path: Dotted path of the block list, to pick one by hand (e.g. ``"model.language_model.layers"``).
            By default the stack is found: the largest list of identical blocks inside the model's
            decoder (``get_decoder()``), or inside the whole model when it has no decoder accessor.

    Returns:
        The stack, with its blocks' linear modules classified.

    Raises:
        TypeError: ``model`` is not a torch module.
        ValueError: no block stack is found, ``path`` names no block list, or several unrelated
            stacks compete and the choice would be a guess.
    """
    base = unwrap_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None) or type(base).__name__
    modules_by_name = dict(base.named_modules())
    if path is not None:
        if not isinstance(path, str):
            raise TypeError(f"path must be a string, got {type(path).__name__}")
        blocks = modules_by_name.get(path)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError(f"path={path!r} is not a non-empty block list in {type(base).__name__}")
    else:
        root, prefix = base, ""
        decoder = None
        if hasattr(base, "get_decoder"):
            try:
                decoder = base.get_decoder()
            except Exception:  # some models raise NotImplementedError or AttributeError here
                decoder = None
        if isinstance(decoder, nn.Module) and decoder is not base:
            names = [n for n, m in base.named_modules() if m is decoder]
            if names:
                root, prefix = decoder, names[0] + "."
        candidates = [(prefix + n, m) for n, m in _block_lists(root)]
        if not candidates:
            raise ValueError(
                f"no decoder-block stack found in {type(base).__name__} (model_type={model_type!r}): "
                "no list of identical blocks with parameters; pass path='...' to name it"
            )
        # Lists nested in another candidate (MoE expert lists inside blocks) are not the stack.
        outer = [(n, m) for n, m in candidates if not any(n != o and n.startswith(o + ".") for o, _ in candidates)]
        outer.sort(key=lambda item: _num_params(item[1]), reverse=True)
        if len(outer) > 1 and _num_params(outer[1][1]) >= 0.25 * _num_params(outer[0][1]):
            listing = ", ".join(f"{n} ({len(m)} x {type(m[0]).__name__})" for n, m in outer[:4])
            raise ValueError(
                f"{type(base).__name__} has several block stacks ({listing}) and no language-model decoder "
                "accessor to choose between them; pass path='...' to name the decoder stack"
            )
        path, blocks = outer[0]

    block = blocks[0]
    linear = []
    fan_in_fan_out = False
    for name, module in block.named_modules():
        if not name or is_adapter_name(name):
            continue  # PEFT adapters and their wrapped base layers are not the model's own modules
        if linear_shape(module) is not None:
            linear.append(name)
            base_layer = getattr(module, "base_layer", None)
            fan_in_fan_out |= is_conv1d(base_layer if base_layer is not None else module)
    suffixes = _unique_suffixes(linear)
    kinds = {suffixes[name]: _classify(name) for name in linear}
    experts = tuple(
        name
        for name, param in block.named_parameters()
        if param.dim() == 3 and not is_adapter_name(name) and _classify(name) == MLP
    )
    other = [n for n, k in kinds.items() if k == OTHER]
    if other:
        logger.warning(
            "%s: linear modules %s are neither attention nor MLP; not targeted by default", model_type, other
        )
    return DecoderStack(
        path=path,
        num_layers=len(blocks),
        layers_pattern=re.escape(path),
        block_class=type(block).__name__,
        model_type=model_type,
        modules=kinds,
        expert_parameters=experts,
        fan_in_fan_out=fan_in_fan_out,
        blocks=blocks,
    )


def block_parameters(stack: DecoderStack) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """Per block, its own floating-point parameters (PEFT adapter weights excluded), in a stable order."""
    per_block = []
    for block in stack.blocks:
        params = [
            (name, p)
            for name, p in block.named_parameters()
            if not is_adapter_name(name) and (p.is_floating_point() or p.is_complex())
        ]
        per_block.append(params)
    return per_block


def resolve_stack(model: nn.Module, stack: DecoderStack | None = None) -> DecoderStack:
    """``stack`` when the caller has found it already (checked to be ``model``'s), else :func:`find_decoder_stack`.

    Raises:
        TypeError: ``stack`` is not a :class:`DecoderStack`.
        ValueError: ``stack`` has no blocks, or its blocks are not ``model``'s module at ``stack.path``.
    """
    if stack is None:
        return find_decoder_stack(model)
    if not isinstance(stack, DecoderStack):
        raise TypeError(f"stack must be a DecoderStack from find_decoder_stack, got {type(stack).__name__}")
    try:
        blocks = unwrap_model(model).get_submodule(stack.path)
    except AttributeError:
        blocks = None
    if stack.blocks is None or blocks is not stack.blocks:
        raise ValueError(f"stack ({stack.path}) is not the decoder stack of this {type(unwrap_model(model)).__name__}")
    return stack


# --- block shapes, from a model or from its config -------------------------------------------------------------


@dataclass(frozen=True)
class BlockShapes:
    """The linear layers of each block, and the sizes of attention and the LM head.

    Attributes:
        model_type: ``config.model_type``, or the model's class name.
        source: ``"modules"`` (read from a model) or ``"config"``.
        blocks: Per block, its linear layers as (name relative to the block, in, out, kind); ``kind`` is empty
            when read from a model (its targets come from the stack instead).
        expert_params: Per block, the weights of fused MoE experts one token passes through.
        attention_width: ``heads * head_dim``: the width of the attention-score and weighted-sum products.
        head_in: Input width of the LM head.
        vocab_size: Output width of the LM head.
        default_targets: Target names of the attention and MLP projections.
    """

    model_type: str
    source: str
    blocks: list[list[tuple[str, int, int, str]]]
    expert_params: list[float]
    attention_width: int
    head_in: int
    vocab_size: int
    default_targets: list[str]


def looks_like_config(obj: Any) -> bool:
    """A transformers ``PretrainedConfig`` (or anything shaped like one)."""
    return hasattr(obj, "model_type") and hasattr(obj, "to_dict")


_MISSING = object()


def config_value(config: Any, *names: str, default: Any = _MISSING) -> Any:
    """The first of ``names`` that the config sets (not None): architectures name the same size differently.

    Raises:
        ValueError: none is set and there is no ``default``.
    """
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    if default is _MISSING:
        raise ValueError(
            f"config of model_type {getattr(config, 'model_type', '?')!r} sets none of {list(names)}; "
            "pass the model instead to count its modules"
        )
    return default


def text_config(config: Any) -> Any:
    """The language model's config inside a multimodal one (``get_text_config``), else the config itself."""
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def config_num_layers(config: Any) -> int:
    """Number of decoder blocks a config describes."""
    return int(config_value(text_config(config), "num_hidden_layers", "n_layer", "n_layers", "num_layers"))


def _attention_sizes(config: Any) -> tuple[int, int, int, int]:
    """(hidden, heads, kv_heads, head_dim) from a config under any of the common names."""
    hidden = int(config_value(config, "hidden_size", "n_embd", "d_model"))
    heads = int(config_value(config, "num_attention_heads", "n_head", "n_heads"))
    kv_heads = config_value(config, "num_key_value_heads", default=None)
    if kv_heads is None and config.model_type == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            kv_heads = config_value(config, "num_kv_heads", default=heads)
        elif getattr(config, "multi_query", False):
            kv_heads = 1
    kv_heads = int(kv_heads if kv_heads is not None else heads)
    head_dim = int(config_value(config, "head_dim", default=hidden // heads))
    return hidden, heads, kv_heads, head_dim


# Llama-style model types (q/k/v/o, gate/up/down) costed from their config without a note in the log.
KNOWN_LLAMA_STYLE = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "stablelm",
    "olmo",
    "olmo2",
    "granite",
    "cohere",
    "starcoder2",
}


def shapes_from_config(config: Any) -> BlockShapes:
    """The blocks a config describes: GPT-2, GPT-NeoX, Falcon, BLOOM, OPT, MPT, Phi, Phi-3 and Llama-style names
    (unknown model types are read as Llama-style), every block alike."""
    get = config_value
    config = text_config(config)
    model_type = str(config.model_type)
    hidden, heads, kv_heads, head_dim = _attention_sizes(config)
    num_layers = config_num_layers(config)
    vocab = int(get(config, "vocab_size"))
    q, kv = heads * head_dim, kv_heads * head_dim
    A, M = ATTENTION, MLP
    experts = 0.0
    if model_type == "gpt2":
        inner = int(get(config, "n_inner", default=4 * hidden))
        block = [("attn.c_attn", hidden, 3 * hidden, A), ("attn.c_proj", hidden, hidden, A)]
        block += [("mlp.c_fc", hidden, inner, M), ("mlp.c_proj", inner, hidden, M)]
    elif model_type in ("gpt_neox", "falcon", "bloom"):
        prefix = "attention" if model_type == "gpt_neox" else "self_attention"
        inner = int(get(config, "intermediate_size", "ffn_hidden_size", default=4 * hidden))
        block = [(f"{prefix}.query_key_value", hidden, q + 2 * kv, A), (f"{prefix}.dense", q, hidden, A)]
        block += [("mlp.dense_h_to_4h", hidden, inner, M), ("mlp.dense_4h_to_h", inner, hidden, M)]
    elif model_type == "opt":
        inner = int(get(config, "ffn_dim", default=4 * hidden))
        block = [(f"self_attn.{n}", hidden, hidden, A) for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
        block += [("fc1", hidden, inner, M), ("fc2", inner, hidden, M)]
    elif model_type == "mpt":
        inner = int(get(config, "expansion_ratio", default=4) * hidden)
        block = [("attn.Wqkv", hidden, 3 * hidden, A), ("attn.out_proj", hidden, hidden, A)]
        block += [("ffn.up_proj", hidden, inner, M), ("ffn.down_proj", inner, hidden, M)]
    elif model_type == "phi":
        inner = int(get(config, "intermediate_size", default=4 * hidden))
        block = [("self_attn.q_proj", hidden, q, A), ("self_attn.k_proj", hidden, kv, A)]
        block += [("self_attn.v_proj", hidden, kv, A), ("self_attn.dense", q, hidden, A)]
        block += [("mlp.fc1", hidden, inner, M), ("mlp.fc2", inner, hidden, M)]
    elif model_type == "phi3":
        inner = int(get(config, "intermediate_size"))
        block = [("self_attn.qkv_proj", hidden, q + 2 * kv, A), ("self_attn.o_proj", q, hidden, A)]
        block += [("mlp.gate_up_proj", hidden, 2 * inner, M), ("mlp.down_proj", inner, hidden, M)]
    else:
        block = [("self_attn.q_proj", hidden, q, A), ("self_attn.k_proj", hidden, kv, A)]
        block += [("self_attn.v_proj", hidden, kv, A), ("self_attn.o_proj", q, hidden, A)]
        num_experts = get(config, "num_local_experts", "num_experts", default=None)
        if num_experts:
            top_k = int(get(config, "num_experts_per_tok", default=2))
            expert_inner = int(get(config, "moe_intermediate_size", "intermediate_size"))
            experts = top_k * 3 * hidden * expert_inner  # gate, up and down of each expert a token visits
            shared = get(config, "shared_expert_intermediate_size", default=0)
            if shared:
                block += [(f"mlp.shared_expert.{n}", hidden, shared, M) for n in ("gate_proj", "up_proj")]
                block += [
                    ("mlp.shared_expert.down_proj", shared, hidden, M),
                    ("mlp.shared_expert_gate", hidden, 1, ROUTER),
                ]
        else:
            if model_type not in KNOWN_LLAMA_STYLE:
                logger.info("model_type %r: costed as a Llama-style block (q/k/v/o, gate/up/down)", model_type)
            inner = int(get(config, "intermediate_size"))
            block += [(f"mlp.{n}", hidden, inner, M) for n in ("gate_proj", "up_proj")]
            block += [("mlp.down_proj", inner, hidden, M)]
    head_in = int(get(config, "word_embed_proj_dim", default=hidden)) if model_type == "opt" else hidden
    return BlockShapes(
        model_type=model_type,
        source="config",
        blocks=[list(block) for _ in range(num_layers)],
        expert_params=[experts] * num_layers,
        attention_width=q,
        head_in=head_in,
        vocab_size=vocab,
        default_targets=[name for name, _, _, kind in block if kind in (ATTENTION, MLP)],
    )


def shapes_from_model(model: nn.Module, *, stack: DecoderStack | None = None) -> BlockShapes:
    """The blocks of a model as its modules are, block by block (PEFT adapters left out)."""
    stack = resolve_stack(model, stack)
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    top_k = None
    attention_width = 0
    if config is not None:
        text = text_config(config)
        try:
            _, heads, _, head_dim = _attention_sizes(text)
            attention_width = heads * head_dim
        except ValueError:
            logger.warning("%s: no head count in its config; attention-score FLOPs not counted", stack.model_type)
        top_k = getattr(text, "num_experts_per_tok", None)
    blocks, expert_params = [], []
    for block in stack.blocks:
        linears = []
        for name, module in block.named_modules():
            if not name or is_adapter_name(name):
                continue
            shape = linear_shape(module)
            if shape is not None:
                linears.append((name, *shape, ""))
        blocks.append(linears)
        experts = 0.0
        for name in stack.expert_parameters:
            param = block.get_parameter(name)
            per_expert = param.numel() / param.shape[0]
            experts += per_expert * (top_k or param.shape[0])
        expert_params.append(experts)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        vocab, head_in = weight.shape
    else:
        if config is None:
            raise ValueError(f"{type(base).__name__} has neither an output embedding nor a config to size its head")
        text = text_config(config)
        vocab, head_in = config_value(text, "vocab_size"), config_value(text, "hidden_size", "n_embd", "d_model")
    return BlockShapes(
        model_type=stack.model_type,
        source="modules",
        blocks=blocks,
        expert_params=expert_params,
        attention_width=attention_width,
        head_in=int(head_in),
        vocab_size=int(vocab),
        default_targets=stack.default_target_modules,
    )
