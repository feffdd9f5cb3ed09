"""What the arms train on: the base model, the training, held-out and general rows, the batches of every step,
and each arm's own LoRA copy of the base model."""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
from peft import LoraConfig
from torch import nn

from aletheia_lora.bench.config import TINY_MODEL, BenchConfig
from aletheia_lora.data import DataConfig, build_datasets, pad_collate
from aletheia_lora.models import ModelConfig
from aletheia_lora.prefix_cache import ROW_IDS
from aletheia_lora.train import prepare_lora_model

logger = logging.getLogger(__name__)


def tiny_llama(*, seed: int, **config) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of ``LlamaConfig(pad_token_id=0, **config)``, the same weights
    for the same ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(pad_token_id=0, **config)
    torch.manual_seed(seed)
    return LlamaForCausalLM(model_config)


def tiny_bench_model(config: Any, *, seed: int, vocab_size: int, **extra) -> nn.Module:
    """The benchmarks' ``tiny`` model: :func:`tiny_llama` of ``config.tiny_layers`` blocks of width
    ``config.tiny_hidden`` (4 heads, 2 key-value heads, tied embeddings)."""
    return tiny_llama(
        seed=seed,
        vocab_size=vocab_size,
        hidden_size=config.tiny_hidden,
        intermediate_size=2 * config.tiny_hidden,
        num_hidden_layers=config.tiny_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **extra,
    )


def _counting_rows(n: int, length: int, vocab: int, stride: int, seed: int) -> list[dict]:
    """Rows that count up by ``stride`` from a random start (ids 1..vocab-1): learnable in a few steps."""
    starts = np.random.default_rng(seed).integers(0, vocab - 1, n)
    return [{"input_ids": ((s + stride * np.arange(length)) % (vocab - 1) + 1).tolist()} for s in starts]


def _spread(rows, n: int) -> list:
    """``n`` rows spread evenly over ``rows`` (all of them when there are fewer)."""
    if len(rows) <= n:
        return [rows[i] for i in range(len(rows))]
    return [rows[int(i)] for i in np.linspace(0, len(rows) - 1, n).round().astype(int)]


def load_workload(config: BenchConfig, device: torch.device) -> tuple[nn.Module, list, list, list | None, int]:
    """The base model and the train, held-out target and general rows, plus the padding id.

    The general rows are None with ``general_data`` None (``--general-data none``): forgetting is not measured.
    """
    if config.model == TINY_MODEL:
        model = tiny_bench_model(config, seed=config.seed, vocab_size=config.tiny_vocab).to(device)
        n_train = config.batch_size * config.max_steps * 2
        train = _counting_rows(n_train, config.max_length, config.tiny_vocab, 1, config.seed)
        target = _counting_rows(config.eval_blocks, config.max_length, config.tiny_vocab, 1, config.seed + 1)
        general = None
        if config.general_data is not None:
            general = _counting_rows(config.general_blocks, config.max_length, config.tiny_vocab, 2, config.seed + 2)
        return model, train, target, general, 0
    model, tokenizer = ModelConfig(
        model=config.model, dtype=config.dtype, device=str(device), cpu_allocator=config.cpu_allocator
    ).load()
    data = DataConfig(
        data=config.data,
        general_data=config.general_data,
        max_length=config.max_length,
        max_train_chars=config.max_train_chars,
        max_eval_chars=config.max_eval_chars,
        split_seed=config.seed,
    )
    train, evaluation, general = build_datasets(data, tokenizer)
    for label, rows, wanted in (("eval", evaluation, config.eval_blocks), ("general", general, config.general_blocks)):
        if rows is not None and len(rows) < wanted:
            logger.warning(
                "the %s data holds %d blocks, fewer than the %d asked for: using those", label, len(rows), wanted
            )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [train[i] for i in range(len(train))]
    general_rows = None if general is None else _spread(general, config.general_blocks)
    return model, rows, _spread(evaluation, config.eval_blocks), general_rows, pad


class Batches:
    """Training batch ``i`` for step ``i``: the same for every arm. Rows go in seeded epoch permutations.

    With ``row_ids``, each batch also carries the indices of its rows in ``rows`` as a long tensor (on the CPU) under
    :data:`aletheia_lora.prefix_cache.ROW_IDS`, for a prefix cache built over ``rows``; the other tensors are the same.
    """

    def __init__(
        self,
        rows: list,
        batch_size: int,
        seed: int,
        pad_token_id: int,
        device: torch.device,
        *,
        row_ids: bool = False,
    ) -> None:
        if not rows:
            raise ValueError("the training data is empty")
        self.rows, self.batch_size, self.seed, self.pad, self.device = rows, batch_size, seed, pad_token_id, device
        self.row_ids = row_ids
        self._order: list[int] = []
        self._epochs = 0
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self._cache:
            end = (index + 1) * self.batch_size
            while len(self._order) < end:
                rng = np.random.default_rng([self.seed, self._epochs])
                self._order.extend(rng.permutation(len(self.rows)).tolist())
                self._epochs += 1
            indices = self._order[index * self.batch_size : end]
            picked = [self.rows[j] for j in indices]
            batch = {k: v.to(self.device) for k, v in pad_collate(picked, self.pad).items()}
            if self.row_ids:
                batch[ROW_IDS] = torch.tensor(indices, dtype=torch.long)  # the cache reads them on the CPU
            self._cache[index] = batch
        return self._cache[index]


def lora_copy(
    base: nn.Module, lora: LoraConfig, *, seed: int, learning_rate: float, weight_decay: float
) -> tuple[nn.Module, list[nn.Parameter], torch.optim.Optimizer]:
    """An arm: a copy of ``base`` with the adapters of ``lora``, in train mode, its trainable parameters and AdamW.

    The adapters are initialised from ``seed``, the same rule in every arm, so arms with the same blocks start
    from the same weights.
    """
    torch.manual_seed(seed)
    model = prepare_lora_model(copy.deepcopy(base), lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
