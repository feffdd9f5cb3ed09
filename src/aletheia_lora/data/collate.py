"""Collating tokenized rows into padded batches whose loss covers real tokens only."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

# The label that ``torch.nn.CrossEntropyLoss`` (and every transformers causal-LM loss) skips.
IGNORE_INDEX = -100


def _integer_tensor(value: Any, row: int, key: str) -> torch.Tensor:
    """A row's token ids (or mask, or labels) as a flat long tensor; strings and fractions are refused."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"dataset row {row}: {key!r} must be a list of integers, got text; tokenize the dataset first")
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"dataset row {row}: {key!r} must be a list of integers, got {type(value).__name__}") from exc
    if tensor.numel() == 0:  # checked first: an empty list becomes a float tensor, which is not the mistake
        if key == "input_ids":
            raise ValueError(f"dataset row {row} has empty 'input_ids': a row needs at least one token")
        return torch.zeros(0, dtype=torch.long)  # the length check below names the mismatch
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"dataset row {row}: {key!r} must hold integers, got {tensor.dtype}")
    return tensor.to(torch.long).flatten()


# Not transformers.DataCollatorForSeq2Seq, which gives the same batch for well-formed rows (right padding, labels
# padded with -100): the probe collates users' rows with only a pad id (theirs needs a tokenizer with a pad token),
# rows may come without labels (theirs then gives none, so no loss), a row's own padding must stay out of the loss
# (theirs keeps its labels), and text where ids belong gets a message (tests/test_data.py shows each).
def pad_collate(features: Sequence[Mapping], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized rows into a batch whose loss covers real tokens only.

    Each row needs ``input_ids``; ``attention_mask`` defaults to all ones and ``labels`` to a copy of
    ``input_ids`` (a row's own ``labels``, e.g. prompt tokens set to -100, are kept). Padding gets
    attention 0 and label -100, so it never enters the loss.
    """
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral):
        raise TypeError(f"pad_token_id must be an integer token id, got {pad_token_id!r}")
    rows = []
    for i, row in enumerate(features):
        if not isinstance(row, Mapping) or "input_ids" not in row:
            keys = sorted(row) if isinstance(row, Mapping) else type(row).__name__
            raise ValueError(f"dataset row {i} has no 'input_ids' (got {keys}); tokenize the dataset first")
        ids = _integer_tensor(row["input_ids"], i, "input_ids")
        mask = row.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else _integer_tensor(mask, i, "attention_mask")
        labels = row.get("labels")
        labels = ids.clone() if labels is None else _integer_tensor(labels, i, "labels")
        if not (mask.numel() == labels.numel() == ids.numel()):
            raise ValueError(
                f"dataset row {i}: input_ids, attention_mask and labels differ in length "
                f"({ids.numel()}, {mask.numel()}, {labels.numel()})"
            )
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        rows.append((ids, mask, labels))
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max(ids.numel() for ids, _, _ in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
    }
    for j, (ids, mask, labels) in enumerate(rows):
        n = ids.numel()
        batch["input_ids"][j, :n] = ids
        batch["attention_mask"][j, :n] = mask
        batch["labels"][j, :n] = labels
    return batch
