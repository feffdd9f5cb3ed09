"""Find a causal LM's decoder-block stack and classify the modules inside one block.

Every later stage works on this description: the probe scores the blocks, the selection picks block
indices, and the PEFT config targets modules inside the picked blocks. The stack's index is the one
PEFT reads from module names (``<path>.<index>.``), so the selection and PEFT's injection agree.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

ATTENTION = "attention"
MLP = "mlp"
ROUTER = "router"
OTHER = "other"

# Path components that mark a module as part of attention or of the feed-forward network.
_ATTENTION_HINTS = ("attn", "attention")
_MLP_HINTS = ("mlp", "ffn", "feed_forward", "moe", "expert")
# Leaf names of feed-forward projections that some architectures keep directly in the block (OPT's fc1/fc2).
_MLP_LEAVES = {
    "fc1",
    "fc2",
    "c_fc",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
    "w1",
    "w2",
    "w3",
}
# MoE routers: tiny, and adapting them changes which experts fire, so they are never default targets.
_ROUTER_LEAVES = {"gate", "router", "shared_expert_gate", "classifier"}


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


def _is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with a transposed weight.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _classify(relative_name: str) -> str:
    parts = relative_name.split(".")
    leaf = parts[-1]
    if leaf in _ROUTER_LEAVES:
        return ROUTER
    if any(hint in part.lower() for part in parts[:-1] for hint in _ATTENTION_HINTS):
        return ATTENTION
    if any(hint in part.lower() for part in parts[:-1] for hint in _MLP_HINTS) or leaf in _MLP_LEAVES:
        return MLP
    if leaf in {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv"}:
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
        if not name or "lora_" in name or name.endswith(".base_layer"):
            continue  # PEFT adapters and their wrapped base layers are not the model's own modules
        base_layer = getattr(module, "base_layer", None)
        if _is_linear(module) or (isinstance(base_layer, nn.Module) and _is_linear(base_layer)):
            linear.append(name)
            fan_in_fan_out |= type(base_layer if base_layer is not None else module).__name__ == "Conv1D"
    suffixes = _unique_suffixes(linear)
    kinds = {suffixes[name]: _classify(name) for name in linear}
    experts = tuple(
        name
        for name, param in block.named_parameters()
        if param.dim() == 3 and "lora_" not in name and _classify(name) == MLP
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
            if "lora_" not in name and (p.is_floating_point() or p.is_complex())
        ]
        per_block.append(params)
    return per_block
