"""Checkpoint folders checked before and after transformers reads them: missing, damaged or inconsistent files are
refused with a :class:`CheckpointError` that names the folder or file."""

from __future__ import annotations

import logging
import os
import pickle
import stat
import zipfile
from pathlib import Path

from safetensors import SafetensorError

from aletheia_lora.checks import read_data_file

logger = logging.getLogger(__name__)

# Where transformers reads a checkpoint's weights from (a sharded checkpoint has an index naming its shards).
WEIGHT_FILES = tuple(stem + end for stem in ("model.safetensors", "pytorch_model.bin") for end in ("", ".index.json"))
# Any one of these lets AutoTokenizer build a tokenizer (fast JSON, sentencepiece, BPE or WordPiece vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "tekken.json")
TOKENIZER_FILES += ("vocab.json", "vocab.txt")
# A config.json is a few kB; one this large is not a model's config, and would only be slow to refuse later.
MAX_CONFIG_BYTES = 16 * 2**20
# Errors that say a weights file is damaged (truncated download, a garbage or half-written file).
_DAMAGED = (SafetensorError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile)


class CheckpointError(ValueError):
    """A model checkpoint that cannot be loaded as it is: a missing, damaged or inconsistent file.

    The message names the folder or file and what is wrong with it; the error from transformers, safetensors
    or torch that revealed it is chained (``__cause__``).
    """


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _file_kind(path: Path) -> str | None:
    """None for a regular file (symlinks followed) or a missing path; else what it is, for a message."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    return "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"


def _check_safetensors(file: Path) -> None:
    """Read a safetensors file's header (cheap: no tensor is read); a truncated or garbage file fails here."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"weights file {file} is damaged or truncated ({_one_line(exc)}); download or save the checkpoint again"
        ) from exc


def _weight_shards(folder: Path, index_name: str) -> list[Path]:
    index = folder / index_name
    try:
        weight_map = read_data_file(index, fmt="json")["weight_map"]
        shards = sorted({str(name) for name in weight_map.values()})
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"weights index {index} is damaged: {_one_line(exc)}") from exc
    paths = [folder / name for name in shards]
    for path in paths:
        if not path.exists():
            raise CheckpointError(f"weights file {path} named in {index.name} is missing")
        if _file_kind(path) is not None:
            raise CheckpointError(f"weights file {path} is {_file_kind(path)}, not a regular file")
    return paths


def check_checkpoint_folder(folder: str | os.PathLike) -> None:
    """Check that a local folder holds a loadable checkpoint, before any weights are read.

    It needs ``config.json`` (a JSON object), weights (``model.safetensors``, ``pytorch_model.bin`` or a sharded
    index and its shards) and tokenizer files, each a regular file (a FIFO would hang the loader). Safetensors
    headers are read (no tensor), so a truncated or garbage file is caught here.

    Raises:
        CheckpointError: naming the folder or file and what is wrong (empty, a PEFT adapter instead of a model,
            no ``config.json``, no weights, no tokenizer, a damaged file).
    """
    path = Path(folder)
    where = f"cannot load a model from the local folder {path}"
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        raise CheckpointError(f"{where}: {exc.strerror or exc}") from exc
    if not names:
        raise CheckpointError(
            f"{where}: it is empty; a checkpoint folder holds config.json, the weights (model.safetensors or "
            "pytorch_model.bin) and the tokenizer files"
        )
    for name in names:  # transformers opens many of them (configs, tokenizer files): a FIFO would hang it
        kind = _file_kind(path / name)
        if kind not in (None, "a folder") or (kind == "a folder" and name in (*WEIGHT_FILES, *TOKENIZER_FILES)):
            raise CheckpointError(f"{where}: {name} is {kind}, not a regular file")
    config = path / "config.json"
    if not config.exists():
        if (path / "adapter_config.json").exists():
            raise CheckpointError(
                f"{where}: it holds a PEFT adapter (adapter_config.json), not a model; give the adapter's base model "
                "(base_model_name_or_path in adapter_config.json) and load the adapter with PeftModel.from_pretrained"
            )
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise CheckpointError(
            f"{where}: it has no config.json, so it is not a transformers checkpoint (it holds {shown})"
        )
    if config.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{where}: config.json is {config.stat().st_size} bytes, too large to be a model config")
    try:
        settings = read_data_file(config, fmt="json")
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply to parse
        raise CheckpointError(f"{where}: config.json is not valid JSON ({_one_line(exc)})") from exc
    if not isinstance(settings, dict):
        raise CheckpointError(f"{where}: config.json must hold a JSON object, got {type(settings).__name__}")
    weights = [name for name in WEIGHT_FILES if (path / name).exists()]
    if not weights:
        raise CheckpointError(
            f"{where}: it has config.json but no weights (model.safetensors, pytorch_model.bin, or a sharded "
            "checkpoint's model.safetensors.index.json with its shards)"
        )
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{where}: it has no tokenizer (none of tokenizer.json, tokenizer_config.json, tokenizer.model, "
            "vocab.json); save the tokenizer into the folder with tokenizer.save_pretrained(folder)"
        )
    first = weights[0]  # transformers' own order of preference
    for file in _weight_shards(path, first) if first.endswith(".index.json") else [path / first]:
        if file.suffix == ".safetensors":
            _check_safetensors(file)


def _check_loading_info(source: str, info: dict) -> None:
    """Refuse weights that disagree with config.json: a tensor of another shape, or one the weights lack (it would
    be left random). Unused tensors in the weights are only worth a warning (e.g. a value head)."""
    prefix = f"the weights of {source} do not match its config.json"
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda item: item[0])
    if mismatched:
        key, in_weights, in_config = mismatched[0]
        raise CheckpointError(
            f"{prefix}: {len(mismatched)} tensor(s) differ in shape, e.g. {key} is {list(in_weights)} in the weights "
            f"but {list(in_config)} under config.json; are config.json and the weights from the same model?"
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise CheckpointError(
            f"{prefix}: {len(missing)} tensor(s) that config.json calls for are not in the weights "
            f"(e.g. {missing[0]}) and would be left random"
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        logger.warning("%d tensor(s) in the weights of %s go unused (e.g. %s)", len(unexpected), source, unexpected[0])
