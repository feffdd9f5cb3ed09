"""Shared fixtures."""

from __future__ import annotations

import functools

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# The test models are tiny: one thread is faster, and OpenMP threads spin badly on a busy 2-core machine.
torch.set_num_threads(1)

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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Llama saved with the tiny tokenizer: a local checkpoint folder for end-to-end tests."""
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tiny_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Small real-looking target and general text files."""
    folder = tmp_path_factory.mktemp("corpus")
    target = "\n\n".join(f"def f{i}(a, b):\n    return a + b * {i}\n" for i in range(60))
    general = "\n\n".join(
        "And the earth was without form, and void; and darkness was upon the deep." for _ in range(30)
    )
    (folder / "target.txt").write_text(target)
    (folder / "general.txt").write_text(general)
    return folder


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; on a CPU-only machine they are skipped, and say so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _glibc_defaults_in_this_process(monkeypatch):
    """The test process keeps glibc's own malloc thresholds: memory tests read the resident set, and a pipeline
    test tuning them (``ModelConfig.load`` on the CPU) would change every later test's figures. The tuning itself
    is tested in subprocesses (tests/test_allocator.py)."""
    monkeypatch.setattr("aletheia_lora.models.loading.tune_cpu_allocator", lambda: None)
