"""Merge a saved LoRA adapter into its base model: a full checkpoint folder (weights, config, tokenizer) that loads
with ``AutoModelForCausalLM.from_pretrained`` and needs neither PEFT nor this package.

The adapter is any PEFT LoRA adapter folder (``adapter_config.json`` and ``adapter_model.safetensors``): the
``adapter/`` of a run of this tool, a Trainer checkpoint, or one written by PEFT itself. Its base model is loaded
as :func:`~aletheia_lora.models.load_model_and_tokenizer` loads any model (the bundled alias, a local folder or a
Hub id), the adapter is attached with PEFT and checked to fit it exactly, and PEFT's ``merge_and_unload`` folds
``B @ A`` into the base weights. The merge runs on the CPU.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aletheia_lora import __version__
from aletheia_lora.checks import check_bool, read_data_file
from aletheia_lora.files import atomic_dir, write_json
from aletheia_lora.models import (
    TOKENIZER_FILES,
    bundled_cache_dir,
    check_checkpoint_folder,
    load_model_and_tokenizer,
    resolve_dtype,
)

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Written into the merged folder: where it came from, and which files merge_adapter wrote there (so that
# ``overwrite`` replaces a folder only when everything in it is a merge's own).
MERGE_MARKER = "aletheia_merge.json"


def _kind(path: Path) -> str | None:
    """What is at ``path`` (a symlink not followed) when it is not a real folder; None for a folder or nothing."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISDIR(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symlink"
    return "a file" if stat.S_ISREG(mode) else "a FIFO, socket or device"


def _read_adapter(adapter: Any) -> tuple[Path, dict]:
    """The adapter folder and its ``adapter_config.json``, checked: a folder, a LoRA adapter, weights present."""
    if not isinstance(adapter, (str, os.PathLike)) or not str(adapter).strip():
        raise ValueError(f"adapter must be the folder of a saved LoRA adapter, got {adapter!r}")
    folder = Path(str(adapter).strip()).expanduser()
    if not folder.exists():
        raise ValueError(f"adapter folder not found: {folder}")
    if not folder.is_dir():
        raise ValueError(f"adapter {folder} is {_kind(folder) or 'not a folder'}; give the adapter's folder")
    config = folder / ADAPTER_CONFIG
    if not config.is_file():
        if (folder / "adapter" / ADAPTER_CONFIG).is_file():
            hint = f"; a run's adapter is in its adapter/ folder: {folder / 'adapter'}"
        elif (folder / "config.json").is_file():
            hint = "; it holds a full model (config.json), which has nothing to merge"
        else:
            hint = ""
        raise ValueError(f"adapter folder {folder} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter{hint}")
    try:
        settings = read_data_file(config, fmt="json")
    except (OSError, ValueError, RecursionError) as exc:
        raise ValueError(f"{config} is not valid JSON ({' '.join(str(exc).split())})") from exc
    if not isinstance(settings, dict):
        raise ValueError(f"{config} must hold a JSON object, got {type(settings).__name__}")
    peft_type = str(settings.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(
            f"adapter {folder} is a {settings.get('peft_type')!r} adapter ({ADAPTER_CONFIG}: peft_type); "
            "merge_adapter merges LoRA adapters only"
        )
    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ValueError(
            f"adapter folder {folder} has {ADAPTER_CONFIG} but no weights ({' or '.join(ADAPTER_WEIGHTS)})"
        )
    return folder, settings


def _merged_files(folder: Path) -> set[str] | None:
    """The names a previous merge wrote in ``folder`` (its marker lists them), or None when it is no merge output."""
    try:
        listed = read_data_file((folder / MERGE_MARKER), fmt="json")["files"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return None
    if not isinstance(listed, list):
        return None
    return {name for name in listed if isinstance(name, str)} | {MERGE_MARKER}


def _check_out(out: Any, overwrite: bool) -> Path:
    """The output folder, checked before anything is loaded: absent, empty, or (with ``overwrite``) a merge's own."""
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise ValueError(f"out must be a folder path, got {out!r}")
    path = Path(str(out).strip()).expanduser()
    kind = _kind(path)
    if kind is not None:
        raise ValueError(f"out {str(path)!r} is {kind}, not a folder; the merged checkpoint is a folder")
    names = sorted(os.listdir(path)) if path.is_dir() else []
    if not names:
        return path
    if not overwrite:
        raise FileExistsError(
            f"output folder {str(path)!r} exists and is not empty; pass overwrite=True (--overwrite) to replace a "
            "merged checkpoint written there before, or choose another out"
        )
    owned = _merged_files(path)
    foreign = [name for name in names if owned is None or name not in owned]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"output folder {str(path)!r} holds files merge_adapter did not write ({shown}); overwrite replaces "
            "only a merged checkpoint this tool wrote, never other files: move them or choose another out"
        )
    return path


def _base_model(folder: Path, settings: dict, base_model: Any) -> tuple[str, bool]:
    """The base model to load, and whether it came from the adapter's config (not from the caller)."""
    if base_model is not None:
        if not isinstance(base_model, (str, os.PathLike)) or not str(base_model).strip():
            raise ValueError(f"base_model must be a model name, a folder or a Hub id, got {base_model!r}")
        return str(base_model).strip(), False
    named = settings.get("base_model_name_or_path")
    if not isinstance(named, str) or not named.strip():
        raise ValueError(
            f"{folder / ADAPTER_CONFIG} names no base model (base_model_name_or_path); give base_model "
            "(--base-model): the model the adapter was trained on"
        )
    if Path(named).expanduser() == bundled_cache_dir():  # the bundled model's cache: converted again if removed
        return "smollm2-135m", True
    return named.strip(), True


def _saved_dtype(source: str) -> torch.dtype:
    """The dtype a checkpoint's config.json records (a local folder or the Hugging Face cache), else float32."""
    from transformers.utils import cached_file

    try:
        file = cached_file(source, "config.json", local_files_only=True)
        settings = read_data_file(Path(file), fmt="json")
        name = settings.get("dtype") or settings.get("torch_dtype")
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
    except (OSError, ValueError, TypeError, AttributeError):
        dtype = None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _attach(model: PreTrainedModel, folder: Path, base: str) -> PeftModel:
    """The adapter on ``model``, refused unless every one of its tensors has its place and every adapted module of
    the model gets its weights (a base of another shape or depth would be merged in part, silently)."""
    mismatch = f"the base model {base!r} does not match the adapter in {folder}"
    try:
        config = PeftConfig.from_pretrained(str(folder))
        config.base_model_name_or_path = model.name_or_path  # the base chosen; PEFT would warn of the change
        peft_model = get_peft_model(model, config)
        result = peft_model.load_adapter(str(folder), adapter_name="default")
    except (ValueError, RuntimeError) as exc:  # no target module found; tensors of another shape
        detail = " ".join(str(exc).split())
        raise ValueError(f"{mismatch}: {detail[:300]}{'...' if len(detail) > 300 else ''}") from exc
    if result.unexpected_keys:
        keys = sorted(result.unexpected_keys)
        raise ValueError(
            f"{mismatch}: {len(keys)} of the adapter's tensors have no module to go to in it (e.g. {keys[0]}); "
            "was the adapter trained on a deeper or different model?"
        )
    if result.missing_keys:
        keys = sorted(result.missing_keys)
        raise ValueError(
            f"{mismatch}: {len(keys)} adapted module tensors of the base get no weights from the adapter (e.g. "
            f"{keys[0]}); was the adapter trained on a shallower or different model?"
        )
    return peft_model


def _adapter_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with the adapter (a Trainer checkpoint holds the one it trained with), if any."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _fill_checkpoint(
    tmp: Path, merged: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, provenance: dict[str, Any]
) -> None:
    """Write the merged model, its tokenizer and the marker into ``tmp`` (atomic_dir's temporary folder)."""
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    files = sorted(os.listdir(tmp))
    write_json(tmp / MERGE_MARKER, {**provenance, "files": files})
    check_checkpoint_folder(tmp)  # what from_pretrained will read is all there


def merge_adapter(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base_model: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Merge a saved LoRA adapter into its base model and write the full checkpoint to ``out``.

    Args:
        adapter: The adapter's folder (``adapter_config.json`` and ``adapter_model.safetensors``): a run's
            ``adapter/``, a Trainer checkpoint, or any PEFT LoRA adapter.
        out: The folder to write: the merged model (safetensors), its ``config.json``, generation config and
            tokenizer, and ``aletheia_merge.json`` (adapter, base model, dtype, version, the files written). It is
            written whole or not at all (a temporary folder beside it, then renamed).
        base_model: The model to merge into: ``"smollm2-135m"`` (the bundled model), a local checkpoint folder or a
            Hub id. None: the adapter's ``base_model_name_or_path``.
        dtype: The merged checkpoint's dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` (float32
            here: the merge runs on the CPU) or a ``torch.dtype``; the base is loaded and merged in it. None: the
            dtype the base checkpoint's ``config.json`` records (float32 when it records none), merged in float32.
        overwrite: Replace ``out`` when it holds a checkpoint this function wrote before (its marker lists every file
            in it); a folder holding anything else is never replaced.
        trust_remote_code: Run code shipped with the base checkpoint (off unless asked).

    Returns:
        The output folder.

    Raises:
        ValueError: a bad ``dtype``; an adapter folder that is missing, not a LoRA adapter (e.g. IA3, LoHa) or without
            weights; no base model named; a base model that cannot be loaded (the message names where its name came
            from) or does not match the adapter (target modules missing, tensors of another shape, adapter tensors
            with no module in the base or the other way round); a merge that yields NaN or infinity; an ``out`` that
            is not a folder, or holds files this function did not write (also with ``overwrite``).
        FileExistsError: ``out`` exists and is not empty, without ``overwrite``.
        TypeError: ``overwrite`` or ``trust_remote_code`` is not a bool.
    """
    check_bool("overwrite", overwrite)
    check_bool("trust_remote_code", trust_remote_code)
    target = None if dtype is None else resolve_dtype(dtype, "cpu")
    folder, settings = _read_adapter(adapter)
    path = _check_out(out, overwrite)
    base, from_config = _base_model(folder, settings, base_model)

    logger.info("merging the LoRA adapter %s into %s", folder, base)
    try:
        model, tokenizer = load_model_and_tokenizer(
            base, dtype=target or torch.float32, trust_remote_code=trust_remote_code, device="cpu"
        )
    except ValueError as exc:
        if not from_config:
            raise
        raise ValueError(
            f"cannot load the adapter's base model {base!r} (base_model_name_or_path in {folder / ADAPTER_CONFIG}): "
            f"{exc}; give base_model (--base-model) to merge into another copy of it"
        ) from exc
    target = target or _saved_dtype(model.name_or_path)
    peft_model = _attach(model, folder, base)
    try:
        merged = peft_model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN or inf in merged weights
    except ValueError as exc:
        raise ValueError(f"merging the adapter in {folder} into {base!r} failed: {exc}") from exc
    merged = merged.to(target)
    saved_with_adapter = _adapter_tokenizer(folder)
    tokenizer = tokenizer if saved_with_adapter is None else saved_with_adapter
    provenance = {
        "written_by": "aletheia-lora merge_adapter",
        "version": __version__,
        "adapter": str(folder),
        "base_model": base,
        "dtype": str(target).removeprefix("torch."),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path) as tmp:
        _fill_checkpoint(tmp, merged, tokenizer, provenance)
    logger.debug("wrote the merged checkpoint (%s) to %s", provenance["dtype"], path)
    return path
