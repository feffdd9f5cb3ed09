"""The protocol's tasks as token rows in three disjoint splits, the base model, and the tiny byte tokenizer.

A task's bundled corpus holds training documents and held-out ones (:func:`~aletheia_lora.data.bundled_corpus`
splits them by a hash of the document's name). The held-out documents are split again, by another hash, into
**validation** (the learning rate of each arm is chosen on it) and **test** (the reported loss; no choice reads
it), so the three splits share no document.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from torch import nn

from aletheia_lora.bench.config import TINY_MODEL
from aletheia_lora.bench.workload import _spread, tiny_bench_model
from aletheia_lora.data import bundled_corpus, tokenize_records
from aletheia_lora.data.corpora import chitchat_conversations
from aletheia_lora.models import ModelConfig

logger = logging.getLogger(__name__)

SPLIT_SALT = "aletheia-quality-split"
EOS = "<|endoftext|>"


def validation_or_test(source: str) -> str:
    """The split of a held-out document: ``"validation"`` or ``"test"``, about half each, by a salted hash."""
    digest = hashlib.sha256(f"{SPLIT_SALT}:{source}".encode()).digest()
    return "validation" if digest[0] % 2 == 0 else "test"


@functools.lru_cache(maxsize=1)
def byte_tokenizer() -> Any:
    """A byte-level tokenizer (256 bytes and EOS, no merges, no chat template) for the tiny model, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def load_base(config: Any, device: torch.device) -> tuple[nn.Module, Any]:
    """The base model and its tokenizer: the tiny random Llama with the byte tokenizer, or ``config.model``."""
    if config.model == TINY_MODEL:
        tokenizer = byte_tokenizer()
        model = tiny_bench_model(config, seed=0, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id).to(
            device
        )
        return model, tokenizer
    return ModelConfig(
        model=config.model, dtype=config.dtype, device=str(device), cpu_allocator=config.cpu_allocator
    ).load()


@dataclass
class TaskData:
    """A task's token rows: train, validation, test and general (forgetting; None when not measured)."""

    name: str
    train: list
    validation: list
    test: list
    general: list | None
    pad: int
    sources: dict[str, list[str]]  # split -> the documents it holds
    kind: str  # "text" (packed blocks) or "conversations" (loss on the assistant's turns)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "rows": {
                "train": len(self.train),
                "validation": len(self.validation),
                "test": len(self.test),
                "general": None if self.general is None else len(self.general),
            },
            "documents": {split: len(names) for split, names in self.sources.items()},
        }


def _records(task: str, config: Any) -> tuple[Dataset, Dataset, str, dict]:
    if task == "python-stdlib":
        kw = {"max_doc_chars": config.max_doc_chars}
        train = bundled_corpus(task, "train", max_chars=config.train_chars, **kw)
        held = bundled_corpus(task, "eval", max_chars=config.held_chars, **kw)
        return train, held, "text", {"text_field": "text", "pack": True}
    if task == "chitchat":
        train = chitchat_conversations("train", max_docs=config.train_dialogues, max_turns=config.max_turns)
        held = chitchat_conversations("eval", max_docs=config.held_dialogues, max_turns=config.max_turns)
        return train, held, "conversations", {"messages_field": "messages"}
    raise ValueError(f"unknown task {task!r}")


def _rows(ds: Dataset) -> list:
    return [ds[i] for i in range(len(ds))]


def load_task(task: str, config: Any, tokenizer: Any) -> TaskData:
    """The task's rows in disjoint splits (by document), tokenized for ``tokenizer``."""
    train_records, held, kind, how = _records(task, config)
    sides = [validation_or_test(s) for s in held["source"]]
    parts = {name: held.select([i for i, side in enumerate(sides) if side == name]) for name in ("validation", "test")}
    for name, part in parts.items():
        if len(part) == 0:
            raise ValueError(f"task {task}: no held-out document fell in the {name} split; hold out more")
    tokenize = functools.partial(tokenize_records, tokenizer=tokenizer, max_length=config.max_length, **how)
    train = _rows(tokenize(train_records))
    validation = _spread(_rows(tokenize(parts["validation"])), config.validation_rows)
    test = _spread(_rows(tokenize(parts["test"])), config.test_rows)
    general = None
    if config.general_data is not None:
        general_records = bundled_corpus(config.general_data, "eval", max_chars=config.general_rows * 1000)
        general = _spread(_rows(tokenize_records(general_records, tokenizer, max_length=config.max_length)),
                          config.general_rows)  # fmt: skip
    sources = {
        "train": list(train_records["source"]),
        "validation": list(parts["validation"]["source"]),
        "test": list(parts["test"]["source"]),
    }
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if len(train) < config.batch_size:
        raise ValueError(f"task {task}: {len(train)} training rows, fewer than a batch of {config.batch_size}")
    return TaskData(task, train, validation, test, general, pad, sources, kind)
