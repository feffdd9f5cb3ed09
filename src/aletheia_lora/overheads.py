"""What a LoRA training step costs beyond its FLOPs: the constants of :class:`~aletheia_lora.cost.CostModel`.

A FLOP count prices every operation at the rate of a large matrix product. On a CPU much of a LoRA step runs far
below that rate: the adapters' rank-r products read and write a whole activation for ``2 * r`` FLOPs per element
(memory-bound: their time follows the width they touch, not r), and so do their scaling, their addition to the
base output and the gradient they add to the base input; attention's softmax works per score, norms, rotary
embeddings and activations per element, the loss per vocabulary entry, and the optimizer pays a fixed price per
tensor. Counted in FLOPs alone, the adapters of SmolLM2-135M at r=8 are 2.5% of an all-layer step; timed, they are
13-20% (`docs/EVIDENCE.md`). :class:`Overheads` prices each of these in **FLOP-equivalents**: the FLOPs a large
matrix product of the base model does in the same time (on the machine below, one FLOP-equivalent is ~1/60 ns).

**How the constants were measured** (the machine the committed benchmarks ran on: a 2-core AMD EPYC, one torch
thread, torch 2.13 CPU, float32; medians of interleaved repeats). ``torch.profiler`` over all-layer LoRA steps and
over forward and backward passes without adapters (the gradient forced through every block from the embeddings)
of the scaled Llama-3.1, Qwen2.5 and Phi-3.5 models of ``bench/families.py`` (batch 2 x 128) and of a
SmolLM2-135M-shaped model (batch 4 x 128); timed passes with and without adapters at r = 2, 8 and 32; and an
AdamW micro-benchmark:

* the unit: the base models' matrix products ran at 55-64 GFLOP/s, whatever their size;
* attention (torch's CPU flash-attention kernel), beyond ``4 * head_dim`` FLOPs per score forward and
  ``8 * head_dim`` backward: 2.4-3.4 ns forward and 4-9 ns backward per score (one query-key pair of one head;
  head dims 6-64) -> 150 and 420;
* elementwise work of a block (norms, rotary embeddings, activation, residual additions, reshapes): 1.2-2.8 ns
  forward and 1.4-2.9 ns backward per token and unit of the block's linear width (the sum of ``in + out`` over
  its linear layers, which the activations these operations touch follow) -> 115 and 115;
* the loss (log-softmax over the vocabulary and its backward): about 4 ns forward and 6 ns backward per token
  and vocabulary entry -> 230 and 350;
* the adapters (all-layer LoRA minus the same passes without adapters): 6-7.7 ns per token and unit of adapted
  width (the sum of ``in + out`` over the adapted modules), a third of it in the forward, within 20% of each
  other at r = 2, 8 and 32 -> beyond their ``6 * r`` FLOPs, 100 forward and 200 backward;
* AdamW (PyTorch's per-tensor loop on a CPU): 36 us per tensor and 2.5 ns per element -> 2.2e6 per adapter
  tensor (two per adapted module) and 140 per parameter beyond the 12 FLOPs the model counts.

**Checked, not fitted.** The constants were fixed before the committed run of ``bench/families.py``
(`bench/results/families.json`, 2026-11-30), so that run is a held-out check in full: over its 36 selection arms
(score, probe-pattern, truncation, contiguous of the 8 families and of SmolLM2-135M) the cost model lands within
5.8% of the measured speedup (median 0.8%) where FLOPs alone missed by up to 12.4% (median 7.7%, always too
low), and it predicts the 10 prefix-cached arms of `bench/results/prefix_cache.json` within 3.7%. On the runs
committed before these constants existed (the families run of 02:44 and `bench/results/train_smollm2.json`) it
lands within 5.9% (median 1.1%). A least-squares refit of the three constants that move predictions most
(adapters, attention backward, elementwise backward) on SmolLM2 and four families (Qwen2.5, Llama-3.1, Gemma-2,
Phi-3.5) of those earlier runs moved them by under 40% and lowered the RMS error on those from 3.4% to 3.3% while
raising it on the held-out four (Mistral, StableLM-2, TinyLlama, Mixtral) from 1.4% to 1.5%: the measured values
stand.

**Assumptions.** Dense float32 on a CPU; the attention kernel gets no discount for the causal mask (as measured);
norms, biases and embeddings are priced through the widths above; MoE routing is not priced. On a GPU, or another
CPU, the split between FLOPs and the rest differs: ``--calibrate`` (:func:`aletheia_lora.calibrate.calibrate`)
times a few steps there instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from aletheia_lora.checks import check_int, check_number
from aletheia_lora.layers import ATTENTION, KNOWN_MODULE_KINDS, MLP, BlockShapes, matches_target


@dataclass(frozen=True)
class Overheads:
    """What a LoRA step costs beyond its FLOPs, in FLOP-equivalents (see the module for how each was measured).

    Attributes:
        attention_forward: Per attention score (one query-key pair of one head) in the forward pass.
        attention_backward: Per attention score in the backward pass.
        elementwise_forward: Per token and unit of a block's linear width (sum of ``in + out``), forward.
        elementwise_backward: The same in the backward pass.
        loss_forward: Per token and vocabulary entry: the log-softmax of the loss.
        loss_backward: Per token and vocabulary entry: its backward.
        adapter_forward: Per token and unit of adapted width (sum of ``in + out`` over adapted modules), forward.
        adapter_backward: The same in the backward pass (input and weight gradients).
        optimizer_per_tensor: Per adapter weight tensor and step (two per adapted module).
        optimizer_per_param: Per adapter parameter and step, beyond the optimizer FLOPs the model counts.
    """

    attention_forward: float = 150.0
    attention_backward: float = 420.0
    elementwise_forward: float = 115.0
    elementwise_backward: float = 115.0
    loss_forward: float = 230.0
    loss_backward: float = 350.0
    adapter_forward: float = 100.0
    adapter_backward: float = 200.0
    optimizer_per_tensor: float = 2.2e6
    optimizer_per_param: float = 140.0

    def __post_init__(self) -> None:
        for item in fields(self):
            check_number(item.name, getattr(self, item.name), minimum=0)


# The constants measured on the benchmarks' CPU: what CostModel.from_model prices a step with by default.
CPU_OVERHEADS = Overheads()


def target_ranks(
    targets: Sequence[str],
    r: int,
    attention_r: int | None = None,
    mlp_r: int | None = None,
    *,
    leaf_kinds: bool = False,
) -> dict[str, int]:
    """Each target's LoRA rank, as :func:`~aletheia_lora.config.apply_aletheia_lora` sets PEFT's ``rank_pattern``:
    ``attention_r`` / ``mlp_r`` for a target whose name :data:`~aletheia_lora.layers.KNOWN_MODULE_KINDS` gives that
    kind, else ``r``. ``leaf_kinds``: look a qualified target up by its last part (a config's default targets, such as
    ``self_attn.q_proj``, stand for the leaf names ``apply_aletheia_lora`` would adapt).

    Raises:
        ValueError: ``attention_r`` or ``mlp_r`` below 1 (or not an integer).
    """
    ranks = {ATTENTION: attention_r, MLP: mlp_r}
    for kind, name in ((ATTENTION, "attention_r"), (MLP, "mlp_r")):
        if ranks[kind] is not None:
            ranks[kind] = check_int(name, ranks[kind], minimum=1)
    out = {}
    for target in targets:
        kind = KNOWN_MODULE_KINDS.get(target)
        if kind is None and leaf_kinds:
            kind = KNOWN_MODULE_KINDS.get(target.rsplit(".", 1)[-1])
        out[target] = ranks.get(kind) or r
    return out


def module_rank(name: str, ranks: Mapping[str, int], r: int) -> int:
    """The rank of module ``name``: that of the first target of ``ranks`` (:func:`target_ranks`) it matches, else
    ``r``."""
    return next((rank for target, rank in ranks.items() if matches_target(name, target)), r)


def step_overheads(
    shapes: BlockShapes,
    targets: Sequence[str],
    overheads: Overheads | None,
    *,
    seq_len: int,
    tokens: int,
    heads: int,
    r: int,
    ranks: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The overhead fields of a :class:`~aletheia_lora.cost.CostModel` for a model's shapes (all 0 for None).

    Args:
        shapes: The model's blocks and head.
        targets: Adapted module names (matched as PEFT does).
        overheads: The constants.
        seq_len: Tokens per sequence (each token's attention scores per head).
        tokens: Tokens per step.
        heads: Attention heads per block (0: scores not priced).
        r: LoRA rank.
        ranks: Each target's rank where it differs from ``r`` (:func:`target_ranks`).

    Raises:
        TypeError: ``overheads`` is neither an :class:`Overheads` nor None.
    """
    if overheads is not None and not isinstance(overheads, Overheads):
        raise TypeError(f"overheads must be an Overheads or None, got {type(overheads).__name__}")
    price = overheads or Overheads(**{item.name: 0.0 for item in fields(Overheads)})
    scores = float(seq_len * heads * tokens)
    out: dict[str, list[float]] = {name: [] for name in ("block", "backward", "forward", "adapter", "update")}
    for block in shapes.blocks:
        adapted = [(name, i, o) for name, i, o, _ in block if any(matches_target(name, t) for t in targets)]
        width = sum(i + o for _, i, o in adapted) * tokens
        linear_width = sum(i + o for _, i, o, _ in block) * tokens
        out["block"].append(price.attention_forward * scores + price.elementwise_forward * linear_width)
        out["backward"].append(price.attention_backward * scores + price.elementwise_backward * linear_width)
        out["forward"].append(price.adapter_forward * width)
        out["adapter"].append(price.adapter_backward * width)
        params = sum(module_rank(name, ranks or {}, r) * (i + o) for name, i, o in adapted)
        out["update"].append(price.optimizer_per_tensor * 2 * len(adapted) + price.optimizer_per_param * params)
    return {
        "block_forward_overhead": tuple(out["block"]),
        "block_backward_overhead": tuple(out["backward"]),
        "head_forward_overhead": price.loss_forward * shapes.vocab_size * tokens,
        "head_backward_overhead": price.loss_backward * shapes.vocab_size * tokens,
        "lora_forward_overhead": tuple(out["forward"]),
        "lora_backward_overhead": tuple(out["adapter"]),
        "lora_update_overhead": tuple(out["update"]),
    }
