"""Held-out loss: the token-weighted mean next-token loss over a tokenized dataset, padding excluded.

The one computation behind every held-out number this package reports: the evaluations before and after training
and the Trainer's own evaluations during training (``train_lora``'s Trainer runs this in place of
``Trainer.evaluate``, see :mod:`aletheia_lora.trainer` for why).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from aletheia_lora.data import IGNORE_INDEX, pad_collate
from aletheia_lora.distributed import collective_device, is_distributed, is_sharded_model


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    dataset: Sequence,
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
    max_batches: int | None = None,
    distributed: bool = False,
) -> dict[str, float]:
    """Token-weighted mean next-token loss (and perplexity) over a tokenized dataset, padding excluded.

    Args:
        model: A causal LM; under several processes also an FSDP-sharded one (every rank then runs as many
            forward passes as the busiest rank, the extra ones not counted).
        dataset: Tokenized rows.
        batch_size: Rows per forward pass.
        pad_token_id: Padding id; padding never enters the loss.
        max_batches: Evaluate only the first this many batches.
        distributed: Under several processes, each rank evaluates its share of the batches and the sums
            are added across ranks, so every rank returns the whole dataset's loss. Every rank must call it.
    """
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = next(model.parameters()).device
    starts = list(range(0, len(dataset), batch_size))[:max_batches]
    collective = distributed and is_distributed()
    counted = len(starts)
    if collective:
        world = dist.get_world_size()
        mine = starts[dist.get_rank() :: world]
        counted = len(mine)
        # A sharded model needs every rank in every forward pass: a rank with one batch fewer repeats one
        # without counting it.
        if is_sharded_model(model):
            mine += starts[:1] * (-(-len(starts) // world) - len(mine))
        starts = mine
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for b, start in enumerate(starts):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in pad_collate(rows, pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            n = int((targets != IGNORE_INDEX).sum())
            if n == 0 or b >= counted:
                continue
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total += float(loss)
            tokens += n
    finally:
        model.train(was_training)
    if collective:
        sums = torch.tensor([total, float(tokens)], dtype=torch.float64, device=collective_device(device))
        dist.all_reduce(sums)
        total, tokens = float(sums[0]), int(sums[1])
    if tokens == 0:
        raise ValueError("the evaluation data has no tokens to predict")
    mean = total / tokens
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": tokens}
