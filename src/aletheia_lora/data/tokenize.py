"""Tokenizing records for causal-LM training, and checking a length against the model's context.

Plain text is packed into fixed-length blocks (or one row a document); prompt/response pairs become one row
each with the prompt masked out of the loss.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from datasets import Dataset

from aletheia_lora.data.collate import IGNORE_INDEX
from aletheia_lora.data.load import _check_fields, _required_fields

logger = logging.getLogger(__name__)


def _check_max_length(max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")


def _encode(tokenizer: Any, texts: Sequence[str], *, add_special_tokens: bool) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), 1000):
        batch = list(texts[start : start + 1000])
        enc = tokenizer(batch, add_special_tokens=add_special_tokens, return_attention_mask=False, verbose=False)
        out.extend(list(ids) for ids in enc["input_ids"])
    return out


def _rows(input_ids: list[list[int]], labels: list[list[int]] | None = None) -> Dataset:
    return Dataset.from_dict(
        {
            "input_ids": input_ids,
            "attention_mask": [[1] * len(ids) for ids in input_ids],
            "labels": [list(ids) for ids in input_ids] if labels is None else labels,
        }
    )


def _tokenize_text(ds: Dataset, tokenizer: Any, max_length: int, pack: bool, text_field: str) -> Dataset:
    texts = [t for t in ds[text_field] if t and t.strip()]
    if len(texts) < len(ds):
        logger.info("skipped %d empty documents", len(ds) - len(texts))
    eos = tokenizer.eos_token_id
    if eos is None:
        logger.warning("the tokenizer has no EOS token; documents are joined without a separator")
    docs = _encode(tokenizer, texts, add_special_tokens=True)
    if eos is not None:
        docs = [ids if ids and ids[-1] == eos else ids + [eos] for ids in docs]
    if pack:
        flat = np.fromiter((i for ids in docs for i in ids), dtype=np.int64)
        n_blocks = len(flat) // max_length
        if n_blocks == 0:
            raise ValueError(
                f"the data holds {len(flat)} tokens, fewer than one block of max_length={max_length}; "
                "add data, lower max_length or turn packing off"
            )
        return _rows(flat[: n_blocks * max_length].reshape(n_blocks, max_length).tolist())
    rows = [ids[:max_length] for ids in docs if len(ids) >= 2]
    if len(rows) < len(docs):
        logger.warning("dropped %d documents shorter than 2 tokens (nothing to predict)", len(docs) - len(rows))
    if not rows:
        raise ValueError("no document has at least 2 tokens")
    return _rows(rows)


def _chat_ids(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    user = {"role": "user", "content": prompt}
    prompt_ids = list(tokenizer.apply_chat_template([user], add_generation_prompt=True, return_dict=False))
    full = list(tokenizer.apply_chat_template([user, {"role": "assistant", "content": response}], return_dict=False))
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            "the tokenizer's chat template does not render the prompt as a prefix of the whole conversation, "
            "so the prompt cannot be masked; use chat_template=False"
        )
    return prompt_ids, full[len(prompt_ids) :]


def _tokenize_pairs(
    ds: Dataset, tokenizer: Any, max_length: int, prompt_field: str, response_field: str, chat_template: bool
) -> Dataset:
    prompts = [p or "" for p in ds[prompt_field]]
    responses = [r or "" for r in ds[response_field]]
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        pairs = [_chat_ids(tokenizer, p, r) for p, r in zip(prompts, responses)]
    else:
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        prompt_ids = _encode(tokenizer, prompts, add_special_tokens=True)
        response_ids = [ids + eos for ids in _encode(tokenizer, responses, add_special_tokens=False)]
        pairs = list(zip(prompt_ids, response_ids))
    input_ids, labels = [], []
    for (p_ids, r_ids), response in zip(pairs, responses):
        ids = (p_ids + r_ids)[:max_length]
        row_labels = ([IGNORE_INDEX] * len(p_ids) + r_ids)[:max_length]
        if not response or all(label == IGNORE_INDEX for label in row_labels):
            continue
        input_ids.append(ids)
        labels.append(row_labels)
    if len(input_ids) < len(pairs):
        logger.warning(
            "dropped %d of %d prompt/response rows with no response tokens within max_length=%d",
            len(pairs) - len(input_ids),
            len(pairs),
            max_length,
        )
    if not input_ids:
        raise ValueError(f"no prompt/response row has a response token within max_length={max_length}")
    return _rows(input_ids, labels)


def tokenize_records(
    ds: Dataset,
    tokenizer: Any,
    *,
    max_length: int = 512,
    pack: bool = True,
    text_field: str = "text",
    prompt_field: str | None = None,
    response_field: str | None = None,
    chat_template: bool = False,
) -> Dataset:
    """Tokenize records for causal-LM training.

    Text mode (no prompt/response fields): each non-empty document is tokenized with the tokenizer's own special
    tokens and ends with the EOS token. With ``pack=True`` all documents are concatenated and cut into blocks of
    exactly ``max_length`` tokens (the remainder is dropped); with ``pack=False`` each document becomes one row,
    truncated to ``max_length``.

    Prompt/response mode: one row per pair, truncated to ``max_length``, never packed. The row is the prompt
    followed by the response and EOS (or, with ``chat_template=True``, the tokenizer's chat template for a user
    turn and an assistant turn); ``labels`` are ``-100`` on every prompt token, so the loss covers the response
    only. Rows left without a response token (empty, or cut off by truncation) are dropped with a warning.

    Args:
        ds: Records, e.g. from :func:`load_records` or :func:`bundled_corpus`.
        tokenizer: A Hugging Face tokenizer.
        max_length: Tokens per block or row, at least 2.
        pack: Pack text into full blocks (text mode only).
        text_field: Column with the text in text mode.
        prompt_field: Column with prompts; with ``response_field`` selects prompt/response mode.
        response_field: Column with responses.
        chat_template: Render pairs with the tokenizer's chat template instead of plain concatenation.

    Returns:
        A dataset with exactly the columns ``input_ids``, ``attention_mask`` and ``labels``.

    Raises:
        ValueError: a bad ``max_length``, a missing field, too little text for one block, or no usable row.
    """
    _check_max_length(max_length)
    required = _required_fields(text_field, prompt_field, response_field)
    if len(ds) == 0:
        raise ValueError("the dataset holds no records: nothing to tokenize")
    _check_fields(ds, required, "the dataset")
    if prompt_field is not None:
        return _tokenize_pairs(ds, tokenizer, max_length, prompt_field, response_field, chat_template)  # type: ignore[arg-type]
    return _tokenize_text(ds, tokenizer, max_length, pack, required[0])


# ---------------------------------------------------------------------------------------------------------------
# The model's context

# Config attributes that hold the longest sequence a model's position encoding is built for, most common first.
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length")


def model_context_length(model_or_config: Any) -> tuple[int, str] | None:
    """The longest sequence ``model_or_config`` is built for, and the config attribute that says so.

    Args:
        model_or_config: A transformers model (or a PEFT/DDP wrapper, anything with ``.config``) or its config.
            A multimodal config's text config is read.

    Returns:
        ``(length, attribute)``, or None when the config names no limit (e.g. BLOOM's ALiBi).
    """
    config = getattr(model_or_config, "config", model_or_config)
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        config = get_text_config()
    for name in CONTEXT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0:
            return int(value), name
    return None


def check_max_length(max_length: int, model_or_config: Any, *, name: str = "--max-length") -> int | None:
    """Refuse sequences longer than the model's context, where the data and the model meet.

    Past its context a model with learned positions (GPT-2, OPT) fails deep inside torch with an index error,
    and a rotary one silently runs on positions it was never trained on; neither is what the user meant. So a
    too-long ``max_length`` is an error, raised before any tokenizing or training, rather than a truncation.

    Args:
        max_length: Tokens per row or block (``DataConfig.max_length``), or the length of a batch.
        model_or_config: The model (or its config).
        name: What ``max_length`` is called in the message.

    Returns:
        The model's context length, or None when its config names none (then nothing is checked).

    Raises:
        ValueError: ``max_length`` is longer than the context; the message names both numbers.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 1:
        raise ValueError(f"{name} must be a positive integer, got {max_length!r}")
    found = model_context_length(model_or_config)
    if found is None:
        return None
    context, attribute = found
    if max_length > context:
        model_type = getattr(getattr(model_or_config, "config", model_or_config), "model_type", None) or "the model"
        raise ValueError(
            f"{name} {max_length} is longer than the model's context of {context} tokens "
            f"({attribute} of {model_type}); use {name} {context} or less"
        )
    return context
