"""Load a model and its tokenizer: the bundled SmolLM2, a local checkpoint folder or a Hub id; dtype and device."""

from __future__ import annotations

import logging
import os
import pickle
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aletheia_lora.allocator import CPU_ALLOCATOR_HELP, CPU_ALLOCATORS, tune_cpu_allocator
from aletheia_lora.checks import check_bool, check_choice, check_int
from aletheia_lora.models.bundled import BUNDLED_ALIASES, BUNDLED_MODEL, ensure_bundled_checkpoint, is_quantized
from aletheia_lora.models.checkpoint import (
    _DAMAGED,
    CheckpointError,
    _check_loading_info,
    _file_kind,
    _one_line,
    check_checkpoint_folder,
)

logger = logging.getLogger(__name__)


DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",  # resolved per device by auto_dtype
}
DTYPE_HELP = (
    "Weights dtype: auto, float32, bfloat16 or float16. auto (the default) is bfloat16 on a CUDA GPU with native "
    "bfloat16 (Ampere or newer), else float32 (CPU, older GPUs: float16 is never picked, it needs loss scaling to "
    "train). An explicit dtype always wins."
)
# A Hub id is ``name`` or ``owner/name``; anything else (``./x``, ``/a/b/c``, ``~``) is meant as a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def default_device() -> torch.device:
    """Where a model goes when no device is given: ``cuda`` when a CUDA device is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cuda_bf16_supported() -> bool:
    """Whether the current CUDA device computes in bfloat16 natively (emulated bfloat16 on older GPUs is slow)."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the keyword: it does not count emulation
        return bool(torch.cuda.is_bf16_supported())


def auto_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The dtype ``"auto"`` stands for on ``device``: bfloat16 on a CUDA device that supports it natively, else
    float32.

    Not float16 where bfloat16 is missing: its narrow range needs loss scaling in training, which the caller's
    trainer would have to switch on. Not bfloat16 on a CPU or MPS: slower than float32 on most of them.

    Args:
        device: The device the model goes to; None: :func:`default_device`.
    """
    device = default_device() if device is None else torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and _cuda_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """Turn a dtype name or ``torch.dtype`` into the ``torch.dtype`` to load weights in.

    Args:
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` or a floating-point ``torch.dtype``.
        device: The device the model goes to, for ``"auto"`` (see :func:`auto_dtype`); None: :func:`default_device`.

    Returns:
        The ``torch.dtype``; ``"auto"`` resolved by :func:`auto_dtype`.

    Raises:
        ValueError: for any other value; the message names ``dtype`` and the value.
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    name = dtype.strip().lower() if isinstance(dtype, str) else None
    if name == "auto":
        return auto_dtype(device)
    if name in DTYPES:
        return DTYPES[name]
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
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m"`` (also ``"bundled"`` or ``"default"``) for the bundled SmolLM2-135M-Instruct,
            a local checkpoint folder (read with ``local_files_only=True``), or a Hugging Face Hub id.
        dtype: ``"auto"`` (bfloat16 on a CUDA ``device`` that supports it, else float32, also for ``device=None``,
            which leaves the model on the CPU: :func:`auto_dtype`), ``"float32"``, ``"bfloat16"``, ``"float16"`` or
            a ``torch.dtype``.
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
    resolve_dtype(dtype, "cpu")  # a bad dtype is named before the device
    target_device = None if device is None else check_device("device", device)
    # None leaves the model where transformers puts it: on the CPU
    torch_dtype = resolve_dtype(dtype, target_device or "cpu")
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
    dtype: str = field(default="auto", metadata={"help": DTYPE_HELP})
    device: str | None = field(default=None, metadata={"help": "Device, e.g. cpu or cuda (default: cuda if present)."})
    cpu_allocator: str = field(default="default", metadata={"help": CPU_ALLOCATOR_HELP})
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
        check_choice("--cpu-allocator", self.cpu_allocator, CPU_ALLOCATORS)
        check_int("--dist-timeout", self.dist_timeout, minimum=1)

    @property
    def resolved_device(self) -> str:
        """The device :meth:`load` puts the model on: ``device``, else ``cuda`` when available, else ``cpu``."""
        return self.device or str(default_device())

    @property
    def resolved_dtype(self) -> str:
        """The name of the dtype :meth:`load` loads the weights in on this machine, e.g. ``"bfloat16"`` for
        ``dtype="auto"`` on a recent GPU (see :func:`auto_dtype`)."""
        return dtype_name("dtype", resolve_dtype(self.dtype, self.resolved_device))

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """Load the model (on ``device``, else on CUDA when available) in :attr:`resolved_dtype`, and its
        tokenizer; on the CPU with ``cpu_allocator="tuned"``, first fix glibc's malloc thresholds for the rest of the
        process (:func:`~aletheia_lora.allocator.tune_cpu_allocator`)."""
        if self.cpu_allocator == "tuned" and torch.device(self.resolved_device).type == "cpu":
            tune_cpu_allocator()
        return load_model_and_tokenizer(
            self.model, dtype=self.dtype, trust_remote_code=self.trust_remote_code, device=self.resolved_device
        )
