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

from aletheia_lora.data.chat import (
    chat_template_of,
    conversation_tokens,
    normalize_messages,
    warn_once,
    with_system_prompt,
)
from aletheia_lora.data.collate import IGNORE_INDEX
from aletheia_lora.data.formats import CONVERSATIONS, PAIRS, DataFormat, detect_format, prompt_separator

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
        # run_clm's group_texts; TRL's pack_dataset(strategy="wrapped") gives the same blocks but keeps a short one
        # per map batch, and TRL is no dependency of this package (test_packing_is_trl_wrapped_packing_in_full_blocks)
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


def _template(tokenizer: Any) -> str:
    template, own = chat_template_of(tokenizer)
    if not own:  # once: the train and eval sets are tokenized one after the other
        warn_once(
            "the tokenizer has no chat template: conversations are rendered with aletheia-lora's plain one "
            "('Role:' lines, EOS after each assistant turn; aletheia_lora.data.FALLBACK_CHAT_TEMPLATE)"
        )
    return template


def _keep_trained(
    rows: list[tuple[list[int], list[int]]], max_length: int, what: str, trained: str
) -> tuple[list[list[int]], list[list[int]]]:
    """Rows cut to ``max_length``; those left with nothing to train on are dropped, with a warning."""
    input_ids, labels = [], []
    for ids, row_labels in rows:
        ids, row_labels = ids[:max_length], row_labels[:max_length]
        if ids and any(label != IGNORE_INDEX for label in row_labels):
            input_ids.append(ids)
            labels.append(row_labels)
    if len(input_ids) < len(rows):
        logger.warning(
            "dropped %d of %d %s rows with no %s tokens within max_length=%d",
            len(rows) - len(input_ids),
            len(rows),
            what,
            trained,
            max_length,
        )
    if not input_ids:
        article = "an" if trained[0] in "aeiou" else "a"
        raise ValueError(f"no {what} row has {article} {trained} token within max_length={max_length}")
    return input_ids, labels


def _string_pairs(
    tokenizer: Any, prompts: list[str], responses: list[str], chat_template: bool, system_prompt: str | None
) -> list[tuple[list[int], list[int]]]:
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        template = chat_template_of(tokenizer)[0]
        rows = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            if not response:  # nothing to learn; dropped below with the count
                rows.append(([], []))
                continue
            messages = with_system_prompt(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], system_prompt
            )
            rows.append(
                conversation_tokens(
                    tokenizer, messages, train_from=len(messages) - 1, template=template, where=f"row {i}"
                )
            )
        return rows
    if system_prompt is not None:
        raise ValueError(
            "system_prompt needs a chat template: pass chat_template=True (prompt/response text without one has no "
            "system turn), or put the instructions in the prompts"
        )
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    prompt_ids = _encode(
        tokenizer, [p + prompt_separator(p, r) for p, r in zip(prompts, responses)], add_special_tokens=True
    )
    response_ids = _encode(tokenizer, responses, add_special_tokens=False)
    return [
        (p + r + eos, [IGNORE_INDEX] * len(p) + r + eos) if response else ([], [])
        for p, r, response in zip(prompt_ids, response_ids, responses)
    ]


def _tokenize_pairs(
    ds: Dataset, tokenizer: Any, max_length: int, fmt: DataFormat, chat_template: bool, system_prompt: str | None
) -> Dataset:
    prompts, responses = ds[fmt.prompt_field], ds[fmt.response_field]
    if fmt.conversational:  # TRL's conversational prompt/completion: always through a chat template
        template = _template(tokenizer)
        rows = []
        for i, (prompt, completion) in enumerate(zip(prompts, responses)):
            where = f"row {i}"
            context = normalize_messages(prompt, f"{where} of {fmt.prompt_field!r}")
            answer = normalize_messages(completion, f"{where} of {fmt.response_field!r}")
            messages = with_system_prompt(context + answer, system_prompt)
            rows.append(
                conversation_tokens(
                    tokenizer, messages, train_from=len(messages) - len(answer), template=template, where=where
                )
            )
    else:
        rows = _string_pairs(
            tokenizer, [p or "" for p in prompts], [r or "" for r in responses], chat_template, system_prompt
        )
    input_ids, labels = _keep_trained(rows, max_length, "prompt/response", "response")
    return _rows(input_ids, labels)


def _tokenize_conversations(
    ds: Dataset, tokenizer: Any, max_length: int, field: str, system_prompt: str | None
) -> Dataset:
    template = _template(tokenizer)
    rows = []
    for i, value in enumerate(ds[field]):
        messages = with_system_prompt(normalize_messages(value, f"row {i} of {field!r}"), system_prompt)
        rows.append(conversation_tokens(tokenizer, messages, template=template, where=f"row {i}"))
    input_ids, labels = _keep_trained(rows, max_length, "conversation", "assistant")
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
    messages_field: str | None = None,
    system_prompt: str | None = None,
) -> Dataset:
    """Tokenize records for causal-LM training.

    The format comes from the named columns, else from TRL's column names (:func:`detect_format`).

    Text: each non-empty document is tokenized with the tokenizer's own special tokens and ends with the EOS
    token. With ``pack=True`` all documents are concatenated and cut into blocks of exactly ``max_length`` tokens
    (the remainder is dropped); with ``pack=False`` each document becomes one row, truncated to ``max_length``.

    Prompt/response (or TRL's prompt/completion) strings: one row per pair, never packed. Without
    ``chat_template`` the row is the prompt, :func:`prompt_separator` (a newline unless either side already has
    whitespace there), the response and EOS; with it, the tokenizer's chat template for a user turn and an
    assistant turn. ``labels`` are ``-100`` on every prompt token, so the loss covers the response only.

    Conversations (``messages``) and TRL's conversational prompt/completion (both lists of messages): one row per
    conversation, rendered with the tokenizer's chat template (:data:`FALLBACK_CHAT_TEMPLATE` when it has none);
    the loss covers the assistant's turns (of the completion), see :func:`conversation_tokens`.

    Rows are truncated to ``max_length`` (keeping the start); rows left without a token to train on (an empty
    response, or one cut off by truncation) are dropped with a warning.

    Args:
        ds: Records, e.g. from :func:`load_records` or :func:`bundled_corpus`.
        tokenizer: A Hugging Face tokenizer.
        max_length: Tokens per block or row, at least 2.
        pack: Pack text into full blocks (text only).
        text_field: Column with the text.
        prompt_field: Column with prompts (strings or lists of messages); with ``response_field``.
        response_field: Column with responses or completions.
        chat_template: Render string pairs with the tokenizer's chat template instead of plain joining.
        messages_field: Column with conversations.
        system_prompt: A system message put first in every conversation without one (conversations, and string
            pairs with ``chat_template``); refused for plain text and untemplated pairs, which have no system turn.

    Returns:
        A dataset with exactly the columns ``input_ids``, ``attention_mask`` and ``labels``.

    Raises:
        ValueError: a bad ``max_length``, a missing field, too little text for one block, or no usable row.
    """
    _check_max_length(max_length)
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise ValueError(f"system_prompt must be text or None, got {type(system_prompt).__name__}")
    if len(ds) == 0:
        raise ValueError("the dataset holds no records: nothing to tokenize")
    fmt = detect_format(
        ds,
        text_field=text_field,
        prompt_field=prompt_field,
        response_field=response_field,
        messages_field=messages_field,
    )
    if fmt.kind == CONVERSATIONS:
        return _tokenize_conversations(ds, tokenizer, max_length, fmt.messages_field, system_prompt)  # type: ignore[arg-type]
    if fmt.kind == PAIRS:
        return _tokenize_pairs(ds, tokenizer, max_length, fmt, chat_template, system_prompt)
    if system_prompt is not None:
        raise ValueError("system_prompt applies to conversations and prompt/response pairs, not to plain text")
    return _tokenize_text(ds, tokenizer, max_length, pack, fmt.text_field)  # type: ignore[arg-type]


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
