"""Checkpoints and ``--resume``: whether a checkpoint's files are whole, whether a run may continue from it, and the
rotation of this tool's checkpoints.

* :func:`check_checkpoint_files` reads every file a resume loads, unpickling nothing, and names a damaged one.
* :func:`check_resume` compares the adapters of a run (its ``LoraConfig``, and its tensors shape by shape) with the
  checkpoint's; :func:`check_resumed_run` compares a run's settings with those its ``run_config.json`` recorded.
* :func:`rotate_checkpoints` deletes only checkpoints the output folder's manifest lists (:mod:`aletheia_lora.files`).
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any

from peft import LoraConfig
from torch import nn

from aletheia_lora.checks import read_data_file
from aletheia_lora.files import (
    TRAINER_STATE_NAME,
    last_complete_checkpoint,
    owned_checkpoints,
    path_kind,
    read_manifest,
    update_manifest,
)

logger = logging.getLogger(__name__)

_REDO = "resume with the checkpoint's settings, or start again with --overwrite"


# --- the checkpoint's files -----------------------------------------------------------------------------------


def _check_checkpoint_file(file: Path) -> None:
    if file.suffix == ".json":  # the caller names the file: json's own message says what is wrong
        payload = json.loads(file.read_text(encoding="utf-8"))
        if file.name == TRAINER_STATE_NAME and not (
            isinstance(payload, dict) and type(payload.get("global_step")) is int
        ):
            raise ValueError("no integer global_step in it")
    elif file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:  # the header: a truncated file fails here
            for key in handle.keys():
                handle.get_slice(key).get_shape()
    elif file.suffix in (".pt", ".pth", ".bin"):
        with zipfile.ZipFile(file) as archive:  # torch.save's format: the CRCs find a damaged byte too
            bad = archive.testzip()
        if bad is not None:
            raise ValueError(f"its entry {bad} fails its checksum")


def check_checkpoint_files(checkpoint: str | os.PathLike) -> None:
    """Read every file a resume loads from ``checkpoint`` (state, adapter, optimizer, scheduler, RNG), unpickling
    nothing and changing nothing; raise a ``ValueError`` naming the first damaged file and what to do."""
    checkpoint = Path(checkpoint)
    advice = "left as it is: move its checkpoint out of the way to resume from the one before, or use --overwrite"
    for file in sorted(checkpoint.iterdir()):
        kind = path_kind(file)
        if kind == "a folder":
            continue
        if kind != "a file":
            raise ValueError(f"--resume: {str(file)!r} is {kind}, not a regular file; {advice}")
        try:
            _check_checkpoint_file(file)
        except Exception as exc:  # noqa: BLE001 - JSON, zip, safetensors and OS errors all mean a damaged file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"--resume: {str(file)!r} is damaged or truncated ({reason}); {advice}") from None


def rotate_checkpoints(folder: str | os.PathLike, keep: int) -> list[Path]:
    """Delete this tool's checkpoints in ``folder/checkpoints`` but the newest ``keep`` (0: all of them).

    The HF Trainer's own rotation deletes every ``checkpoint-*`` folder it finds, whoever wrote it; this one
    deletes only checkpoints the manifest lists, and forgets the listed ones that are gone.

    Returns:
        The checkpoint folders deleted.
    """
    folder = Path(folder)
    owned = owned_checkpoints(folder)
    doomed = owned[: max(len(owned) - keep, 0)]
    for path in doomed:
        logger.info("removing checkpoint %s", path)
        shutil.rmtree(path)
    listed = {n for n in read_manifest(folder).entries if n.startswith("checkpoints/")}
    listed = {n for n in listed if len(PurePosixPath(n).parts) == 2 and n.split("/")[1].startswith("checkpoint-")}
    gone = {n for n in listed if path_kind(folder / n) is None} | {f"checkpoints/{p.name}" for p in doomed}
    if gone:
        update_manifest(folder, forget=gone)
    return doomed


# --- the adapters: checkpoint vs this run ---------------------------------------------------------------------

# What a resumed run's adapters must share with the checkpoint's: LoraConfig fields, by the flag that sets them.
_RESUMED = ("layers_to_transform", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")
_RESUMED += ("target_parameters", "lora_dropout", "use_rslora", "use_dora")
_FLAGS = {"layers_to_transform": "--layers", "rank_pattern": "--attention-r/--mlp-r/--rank-allocation"}
_FLAGS |= {"alpha_pattern": "--attention-alpha/--mlp-alpha", "target_parameters": "--target-experts"}


def _shown(value: object) -> str:
    """A LoraConfig value as text, the same for the config and its JSON (sets, lists in any order, 8 and 8.0)."""
    if isinstance(value, (set, frozenset, list, tuple)):
        items = sorted(map(_shown, value))
        return " ".join(sorted(items, key=int) if all(v.isdigit() for v in items) else items) or "None"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_shown(v)}" for k, v in sorted(value.items())) or "None"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def check_resume(checkpoint: str | os.PathLike, lora_config: LoraConfig, model: nn.Module | None = None) -> None:
    """Check, changing nothing, that a run with ``lora_config`` (and with ``model``, its PeftModel, whose adapter
    tensors are compared shape by shape) may resume from the ``checkpoint-N`` folder ``checkpoint``.

    Raises:
        ValueError: a damaged file (named), or adapters that differ: the flag, the checkpoint's value and the run's.
    """
    checkpoint = Path(checkpoint)
    check_checkpoint_files(checkpoint)
    saved_config = checkpoint / "adapter_config.json"
    saved = read_data_file(saved_config, fmt="json") if saved_config.is_file() else {}
    new = lora_config.to_dict()
    for key in _RESUMED:
        before, now, flag = _shown(saved.get(key)), _shown(new.get(key)), _FLAGS.get(key, "--" + key.replace("_", "-"))
        if key in saved and before != now:
            raise ValueError(
                f"--resume: {checkpoint} was trained with {flag} {before}, this run has {flag} {now}; {_REDO}"
            )
    weights = checkpoint / "adapter_model.safetensors"
    if model is not None and weights.is_file():
        from peft import get_peft_model_state_dict
        from safetensors import safe_open

        expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
        with safe_open(str(weights), framework="pt") as handle:
            found = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        differ = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        if differ:
            raise ValueError(
                f"--resume: the adapter in {weights} does not fit this run's: {len(differ)} tensors differ, e.g. "
                f"{differ[0]} ({found.get(differ[0], 'missing')} there, {expected.get(differ[0], 'missing')} "
                f"here); {_REDO}"
            )


# --- the run's settings: run_config.json vs this run ----------------------------------------------------------

# Settings a resumed run may change (they do not change what the checkpoint's adapters become); every other one
# must be the run's, as run_config.json records it.
MAY_CHANGE_ON_RESUME = {
    ("train", "max_steps"),
    ("train", "num_train_epochs"),
    ("train", "save_steps"),
    ("train", "save_total_limit"),
    ("train", "logging_steps"),
    ("train", "eval_steps"),
    ("train", "report_to"),
    ("train", "progress"),
    ("model", "device"),
    ("model", "cpu_allocator"),
    ("model", "dist_timeout"),
    ("data", "general_data"),
}


def run_settings(config: Any) -> dict:
    """A :class:`~aletheia_lora.pipeline.RunConfig` as run_config.json records it: ``{group: {setting: value}}``."""
    return {k: asdict(v) for k, v in vars(config).items()}


def _same(before, now) -> bool:
    if isinstance(before, (list, tuple)) and isinstance(now, (list, tuple)):
        return len(before) == len(now) and all(map(_same, before, now))
    if isinstance(before, numbers.Real) and isinstance(now, numbers.Real) and not isinstance(before, bool):
        return not isinstance(now, bool) and float(before) == float(now)
    if isinstance(before, str) and isinstance(now, str) and before != now:
        try:  # one file named two ways (relative, absolute) is the same setting
            return os.path.samefile(before, now)
        except OSError:
            return False
    return before == now


def _flag_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(_flag_value, value))
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def check_resumed_run(out: Path, config: Any, layers: list[int] | None) -> None:
    """``--resume``, before the model loads: a readable checkpoint of the same ``--layers``, and the settings of
    the run that wrote it (run_config.json; ``config`` is the run's ``RunConfig``). The checkpoint's adapters are
    compared in full by ``train_lora`` (:func:`check_resume`)."""
    checkpoint = last_complete_checkpoint(out / "checkpoints")
    if checkpoint is None:
        raise ValueError(f"--resume: no checkpoint found in {str(out / 'checkpoints')!r}")
    check_checkpoint_files(checkpoint)
    adapter_config = checkpoint / "adapter_config.json"
    if layers is not None and not config.train.reprobe_every and adapter_config.is_file():
        saved = read_data_file(adapter_config, fmt="json")
        trained = saved.get("layers_to_transform") if isinstance(saved, dict) else None
        trained = [trained] if isinstance(trained, int) else trained
        if isinstance(trained, list) and all(type(v) is int for v in trained) and sorted(trained) != sorted(layers):
            shown = _flag_value(sorted(trained)), _flag_value(sorted(layers))
            raise ValueError(
                f"--resume: {checkpoint} was trained with --layers {shown[0]}, this run has --layers {shown[1]}; "
                "resume with the checkpoint's settings, or start again with --overwrite"
            )
    path = out / "run_config.json"
    if not path.is_file():
        return
    try:
        before = read_data_file(path, fmt="json")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"--resume: cannot read {str(path)!r}: {exc}; move it away to resume without it") from None
    for group, values in run_settings(config).items():
        old = before.get(group) if isinstance(before, dict) else None
        for name, value in values.items():
            if not isinstance(old, dict) or name not in old or _same(old[name], value):
                continue
            if (group, name) in MAY_CHANGE_ON_RESUME:
                logger.info("resuming with --%s %s (the run had %s)", name.replace("_", "-"), value, old[name])
                continue
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"--resume: the run in {str(out)!r} was started with {flag} {_flag_value(old[name])}, this run has "
                f"{flag} {_flag_value(value)}; resume with the run's settings, or start again with --overwrite"
            )
