"""What one LoRA training step costs, as a function of which decoder blocks carry adapters.

Autograd stops the backward pass at the lowest block that has a trainable parameter. With the base weights
frozen, a LoRA step is therefore:

* the forward pass through every block and the LM head;
* the backward pass of the head and of every block from the top down to the LOWEST adapted block, which
  computes activation gradients only (frozen weights get no weight gradient): about one forward's FLOPs per
  linear layer, twice the forward for the attention-score products (both operands need gradients);
* the adapters themselves in the adapted blocks (forward, input gradient and weight gradient of A and B);
* the optimizer update of the adapter weights.

So the lowest adapted block sets most of the price: half the layers scattered with layer 0 among them saves
a few percent of a step, the top contiguous half saves about a quarter. Two things make the backward reach
the embeddings whatever is adapted: an input-require-grads hook on the embeddings (``enable_input_require_grads``,
which PEFT's k-bit preparation and transformers' gradient checkpointing register) and reentrant checkpointing.
Gradient checkpointing also re-runs the forward of every checkpointed block whose backward runs.

:class:`CostModel` counts FLOPs from a model's real module shapes or from its config; :meth:`CostModel.uniform`
is the model-free approximation (every block costs 1 forward and 1 backward); :func:`calibrate` times real
steps on the user's hardware and fits a :class:`Calibration`, which captures what FLOPs miss (on CPUs the
small rank-r products of the adapters cost far more than their FLOPs).
"""

from __future__ import annotations

import logging
import math
import numbers
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch
from torch import nn

from aletheia_lora.config import validate_selected_layers
from aletheia_lora.layers import ATTENTION, MLP, ROUTER, find_decoder_stack, unwrap_model

logger = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 512
# AdamW: two moment updates, bias corrections, a square root, a division and weight decay per parameter.
DEFAULT_OPTIMIZER_FLOPS_PER_PARAM = 12.0


@dataclass(frozen=True)
class StepCost:
    """FLOPs of one training step with LoRA on a given set of blocks.

    Attributes:
        forward: Base-model forward (every block and the LM head).
        backward: Base-model backward: activation gradients of the head and of the blocks it reaches.
        recompute: Forward re-run by gradient checkpointing (blocks and their adapters); 0 without it.
        lora: Adapters: forward, input gradient and weight gradient of A and B in the adapted blocks.
        optimizer: Optimizer update of the adapter weights.
        lowest_layer: The lowest adapted block: the backward stops there.
        backward_layers: How many blocks the backward pass runs through.
        adapted_layers: The adapted blocks, sorted.
        trainable_params: Adapter parameters.
    """

    forward: float
    backward: float
    recompute: float
    lora: float
    optimizer: float
    lowest_layer: int
    backward_layers: int
    adapted_layers: tuple[int, ...]
    trainable_params: int

    @property
    def total(self) -> float:
        """All FLOPs of the step."""
        return self.forward + self.backward + self.recompute + self.lora + self.optimizer


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CostModel:
    """Per-step FLOPs of each part of a LoRA step; turns a layer selection into a :class:`StepCost`.

    Build one with :meth:`from_model` (FLOPs from a model or its config) or :meth:`uniform` (no model needed).
    Per-block values are tuples indexed by block, so stacks whose blocks differ are costed block by block.
    A cost model is also a callable: ``cost(layers)`` is :meth:`speedup`.

    Attributes:
        block_forward: Forward FLOPs of each block.
        block_backward: Activation-gradient backward FLOPs of each block (frozen base weights).
        head_forward: Forward FLOPs of the final norm and LM head.
        head_backward: Backward FLOPs of the head (input gradient only).
        lora_forward: Forward FLOPs of the adapters of each block, when adapted.
        lora_backward: Backward FLOPs (input and weight gradients) of the adapters of each block, when adapted.
        lora_params: Adapter parameters of each block, when adapted.
        optimizer_flops_per_param: Optimizer FLOPs per adapter parameter and step.
        backward_to_embeddings: The backward runs through every block whatever is adapted.
        gradient_checkpointing: Every block the backward runs through re-runs its forward first.
        description: What the model was built from, for logs.
    """

    block_forward: tuple[float, ...]
    block_backward: tuple[float, ...]
    head_forward: float
    head_backward: float
    lora_forward: tuple[float, ...]
    lora_backward: tuple[float, ...]
    lora_params: tuple[int, ...]
    optimizer_flops_per_param: float = DEFAULT_OPTIMIZER_FLOPS_PER_PARAM
    backward_to_embeddings: bool = False
    gradient_checkpointing: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        n = len(self.block_forward)
        if n == 0:
            raise ValueError("a cost model needs at least one block")
        for name in ("block_backward", "lora_forward", "lora_backward", "lora_params"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} blocks")

    @property
    def num_layers(self) -> int:
        """Number of blocks."""
        return len(self.block_forward)

    @classmethod
    def uniform(
        cls,
        num_layers: int,
        *,
        head_share: float = 0.0,
        backward_to_embeddings: bool = False,
        gradient_checkpointing: bool = False,
    ) -> CostModel:
        """The model-free approximation: identical blocks costing 1 forward and 1 backward, adapters free.

        Args:
            num_layers: Number of blocks.
            head_share: Share of an all-layer step (without checkpointing) that does not depend on the
                selection: head, embeddings, loss, fixed overheads. In [0, 1). 0 counts the blocks only,
                which overstates speedups; a large-vocabulary model such as SmolLM2-135M spends about a
                fifth of its FLOPs in the head.
            backward_to_embeddings: See :class:`CostModel`.
            gradient_checkpointing: See :class:`CostModel`.

        Returns:
            The cost model.
        """
        n = _check_positive_int("num_layers", num_layers)
        share = _check_non_negative("head_share", head_share)
        if share >= 1:
            raise ValueError(f"head_share must be in [0, 1), got {head_share!r}")
        # fixed / (fixed + 2n) = share; the fixed part is split evenly between forward and backward.
        fixed = 2 * n * share / (1 - share)
        return cls(
            block_forward=(1.0,) * n,
            block_backward=(1.0,) * n,
            head_forward=fixed / 2,
            head_backward=fixed / 2,
            lora_forward=(0.0,) * n,
            lora_backward=(0.0,) * n,
            lora_params=(0,) * n,
            optimizer_flops_per_param=0.0,
            backward_to_embeddings=_check_flag("backward_to_embeddings", backward_to_embeddings),
            gradient_checkpointing=_check_flag("gradient_checkpointing", gradient_checkpointing),
            description=f"uniform {n} blocks, head share {share:g}",
        )

    @classmethod
    def from_model(
        cls,
        model_or_config: nn.Module | Any,
        *,
        seq_len: int = DEFAULT_SEQ_LEN,
        batch_size: int = 1,
        r: int = 16,
        target_modules: Sequence[str] | None = None,
        backward_to_embeddings: bool | None = None,
        gradient_checkpointing: bool = False,
        optimizer_flops_per_param: float = DEFAULT_OPTIMIZER_FLOPS_PER_PARAM,
    ) -> CostModel:
        """Count the FLOPs of a LoRA step of a model, or of a model described by its config.

        A linear layer costs ``2 * in * out`` FLOPs per token; attention scores and their weighted sum cost
        ``4 * seq_len * heads * head_dim`` per token (no discount for the causal mask, as in the unfused
        kernels); an adapter of rank ``r`` costs ``2 * r * (in + out)`` forward and twice that backward.
        Norms, activations and rotary embeddings are not counted. Fused MoE experts count
        ``num_experts_per_tok`` experts per token.

        Args:
            model_or_config: A transformers causal LM (or a PEFT/DDP wrapper): its blocks' real module shapes
                are counted, block by block. Or its ``PretrainedConfig``: shapes follow from the config
                (GPT-2, GPT-NeoX, Falcon, BLOOM, OPT, MPT, Phi, Phi-3 and Llama-style names; unknown model
                types are read as Llama-style), every block alike.
            seq_len: Tokens per sequence.
            batch_size: Sequences per step.
            r: LoRA rank.
            target_modules: Adapted module names, matched against the end of a module name as PEFT does.
                Default: the blocks' attention and MLP projections (what :func:`apply_aletheia_lora` adapts).
            backward_to_embeddings: The backward runs through every block whatever is adapted (an
                input-require-grads hook on the embeddings, or reentrant checkpointing). Default: the value
                of ``gradient_checkpointing``, because transformers' ``gradient_checkpointing_enable``
                registers that hook.
            gradient_checkpointing: Blocks re-run their forward (adapters included) before their backward.
            optimizer_flops_per_param: Optimizer FLOPs per adapter parameter and step.

        Returns:
            The cost model.

        Raises:
            TypeError: ``model_or_config`` is neither a torch module nor a config, or an option has the wrong type.
            ValueError: an option is out of range, the config lacks a size, or a target module matches nothing.
        """
        seq_len = _check_positive_int("seq_len", seq_len)
        batch_size = _check_positive_int("batch_size", batch_size)
        r = _check_positive_int("r", r)
        gradient_checkpointing = _check_flag("gradient_checkpointing", gradient_checkpointing)
        if backward_to_embeddings is None:
            backward_to_embeddings = gradient_checkpointing
        backward_to_embeddings = _check_flag("backward_to_embeddings", backward_to_embeddings)
        optimizer_flops_per_param = _check_non_negative("optimizer_flops_per_param", optimizer_flops_per_param)
        if target_modules is not None and (
            isinstance(target_modules, str) or not all(isinstance(t, str) and t for t in target_modules)
        ):
            raise TypeError(f"target_modules must be a list of module names, got {target_modules!r}")

        if isinstance(model_or_config, nn.Module):
            shapes = _shapes_from_model(model_or_config)
        elif _looks_like_config(model_or_config):
            shapes = _shapes_from_config(model_or_config)
        else:
            raise TypeError(
                "model_or_config must be a torch model or a transformers PretrainedConfig, "
                f"got {type(model_or_config).__name__}"
            )
        targets = list(target_modules) if target_modules is not None else shapes.default_targets
        if not targets:
            raise ValueError(f"{shapes.model_type}: no attention or MLP linear modules to adapt")
        all_names = {name for block in shapes.blocks for name, _, _, _ in block}
        for target in targets:
            if not any(_matches(name, target) for name in all_names):
                raise ValueError(
                    f"target module {target!r} is not in {shapes.model_type}'s blocks; they have {sorted(all_names)}"
                )

        tokens = seq_len * batch_size
        attention = 4.0 * seq_len * shapes.attention_width * tokens
        block_forward, block_backward, lora_forward, lora_backward, lora_params = [], [], [], [], []
        for block, experts in zip(shapes.blocks, shapes.expert_flops):
            linear = sum(2.0 * fan_in * fan_out for _, fan_in, fan_out, _ in block) * tokens + experts * tokens
            block_forward.append(linear + attention)
            block_backward.append(linear + 2 * attention)
            width = sum(
                fan_in + fan_out for name, fan_in, fan_out, _ in block if any(_matches(name, t) for t in targets)
            )
            lora_forward.append(2.0 * r * width * tokens)
            lora_backward.append(4.0 * r * width * tokens)
            lora_params.append(r * width)
        head = 2.0 * shapes.head_in * shapes.vocab_size * tokens
        return cls(
            block_forward=tuple(block_forward),
            block_backward=tuple(block_backward),
            head_forward=head,
            head_backward=head,
            lora_forward=tuple(lora_forward),
            lora_backward=tuple(lora_backward),
            lora_params=tuple(lora_params),
            optimizer_flops_per_param=optimizer_flops_per_param,
            backward_to_embeddings=backward_to_embeddings,
            gradient_checkpointing=gradient_checkpointing,
            description=f"{shapes.model_type} ({shapes.source}), {batch_size}x{seq_len} tokens, r={r}",
        )

    def step_cost(self, selected_layers: Iterable[int]) -> StepCost:
        """FLOPs of one step with adapters on ``selected_layers``.

        Raises:
            TypeError, ValueError: ``selected_layers`` is not a non-empty list of distinct block indices in range.
        """
        layers = validate_selected_layers(selected_layers, self.num_layers)
        lowest = layers[0]
        reached = range(0 if self.backward_to_embeddings else lowest, self.num_layers)
        forward = sum(self.block_forward) + self.head_forward
        backward = self.head_backward + sum(self.block_backward[i] for i in reached)
        lora_forward = sum(self.lora_forward[i] for i in layers)
        recompute = 0.0
        if self.gradient_checkpointing:
            # Every adapted block lies in the reached range, so all adapters re-run their forward too.
            recompute = sum(self.block_forward[i] for i in reached) + lora_forward
        params = sum(self.lora_params[i] for i in layers)
        return StepCost(
            forward=forward,
            backward=backward,
            recompute=recompute,
            lora=lora_forward + sum(self.lora_backward[i] for i in layers),
            optimizer=self.optimizer_flops_per_param * params,
            lowest_layer=lowest,
            backward_layers=len(reached),
            adapted_layers=tuple(layers),
            trainable_params=params,
        )

    def speedup(self, selected_layers: Iterable[int]) -> float:
        """Predicted step-time ratio: LoRA on every block / LoRA on ``selected_layers`` (> 1 is faster)."""
        selected = self.step_cost(selected_layers).total
        return self.step_cost(range(self.num_layers)).total / selected

    def __call__(self, selected_layers: Iterable[int]) -> float:
        return self.speedup(selected_layers)


# --- shapes -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shapes:
    """Linear layers of each block as (name relative to the block, in, out, kind), plus head and attention sizes."""

    model_type: str
    source: str
    blocks: list[list[tuple[str, int, int, str]]]
    expert_flops: list[float]  # per token, fused MoE experts (not linear modules)
    attention_width: int  # heads * head_dim: the width of the score and weighted-sum products
    head_in: int
    vocab_size: int
    default_targets: list[str]


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list ``target_modules``: the module name equals the target or ends with ``.target``."""
    return name == target or name.endswith("." + target)


def _looks_like_config(obj: Any) -> bool:
    return hasattr(obj, "model_type") and hasattr(obj, "to_dict")


_MISSING = object()


def _get(config: Any, *names: str, default: Any = _MISSING) -> Any:
    """The first of ``names`` that the config sets (not None)."""
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


def _text_config(config: Any) -> Any:
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _attention_sizes(config: Any) -> tuple[int, int, int, int]:
    """(hidden, heads, kv_heads, head_dim) from a config under any of the common names."""
    hidden = int(_get(config, "hidden_size", "n_embd", "d_model"))
    heads = int(_get(config, "num_attention_heads", "n_head", "n_heads"))
    kv_heads = _get(config, "num_key_value_heads", default=None)
    if kv_heads is None and config.model_type == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            kv_heads = _get(config, "num_kv_heads", default=heads)
        elif getattr(config, "multi_query", False):
            kv_heads = 1
    kv_heads = int(kv_heads if kv_heads is not None else heads)
    head_dim = int(_get(config, "head_dim", default=hidden // heads))
    return hidden, heads, kv_heads, head_dim


def _shapes_from_config(config: Any) -> _Shapes:
    config = _text_config(config)
    model_type = str(config.model_type)
    hidden, heads, kv_heads, head_dim = _attention_sizes(config)
    num_layers = int(_get(config, "num_hidden_layers", "n_layer", "n_layers", "num_layers"))
    vocab = int(_get(config, "vocab_size"))
    q, kv = heads * head_dim, kv_heads * head_dim
    A, M = ATTENTION, MLP
    experts = 0.0
    if model_type == "gpt2":
        inner = int(_get(config, "n_inner", default=4 * hidden))
        block = [("attn.c_attn", hidden, 3 * hidden, A), ("attn.c_proj", hidden, hidden, A)]
        block += [("mlp.c_fc", hidden, inner, M), ("mlp.c_proj", inner, hidden, M)]
    elif model_type in ("gpt_neox", "falcon", "bloom"):
        prefix = "attention" if model_type == "gpt_neox" else "self_attention"
        inner = int(_get(config, "intermediate_size", "ffn_hidden_size", default=4 * hidden))
        block = [(f"{prefix}.query_key_value", hidden, q + 2 * kv, A), (f"{prefix}.dense", q, hidden, A)]
        block += [("mlp.dense_h_to_4h", hidden, inner, M), ("mlp.dense_4h_to_h", inner, hidden, M)]
    elif model_type == "opt":
        inner = int(_get(config, "ffn_dim", default=4 * hidden))
        block = [(f"self_attn.{n}", hidden, hidden, A) for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
        block += [("fc1", hidden, inner, M), ("fc2", inner, hidden, M)]
    elif model_type == "mpt":
        inner = int(_get(config, "expansion_ratio", default=4) * hidden)
        block = [("attn.Wqkv", hidden, 3 * hidden, A), ("attn.out_proj", hidden, hidden, A)]
        block += [("ffn.up_proj", hidden, inner, M), ("ffn.down_proj", inner, hidden, M)]
    elif model_type == "phi":
        inner = int(_get(config, "intermediate_size", default=4 * hidden))
        block = [("self_attn.q_proj", hidden, q, A), ("self_attn.k_proj", hidden, kv, A)]
        block += [("self_attn.v_proj", hidden, kv, A), ("self_attn.dense", q, hidden, A)]
        block += [("mlp.fc1", hidden, inner, M), ("mlp.fc2", inner, hidden, M)]
    elif model_type == "phi3":
        inner = int(_get(config, "intermediate_size"))
        block = [("self_attn.qkv_proj", hidden, q + 2 * kv, A), ("self_attn.o_proj", q, hidden, A)]
        block += [("mlp.gate_up_proj", hidden, 2 * inner, M), ("mlp.down_proj", inner, hidden, M)]
    else:
        block = [("self_attn.q_proj", hidden, q, A), ("self_attn.k_proj", hidden, kv, A)]
        block += [("self_attn.v_proj", hidden, kv, A), ("self_attn.o_proj", q, hidden, A)]
        num_experts = _get(config, "num_local_experts", "num_experts", default=None)
        if num_experts:
            top_k = int(_get(config, "num_experts_per_tok", default=2))
            expert_inner = int(_get(config, "moe_intermediate_size", "intermediate_size"))
            experts = top_k * 3 * 2.0 * hidden * expert_inner
            shared = _get(config, "shared_expert_intermediate_size", default=0)
            if shared:
                block += [(f"mlp.shared_expert.{n}", hidden, shared, M) for n in ("gate_proj", "up_proj")]
                block += [
                    ("mlp.shared_expert.down_proj", shared, hidden, M),
                    ("mlp.shared_expert_gate", hidden, 1, ROUTER),
                ]
        else:
            if model_type not in _KNOWN_LLAMA_STYLE:
                logger.info("model_type %r: costed as a Llama-style block (q/k/v/o, gate/up/down)", model_type)
            inner = int(_get(config, "intermediate_size"))
            block += [(f"mlp.{n}", hidden, inner, M) for n in ("gate_proj", "up_proj")]
            block += [("mlp.down_proj", inner, hidden, M)]
    head_in = int(_get(config, "word_embed_proj_dim", default=hidden)) if model_type == "opt" else hidden
    return _Shapes(
        model_type=model_type,
        source="config",
        blocks=[list(block) for _ in range(num_layers)],
        expert_flops=[experts] * num_layers,
        attention_width=q,
        head_in=head_in,
        vocab_size=vocab,
        default_targets=[name for name, _, _, kind in block if kind in (ATTENTION, MLP)],
    )


_KNOWN_LLAMA_STYLE = {
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


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Module):
        module = base
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer stores its weight as (in, out)
        fan_in, fan_out = module.weight.shape
        return int(fan_in), int(fan_out)
    return None


def _shapes_from_model(model: nn.Module) -> _Shapes:
    stack = find_decoder_stack(model)
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    top_k = None
    attention_width = 0
    if config is not None:
        text = _text_config(config)
        try:
            _, heads, _, head_dim = _attention_sizes(text)
            attention_width = heads * head_dim
        except ValueError:
            logger.warning("%s: no head count in its config; attention-score FLOPs not counted", stack.model_type)
        top_k = getattr(text, "num_experts_per_tok", None)
    blocks, expert_flops = [], []
    for block in stack.blocks:
        linears = []
        for name, module in block.named_modules():
            if not name or "lora_" in name or name.endswith(".base_layer"):
                continue
            shape = _linear_shape(module)
            if shape is not None:
                linears.append((name, *shape, ""))
        blocks.append(linears)
        experts = 0.0
        for name in stack.expert_parameters:
            param = block.get_parameter(name)
            per_expert = param.numel() / param.shape[0]
            experts += 2.0 * per_expert * (top_k or param.shape[0])
        expert_flops.append(experts)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        vocab, head_in = weight.shape
    else:
        if config is None:
            raise ValueError(f"{type(base).__name__} has neither an output embedding nor a config to size its head")
        text = _text_config(config)
        vocab, head_in = _get(text, "vocab_size"), _get(text, "hidden_size", "n_embd", "d_model")
    return _Shapes(
        model_type=stack.model_type,
        source="modules",
        blocks=blocks,
        expert_flops=expert_flops,
        attention_width=attention_width,
        head_in=int(head_in),
        vocab_size=int(vocab),
        default_targets=stack.default_target_modules,
    )


# --- functional entry points --------------------------------------------------------------------------------


def step_cost(
    model_or_config: nn.Module | Any,
    selected_layers: Iterable[int],
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 1,
    r: int = 16,
    target_modules: Sequence[str] | None = None,
    backward_to_embeddings: bool | None = None,
    gradient_checkpointing: bool = False,
    optimizer_flops_per_param: float = DEFAULT_OPTIMIZER_FLOPS_PER_PARAM,
) -> StepCost:
    """FLOPs of one LoRA training step with adapters on ``selected_layers``.

    Args:
        model_or_config: A causal LM or its ``PretrainedConfig``.
        selected_layers: Adapted block indices.
        Other arguments: as :meth:`CostModel.from_model`.

    Returns:
        The step's :class:`StepCost`.
    """
    model = CostModel.from_model(
        model_or_config,
        seq_len=seq_len,
        batch_size=batch_size,
        r=r,
        target_modules=target_modules,
        backward_to_embeddings=backward_to_embeddings,
        gradient_checkpointing=gradient_checkpointing,
        optimizer_flops_per_param=optimizer_flops_per_param,
    )
    return model.step_cost(selected_layers)


def predict_speedup(
    model_or_config: nn.Module | Any,
    selected_layers: Iterable[int],
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 1,
    r: int = 16,
    target_modules: Sequence[str] | None = None,
    backward_to_embeddings: bool | None = None,
    gradient_checkpointing: bool | None = None,
    optimizer_flops_per_param: float = DEFAULT_OPTIMIZER_FLOPS_PER_PARAM,
    calibration: Calibration | None = None,
) -> float:
    """Predicted step-time ratio of LoRA on every block to LoRA on ``selected_layers`` (> 1 is faster).

    Args:
        model_or_config: A causal LM or its ``PretrainedConfig``.
        selected_layers: Adapted block indices.
        calibration: Times measured on this hardware (:func:`calibrate`). They replace the FLOP count: the
            prediction is the calibration's, measured at its own batch, rank and checkpointing regime, so
            ``seq_len``, ``batch_size``, ``r`` and ``target_modules`` do not enter. ``backward_to_embeddings``
            and ``gradient_checkpointing``, when given, must match the regime it was measured in.
        Other arguments: as :meth:`CostModel.from_model` (``gradient_checkpointing=None`` means False).

    Returns:
        The speedup; 1.0 for every block adapted.
    """
    if calibration is None:
        model = CostModel.from_model(
            model_or_config,
            seq_len=seq_len,
            batch_size=batch_size,
            r=r,
            target_modules=target_modules,
            backward_to_embeddings=backward_to_embeddings,
            gradient_checkpointing=False if gradient_checkpointing is None else gradient_checkpointing,
            optimizer_flops_per_param=optimizer_flops_per_param,
        )
        return model.speedup(selected_layers)
    if not isinstance(calibration, Calibration):
        raise TypeError(f"calibration must be a Calibration from calibrate(), got {type(calibration).__name__}")
    for name, value in (
        ("backward_to_embeddings", backward_to_embeddings),
        ("gradient_checkpointing", gradient_checkpointing),
    ):
        if value is not None and value != getattr(calibration, name):
            raise ValueError(
                f"{name}={value!r}, but the calibration was measured with {name}={getattr(calibration, name)!r}"
            )
    num_layers = _num_layers(model_or_config)
    if num_layers != calibration.num_layers:
        raise ValueError(
            f"the calibration was measured on {calibration.num_layers} layers, the model has {num_layers}"
        )
    return calibration.speedup(selected_layers)


def _num_layers(model_or_config: nn.Module | Any) -> int:
    if isinstance(model_or_config, nn.Module):
        return find_decoder_stack(model_or_config).num_layers
    if _looks_like_config(model_or_config):
        return int(_get(_text_config(model_or_config), "num_hidden_layers", "n_layer", "n_layers", "num_layers"))
    kind = type(model_or_config).__name__
    raise TypeError(f"model_or_config must be a torch model or a transformers PretrainedConfig, got {kind}")


# --- calibration --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Step time on this hardware as ``fixed + per_backward_block * blocks reached + per_adapted_block * adapted``.

    ``fixed`` holds everything a selection does not change: the forward of all blocks, the head, embeddings,
    loss, launch and optimizer overheads. ``per_backward_block`` is the backward of one block (and its
    re-forward under checkpointing); ``per_adapted_block`` is the adapters of one block, forward, backward
    and update. A calibration is also a callable: ``cal(layers)`` is :meth:`speedup`.

    Attributes:
        num_layers: Blocks of the calibrated model.
        fixed_s: Seconds per step that do not depend on the selection.
        per_backward_block_s: Seconds per block the backward pass runs through.
        per_adapted_block_s: Seconds per adapted block.
        backward_to_embeddings: The backward reached every block in the measured regime.
        gradient_checkpointing: The model had gradient checkpointing on.
        timings: The measured ``(layers, median seconds per step)`` the fit came from.
    """

    num_layers: int
    fixed_s: float
    per_backward_block_s: float
    per_adapted_block_s: float
    backward_to_embeddings: bool = False
    gradient_checkpointing: bool = False
    timings: tuple[tuple[tuple[int, ...], float], ...] = ()

    @property
    def description(self) -> str:
        """What the predictions come from, for logs and reports."""
        return (
            f"calibrated on this hardware from {len(self.timings)} timed placements: {self.fixed_s:.3f} s + "
            f"{self.per_backward_block_s:.4f} s per block the backward reaches + {self.per_adapted_block_s:.4f} s "
            "per adapted block"
        )

    def _features(self, layers: list[int]) -> tuple[int, int]:
        reached = self.num_layers if self.backward_to_embeddings else self.num_layers - layers[0]
        return reached, len(layers)

    def step_time(self, selected_layers: Iterable[int]) -> float:
        """Predicted seconds per step with adapters on ``selected_layers``."""
        reached, adapted = self._features(validate_selected_layers(selected_layers, self.num_layers))
        return self.fixed_s + self.per_backward_block_s * reached + self.per_adapted_block_s * adapted

    def speedup(self, selected_layers: Iterable[int]) -> float:
        """Predicted step-time ratio: every block adapted / ``selected_layers`` adapted."""
        return self.step_time(range(self.num_layers)) / self.step_time(selected_layers)

    def __call__(self, selected_layers: Iterable[int]) -> float:
        return self.speedup(selected_layers)

    @classmethod
    def fit(
        cls,
        num_layers: int,
        timings: Mapping[Sequence[int], float] | Iterable[tuple[Sequence[int], float]],
        *,
        backward_to_embeddings: bool = False,
        gradient_checkpointing: bool = False,
    ) -> Calibration:
        """Fit the three coefficients to measured step times by least squares, keeping them non-negative.

        An effect the placements cannot tell apart (all placements reach the same blocks, or adapt as many)
        gets coefficient 0 and its time lands in the others; so does one whose free fit comes out negative
        (noise). Three placements such as all layers, the top half and every other layer from 1 separate
        all three.

        Args:
            num_layers: Blocks of the model.
            timings: ``layers -> seconds per step`` (a mapping or pairs).
            backward_to_embeddings: See :class:`Calibration`.
            gradient_checkpointing: See :class:`Calibration`.

        Returns:
            The calibration.
        """
        num_layers = _check_positive_int("num_layers", num_layers)
        pairs = list(timings.items()) if isinstance(timings, Mapping) else list(timings)
        if not pairs:
            raise ValueError("timings is empty: measure at least one placement")
        rows, seconds = [], []
        draft = cls(num_layers, 0.0, 0.0, 0.0, backward_to_embeddings, gradient_checkpointing)
        for layers, t in pairs:
            t = _check_non_negative(f"timings[{tuple(layers)}]", t)
            rows.append((1.0, *map(float, draft._features(validate_selected_layers(layers, num_layers)))))
            seconds.append(t)
        x = torch.tensor(rows, dtype=torch.float64)
        y = torch.tensor(seconds, dtype=torch.float64).unsqueeze(1)
        best = None
        # At most three columns: trying every subset is the simplest exact non-negative least squares.
        for size in (3, 2, 1):
            for columns in combinations(range(3), size):
                sub = x[:, list(columns)]
                if int(torch.linalg.matrix_rank(sub)) < size:
                    continue
                coef = torch.linalg.lstsq(sub, y).solution.squeeze(1)
                if (coef < 0).any():
                    continue
                residual = float(((sub @ coef.unsqueeze(1) - y) ** 2).sum())
                if best is None or residual < best[0] - 1e-12 * float((y**2).sum()):
                    values = [0.0, 0.0, 0.0]
                    for column, value in zip(columns, coef.tolist()):
                        values[column] = value
                    best = (residual, values)
        if best is None:
            raise ValueError(f"cannot fit step times {seconds}: no non-negative split explains them")
        fixed, per_backward, per_adapted = best[1]
        if per_backward == 0 and not backward_to_embeddings:
            logger.warning(
                "calibration: fitted no backward cost per block: the placements or noisy timings could not separate "
                "it from the fixed cost (more steps or a larger batch help)"
            )
        return cls(
            num_layers=num_layers,
            fixed_s=fixed,
            per_backward_block_s=per_backward,
            per_adapted_block_s=per_adapted,
            backward_to_embeddings=backward_to_embeddings,
            gradient_checkpointing=gradient_checkpointing,
            timings=tuple((tuple(validate_selected_layers(layers, num_layers)), float(t)) for layers, t in pairs),
        )


def default_placements(num_layers: int) -> list[list[int]]:
    """All layers, the top half, and every other layer from 1: they separate the three calibrated costs."""
    candidates = [list(range(num_layers)), list(range(num_layers // 2, num_layers)), list(range(1, num_layers, 2))]
    unique = []
    for layers in candidates:
        if layers and layers not in unique:
            unique.append(layers)
    return unique


def _is_checkpointing(model: nn.Module) -> bool:
    # transformers 5 renamed the flag; reading the old name there only emits a deprecation warning.
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or name in vars(model):
            return bool(getattr(model, name))
    return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    placements: Sequence[Sequence[int]] | None = None,
    steps: int = 3,
    warmup: int = 1,
    r: int = 16,
    target_modules: Sequence[str] | None = None,
    lr: float = 1e-4,
    lora_kwargs: Mapping[str, Any] | None = None,
) -> Calibration:
    """Time real LoRA steps for a few placements on this hardware and fit a :class:`Calibration`.

    For each placement, adapters are injected with :func:`apply_aletheia_lora` and ``peft.get_peft_model``,
    ``warmup + steps`` AdamW steps are run on ``batch`` and the median of the timed ones is kept; the adapters
    are then removed again. The model's regime is measured as it is: gradient checkpointing if it is on, and
    whether an input-require-grads hook makes the backward reach the embeddings.

    Args:
        model: A causal LM without adapters. Its weights are not changed; it is left in the training mode and
            with the ``requires_grad`` flags it came with.
        batch: Model inputs: ``input_ids`` (and optionally ``attention_mask``, ``labels``; labels default to
            the input ids), on any device: they are moved to the model's.
        placements: Layer selections to time. Default: :func:`default_placements`.
        steps: Timed steps per placement.
        warmup: Untimed steps before them.
        r: LoRA rank.
        target_modules: Adapted modules; default as :func:`apply_aletheia_lora`.
        lr: AdamW learning rate (the step's cost does not depend on it).
        lora_kwargs: Further ``LoraConfig`` arguments.

    Returns:
        The fitted calibration; ``timings`` holds the medians.
    """
    from peft import get_peft_model

    from aletheia_lora.config import apply_aletheia_lora

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise ValueError("model already has LoRA adapters; calibrate the base model")
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
        raise TypeError(f"batch must be a mapping with an 'input_ids' tensor, got {type(batch).__name__}")
    steps = _check_positive_int("steps", steps)
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    num_layers = find_decoder_stack(model).num_layers
    if placements is None:
        placements = default_placements(num_layers)
    placements = [validate_selected_layers(layers, num_layers) for layers in placements]
    if not placements:
        raise ValueError("placements is empty: give at least one layer selection to time")

    device = next(model.parameters()).device
    inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    inputs.setdefault("labels", inputs["input_ids"].clone())
    inputs.setdefault("use_cache", False)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    gradient_checkpointing = _is_checkpointing(unwrap_model(model))
    reaches_embeddings = False
    timings = []
    model.train()
    try:
        for layers in placements:
            config = apply_aletheia_lora(model, layers, r=r, target_modules=target_modules, **dict(lora_kwargs or {}))
            peft_model = get_peft_model(model, config)
            try:
                params = [p for p in peft_model.parameters() if p.requires_grad]
                optimizer = torch.optim.AdamW(params, lr=lr)
                probe = peft_model.get_input_embeddings()(inputs["input_ids"][:, :1])
                reaches_embeddings |= bool(probe.requires_grad)
                times = []
                for step in range(warmup + steps):
                    _sync(device)
                    start = time.perf_counter()
                    peft_model(**inputs).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    _sync(device)
                    if step >= warmup:
                        times.append(time.perf_counter() - start)
                timings.append((tuple(layers), statistics.median(times)))
                logger.info("calibrate: layers %s: %.4f s/step", _span(layers), timings[-1][1])
            finally:
                model = peft_model.unload()
    finally:
        for name, p in model.named_parameters():
            if name in requires_grad:
                p.requires_grad_(requires_grad[name])
        model.train(was_training)
    return Calibration.fit(
        num_layers,
        timings,
        backward_to_embeddings=reaches_embeddings,
        gradient_checkpointing=gradient_checkpointing,
    )


def _span(layers: Sequence[int]) -> str:
    """``15..29`` for a contiguous run, else the list."""
    if len(layers) > 2 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return str(list(layers))
