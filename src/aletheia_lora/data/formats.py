"""Which columns of a dataset hold what: plain text, conversations, or prompt/response pairs (TRL's names too).

The formats are TRL's (https://huggingface.co/docs/trl/dataset_formats), plus this package's prompt/response:

* text: ``{"text": "..."}``; the loss covers every token;
* conversations: ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``, any
  number of turns (ShareGPT's ``conversations`` with ``from``/``value`` too); the loss covers the assistant's
  turns only;
* prompt/completion: ``{"prompt": "...", "completion": "..."}`` (or ``response``); the loss covers the completion.
  Both may be strings, or both lists of messages (TRL's conversational prompt/completion: the prompt's messages are
  context, the completion's assistant turns train).

Named columns win; without any, a dataset with no ``text`` column is searched for ``messages``, ``conversations``,
``prompt`` + ``completion`` and ``prompt`` + ``response``, in that order.

Prompt/response strings without a chat template are joined by :func:`prompt_separator`: a newline unless the
prompt is empty, ends with whitespace, or the response starts with whitespace (so TRL-style rows such as
``{"prompt": "The sky is", "completion": " blue."}`` are joined as they are); the EOS token ends the response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from datasets import Dataset

TEXT, CONVERSATIONS, PAIRS = "text", "conversations", "pairs"
# Searched in this order when no column is named and there is no text column.
MESSAGE_COLUMNS = ("messages", "conversations")
PAIR_COLUMNS = (("prompt", "completion"), ("prompt", "response"))


def _required_fields(text_field: str | None, prompt_field: str | None, response_field: str | None) -> list[str]:
    if (prompt_field is None) != (response_field is None):
        raise ValueError("prompt_field and response_field go together: pass both or neither")
    if prompt_field is not None:
        return [prompt_field, response_field]  # type: ignore[list-item]
    return [text_field or "text"]


def _check_fields(ds: Dataset, names: Sequence[str], where: str) -> None:
    for name in names:
        if name not in ds.column_names:
            raise ValueError(f"field {name!r} not found in {where}; fields: {', '.join(ds.column_names) or '(none)'}")
        feature = ds.features[name]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise ValueError(f"field {name!r} in {where} must hold text, found {feature}")


def prompt_separator(prompt: str, response: str) -> str:
    """What goes between a prompt and its response joined as plain text: ``"\\n"``, or nothing when the prompt
    is empty, already ends with whitespace, or the response starts with whitespace."""
    if not prompt or not response or prompt[-1].isspace() or response[0].isspace():
        return ""
    return "\n"


def column_kind(feature: Any) -> str:
    """``"text"`` for a string column, ``"messages"`` for a list column (conversations), else ``"other"``."""
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        return "text"
    if isinstance(feature, (list, tuple)) or type(feature).__name__ in ("List", "LargeList", "Sequence"):
        return "messages"
    return "other"


@dataclass(frozen=True)
class DataFormat:
    """The format of a dataset and the columns that hold it (see the module docstring).

    Attributes:
        kind: ``"text"``, ``"conversations"`` or ``"pairs"``.
        text_field: The text column (text).
        messages_field: The conversation column (conversations).
        prompt_field: The prompt column (pairs).
        response_field: The response or completion column (pairs).
        conversational: Pairs whose columns hold lists of messages rather than strings.
    """

    kind: str
    text_field: str | None = None
    messages_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    conversational: bool = False

    def describe(self) -> str:
        """A few words for the log: what the rows are and where the loss goes."""
        if self.kind == TEXT:
            return f"plain text ({self.text_field!r})"
        if self.kind == CONVERSATIONS:
            return f"conversations ({self.messages_field!r}), loss on the assistant turns"
        what = "lists of messages" if self.conversational else "text"
        return f"{self.prompt_field!r}/{self.response_field!r} pairs of {what}, loss on the {self.response_field}"

    def to_dict(self) -> dict:
        """The fields, JSON-ready."""
        return asdict(self)


def _check_list_column(ds: Dataset, name: str, where: str) -> None:
    if name not in ds.column_names:
        raise ValueError(f"field {name!r} not found in {where}; fields: {', '.join(ds.column_names) or '(none)'}")
    if column_kind(ds.features[name]) != "messages":
        raise ValueError(
            f"field {name!r} in {where} must hold conversations (lists of {{'role', 'content'}} messages), "
            f"found {ds.features[name]}"
        )


def _pair_format(ds: Dataset, prompt_field: str, response_field: str, where: str) -> DataFormat:
    for name in (prompt_field, response_field):
        if name not in ds.column_names:
            raise ValueError(f"field {name!r} not found in {where}; fields: {', '.join(ds.column_names) or '(none)'}")
    kinds = {name: column_kind(ds.features[name]) for name in (prompt_field, response_field)}
    if set(kinds.values()) == {"messages"}:
        return DataFormat(PAIRS, prompt_field=prompt_field, response_field=response_field, conversational=True)
    if set(kinds.values()) != {"text"} and "messages" in kinds.values():
        raise ValueError(
            f"fields {prompt_field!r} and {response_field!r} in {where} must both hold text or both hold lists "
            f"of messages, found {ds.features[prompt_field]} and {ds.features[response_field]}"
        )
    _check_fields(ds, [prompt_field, response_field], where)
    return DataFormat(PAIRS, prompt_field=prompt_field, response_field=response_field)


def detect_format(
    ds: Dataset,
    *,
    text_field: str | None = "text",
    prompt_field: str | None = None,
    response_field: str | None = None,
    messages_field: str | None = None,
    where: str = "the dataset",
) -> DataFormat:
    """The format of ``ds``: from the named columns, else found by TRL's column names.

    Args:
        ds: The records.
        text_field: The text column; when it is ``"text"`` (the default) and absent, the other formats are
            searched for by name.
        prompt_field: The prompt column (with ``response_field``).
        response_field: The response or completion column.
        messages_field: The conversation column.
        where: What to call the dataset in an error (a file path).

    Returns:
        The :class:`DataFormat`.

    Raises:
        ValueError: both a conversation and a pair column named, a named column missing or of the wrong type, or
            no known column; the message names the fields that exist.
    """
    if (prompt_field is None) != (response_field is None):
        raise ValueError("prompt_field and response_field go together: pass both or neither")
    if messages_field is not None and prompt_field is not None:
        raise ValueError("messages_field and prompt_field/response_field are two formats: pass one of them")
    if messages_field is not None:
        _check_list_column(ds, messages_field, where)
        return DataFormat(CONVERSATIONS, messages_field=messages_field)
    if prompt_field is not None:
        return _pair_format(ds, prompt_field, response_field, where)  # type: ignore[arg-type]
    text_field = text_field or "text"
    columns = set(ds.column_names)
    if text_field not in columns and text_field == "text":
        for name in MESSAGE_COLUMNS:
            if name in columns and column_kind(ds.features[name]) == "messages":
                return DataFormat(CONVERSATIONS, messages_field=name)
        for prompt, response in PAIR_COLUMNS:
            if prompt in columns and response in columns:
                return _pair_format(ds, prompt, response, where)
        fields = ", ".join(ds.column_names) or "(none)"
        raise ValueError(
            f"field 'text' not found in {where}; fields: {fields} (nor 'messages', 'conversations', "
            "'prompt'+'completion' or 'prompt'+'response'; name the columns to use)"
        )
    _check_fields(ds, [text_field], where)
    return DataFormat(TEXT, text_field=text_field)
