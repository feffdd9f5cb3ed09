"""PEFT LoRA configuration that adapts only the selected decoder blocks."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from peft import LoraConfig, TaskType
from torch import nn

from aletheia_lora.checks import (
    check_bool,
    check_choice,
    check_names,
    check_number,
    check_positive,
    validate_selected_layers,
)
from aletheia_lora.layers import (
    ATTENTION,
    KNOWN_MODULE_KINDS,
    LLAMA_TARGET_MODULES,
    MLP,
    DecoderStack,
    is_adapter_name,
    matches_target,
    resolve_stack,
    unwrap_model,
)
from aletheia_lora.ranks import BY, allocate_for_config

logger = logging.getLogger(__name__)

RANK_ALLOCATIONS = ("uniform", "scores")


@dataclass
class LoraSettings:
    """LoRA settings. Field help strings are shared by the CLI and the docs."""

    r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    attention_r: int | None = field(default=None, metadata={"help": "Rank of the attention projections."})
    mlp_r: int | None = field(default=None, metadata={"help": "Rank of the MLP projections."})
    attention_alpha: float | None = field(
        default=None, metadata={"help": "Alpha of the attention projections (default: follows the rank)."}
    )
    mlp_alpha: float | None = field(
        default=None, metadata={"help": "Alpha of the MLP projections (default: follows the rank)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt (default: the architecture's attention and MLP)."}
    )
    target_experts: bool = field(default=False, metadata={"help": "Also adapt fused MoE expert weights."})
    rank_allocation: str = field(
        default="uniform",
        metadata={
            "help": "uniform: rank r everywhere; scores: the parameter budget of rank r spread over the selected "
            "layers in proportion to their probe scores"
        },
    )
    rank_by: str = field(
        default="layer", metadata={"help": "With --rank-allocation scores: one rank per layer, or per layer_and_kind."}
    )

    def __post_init__(self) -> None:
        check_choice("--rank-allocation", self.rank_allocation, RANK_ALLOCATIONS)
        check_choice("--rank-by", self.rank_by, BY)
        for name in ("r", "lora_alpha", "attention_r", "mlp_r", "attention_alpha", "mlp_alpha"):
            flag, value = "--" + name.replace("_", "-"), getattr(self, name)
            optional = name not in ("r", "lora_alpha")
            check_number(flag, value, above=0, allow_none=optional, expected="a positive number")
            # 8.0 (from a YAML file) is a rank; kwargs() passes it on as 8
            if name in ("r", "attention_r", "mlp_r") and value is not None and not float(value).is_integer():
                raise ValueError(f"{flag} must be an integer, got {value!r}")
        check_number("--lora-dropout", self.lora_dropout, minimum=0, below=1)

    def kwargs(self) -> dict:
        """Keyword arguments for :func:`apply_aletheia_lora`."""
        out = {k: getattr(self, k) for k in ("r", "lora_alpha", "attention_r", "mlp_r", "lora_dropout")}
        out.update(attention_alpha=self.attention_alpha, mlp_alpha=self.mlp_alpha)
        out["r"] = int(self.r)
        for k in ("attention_r", "mlp_r"):
            out[k] = None if out[k] is None else int(out[k])
        return {
            **out,
            "target_modules": self.target_modules,
            "target_experts": self.target_experts,
            "rank_allocation": self.rank_allocation,
            "rank_by": self.rank_by,
        }


def aletheia_lora_config(
    selected_layers: Sequence[int],
    target_modules: Sequence[str] | None = None,
    r: int = 16,
    lora_alpha: float = 32,
    attention_r: int | None = None,
    mlp_r: int | None = None,
    attention_alpha: float | None = None,
    mlp_alpha: float | None = None,
    lora_dropout: float = 0.0,
    task_type: str = "CAUSAL_LM",
    *,
    layers_pattern: str | None = None,
    num_layers: int | None = None,
    module_kinds: dict[str, str] | None = None,
    fan_in_fan_out: bool = False,
    target_parameters: Sequence[str] | None = None,
    **lora_kwargs,
) -> LoraConfig:
    """Build a PEFT ``LoraConfig`` that adapts only ``selected_layers``.

    Args:
        selected_layers: Block indices to adapt (from :func:`select_layers`); sorted here.
        target_modules: Module names PEFT matches by suffix. Default: the Llama/Qwen/Mistral projections.
        r: LoRA rank of modules without a group override.
        lora_alpha: LoRA alpha of modules without a group override.
        attention_r: Rank of the attention projections.
        mlp_r: Rank of the MLP projections.
        attention_alpha: Alpha of the attention projections. By default it follows the rank,
            ``lora_alpha * attention_r / r``, so the scale alpha/r stays that of the other modules
            instead of silently shrinking as the rank grows. An explicit value wins.
        mlp_alpha: Same for the MLP projections.
        lora_dropout: Dropout on the LoRA input.
        task_type: PEFT task type.
        layers_pattern: Regex naming the block list (``DecoderStack.layers_pattern``); None lets PEFT read
            the first numbered segment of a module name.
        num_layers: Number of blocks, to range-check ``selected_layers``.
        module_kinds: Target name -> ``attention``/``mlp`` (from the model); guessed from names otherwise.
        fan_in_fan_out: True for GPT-2 style ``Conv1D`` weights.
        target_parameters: Full parameter names (e.g. fused MoE experts) PEFT adapts directly.
        **lora_kwargs: Passed to ``LoraConfig`` (e.g. ``use_rslora=True``).

    Returns:
        The ``LoraConfig``; pass it to ``peft.get_peft_model``.
    """
    layers = validate_selected_layers(selected_layers, num_layers)
    # NumPy scalars become int/float: a LoraConfig holding them cannot be saved as JSON.
    r = check_positive("r", r, integer=True)
    lora_alpha = check_positive("lora_alpha", lora_alpha)
    attention_r = check_positive("attention_r", attention_r, integer=True, allow_none=True)
    mlp_r = check_positive("mlp_r", mlp_r, integer=True, allow_none=True)
    attention_alpha = check_positive("attention_alpha", attention_alpha, allow_none=True)
    mlp_alpha = check_positive("mlp_alpha", mlp_alpha, allow_none=True)
    lora_dropout = check_number("lora_dropout", lora_dropout, minimum=0, below=1)
    target_modules = check_names("target_modules", target_modules) or list(LLAMA_TARGET_MODULES)
    target_parameters = check_names("target_parameters", target_parameters, what="parameter")
    if layers_pattern is not None and (not isinstance(layers_pattern, str) or not layers_pattern):
        raise TypeError(f"layers_pattern must be a non-empty string (a regex) or None, got {layers_pattern!r}")
    fan_in_fan_out = check_bool("fan_in_fan_out", fan_in_fan_out)
    check_choice("task_type", task_type, [t.value for t in TaskType])
    if module_kinds is not None and not isinstance(module_kinds, Mapping):
        raise TypeError(f"module_kinds must be a mapping of module name -> kind, got {type(module_kinds).__name__}")
    kinds = module_kinds if module_kinds is not None else KNOWN_MODULE_KINDS

    rank_pattern, alpha_pattern = {}, {}
    groups = ((ATTENTION, attention_r, attention_alpha), (MLP, mlp_r, mlp_alpha))
    for kind, group_r, group_alpha in groups:
        if group_r is None and group_alpha is None:
            continue
        names = [t for t in target_modules if kinds.get(t) == kind]
        if not names:
            logger.warning(
                "no %s module among target_modules %s: %s_r/%s_alpha ignored", kind, target_modules, kind, kind
            )
        if group_alpha is None:
            group_alpha = lora_alpha * group_r / r
        for name in names:
            # PEFT matches these keys as regexes against the end of a module name.
            key = re.escape(name)
            if group_r is not None:
                rank_pattern[key] = int(group_r)
            alpha_pattern[key] = group_alpha

    if target_parameters:
        lora_kwargs["target_parameters"] = list(target_parameters)
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        layers_to_transform=layers,
        layers_pattern=layers_pattern,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=fan_in_fan_out,
        task_type=task_type,
        bias="none",
        **lora_kwargs,
    )


def _check_against_model(config: LoraConfig, base: nn.Module, stack: DecoderStack, layers: list[int]) -> None:
    """Run PEFT's own module matcher over the model: adapters must land in exactly the selected blocks."""
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [name for name, _ in base.named_modules() if name]
    for target in config.target_modules:
        if not any(matches_target(n, target) for n in names):
            raise ValueError(
                f"target module {target!r} is not in {type(base).__name__}; its blocks have {sorted(stack.modules)}"
            )
    hit_layers = set()
    for name in names:
        if is_adapter_name(name):
            continue
        if check_target_module_exists(config, name):
            layer = stack.layer_of(name)
            if layer is None:
                raise ValueError(f"PEFT would adapt {name!r}, outside the decoder stack {stack.path}")
            hit_layers.add(layer)
    if not config.target_parameters and hit_layers != set(layers):
        raise ValueError(
            f"PEFT would adapt layers {sorted(hit_layers)}, not the selected {layers}; "
            f"check target_modules={sorted(config.target_modules)}"
        )


def apply_aletheia_lora(
    model: nn.Module,
    selected_layers: Sequence[int],
    target_modules: Sequence[str] | None = None,
    r: int = 16,
    lora_alpha: float = 32,
    attention_r: int | None = None,
    mlp_r: int | None = None,
    attention_alpha: float | None = None,
    mlp_alpha: float | None = None,
    lora_dropout: float = 0.0,
    task_type: str = "CAUSAL_LM",
    *,
    target_experts: bool = False,
    rank_allocation: str = "uniform",
    layer_scores=None,
    rank_by: str = "layer",
    stack: DecoderStack | None = None,
    **lora_kwargs,
) -> LoraConfig:
    """Build the ``LoraConfig`` for ``model``: its own module names, its block stack, checked against PEFT.

    Unlike :func:`aletheia_lora_config`, the defaults come from the model: target modules are the blocks'
    attention and MLP projections under the architecture's own names (``c_attn``, ``query_key_value``,
    ``qkv_proj``, ...), the layer pattern names the decoder stack only (never a vision tower or an MoE
    expert index), ``Conv1D`` sets ``fan_in_fan_out``, and every target module must exist. PEFT's own
    matcher is then run over the model to check that adapters land in exactly ``selected_layers``.
    The model is not modified; pass the result to ``peft.get_peft_model(model, config)``.

    Args:
        model: The causal LM (or a PeftModel around it) the config is for.
        selected_layers: Block indices to adapt.
        target_experts: Also adapt fused MoE expert weights (PEFT ``target_parameters``) in the selected
            blocks. Off by default: routers and experts are left to the base model, attention and any
            shared-expert MLP are adapted.
        rank_allocation: ``uniform`` (rank ``r`` everywhere) or ``scores``: the parameter budget of rank ``r``
            on the selected layers, spread in proportion to ``layer_scores`` (see :func:`allocate_ranks`).
        layer_scores: Probe scores, needed by ``rank_allocation="scores"``.
        rank_by: With ``scores``: ``layer`` (one rank per layer) or ``layer_and_kind``.
        stack: ``model``'s decoder stack, when the caller has found it already.
        Other arguments: as :func:`aletheia_lora_config`.

    Returns:
        The ``LoraConfig``.
    """
    target_experts = check_bool("target_experts", target_experts)
    if rank_allocation not in RANK_ALLOCATIONS:
        raise ValueError(f"rank_allocation must be 'uniform' or 'scores', got {rank_allocation!r}")
    if rank_allocation == "scores":
        if layer_scores is None:
            raise ValueError("rank_allocation='scores' needs layer_scores (from gradient_probe)")
        for name, value in (("attention_r", attention_r), ("mlp_r", mlp_r)):
            if value is not None:
                raise ValueError(f"rank_allocation='scores' sets every rank; do not give {name}={value!r}")
        for name, value in (("attention_alpha", attention_alpha), ("mlp_alpha", mlp_alpha)):
            if value is not None:
                raise ValueError(f"rank_allocation='scores' sets every alpha; do not give {name}={value!r}")
    stack = resolve_stack(model, stack)
    base = unwrap_model(model)
    layers = validate_selected_layers(selected_layers, stack.num_layers)
    if target_modules is None:
        target_modules = stack.default_target_modules
        if not target_modules:
            raise ValueError(f"{type(base).__name__}: found no attention or MLP linear modules in {stack.block_class}")
    target_parameters = None
    if stack.expert_parameters:
        if target_experts:
            target_parameters = [f"{stack.path}.{i}.{name}" for i in layers for name in stack.expert_parameters]
        else:
            logger.warning(
                "%s keeps MoE experts as fused weights %s; they are not adapted (target_experts=True adapts them)",
                stack.model_type,
                list(stack.expert_parameters),
            )
    config = aletheia_lora_config(
        layers,
        target_modules=target_modules,
        r=r,
        lora_alpha=lora_alpha,
        attention_r=attention_r,
        mlp_r=mlp_r,
        attention_alpha=attention_alpha,
        mlp_alpha=mlp_alpha,
        lora_dropout=lora_dropout,
        task_type=task_type,
        layers_pattern=stack.layers_pattern,
        num_layers=stack.num_layers,
        module_kinds={**KNOWN_MODULE_KINDS, **stack.modules},
        fan_in_fan_out=stack.fan_in_fan_out,
        target_parameters=target_parameters,
        **lora_kwargs,
    )
    _check_against_model(config, base, stack, layers)
    if rank_allocation == "scores":
        config, _ = allocate_for_config(model, config, layer_scores, by=rank_by, stack=stack)
    return config


EXPORT_FORMATS = ("peft", "axolotl", "llamafactory", "json")


def adapted_module_names(config: LoraConfig, model: nn.Module) -> list[str]:
    """Full names of the modules PEFT will adapt in ``model`` under ``config``, found with PEFT's own matcher."""
    from peft.tuners.tuners_utils import check_target_module_exists

    base = unwrap_model(model)
    return [
        name
        for name, _ in base.named_modules()
        if name and not is_adapter_name(name) and check_target_module_exists(config, name)
    ]


def export_config(config: LoraConfig, fmt: str = "peft", model: nn.Module | None = None) -> str:
    """Write a selection's LoRA config in the form another tool reads.

    Args:
        config: From :func:`apply_aletheia_lora` or :func:`aletheia_lora_config`.
        fmt: ``peft`` (``adapter_config.json``, for ``LoraConfig.from_pretrained``); ``axolotl`` (YAML keys
            ``adapter``, ``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``,
            ``peft_layers_to_transform``); ``llamafactory`` (YAML keys ``finetuning_type``, ``lora_rank``,
            ``lora_alpha``, ``lora_dropout`` and ``lora_target``, which has no layer option: it lists the full
            names of the adapted modules, which PEFT matches exactly); ``json`` (the selection and LoRA settings).
        model: Needed for ``llamafactory`` to name the modules (without it, the Llama layout
            ``model.layers.N.self_attn|mlp.NAME`` is assumed).

    Returns:
        The text to write.
    """
    import json
    import tempfile
    from pathlib import Path

    import yaml

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    layers = sorted(config.layers_to_transform or [])
    targets = sorted(config.target_modules)
    if config.rank_pattern and fmt in ("axolotl", "llamafactory"):
        raise ValueError(f"format {fmt!r} has no per-module ranks; export with --format peft")
    if fmt == "peft":
        with tempfile.TemporaryDirectory() as tmp:
            config.save_pretrained(tmp)
            return (Path(tmp) / "adapter_config.json").read_text()
    if fmt == "json":
        payload = {
            "selected_layers": layers,
            "target_modules": targets,
            "r": config.r,
            "lora_alpha": config.lora_alpha,
            "lora_dropout": config.lora_dropout,
            "layers_pattern": config.layers_pattern,
            "rank_pattern": dict(config.rank_pattern),
            "alpha_pattern": dict(config.alpha_pattern),
        }
        return json.dumps(payload, indent=2) + "\n"
    if fmt == "axolotl":
        payload = {
            "adapter": "lora",
            "lora_r": config.r,
            "lora_alpha": config.lora_alpha,
            "lora_dropout": config.lora_dropout,
            "lora_target_modules": targets,
            "peft_layers_to_transform": layers,
        }
        return yaml.safe_dump(payload, sort_keys=False)
    if model is not None:
        names = adapted_module_names(config, model)
    else:
        names = [
            f"model.layers.{i}.{'self_attn' if KNOWN_MODULE_KINDS.get(t) == ATTENTION else 'mlp'}.{t}"
            for i in layers
            for t in targets
        ]
    payload = {
        "finetuning_type": "lora",
        "lora_rank": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "lora_target": ",".join(names),
    }
    return yaml.safe_dump(payload, sort_keys=False, width=10**6)
