"""Fixed thresholds for glibc's ``malloc`` on Linux, so CPU step times stop depending on the heap's history.

By default glibc adapts its mmap threshold as blocks are freed, and gives memory above 128 KiB at the top of the heap
back to the system, so a training step that frees and re-allocates its activations keeps faulting the same pages in
again, by an amount that depends on what the process allocated before. On this project's CPU that made a
``--calibrate`` of one model disagree with copies trained side by side: the families benchmark calibrated within 6.0%
with glibc's defaults, within 1.7% tuned (``bench/results/families{,_tuned}``; README, "Predicted speedups").
:func:`tune_cpu_allocator` fixes the three thresholds, as the ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_TOP_PAD_`` environment variables would at start-up, through ``mallopt``:
blocks up to 32 MiB come from the heap, and up to 1 GiB of freed heap is kept for reuse instead of returned, so the
process's resident memory can stay that much above its live memory.

The command line applies it on CPU runs when asked (``--cpu-allocator tuned``); the library never does on its own.
Measured (``bench/allocator.py``): SmolLM2's all-block LoRA step 0.6-2.8% faster, the top half's 1.6-5.2% slower,
peak memory up to 364 MB higher, so it is not the default.
Elsewhere (macOS, Windows, musl) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

MiB = 2**20
# mallopt's parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
TUNED = {"mmap_threshold": 32 * MiB, "trim_threshold": 1024 * MiB, "top_pad": 256 * MiB}
CPU_ALLOCATORS = ("tuned", "default")
CPU_ALLOCATOR_HELP = (
    "glibc's malloc on CPU runs (Linux): 'tuned' fixes its mmap threshold (32 MiB), trim threshold (1 GiB) and top "
    "pad (256 MiB), so freed activations are reused instead of returned and faulted in again (resident memory may "
    "stay up to 1 GiB above live memory; bench/allocator.py measured no consistent speedup); 'default' (the default) "
    "leaves the allocator as it is."
)
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_PARAMS = {"mmap_threshold": M_MMAP_THRESHOLD, "trim_threshold": M_TRIM_THRESHOLD, "top_pad": M_TOP_PAD}
_applied: dict[str, int] | None = None


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_cpu_allocator() -> dict[str, int] | None:
    """Set glibc's mmap threshold, trim threshold and top pad to :data:`TUNED` for the rest of the process.

    Returns:
        The settings applied (bytes by name), or None where the C library is not glibc (nothing changed; logged).

    Raises:
        RuntimeError: glibc refused a setting (``mallopt`` returned 0).
    """
    global _applied
    libc = _glibc()
    if libc is None:
        logger.info("the C library is not glibc (%s): the CPU allocator is left as it is", platform.system())
        return None
    for name, value in TUNED.items():
        if libc.mallopt(_PARAMS[name], value) != 1:
            raise RuntimeError(f"glibc's mallopt refused {name}={value}")
    _applied = dict(TUNED)
    logger.debug("glibc malloc tuned: %s", _applied)
    return dict(_applied)


def allocator_state() -> dict:
    """What this process's CPU allocator runs with, for a benchmark's record: the C library, the settings
    :func:`tune_cpu_allocator` applied (None if it was not called) and the environment's ``MALLOC_*`` thresholds."""
    libc, version = platform.libc_ver()
    return {
        "libc": f"{libc}-{version}" if libc else None,
        "tuned": dict(_applied) if _applied else None,
        "environment": {k: os.environ[k] for k in ENVIRONMENT if k in os.environ},
    }
