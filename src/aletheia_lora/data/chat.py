"""Conversations (lists of ``{"role", "content"}`` messages) as token ids with the loss where SFT puts it.

A conversation is rendered with the tokenizer's chat template, or with :data:`FALLBACK_CHAT_TEMPLATE` when the
tokenizer has none, and its ids equal ``apply_chat_template(messages, tokenize=True)``. The tokens that train are
the ones TRL's ``SFTTrainer`` trains on:

* a whole conversation (a ``messages`` row): the assistant's turns, as ``assistant_only_loss=True``. When the
  template marks the assistant's text with ``{% generation %}`` tags (the fallback template does), the mask is
  ``apply_chat_template(..., return_assistant_tokens_mask=True)``'s, as TRL's. Most models' own templates have no
  such tags: then each assistant turn is the text that rendering the conversation up to and including that turn
  adds to rendering it up to the turn before with the generation prompt (the assistant's header, e.g.
  ``<|im_start|>assistant\n``, is context; its content and end-of-turn tokens train), and a token trains when any
  of its characters lies in such a turn (transformers' own rule for the tags). Every such prefix must be a prefix
  of the whole rendering, else the row is refused with a message. A slow (Python) tokenizer, which has no
  character offsets, takes this way too, tokenizing the pieces one by one;
* a prompt and its completion (TRL's conversational prompt/completion, and prompt/response text given
  ``chat_template``): everything after the rendered prompt, as ``completion_only_loss``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from aletheia_lora.data.collate import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Plain-text turns for a tokenizer without a chat template (a base model): each turn is "Role:" on its own line,
# the text, and a blank line; the assistant's text ends with the EOS token, so the model learns to stop. BOS
# starts the conversation when the tokenizer has one. The assistant's text and EOS are inside {% generation %}.
FALLBACK_CHAT_TEMPLATE = (
    "{%- if bos_token %}{{ bos_token }}{% endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ 'Assistant:\\n' }}{% generation %}{{ message['content'] }}{% if eos_token %}{{ eos_token }}{% endif %}"
    "{% endgeneration %}{{ '\\n\\n' }}"
    "{%- else -%}"
    "{{ message['role'] | capitalize }}{{ ':\\n' }}{{ message['content'] }}{{ '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ 'Assistant:\\n' }}{% endif -%}"
)

# ShareGPT rows ({"from": "human", "value": ...}) become ChatML's role/content, as TRL's maybe_convert_to_chatml
# does, and ShareGPT's role names ChatML's.
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def chat_template_of(tokenizer: Any) -> tuple[str, bool]:
    """The template conversations are rendered with, and whether it is the tokenizer's own.

    Returns:
        ``(template, own)``: the tokenizer's chat template (the default one of a named set), or
        :data:`FALLBACK_CHAT_TEMPLATE` and False when it has none.
    """
    template = getattr(tokenizer, "chat_template", None)
    if template and hasattr(tokenizer, "get_chat_template"):
        try:
            template = tokenizer.get_chat_template()
        except (ValueError, KeyError):  # a named set without a default one
            template = None
    if isinstance(template, str) and template.strip():
        return template, True
    return FALLBACK_CHAT_TEMPLATE, False


def has_generation_tags(template: str) -> bool:
    """Whether a chat template marks the assistant's text with ``{% generation %}`` ... ``{% endgeneration %}``."""
    return bool(_GENERATION_TAG.search(template))


def normalize_messages(value: Any, where: str) -> list[dict]:
    """A row's conversation as a list of ``{"role", "content", ...}`` dicts, checked.

    ShareGPT's ``{"from", "value"}`` keys become ``role``/``content`` (``human`` -> ``user``, ``gpt`` ->
    ``assistant``); keys whose value is None (columns other rows fill, e.g. ``tool_calls``) are dropped.

    Args:
        value: The row's messages.
        where: What to call the row in an error (``"row 3 of 'messages'"``).

    Raises:
        ValueError: not a non-empty list of dicts each with a text ``role``.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        kind = "an empty list" if isinstance(value, Sequence) and not value else type(value).__name__
        raise ValueError(f"{where} must be a non-empty list of {{'role', 'content'}} messages, got {kind}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            kind = type(message).__name__
            raise ValueError(f"{where}: message {i} must be a dict with 'role' and 'content', got {kind}")
        message = {k: v for k, v in message.items() if v is not None}
        if "role" not in message and "from" in message:
            source = message.pop("from")
            message["role"] = _SHAREGPT_ROLES.get(source, source)
            if "value" in message and "content" not in message:
                message["content"] = message.pop("value")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where}: message {i} has no 'role' (it has {sorted(message)})")
        messages.append(message)
    return messages


def _render(tokenizer: Any, template: str, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def _ids(encoded: Any) -> list[int]:
    return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _assistant_spans(
    tokenizer: Any, template: str, messages: list[dict], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns, each found as what rendering
    that turn adds to rendering the conversation before it (with the generation prompt)."""
    full = _render(tokenizer, template, messages)
    spans = []
    for i, message in enumerate(messages):
        if i == 0 or message["role"] != "assistant":
            continue  # an opening assistant turn has no prompt before it: context
        before = _render(tokenizer, template, messages[:i], generation_prompt=True)
        through = _render(tokenizer, template, messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(
                f"{where}: the chat template does not render the conversation before assistant message {i} as a "
                "prefix of the whole conversation, so that turn cannot be told from the prompt; use a chat "
                "template that marks the assistant's text with {% generation %} tags, or one that renders turns "
                "in order"
            )
        if len(through) > len(before):
            spans.append((len(before), len(through)))
    return full, spans


def _tokens_in_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and a 0/1 mask of the tokens overlapping ``spans`` (sorted, disjoint)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, mask, k = list(enc["input_ids"]), [], 0
        for start, end in enc["offset_mapping"]:
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            mask.append(int(k < len(spans) and end > spans[k][0]))
        return ids, mask
    # no character offsets: tokenize each piece on its own (equal to the whole where no token spans a boundary)
    ids, mask, cursor = [], [], 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, bit in ((text[cursor:start], 0), (text[start:end], 1)):
            if piece:
                piece_ids = _ids(tokenizer(piece, add_special_tokens=False))
                ids.extend(piece_ids)
                mask.extend([bit] * len(piece_ids))
        cursor = end
    return ids, mask


def _completion_tokens(
    tokenizer: Any, template: str, messages: list[dict], train_from: int
) -> tuple[list[int], list[int]]:
    """TRL's prompt/completion split: everything after the rendered prompt (with the generation prompt) trains."""
    ids = _ids(tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False))
    prompt = _ids(
        tokenizer.apply_chat_template(
            messages[:train_from], chat_template=template, tokenize=True, add_generation_prompt=True, return_dict=False
        )
    )
    n = _common_prefix(prompt, ids)
    if n < len(prompt):
        warn_once(
            "the chat template renders a prompt differently alone than followed by its completion; the completion "
            "is taken to start where the two differ (as TRL does), at %r",
            tokenizer.decode(ids[n : n + 8]),
        )
    return ids, [0] * n + [1] * (len(ids) - n)


_warned: set[str] = set()


def warn_once(message: str, *args: Any) -> None:
    """Log a warning the first time ``message`` comes up in this process (rows are tokenized one by one)."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message, *args)


def conversation_tokens(
    tokenizer: Any,
    messages: list[dict],
    *,
    train_from: int = 0,
    template: str | None = None,
    where: str = "the conversation",
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels: the ids where the loss goes, ``-100`` elsewhere.

    With ``train_from=0`` (a ``messages`` row) the assistant's turns train, as TRL's ``assistant_only_loss``
    (see the module docstring for how they are found). With ``train_from > 0`` (TRL's conversational
    prompt/completion: ``messages[:train_from]`` is the prompt) everything after the rendered prompt trains, as
    TRL's ``completion_only_loss``: the prompt is rendered with the generation prompt, and the completion starts
    where its tokens and the whole conversation's part.

    Args:
        tokenizer: A Hugging Face tokenizer.
        messages: The conversation (see :func:`normalize_messages`).
        train_from: The number of prompt messages before the completion; 0 for a whole conversation.
        template: The chat template; default: the tokenizer's, else :data:`FALLBACK_CHAT_TEMPLATE`.
        where: What to call the row in an error.

    Returns:
        ``(input_ids, labels)`` of equal length; labels are all ``-100`` when nothing trains (no assistant turn).

    Raises:
        ValueError: with ``train_from=0``, a template that renders turns out of order and has no
            ``{% generation %}`` tags.
    """
    if template is None:
        template = chat_template_of(tokenizer)[0]
    if train_from > 0:
        ids, mask = _completion_tokens(tokenizer, template, messages, train_from)
    elif has_generation_tags(template) and getattr(tokenizer, "is_fast", False):
        out = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        text, spans = _assistant_spans(tokenizer, template, messages, where)
        ids, mask = _tokens_in_spans(tokenizer, text, spans)
    return ids, [token if bit else IGNORE_INDEX for token, bit in zip(ids, mask)]


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """``messages`` with a system message first, unless ``system_prompt`` is None or they have one already."""
    if system_prompt is None or any(m.get("role") == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]
