"""What the examples share: the model to run on and a few rows of real text, offline.

``tiny`` (the default, used in CI) is a small randomly initialised Llama with a byte-level tokenizer: it
runs in seconds on a CPU, but its probe scores mean nothing. ``smollm2-135m`` is the bundled pretrained
SmolLM2-135M (see the README), and any local checkpoint folder works too.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from aletheia_lora.data import bundled_corpus, tokenize_records
from aletheia_lora.models import load_model_and_tokenizer

TINY = "tiny"
EOS = "<|endoftext|>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte (no merges) and an end-of-text token: nothing to download or train."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


def load(name: str = TINY, *, num_layers: int = 8, seed: int = 0):
    """``(model, tokenizer)``: the tiny random Llama, or a model :func:`load_model_and_tokenizer` knows."""
    if name != TINY:
        return load_model_and_tokenizer(name)
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


def text_rows(max_docs: int = 16, max_doc_chars: int = 1500):
    """Documents of the Python reference manual (it ships with Python), as ``{"text": ...}`` rows."""
    return bundled_corpus("python-docs", max_docs=max_docs, max_doc_chars=max_doc_chars).select_columns(["text"])


def token_rows(tokenizer, max_length: int = 64, **kwargs):
    """The same text tokenized and packed into rows of ``max_length`` tokens (``input_ids``, ``labels``)."""
    return tokenize_records(text_rows(**kwargs), tokenizer, max_length=max_length)


def cpu_training_args(output_dir: str, steps: int, **overrides) -> dict:
    """Keyword arguments of a few logged CPU steps, for ``TrainingArguments`` or TRL's ``SFTConfig``."""
    return {
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        **overrides,
    }
