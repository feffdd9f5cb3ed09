"""Shared fixtures."""

from __future__ import annotations

import functools

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
BOS = "<s>"
# A tiny chat template whose prompt (with the generation prompt) is a prefix of the whole conversation.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}" + EOS + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_TRAINING_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "import os\nimport sys\n\nclass Thing:\n    pass\n",
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "Question: what is two plus two? Answer: four.",
] * 4


@functools.lru_cache(maxsize=2)
def _tokenizer_json(with_bos: bool) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT, trainer)
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    return tok.to_str()


def make_tiny_tokenizer(with_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (~320 tokens) built offline; EOS but no pad token; optionally adds BOS."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(with_bos)),
        eos_token=EOS,
        bos_token=BOS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tiny byte-level BPE tokenizer (no BOS added, EOS ``<|endoftext|>``, no pad token, a chat template)."""
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_bos_tokenizer() -> PreTrainedTokenizerFast:
    """Like ``tiny_tokenizer``, but it prepends ``<s>`` to every encoded text (like Llama tokenizers)."""
    return make_tiny_tokenizer(with_bos=True)
