"""Several processes (``torchrun``, ``accelerate launch``): who is who, failing together, writing from one rank.

Everything here is a no-op in a single process. Under several processes the rule is that every rank reaches
every collective call: a rank that fails does not simply leave, it tells the others at the next agreed point
(:func:`fail_together`, :func:`on_main_process`), so that all ranks raise the same error instead of waiting
for a partner that is gone. Where no agreed point is near, the process group's timeout bounds the wait.
"""

from __future__ import annotations

import builtins
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800.0
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Errors re-raised with their own type on the ranks that did not fail: the command line answers these with one
# line and exit status 2 (user errors), and so it does on every rank.
_PORTABLE_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ConnectionError,
    OSError,
    MemoryError,
    NotImplementedError,
    RuntimeError,
)
_created_here = False


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank: the process group's, else the launcher's ``RANK`` (the group may be gone
    already, e.g. after :func:`shutdown`), else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    if launched_with_several_processes():
        try:
            return int(os.environ.get("RANK", "0"))
        except ValueError:
            return 0
    return 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process), also after the process group is destroyed: the command line
    prints its summary on rank 0 only."""
    return rank() == 0


def launched_with_several_processes() -> bool:
    """True when a launcher (torchrun, ``accelerate launch``) started this process as one of several."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Initialise the default process group from the launcher's environment, if there is one to initialise.

    The backend is NCCL when CUDA is present (each rank on ``cuda:LOCAL_RANK``) unless ``accelerate launch
    --cpu`` asked for the CPU, else gloo. Collectives fail after ``timeout_s`` seconds instead of hanging.
    The Trainer (through accelerate) later finds the group initialised and uses it.

    Args:
        timeout_s: Seconds a collective waits for the other ranks before it fails.

    Returns:
        True when this call created the process group (then :func:`shutdown` destroys it).

    Raises:
        ValueError: the launcher's variables are incomplete or ``timeout_s`` is not positive.
    """
    global _created_here
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if not launched_with_several_processes() or not dist.is_available() or dist.is_initialized():
        return False
    missing = [name for name in _LAUNCHER_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but the launcher variables {missing} are not set; "
            "start several processes with torchrun or accelerate launch"
        )
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    if torch.cuda.is_available() and not use_cpu:
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
    _created_here = True
    logger.info("rank %d of %d joined the process group (%s)", rank(), world_size(), backend)
    return True


def shutdown() -> None:
    """Destroy the process group if :func:`init_from_env` created it; leave one created elsewhere alone."""
    global _created_here
    if _created_here and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _created_here = False


def collective_device(fallback: torch.device | str | None = None) -> torch.device:
    """Where tensors passed to collectives must live: the CPU for gloo and MPI, the rank's accelerator otherwise."""
    backend = str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else "gloo"
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(fallback) if fallback is not None else torch.device("cpu")


def fsdp1_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP1 ``FullyShardedDataParallel`` modules in ``model``, outermost first."""
    if not dist.is_available():
        return []
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]


def is_dtensor(tensor: Any) -> bool:
    """True for a DTensor (FSDP2 ``fully_shard`` weights, tensor parallelism)."""
    if not dist.is_available():
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch before 2.4 kept it under torch.distributed._tensor
        return False
    return isinstance(tensor, DTensor)


def is_sharded_model(model: torch.nn.Module) -> bool:
    """True when the model's weights are spread over ranks (FSDP1 units or DTensor weights): every rank must
    then take part in every forward pass."""
    return bool(fsdp1_units(model)) or any(is_dtensor(p) for p in model.parameters())


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def _describe(error: BaseException) -> tuple[str, str]:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return type(error).__name__, message


def _rebuild(kind: str, message: str, source: int) -> Exception:
    cls = getattr(builtins, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, _PORTABLE_ERRORS)):
        cls = RuntimeError
    error = cls(f"{message} (raised on rank {source})")
    error.source_rank = source  # this rank did not fail by itself; the pipeline logs only where errors arise
    return error


def agree(error: BaseException | None, *, device: torch.device | None = None) -> None:
    """A collective check point: raise on every rank if any rank brings an error.

    Every rank must call this (with ``None`` when it has nothing to report). The failing rank of lowest
    number sends its error's type and first line; the ranks that did not fail raise an error of the same
    built-in type (else ``RuntimeError``) naming that rank; a failing rank re-raises its own error.

    Args:
        error: This rank's error, or None.
        device: Device for the collective's tensors (see :func:`collective_device`).
    """
    if not is_distributed():
        if error is not None:
            raise error
        return
    device = device or collective_device()
    world = world_size()
    first = torch.tensor([rank() if error is not None else world], dtype=torch.int64, device=device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    source = int(first.item())
    if source == world:
        return
    payload = [_describe(error) if rank() == source else None]
    dist.broadcast_object_list(payload, src=source, device=device)
    if error is not None:
        raise error
    kind, message = payload[0]
    raise _rebuild(kind, message, source)


def fail_together(fn: Callable[..., T], *args: Any, device: torch.device | None = None, **kwargs: Any) -> T:
    """Call ``fn`` on every rank; if it raises on any rank, every rank raises (see :func:`agree`).

    ``fn`` itself must not call collectives: a rank that fails before one would leave the others waiting in it.
    """
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:
        agree(exc, device=device)  # raises exc on this rank, and an error naming this rank on the others
        raise
    agree(None, device=device)
    return result


def on_main_process(fn: Callable[..., T], *args: Any, device: torch.device | None = None, **kwargs: Any) -> T:
    """Call ``fn`` on rank 0 only and hand its result (which must pickle) to every rank; its error too.

    Used for what one rank must do for all (create or check the output folder, write report files): the
    other ranks wait here and then either go on with the result or raise rank 0's error.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    device = device or collective_device()
    result, error = None, None
    if is_main_process():
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            error = exc
    agree(error, device=device)
    payload = [result]
    dist.broadcast_object_list(payload, src=0, device=device)
    return payload[0]


def explain_failure(error: Exception) -> Exception:
    """Log which rank failed (once, where the error arose); a collective that broke because another rank is
    gone becomes a ``ConnectionError`` saying so. Returns the error to raise."""
    if not is_distributed():
        return error
    where = f"rank {rank()} of {world_size()}"
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if lost_contact(error):
        return ConnectionError(
            f"{where} lost contact with the other ranks (one probably failed first; see its error): {message}"
        )
    if getattr(error, "source_rank", None) is None:  # not an error that another rank reported first
        logger.error("%s failed: %s", where, message)
    return error


@contextmanager
def launched_job(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """The frame of a whole job (a command): join the launcher's process group if there is one, explain a
    failure (:func:`explain_failure`), and destroy the group on the way out if this job created it.

    A rank that fails leaves the group, so that ranks still waiting in a collective with it get an error
    at once (gloo) instead of waiting for the timeout; torchrun and accelerate also stop the other ranks
    when one exits with an error.
    """
    created = init_from_env(timeout_s)
    try:
        yield
    except Exception as exc:
        explained = explain_failure(exc)
        if explained is exc:
            raise
        raise explained from exc
    finally:
        if created:
            shutdown()


def lost_contact(error: BaseException) -> bool:
    """True when ``error`` says a collective failed because another rank is gone or too slow."""
    dist_error = getattr(dist, "DistError", ())
    if dist_error and isinstance(error, dist_error):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        hint in text for hint in ("connection closed by peer", "connection reset by peer", "timed out", "timeout")
    )
