"""The protocol's arms, registered by name: which blocks each adapts and at what ranks.

An arm is a function ``(context, seed) -> ArmChoice``; :func:`register_arm` adds one, so later arms (progressive
freezing, prefix caching) plug in by name. The selections come from the plan (:func:`aletheia_lora.plan.
choose_layers`), the same code path as ``aletheia-lora train``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from aletheia_lora.layers import DecoderStack
from aletheia_lora.plan import choose_layers


@dataclass
class ArmContext:
    """What an arm may look at: the base model, its probe scores, the cost model and the protocol's settings."""

    model: nn.Module
    stack: DecoderStack
    scores: Mapping[int, float]
    cost: Any
    config: Any  # QualityConfig
    seq_len: int
    batch_size: int

    @property
    def num_layers(self) -> int:
        return self.stack.num_layers

    def strategy(self, name: str) -> list[int]:
        """The blocks ``aletheia-lora train --strategy NAME --top-pct P`` picks from these scores."""
        select = {"top_pct": self.config.top_pct, "strategy": name}
        _, selection, _ = choose_layers(
            self.model,
            None,
            select=select,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            scores=self.scores,
            cost=self.cost,
            stack=self.stack,
        )
        return sorted(selection.layers)

    def budget(self) -> int:
        return len(self.strategy("score"))

    def lora(self, r: int | None = None, **extra: Any) -> dict:
        """LoRA keyword arguments at rank ``r`` (default the config's), alpha scaled to keep alpha / r."""
        r = self.config.r if r is None else r
        return {"r": r, "lora_alpha": self.config.lora_alpha * r / self.config.r, "lora_dropout": 0.0, **extra}

    def block_size(self, layer: int) -> int:
        """LoRA parameters per unit of rank on block ``layer``: in + out features of every adapted module."""
        wanted = [name for name, kind in self.stack.modules.items() if kind in ("attention", "mlp")]
        total = 0
        for path, module in self.stack.blocks[layer].named_modules():
            # a target name is the shortest unique dotted suffix of the module's path in the block
            if any(path == name or path.endswith("." + name) for name in wanted):
                total += sum(module.weight.shape)
        return total


@dataclass
class ArmChoice:
    """The blocks an arm adapts, its LoRA keyword arguments and what it records besides."""

    layers: list[int]
    lora: dict
    info: dict = field(default_factory=dict)


ArmFn = Callable[[ArmContext, int], ArmChoice]
ARMS: dict[str, ArmFn] = {}
# Arms whose blocks depend on the seed (the others pick the same blocks in every seed).
SEEDED_ARMS: set[str] = set()


def register_arm(name: str, fn: ArmFn, *, seeded: bool = False) -> None:
    """Add the arm ``name`` (replacing one of that name); ``seeded``: its blocks depend on the seed."""
    ARMS[name] = fn
    if seeded:
        SEEDED_ARMS.add(name)


def _all(ctx: ArmContext, seed: int) -> ArmChoice:
    return ArmChoice(list(range(ctx.num_layers)), ctx.lora())


def _strategy(name: str) -> ArmFn:
    return lambda ctx, seed: ArmChoice(ctx.strategy(name), ctx.lora())


def _paper(ctx: ArmContext, seed: int) -> ArmChoice:
    c = ctx.config
    extra = {
        "attention_r": c.paper_attention_r,
        "mlp_r": c.paper_mlp_r,
        "attention_alpha": c.lora_alpha * c.paper_attention_r / c.r,
        "mlp_alpha": c.lora_alpha * c.paper_mlp_r / c.r,
    }
    return ArmChoice(ctx.strategy("score"), ctx.lora(**extra), {"attention_r": extra["attention_r"],
                                                                "mlp_r": extra["mlp_r"]})  # fmt: skip


def _param_matched(ctx: ArmContext, seed: int) -> ArmChoice:
    layers = ctx.strategy("score")
    everything = sum(ctx.block_size(i) for i in range(ctx.num_layers)) * ctx.config.r
    per_rank = sum(ctx.block_size(i) for i in layers)
    rank = max(1, round(everything / per_rank))
    info = {"rank": rank, "lora_parameters": per_rank * rank, "all_layer_parameters": everything}
    return ArmChoice(layers, ctx.lora(rank), info)


def _random(ctx: ArmContext, seed: int) -> ArmChoice:
    k = ctx.budget()
    rng = np.random.default_rng([seed, 7919])  # a different draw per seed, the same on a rerun
    return ArmChoice(sorted(int(i) for i in rng.choice(ctx.num_layers, size=k, replace=False)), ctx.lora())


def _random_above(ctx: ArmContext, seed: int) -> ArmChoice:
    k, lowest = ctx.budget(), min(ctx.strategy("truncation"))
    above = list(range(lowest + 1, ctx.num_layers))
    rng = np.random.default_rng([seed, 104729])
    drawn = rng.choice(above, size=min(k - 1, len(above)), replace=False) if k > 1 and above else []
    return ArmChoice(sorted({lowest, *(int(i) for i in drawn)}), ctx.lora(), {"lowest_layer": lowest})


register_arm("all", _all)
for _name in ("score", "truncation", "contiguous"):
    register_arm(_name, _strategy(_name))
register_arm("paper", _paper)
register_arm("param-matched", _param_matched)
register_arm("random", _random, seeded=True)
register_arm("random-above", _random_above, seeded=True)
