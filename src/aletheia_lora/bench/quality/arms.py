"""The protocol's arms, registered by name: which blocks each adapts and at what ranks.

An arm is a function ``(context, seed) -> ArmChoice``; :func:`register_arm` adds one, so later arms plug in by name.
The selections come from the plan (:func:`aletheia_lora.plan.choose_layers`), the same code path as
``aletheia-lora train``.

Most arms sweep the learning rate. An arm registered with ``rate_from=SOURCE`` does not: it trains every seed (the
first included) at the rate SOURCE chose on validation, once SOURCE's sweep is complete (:func:`rate_source`). That
is for arms that change no loss, only time (prefix caching), or that start as another arm (progressive freezing
starts as LoRA on every block). An arm registered with ``after=OTHER`` waits, unit by unit, for OTHER's unit of the
same task, rate and seed, and reads it (``progressive-fixed`` freezes as many blocks as ``progressive`` did).

The four such arms:

* ``contiguous+cache``, ``truncation+cache``: the blocks of ``contiguous`` / ``truncation``, trained with the prefix
  cache (:mod:`aletheia_lora.prefix_cache`); its build time is charged to the unit's clock at step 0;
* ``progressive``: LoRA on every block, frozen from the bottom by the gradient rule of :mod:`aletheia_lora.freeze`
  (``freeze_every``, ``max_frozen_pct``);
* ``progressive-fixed``: the control: as many blocks as ``progressive`` froze in the same task and seed, frozen on a
  schedule linear in time (:func:`aletheia_lora.forecast.even_freeze_steps`), no gradient signal.
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
    """The blocks an arm adapts, its LoRA keyword arguments and what it records besides.

    ``training`` says how the unit trains beyond plain LoRA on ``layers`` (empty: plain; see
    :func:`~aletheia_lora.bench.quality.unit.run_unit`): ``{"prefix_cache": True}``, ``{"freeze": "gradient",
    "every": N, "max_frozen_pct": P}`` or ``{"freeze": "fixed"}``.
    """

    layers: list[int]
    lora: dict
    info: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)


ArmFn = Callable[[ArmContext, int], ArmChoice]
ARMS: dict[str, ArmFn] = {}
# Arms whose blocks depend on the seed (the others pick the same blocks in every seed).
SEEDED_ARMS: set[str] = set()
# Arms that do not sweep: arm -> the arm whose chosen rate they train at.
RATE_FROM: dict[str, str] = {}
# Arms whose units wait for another arm's unit of the same task, rate and seed: arm -> that arm.
AFTER: dict[str, str] = {}


def _follow(table: Mapping[str, str], name: str) -> str | None:
    seen = [name]
    while seen[-1] in table:
        seen.append(table[seen[-1]])
        if seen[-1] in seen[:-1]:
            raise ValueError(f"arm {name!r}: rate_from goes round in a circle: {' -> '.join(seen)}")
    return seen[-1] if len(seen) > 1 else None


def rate_source(name: str) -> str | None:
    """The arm whose sweep chooses ``name``'s learning rate (followed through ``rate_from`` chains); None: its own."""
    return _follow(RATE_FROM, name)


def register_arm(
    name: str, fn: ArmFn, *, seeded: bool = False, rate_from: str | None = None, after: str | None = None
) -> None:
    """Add the arm ``name`` (replacing one of that name).

    Args:
        name: The arm's name (also its folder under each task).
        fn: ``(context, seed) -> ArmChoice``.
        seeded: Its blocks depend on the seed.
        rate_from: No sweep: every seed trains at the rate this (registered) arm chose on validation.
        after: Each unit waits for this (registered) arm's unit of the same task, rate and seed, and gets its record
            (:func:`~aletheia_lora.bench.quality.unit.run_unit`'s ``after``); both arms must take the same rate.

    Raises:
        ValueError: ``rate_from`` or ``after`` names an unregistered arm or ``name`` itself; ``rate_from`` makes a
            circle; ``after`` names an arm whose rate comes from another sweep.
    """
    for label, other in (("rate_from", rate_from), ("after", after)):
        if other is not None and (other == name or other not in ARMS):
            raise ValueError(f"arm {name!r}: {label}={other!r} must name another registered arm")
    table = {k: v for k, v in RATE_FROM.items() if k != name}
    if rate_from is not None:
        table[name] = rate_from
    own = _follow(table, name) or name
    if after is not None and (_follow(table, after) or after) != own:
        raise ValueError(
            f"arm {name!r}: after={after!r} takes its rate from {_follow(table, after) or after!r}, not {own!r}; a "
            "unit can only wait for a unit of the same rate"
        )
    ARMS[name] = fn
    RATE_FROM.clear()
    RATE_FROM.update(table)
    AFTER.pop(name, None)
    if after is not None:
        AFTER[name] = after
    if seeded:
        SEEDED_ARMS.add(name)
    else:
        SEEDED_ARMS.discard(name)


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


def _cached(source: str) -> ArmFn:
    """The blocks and ranks of ``source``, trained with the prefix cache."""

    def arm(ctx: ArmContext, seed: int) -> ArmChoice:
        choice = ARMS[source](ctx, seed)
        return ArmChoice(choice.layers, choice.lora, dict(choice.info), {**choice.training, "prefix_cache": True})

    return arm


def _progressive(ctx: ArmContext, seed: int) -> ArmChoice:
    c = ctx.config
    rule = {"freeze": "gradient", "every": c.freeze_every, "max_frozen_pct": c.max_frozen_pct}
    return ArmChoice(list(range(ctx.num_layers)), ctx.lora(), {}, rule)


def _progressive_cached(ctx: ArmContext, seed: int) -> ArmChoice:
    # the frozen prefix cached once it has not changed for an epoch, as --strategy progressive --cache-prefix does
    choice = _progressive(ctx, seed)
    return ArmChoice(choice.layers, choice.lora, {}, {**choice.training, "prefix_cache": "settled"})


def _progressive_fixed(ctx: ArmContext, seed: int) -> ArmChoice:
    # how many blocks, and so when each freezes, comes from the progressive unit it runs after
    return ArmChoice(list(range(ctx.num_layers)), ctx.lora(), {}, {"freeze": "fixed"})


register_arm("all", _all)
for _name in ("score", "truncation", "contiguous"):
    register_arm(_name, _strategy(_name))
register_arm("paper", _paper)
register_arm("param-matched", _param_matched)
register_arm("random", _random, seeded=True)
register_arm("random-above", _random_above, seeded=True)
register_arm("contiguous+cache", _cached("contiguous"), rate_from="contiguous")
register_arm("truncation+cache", _cached("truncation"), rate_from="truncation")
register_arm("progressive", _progressive, rate_from="all")
register_arm("progressive-fixed", _progressive_fixed, rate_from="all", after="progressive")
register_arm("progressive+cache", _progressive_cached, rate_from="all")
