"""What the benchmarks measure and record besides losses: memory, saved activations, how deep the backward pass
went, step times, other processes' load, and the machine and versions a result came from.

Used by the training benchmark (:mod:`aletheia_lora.bench.runner`) and the scripts ``bench/families.py`` and
``bench/probe_vs_reference.py``. Memory figures come from the kernel on Linux (``/proc/self``) and from
``torch.cuda`` on a GPU; elsewhere they are None.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import importlib.metadata
import os
import platform
import re
import shlex
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from aletheia_lora.allocator import allocator_state
from aletheia_lora.depth import BackwardDepthMonitor
from aletheia_lora.models import bundled_cache_dir

MB = 2**20
PACKAGES = ("torch", "transformers", "peft", "aletheia-lora")


# ---------------------------------------------------------------------------------------------------------------
# Memory


def proc_status(key: str) -> int | None:
    """A ``/proc/self/status`` figure in bytes (``VmRSS``, ``VmHWM``); None when it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark (VmHWM) to the current RSS; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:  # the kernel's control file, not an output
            f.write("5")
    except OSError:
        return False
    return True


def release_free_memory() -> None:
    """Collect garbage and hand the C allocator's free pages back, so RSS growth measures live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS growth is then an upper bound of the live growth
        pass


class Memory:
    """Memory growth around a piece of work: resident set (CPU, Linux) or allocated device memory (CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.kind = "cuda_allocated" if self.cuda else "rss" if proc_status("VmRSS") is not None else None

    def current(self) -> int | None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return proc_status("VmRSS")

    def start_peak(self) -> int | None:
        """Reset the peak; return the current value to subtract from it."""
        release_free_memory()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if not reset_peak_rss():
            return None
        return proc_status("VmRSS")

    def peak_growth(self, start: int | None) -> int | None:
        if start is None:
            return None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - start
        peak = proc_status("VmHWM")
        return None if peak is None else peak - start


class PeakRss:
    """Peak resident memory of this process over a block, relative to its RSS at the start.

    Primary: the kernel's high-water mark (VmHWM), reset by writing 5 to /proc/self/clear_refs. Check: a thread
    sampling /proc/self/statm every 2 ms.
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    @staticmethod
    def hwm() -> int:
        peak = proc_status("VmHWM")
        if peak is None:
            raise OSError("no VmHWM in /proc/self/status")
        return peak

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled = max(self.sampled, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.hwm_reset = reset_peak_rss()
        self.before = self.rss()
        self.sampled = self.before
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sampled = max(self.sampled, self.rss())
        self.after = self.rss()
        self.hwm_after = self.hwm() if self.hwm_reset else None

    def result(self) -> dict:
        peak = self.hwm_after if self.hwm_after is not None else self.sampled
        return {
            "peak_rss_delta_bytes": peak - self.before,
            "peak_rss_method": "VmHWM after clear_refs" if self.hwm_after is not None else "2 ms sampling",
            "sampled_peak_rss_delta_bytes": self.sampled - self.before,
            "rss_before_bytes": self.before,
            "rss_after_bytes": self.after,
        }


# ---------------------------------------------------------------------------------------------------------------
# One training step


class SavedActivations:
    """Bytes of the distinct tensors autograd saves for the backward pass, parameters excluded."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


class BackwardTrace:
    """Over a training step: the lowest block its backward pass reached and the activations autograd saved.

    Its hooks slow the step, so it goes on an untimed one. ``lowest`` is ``EMBEDDINGS`` when the backward pass ran
    below block 0; ``saved.bytes`` the saved activations' size.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved = SavedActivations(model)
        self.lowest: int | None = None
        self._hooks = contextlib.ExitStack()

    def __enter__(self) -> BackwardTrace:
        self._depth = self._hooks.enter_context(BackwardDepthMonitor(self.model))
        self._hooks.enter_context(torch.autograd.graph.saved_tensors_hooks(self.saved.pack, lambda t: t))
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.close()
        self.lowest = self._depth.lowest


def timed_step(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    params: Sequence[nn.Parameter] = (),
    max_grad_norm: float = 0.0,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, float]:
    """One optimizer step (forward, backward, clipping when ``max_grad_norm``, update) and its wall-clock seconds.

    Returns:
        The loss (still attached) and the seconds, with the CUDA queue drained before and after on a GPU.
    """
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
    return loss, time.perf_counter() - start


def warm_up(model: nn.Module, rows: torch.Tensor) -> str:
    """One tiny forward/backward (8 tokens, gradient of one weight of the last block), model left as found.

    Faults in the kernels' code and starts the thread pools, so neither lands in a measured call.

    Returns:
        The name of the weight whose gradient it took.
    """
    blocks: dict[int, list] = {}
    for name, p in model.named_parameters():
        match = re.search(r"\.(?:layers|h|blocks?)\.(\d+)\.", name)
        if match and p.dim() == 2:
            blocks.setdefault(int(match.group(1)), []).append((name, p))
    name, weight = blocks[max(blocks)][0]
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        weight.requires_grad_(True)
        ids = rows[:1, :8]
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    finally:
        weight.grad = None
        for p, requires_grad in saved:
            p.requires_grad_(requires_grad)
    return name


class ForwardLog:
    """Counts the model's forward calls and records which rows (of ``rows``) each call saw; -1 for others."""

    def __init__(self, model: nn.Module, rows: torch.Tensor) -> None:
        self.index = {bytes(r.numpy().tobytes()): i for i, r in enumerate(rows)}
        self.calls = 0
        self.rows: list[int] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        for row in ids.reshape(-1, ids.shape[-1]).cpu():
            self.rows.append(self.index.get(bytes(row.numpy().tobytes()), -1))

    def reset(self) -> None:
        self.calls = 0
        self.rows = []


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's state dict (names and values): equal models, equal fingerprints."""
    digest = hashlib.sha256()
    for name, p in model.state_dict().items():
        digest.update(name.encode())
        digest.update(memoryview(p.detach().contiguous().cpu().numpy()).cast("B"))
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Other processes' load


def system_busy_s() -> float:
    """CPU seconds all cores of the machine have spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds this process has used (user and system)."""
    t = os.times()
    return t.user + t.system


def wait_for_quiet(max_wait_s: float, threshold_cores: float) -> dict:
    """Wait (up to ``max_wait_s``) until the machine's busy cores over one second fall below ``threshold_cores``."""
    start = time.monotonic()
    while True:
        busy0 = system_busy_s()
        time.sleep(1.0)
        busy = system_busy_s() - busy0
        waited = time.monotonic() - start
        if busy < threshold_cores or waited >= max_wait_s:
            return {"waited_s": round(waited, 1), "busy_cores_before": round(busy, 2)}


# ---------------------------------------------------------------------------------------------------------------
# Where a result came from


def machine_info(device: torch.device) -> dict:
    """Platform, processor, CPUs, torch threads, the CPU allocator's settings and the device (with its name on
    CUDA)."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "allocator": allocator_state(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def launch_prefix() -> list[str]:
    """``OMP_NUM_THREADS=1 taskset -c 1`` as this process was launched, for a benchmark's recorded command."""
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = [f"OMP_NUM_THREADS={shlex.quote(threads)}"] if threads else []
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cpus and len(cpus) < (os.cpu_count() or len(cpus)):
        prefix += ["taskset", "-c", ",".join(map(str, cpus))]
    return prefix


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """The installed version of each distribution in ``names`` (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cache_dir(*parts: str) -> Path:
    """A folder under the package's cache: ``$ALETHEIA_LORA_CACHE``, else ``~/.cache/aletheia-lora``
    (``$XDG_CACHE_HOME/aletheia-lora`` when that is set); the bundled model's conversion lives there too."""
    return bundled_cache_dir().parent.joinpath(*parts)
