"""The data settings of the command line, the train/eval split of records, and the datasets a run trains on.

Formats (:mod:`~aletheia_lora.data.formats`): plain text; conversations (a ``messages`` column, loss on the assistant
turns); prompt/response or TRL's prompt/completion, as text or as lists of messages (loss on the response). Text
pairs without a chat template are joined as prompt, a newline (none when the prompt ends or the response starts with
whitespace), response and EOS. ``--system-prompt`` is put first in every conversation that has no system message.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from datasets import Dataset

from aletheia_lora.data.chat import chat_template_of, has_generation_tags
from aletheia_lora.data.corpora import _check_cap, bundled_corpus, is_bundled_corpus, missing_corpus_package
from aletheia_lora.data.formats import CONVERSATIONS, PAIRS, TEXT, DataFormat, detect_format
from aletheia_lora.data.load import load_records, read_records
from aletheia_lora.data.tokenize import tokenize_records

logger = logging.getLogger(__name__)


# A column that carries each row's original position through the library's split (see train_eval_split).
_ROW = "__aletheia_row__"


def train_eval_split(
    ds: Dataset, eval_fraction: float = 0.1, seed: int = 0, *, eval_rows: int | None = None
) -> tuple[Dataset, Dataset]:
    """Split records into train and eval sets, deterministically, with ``Dataset.train_test_split``.

    The rows are drawn by ``train_test_split(test_size=n, seed=seed)`` (a permutation from
    ``numpy.random.default_rng(seed)``): the same dataset and seed always give the same split. Two things are
    this function's own: the number of eval rows is ``round(len * eval_fraction)``, at least 1 and leaving at
    least 1 for training (``train_test_split`` rounds a fraction up and refuses rather than clamps), and both
    parts keep the original row order (documents are packed in file order). Split documents before tokenizing,
    so no document lands on both sides. The bundled corpora are not split here: their eval documents are
    held-out files (:func:`~aletheia_lora.data.bundled_corpus`).

    Args:
        ds: The records.
        eval_fraction: Share of rows for evaluation, strictly between 0 and 1 (at least one row is taken).
        seed: Seed of the permutation.
        eval_rows: Number of eval rows instead of a fraction (1 to ``len(ds) - 1``).

    Returns:
        ``(train, eval)``.

    Raises:
        ValueError: a fraction outside (0, 1), a bad ``eval_rows``, or fewer than 2 rows.
    """
    n = len(ds)
    if n < 2:
        raise ValueError(f"cannot split a dataset of {n} row(s) into train and eval; it needs at least 2 rows")
    if eval_rows is not None:
        if isinstance(eval_rows, bool) or not isinstance(eval_rows, int) or not 1 <= eval_rows <= n - 1:
            raise ValueError(f"eval_rows must be an integer from 1 to {n - 1} for {n} rows, got {eval_rows!r}")
        n_eval = eval_rows
    else:
        if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 < eval_fraction < 1:
            raise ValueError(f"eval_fraction must be strictly between 0 and 1, got {eval_fraction!r}")
        n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    split = ds.add_column(_ROW, list(range(n))).train_test_split(test_size=n_eval, seed=seed)
    return tuple(ds.select(sorted(split[part][_ROW])) for part in ("train", "test"))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# Configuration for the command line


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --general-data's default: the bundled KJV prose when its optional package is installed, else none.
AUTO_GENERAL = "auto"


@dataclass
class DataConfig:
    """Where the training, evaluation and general (forgetting) data come from, and how they are tokenized."""

    data: str = field(
        default="python-stdlib",
        metadata={
            "help": "Target data: a bundled corpus (python-stdlib, kjv, python-docs, chitchat as plain "
            "transcripts) or a path to a .txt, .jsonl, .json, .csv or .parquet file, a folder of .txt files or a "
            "Dataset.save_to_disk folder."
        },
    )
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "Held-out target data (same kinds as --data); default: the bundled corpus's eval split, or "
            "--eval-fraction of the records in --data."
        },
    )
    general_data: str | None = field(
        default=AUTO_GENERAL,
        metadata={
            "help": "General text unrelated to the target, to measure forgetting on; 'none' to skip. 'auto' (the "
            "default): the bundled King James Bible prose (kjv) when its package (the demo extra) is installed, "
            "else none, said in the log, so a base install runs on your own data as it is."
        },
    )
    text_field: str = field(
        default="text",
        metadata={
            "help": "Column holding plain text in --data files; when 'text' is absent, TRL's conversation or "
            "prompt/completion columns are looked for (see --messages-field, --response-field)."
        },
    )
    prompt_field: str | None = field(
        default=None, metadata={"help": "Column holding prompts (with --response-field: loss on responses only)."}
    )
    response_field: str | None = field(
        default=None,
        metadata={
            "help": "Column holding responses (TRL's 'completion'). Both columns may hold text or both lists of "
            "messages (TRL's conversational prompt/completion). Text is joined as prompt, a newline (none when "
            "the prompt ends or the response starts with whitespace), response, EOS; without named columns, "
            "'prompt'+'completion' or 'prompt'+'response' are used when the data has no --text-field column."
        },
    )
    messages_field: str | None = field(
        default=None,
        metadata={
            "help": "Column holding conversations: lists of {role, content} messages (system, user, assistant; "
            "multi-turn), loss on the assistant turns only, rendered with the tokenizer's chat template (a "
            "plain 'Role:' template when it has none). Default: a 'messages' or 'conversations' column, when the "
            "data has no --text-field column."
        },
    )
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "System message put first in every conversation that has none (conversations, "
            "prompt/completion messages, and --chat-template pairs); not for plain text or untemplated pairs."
        },
    )
    chat_template: bool = field(
        default=False,
        metadata={
            "help": "Render prompt/response text with the tokenizer's chat template (a user and an assistant "
            "turn); conversations always use it."
        },
    )
    max_length: int = field(default=128, metadata={"help": "Tokens per training block or row."})
    pack: bool = field(
        default=True, metadata={"help": "Pack text into full blocks of --max-length tokens (else one row a document)."}
    )
    eval_fraction: float = field(
        default=0.1, metadata={"help": "Share of --data records held out for eval when no --eval-data is given."}
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/eval split of --data records."})
    max_train_chars: int | None = field(
        default=200_000, metadata={"help": "Characters of training text taken from a bundled corpus."}
    )
    max_eval_chars: int | None = field(
        default=40_000, metadata={"help": "Characters of eval and of general text taken from a bundled corpus."}
    )
    max_doc_chars: int | None = field(
        default=10_000, metadata={"help": "Cut each bundled document to this many characters (more, shorter files)."}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.data, (str, os.PathLike)) or not str(self.data).strip():
            raise ValueError(f"--data must name a bundled corpus or a path, got {self.data!r}")
        self.data = str(self.data).strip()
        for name in ("eval_data", "general_data"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{_flag(name)} must name a bundled corpus or a path, got {value!r}")
        if self.general_data is not None and str(self.general_data).strip().lower() == AUTO_GENERAL:
            # resolved here, so run_config.json records what the run measured forgetting on
            self.general_data = None if missing_corpus_package("kjv") else "kjv"
        if self.general_data is not None and str(self.general_data).strip().lower() in ("", "none", "off"):
            self.general_data = None
        if self.eval_data is not None and not str(self.eval_data).strip():
            self.eval_data = None
        for name in ("text_field", "prompt_field", "response_field", "messages_field"):
            value = getattr(self, name)
            if (value is not None or name == "text_field") and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{_flag(name)} must be a column name, got {value!r}")
        for name in ("pack", "chat_template"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{_flag(name)} must be true or false, got {getattr(self, name)!r}")
        if (self.prompt_field is None) != (self.response_field is None):
            raise ValueError("--prompt-field and --response-field go together: pass both or neither")
        if self.messages_field is not None and self.prompt_field is not None:
            raise ValueError("--messages-field and --prompt-field/--response-field are two formats: pass one")
        if self.chat_template and self.messages_field is not None:
            raise ValueError(
                "--chat-template is for --prompt-field/--response-field text; conversations (--messages-field) "
                "always use the chat template"
            )
        if self.chat_template and self.prompt_field is None:
            raise ValueError("--chat-template needs --prompt-field and --response-field")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"--system-prompt must be text, got {self.system_prompt!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"--max-length must be an integer >= 2, got {self.max_length!r}")
        if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction, (int, float)):
            raise ValueError(f"--eval-fraction must be a number strictly between 0 and 1, got {self.eval_fraction!r}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"--eval-fraction must be strictly between 0 and 1, got {self.eval_fraction!r}")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise ValueError(f"--split-seed must be an integer, got {self.split_seed!r}")
        for name in ("max_train_chars", "max_eval_chars", "max_doc_chars"):
            try:
                _check_cap(_flag(name), getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{exc} (no limit)") from None

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the fields, in order (for building command-line options)."""
        return [f.name for f in fields(cls)]

    def check_packages(self) -> None:
        """Refuse a bundled corpus whose optional package is missing, before a model or any data is loaded.

        Raises:
            ValueError: naming the flag, the corpus, the install command and, for ``--general-data``, how to
                skip it (``--general-data none``) or give one's own text.
        """
        for name in ("data", "eval_data", "general_data"):
            source = getattr(self, name)
            source = None if source is None else str(source).strip()
            command = missing_corpus_package(source) if source is not None else None
            if command is None:
                continue
            default = " (the default)" if source.lower() == _DEFAULTS[name] else ""
            message = (
                f"{_flag(name)} {source}{default} needs the optional package {command.split()[-1]}, which is not "
                f"installed: {command} (or pip install 'aletheia-lora[demo]')"
            )
            if name == "general_data":
                message += "; or pass --general-data none to skip measuring forgetting, or --general-data FILE"
            raise ValueError(message)


_DEFAULTS = {f.name: f.default for f in fields(DataConfig)}


def _source_records(
    flag: str, source: str, split: str, cfg: DataConfig, max_chars: int | None, text_field: str | None = None
) -> Dataset:
    """A bundled corpus's split, or a path's records (with ``text_field`` checked when given)."""
    if is_bundled_corpus(source):
        return bundled_corpus(source, split, max_chars=max_chars, max_doc_chars=cfg.max_doc_chars)
    try:
        return read_records(source) if text_field is None else load_records(source, text_field=text_field)
    except ValueError as exc:  # which of --data, --eval-data, --general-data the file came from
        raise ValueError(f"{flag}: {exc}") from exc


def _target_format(flag: str, source: str, records: Dataset, cfg: DataConfig) -> DataFormat:
    if is_bundled_corpus(source):
        return DataFormat(TEXT, text_field="text")
    try:
        return detect_format(
            records,
            text_field=cfg.text_field,
            prompt_field=cfg.prompt_field,
            response_field=cfg.response_field,
            messages_field=cfg.messages_field,
            where=str(Path(source).expanduser()),
        )
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from exc


def _tokenize(records: Dataset, fmt: DataFormat, cfg: DataConfig, tokenizer: Any) -> Dataset:
    if fmt.kind == TEXT and cfg.system_prompt is not None:
        raise ValueError(
            "--system-prompt applies to conversations and prompt/response pairs; the data is plain text "
            f"({fmt.text_field!r})"
        )
    if fmt.kind == PAIRS and not fmt.conversational and not cfg.chat_template and cfg.system_prompt is not None:
        raise ValueError(
            "--system-prompt needs --chat-template for prompt/response text (without a chat template there is no "
            "system turn), or put the instructions in the prompts"
        )
    return tokenize_records(
        records,
        tokenizer,
        max_length=cfg.max_length,
        pack=cfg.pack,
        chat_template=cfg.chat_template,
        system_prompt=None if fmt.kind == TEXT else cfg.system_prompt,
        **{k: v for k, v in fmt.to_dict().items() if k.endswith("_field") and v is not None},
    )


def _describe(fmt: DataFormat, cfg: DataConfig, tokenizer: Any) -> str:
    """One line for the log: the format, the template and how the tokens that train are found."""
    text = fmt.describe()
    if fmt.kind == CONVERSATIONS or fmt.conversational or (fmt.kind == PAIRS and cfg.chat_template):
        template, own = chat_template_of(tokenizer)
        text += "; chat template: " + ("the tokenizer's" if own else "the fallback")
        if fmt.kind == CONVERSATIONS:
            tagged = has_generation_tags(template) and getattr(tokenizer, "is_fast", False)
            text += ", assistant turns found by " + ("its {% generation %} tags" if tagged else "rendering prefixes")
        else:
            text += ", the response is what follows the rendered prompt"
    elif fmt.kind == PAIRS:
        text += "; joined by a newline unless either side has whitespace there, EOS after the response"
    if cfg.system_prompt is not None and fmt.kind != TEXT:
        text += "; the system prompt goes where a conversation has none"
    return text


def build_datasets(cfg: DataConfig, tokenizer: Any) -> tuple[Dataset, Dataset, Dataset | None]:
    """Build the tokenized train, eval and general-eval sets that the command line trains and evaluates on.

    The target (``cfg.data``) is a bundled corpus, whose train and eval splits hold different documents (whole
    held-out files), or a path: then eval comes from ``cfg.eval_data`` or, without it, from a seeded split of the
    records (:func:`train_eval_split`, before tokenizing, so no document feeds both). The format of a path's
    records comes from the named columns, else from TRL's column names (:func:`detect_format`): plain text,
    conversations (loss on the assistant turns) or prompt/completion pairs (loss on the completion). The general
    set is bundled text (default ``"kjv"``) or a path, always tokenized as plain text; it is ``None`` when
    ``cfg.general_data`` is ``None``.

    Args:
        cfg: The data configuration.
        tokenizer: The model's tokenizer.

    Returns:
        ``(train, eval, general_eval)``, each with ``input_ids``, ``attention_mask`` and ``labels``.

    Raises:
        ValueError: from loading or tokenizing, naming the file, field or option at fault.
    """
    cfg.check_packages()
    train_records = _source_records("--data", cfg.data, "train", cfg, cfg.max_train_chars)
    train_format = _target_format("--data", cfg.data, train_records, cfg)
    if cfg.eval_data is not None:
        eval_records = _source_records("--eval-data", cfg.eval_data, "eval", cfg, cfg.max_eval_chars)
        eval_format = _target_format("--eval-data", cfg.eval_data, eval_records, cfg)
    elif is_bundled_corpus(cfg.data):
        eval_records = bundled_corpus(cfg.data, "eval", max_chars=cfg.max_eval_chars, max_doc_chars=cfg.max_doc_chars)
        eval_format = train_format
    else:
        train_records, eval_records = train_eval_split(train_records, cfg.eval_fraction, cfg.split_seed)
        eval_format = train_format
    logger.info("data format: %s", _describe(train_format, cfg, tokenizer))
    if eval_format != train_format:
        logger.info("eval data format: %s", _describe(eval_format, cfg, tokenizer))
    train = _tokenize(train_records, train_format, cfg, tokenizer)
    evaluation = _tokenize(eval_records, eval_format, cfg, tokenizer)
    general = None
    if cfg.general_data is None:
        logger.info("no general corpus: forgetting is not measured (--general-data FILE, or kjv with the demo extra)")
    else:
        if cfg.general_data.strip().lower() == cfg.data.strip().lower():
            logger.warning("the general corpus is the target corpus; forgetting will not be measured")
        text_field = "text" if is_bundled_corpus(cfg.general_data) else cfg.text_field
        general_records = _source_records(
            "--general-data", cfg.general_data, "eval", cfg, cfg.max_eval_chars, text_field=text_field
        )
        general = tokenize_records(
            general_records, tokenizer, max_length=cfg.max_length, pack=cfg.pack, text_field=text_field
        )
    # the counts are the caller's to report (the pipeline prints them once)
    logger.debug(
        "data: %d train, %d eval and %s general rows of up to %d tokens",
        len(train),
        len(evaluation),
        "no" if general is None else len(general),
        cfg.max_length,
    )
    return train, evaluation, general
