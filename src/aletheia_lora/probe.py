"""Gradient probe: how much each decoder block's weights want to move on the user's task.

One forward/backward pass per probe batch covers every block. Each weight gradient is reduced to its
score contribution the moment autograd has accumulated it and is then freed, so gradient memory stays
at about one weight tensor, far below ``chunk_size`` blocks. The model is left exactly as it was found.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import zlib
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from aletheia_lora.checks import (
    check_bool,
    check_choice,
    check_int,
    is_empty_sequence,
    parse_layer_scores,
    read_data_file,
    shown,
)
from aletheia_lora.data import IGNORE_INDEX, check_max_length, pad_collate
from aletheia_lora.distributed import (
    agree,
    collective_device,
    fail_together,
    fsdp1_units,
    is_dtensor,
    is_sharded_model,
)
from aletheia_lora.files import write_json
from aletheia_lora.layers import DecoderStack, block_parameters, resolve_stack, unwrap_model

logger = logging.getLogger(__name__)


METRICS = {
    "grad_norm": "sum over a block's weight tensors of the gradient's L2 norm (the reference's score)",
    "grad_rms": "root-mean-square gradient over all of a block's weights (size-normalised grad_norm)",
    "fisher": "sum of squared gradients over a block's weights (empirical Fisher diagonal trace)",
    "grad_weight": "sum of |gradient x weight| over a block's weights (first-order Taylor importance)",
}
# torch.Generator.manual_seed takes seeds in [0, 2**64)
SEED_MAX = 2**64 - 1
# Probes running now (re-probing runs one inside a training loop): monitors of the training pass skip them.
_running = 0


def is_probing() -> bool:
    """Whether a :func:`gradient_probe` is running: its forward and backward passes are not training passes."""
    return _running > 0


@dataclass
class ProbeConfig:
    """Probe settings. Field help strings are shared by the CLI and the docs."""

    probe_batches: int = field(default=5, metadata={"help": "Batches the gradient probe accumulates scores over."})
    probe_batch_size: int = field(default=1, metadata={"help": "Rows per probe batch (padding is masked)."})
    chunk_size: int = field(
        default=8, metadata={"help": "Memory bound kept from the reference: at most this many blocks' gradients held."}
    )
    metric: str = field(
        default="grad_norm", metadata={"help": "Probe score: " + "; ".join(f"{k}: {v}" for k, v in METRICS.items())}
    )
    probe_seed: int = field(
        default=42, metadata={"help": "Seed of the probe's batch sampling, from 0 to 2**64 - 1 (as torch takes it)."}
    )

    def __post_init__(self) -> None:
        for name in ("probe_batches", "probe_batch_size", "chunk_size"):
            check_int("--" + name.replace("_", "-"), getattr(self, name), minimum=1)
        check_choice("--metric", self.metric, METRICS)
        # checked here, not only by gradient_probe: the CLI answers before it loads a model
        check_int("--probe-seed", self.probe_seed, minimum=0, maximum=SEED_MAX)

    def kwargs(self) -> dict:
        """Keyword arguments for :func:`gradient_probe`."""
        return {
            "probe_batches": self.probe_batches,
            "batch_size": self.probe_batch_size,
            "chunk_size": self.chunk_size,
            "metric": self.metric,
            "seed": self.probe_seed,
        }


class LayerScores(dict):
    """Block index -> probe score, a plain ``dict`` that also carries how it was measured.

    ``meta`` holds the metric, the number of batches and loss tokens, the model type and the stack path.
    """

    def __init__(self, scores: Mapping[int, float] | None = None, meta: Mapping | None = None) -> None:
        super().__init__(scores or {})
        self.meta = dict(meta or {})

    def to_json(self, path: str | os.PathLike) -> None:
        """Write scores and metadata as JSON, atomically (a temporary file, then a rename)."""
        write_json(path, {"scores": {str(k): float(v) for k, v in sorted(self.items())}, "meta": self.meta})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> LayerScores:
        """Read scores written by :meth:`to_json` (or a plain ``{"0": 1.5, ...}`` object), with their ``meta``.

        Layer keys are written as :meth:`to_json` writes them, ``"0"``, ``"1"``, ...: a key with a sign, spaces,
        decimals or leading zeros (``"00"`` would silently merge with ``"0"``) is refused, as is a key given
        twice. The file is read within the limits of :func:`~aletheia_lora.checks.read_data_file`.

        Raises:
            ValueError: the file cannot be read, breaks a limit, is not JSON, or holds a bad key or score.
        """
        where = f"scores file {shown(str(path))}"
        payload = read_data_file(path, label="scores file", fmt="json")
        raw = payload.get("scores", payload) if isinstance(payload, dict) else None
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"{where} holds no layer scores (expected {{'scores': {{'0': ...}}}})")
        meta = payload.get("meta", {}) if "scores" in payload else {}
        return cls(parse_layer_scores(raw, where), meta if isinstance(meta, dict) else {})


def _take_rows(dataset, n_rows: int, seed: int) -> tuple[list, list[int]]:
    """Up to ``n_rows`` rows and their indices in the dataset: a seeded sample of a sized dataset (the reference's
    order), else the first ones."""
    if (
        isinstance(dataset, (str, bytes, Mapping))
        or not isinstance(dataset, Iterable)
        and not hasattr(dataset, "__getitem__")
    ):
        raise TypeError(
            "dataset must be a tokenized dataset (HF Dataset, IterableDataset, list of dicts with 'input_ids'), "
            f"got {type(dataset).__name__}"
        )
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        size = len(dataset)
        if size == 0:
            raise ValueError("dataset is empty: the probe needs at least one tokenized row")
        # The reference's order: DataLoader(shuffle=True, generator=seed), batch size 1. The loader draws its
        # worker base seed from the generator before sampling, so a bare RandomSampler would differ.
        order = torch.utils.data.DataLoader(
            range(size),
            batch_size=1,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=lambda batch: batch[0],
        )
        rows, indices = [], []
        for index in order:
            if len(rows) == n_rows:
                break
            rows.append(dataset[index])
            indices.append(int(index))
        return rows, indices
    rows = []
    for row in dataset:
        rows.append(row)
        if len(rows) == n_rows:
            break
    if not rows:
        raise ValueError("dataset is empty: the probe needs at least one tokenized row")
    return rows, list(range(len(rows)))


def _probe_batches(
    dataset, probe_batches: int, batch_size: int, seed: int, pad_token_id: int
) -> tuple[list[dict], list[int] | None]:
    """The probe's padded batches, and the dataset index of each of their rows (None for a DataLoader's)."""
    indices = None
    if isinstance(dataset, torch.utils.data.DataLoader):
        batches = []
        for batch in dataset:
            if len(batches) == probe_batches:
                break
            if not isinstance(batch, Mapping) or "input_ids" not in batch:
                raise ValueError("DataLoader batches must be dicts with 'input_ids'")
            batches.append(dict(batch))
        if not batches:
            raise ValueError("dataset is empty: the DataLoader yielded no batch")
    else:
        rows, indices = _take_rows(dataset, probe_batches * batch_size, seed)
        for row, index in zip(rows, indices):
            if isinstance(row, Mapping) and "input_ids" in row and is_empty_sequence(row["input_ids"]):
                raise ValueError(f"dataset row {index}: 'input_ids' is empty; a row needs at least 2 tokens")
        batches = [pad_collate(rows[i : i + batch_size], pad_token_id) for i in range(0, len(rows), batch_size)]
    if len(batches) < probe_batches:
        logger.warning(
            "dataset holds %d probe batches, fewer than probe_batches=%d: using those", len(batches), probe_batches
        )
    return batches, indices


def _check_token_ids(batches: list[dict], vocab_size: int | None, indices: list[int] | None, batch_size: int) -> None:
    """Refuse, before any forward pass, token ids and labels that the embedding or the loss would index out of range
    (an IndexError deep in torch; on CUDA a device-side assert). Labels may be -100; those under padding are unread.
    """
    for b, batch in enumerate(batches):
        ids = torch.as_tensor(batch["input_ids"])
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"probe batch {b}: input_ids must hold integers, got {ids.dtype}")
        ids = ids.view(-1, ids.shape[-1]) if ids.numel() else ids
        checked = [("input_ids", ids, torch.ones_like(ids, dtype=torch.bool))]
        if batch.get("labels") is not None and vocab_size is not None:
            labels = torch.as_tensor(batch["labels"]).view_as(ids)
            mask = batch.get("attention_mask")
            read = labels != IGNORE_INDEX if mask is None else (labels != IGNORE_INDEX) & (torch.as_tensor(mask) != 0)
            checked.append(("labels", labels, read.view_as(ids)))
        for key, values, read in checked if vocab_size is not None else ():
            bad = read & ((values < 0) | (values >= vocab_size))
            if bad.any():
                j, position = (int(x) for x in bad.nonzero()[0])
                row = indices[b * batch_size + j] if indices is not None else None
                where = f"dataset row {row} (probe batch {b})" if row is not None else f"probe batch {b}, row {j}"
                what, hint = ("token id", "was the data tokenized for this model?")
                if key == "labels":
                    what, hint = ("label", "a label is a token id, or -100 for a token left out of the loss")
                raise ValueError(
                    f"{where}: {key} hold token ids outside the model's vocabulary [0, {vocab_size}) "
                    f"({what} {int(values[j, position])} at position {position}); {hint}"
                )


def _causal_lm_loss(model: nn.Module, batch: Mapping, device: torch.device) -> tuple[torch.Tensor, int]:
    input_ids = torch.as_tensor(batch["input_ids"]).to(device)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else torch.as_tensor(mask).to(device).view_as(input_ids)
    labels = batch.get("labels")
    labels = input_ids.clone() if labels is None else torch.as_tensor(labels).to(device).view_as(input_ids)
    # Padding never enters the loss, whatever the labels say.
    labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    targets = labels[:, 1:]
    tokens = int((targets != IGNORE_INDEX).sum())
    if tokens == 0:
        raise ValueError("a probe batch has no tokens to predict (every label is masked or padding)")
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
    return loss, tokens


def _data_parallel_inner(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel wrappers. Running it directly synchronises no gradient: each rank's
    gradients stay its own batches' gradients, and the scores are reduced across ranks afterwards instead."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2, tensor parallel); a plain tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _replication(model: nn.Module, tensors: list[torch.Tensor], units: list[nn.Module], world: int) -> torch.Tensor:
    """Per weight, on how many ranks each of its elements lives: summing over all ranks counts it this often.

    FSDP1 FULL_SHARD / SHARD_GRAD_OP and FSDP2 keep each element on one rank; hybrid sharding replicates the
    shards across groups; NO_SHARD and unsharded weights are whole on every rank.
    """
    factor = {}
    for unit in reversed(units):  # pre-order list reversed: a weight belongs to its innermost unit
        strategy = getattr(getattr(unit, "sharding_strategy", None), "name", "FULL_SHARD")
        shard_ranks = int(getattr(unit, "world_size", world) or world)
        copies = world if strategy == "NO_SHARD" else max(1, world // shard_ranks)
        for p in unit.parameters():
            factor.setdefault(id(p), copies)
    result = []
    for p in tensors:
        if is_dtensor(p):
            mesh = p.device_mesh
            if mesh.size() != world:
                raise ValueError(
                    f"a weight is a DTensor on a mesh of {mesh.size()} ranks, but the process group has {world}: "
                    "the probe sums over the whole process group"
                )
            copies = 1
            for dim, placement in enumerate(p.placements):
                if placement.is_replicate():
                    copies *= mesh.size(dim)
            result.append(copies)
        else:
            result.append(factor.get(id(p), world))
    return torch.tensor(result, dtype=torch.float64)


def _fingerprint(batches: list[dict]) -> int:
    """A checksum of the probe batches, to check that every rank sampled the same global set."""
    checksum = zlib.crc32(str(len(batches)).encode())
    for batch in batches:
        for key in ("input_ids", "attention_mask", "labels"):
            if batch.get(key) is not None:
                values = torch.as_tensor(batch[key]).to("cpu", torch.int64).contiguous()
                checksum = zlib.crc32(str(tuple(values.shape)).encode(), checksum)
                checksum = zlib.crc32(values.numpy().tobytes(), checksum)
    return checksum


def _check_same_batches(batches: list[dict], comm_device: torch.device) -> None:
    mine = _fingerprint(batches)
    extremes = torch.tensor([mine, -mine], dtype=torch.int64, device=comm_device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    if int(extremes[0]) != -int(extremes[1]):
        raise ValueError(
            "the ranks sampled different probe batches: pass the same (unsharded) dataset and seed on every rank; "
            "the probe divides the batches among the ranks itself"
        )


def gradient_probe(
    model: nn.Module,
    dataset,
    num_layers: int | None = None,
    probe_batches: int = 5,
    chunk_size: int = 8,
    device: str | torch.device | None = None,
    compute_dtype: torch.dtype | None = None,
    seed: int = 42,
    *,
    batch_size: int = 1,
    metric: str = "grad_norm",
    pad_token_id: int | None = None,
    progress: bool = True,
    distributed: bool | None = None,
    stack: DecoderStack | None = None,
) -> LayerScores:
    """Score every decoder block by the gradient its weights receive on a few batches of the task.

    Under several processes (``torch.distributed`` initialised by torchrun or accelerate) every rank must call
    this with the same dataset and seed, and every rank gets the same scores. The global sample of batches is
    the single-process one; each rank probes its share (batches ``rank, rank + world, ...``) and the per-layer
    sums are added across ranks in float64. A DDP/DataParallel wrapper is looked through (no gradient is
    synchronised). A sharded model (FSDP1 with ``use_orig_params=True``, FSDP2 ``fully_shard``, other DTensor
    weights) needs every rank in every forward pass: there all ranks run every batch together and each weight's
    squared gradient norm is summed over its shards before the root is taken.

    Args:
        model: A transformers causal LM (or a PEFT/DDP/FSDP wrapper; a PeftModel's base weights are probed,
            not its adapters). Left exactly as found: weights, ``requires_grad``, train/eval mode,
            ``.grad`` and hooks, also when the probe raises.
        dataset: Tokenized rows with ``input_ids`` (optionally ``attention_mask`` and ``labels``): an HF
            ``Dataset`` (torch format or not), an ``IterableDataset``, a list of dicts, or a ``DataLoader``
            yielding padded batches. Sized datasets are sampled with ``seed`` as the reference does.
        num_layers: Number of decoder blocks; detected when omitted, checked against the model when given.
        probe_batches: Batches to accumulate scores over (in all, over all ranks).
        chunk_size: Memory bound kept from the reference: gradients of at most this many blocks are held
            at once (the one-pass probe holds about one weight tensor's gradient, so any value >= 1 holds).
            A sharded model holds this rank's shard of every gradient until its backward pass ends.
        device: Where the batches go; the model's device by default. The model is not moved.
        compute_dtype: Autocast dtype for a CUDA forward pass (e.g. ``torch.bfloat16``); None runs the
            model in its own dtype. Scores are accumulated in float32 either way.
        seed: Seed of the batch sampling.
        batch_size: Rows per probe batch (padded on the right; padding is masked out of the loss).
        metric: One of ``grad_norm`` (default, the reference's), ``grad_rms``, ``fisher``, ``grad_weight``.
        pad_token_id: Token id used to pad batches; the model config's pad/eos id, else 0.
        progress: Show a tqdm progress bar (on rank 0 only).
        distributed: Share the batches among the ranks of the initialised process group and reduce the
            scores (None: whenever one with several ranks is initialised); False probes every batch in this
            process alone, with no collective call (e.g. when only rank 0 probes).
        stack: The model's decoder stack (:func:`find_decoder_stack`), when the caller has found it already.

    Returns:
        Block index -> score (summed over batches), with ``meta`` describing the run (``world_size``: how
        many ranks shared the batches; ``sharded``: whether the weights were sharded).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_int("num_layers", num_layers, minimum=1, allow_none=True, expected="a positive integer")
    for name, value in (("probe_batches", probe_batches), ("chunk_size", chunk_size), ("batch_size", batch_size)):
        check_int(name, value, minimum=1)
    check_int("seed", seed)
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {shown(seed)}")
    check_choice("metric", metric, sorted(METRICS))
    if compute_dtype is not None and not isinstance(compute_dtype, torch.dtype):
        raise TypeError(f"compute_dtype must be a torch.dtype or None, got {shown(compute_dtype)}")
    if compute_dtype is not None and not compute_dtype.is_floating_point:
        raise ValueError(f"compute_dtype must be a floating-point dtype, got {compute_dtype}")
    check_bool("progress", progress)
    check_bool("distributed", distributed, allow_none=True)
    # FSDP1 flat parameters are plain Parameters marked with _is_flat_param (a metaclass makes isinstance work)
    if any(getattr(p, "_is_flat_param", False) or type(p).__name__ == "FlatParameter" for p in model.parameters()):
        raise ValueError(
            "an FSDP model wrapped with use_orig_params=False hides its weights in flat parameters: "
            "wrap it with use_orig_params=True (accelerate: fsdp_use_orig_params: true)"
        )
    stack = resolve_stack(model, stack)
    if num_layers is not None and num_layers != stack.num_layers:
        raise ValueError(
            f"num_layers={num_layers} does not match the model: {stack.path} holds {stack.num_layers} blocks"
        )
    base = unwrap_model(model)
    runner = _data_parallel_inner(model)
    if type(runner).__name__ == "DeepSpeedEngine" or any(hasattr(p, "ds_id") for p in model.parameters()):
        raise TypeError(
            "DeepSpeed-wrapped or ZeRO-partitioned models are not supported by the probe (untested): probe the "
            "model before deepspeed.initialize / accelerator.prepare; the probe reduces across ranks by itself"
        )
    units = fsdp1_units(runner)
    sharded = is_sharded_model(runner)
    initialised = dist.is_available() and dist.is_initialized()
    if distributed and not initialised:
        raise ValueError("distributed=True but torch.distributed is not initialised (start with torchrun/accelerate)")
    if sharded and distributed is False and dist.get_world_size() > 1:
        raise ValueError("distributed=False: a sharded (FSDP/DTensor) model needs every rank in its forward pass")
    # A sharded model always takes the collective path: its shards must be combined, even on one rank.
    wanted = dist.get_world_size() > 1 if distributed is None and initialised else bool(distributed)
    collective = initialised and (sharded or wanted)
    world = dist.get_world_size() if collective else 1
    rank = dist.get_rank() if collective else 0

    if device is None:
        first = next(base.parameters(), None)
        device = _local(first).device if first is not None else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {shown(device)}") from None
    comm_device = collective_device(device) if collective else None
    if pad_token_id is None:
        config = getattr(base, "config", None)
        pad_token_id = getattr(config, "pad_token_id", None)
        if pad_token_id is None:
            eos = getattr(config, "eos_token_id", None)
            pad_token_id = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        pad_token_id = int(pad_token_id) if isinstance(pad_token_id, numbers.Integral) else 0
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    vocab_size = getattr(embeddings, "num_embeddings", None)
    if collective:
        # Every rank draws the same global sample; a failure on one rank is raised on all of them.
        batches, indices = fail_together(
            _probe_batches, dataset, probe_batches, batch_size, seed, pad_token_id, device=comm_device
        )
        _check_same_batches(batches, comm_device)
    else:
        batches, indices = _probe_batches(dataset, probe_batches, batch_size, seed, pad_token_id)
    # every rank holds the same batches and model, so a bad batch stops all of them here, before any collective
    _check_token_ids(batches, vocab_size, indices, batch_size)
    longest = max(torch.as_tensor(b["input_ids"]).shape[-1] for b in batches)
    check_max_length(longest, base, name="probe batch length")
    mine = batches if sharded or not collective else batches[rank::world]

    per_block = block_parameters(stack)
    if not any(per_block):
        raise ValueError(f"{type(base).__name__}: the decoder blocks at {stack.path} hold no floating-point weights")
    layer_of = {id(p): i for i, params in enumerate(per_block) for _, p in params}
    numel = torch.tensor([sum(p.numel() for _, p in params) for params in per_block], dtype=torch.float64)

    params = list(model.parameters())
    flat = [fp for unit in units if (fp := getattr(getattr(unit, "_handle", None), "flat_param", None)) is not None]
    if sharded:
        # FSDP owns the gradients of a sharded model: it would add to pending ones, and it ignores requires_grad
        # flags changed after wrapping. So the probe refuses both instead of changing them.
        if any(p.grad is not None for p in params + flat):
            raise ValueError("the sharded model has pending gradients: call zero_grad(set_to_none=True) first")
        frozen = sorted({i for i, block in enumerate(per_block) for _, p in block if not p.requires_grad})
        if frozen:
            raise ValueError(
                f"blocks {frozen} of the sharded model hold frozen weights, and a sharded model's requires_grad "
                "cannot be switched on: probe before freezing or wrapping (e.g. before get_peft_model)"
            )
        tensors = [p for block in per_block for _, p in block]
        layer_index = torch.tensor([layer_of[id(p)] for p in tensors])
        copies = _replication(runner, tensors, units, world)
        counts = torch.tensor([_local(p).numel() for p in tensors], dtype=torch.float64, device=comm_device)
        dist.all_reduce(counts)
        numel = torch.zeros(stack.num_layers, dtype=torch.float64).index_add_(0, layer_index, counts.cpu() / copies)

    saved_requires_grad = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    saved_modes = [(m, m.training) for m in model.modules()]
    handles = []
    total = torch.zeros(stack.num_layers, dtype=torch.float64)
    tokens = 0
    error = None
    global _running
    _running += 1
    try:
        batch_sums = torch.zeros(stack.num_layers, dtype=torch.float32, device=device)
        if not sharded:
            for p in params:
                p.grad = None
                p.requires_grad_(False)

            def reduce_and_free(p: torch.Tensor) -> None:
                g = p.grad
                if metric == "grad_norm":
                    value = torch.linalg.vector_norm(g, dtype=torch.float32)
                elif metric == "grad_weight":
                    value = (g.float() * p.detach().float()).abs().sum()
                else:  # grad_rms and fisher both start from the sum of squares
                    value = torch.linalg.vector_norm(g, dtype=torch.float32).square()
                batch_sums[layer_of[id(p)]] += value.to(device)
                p.grad = None

            for block_params in per_block:
                for _, p in block_params:
                    p.requires_grad_(True)
                    handles.append(p.register_post_accumulate_grad_hook(reduce_and_free))

        model.eval()  # no dropout: the same batches give the same scores
        use_autocast = compute_dtype is not None and device.type == "cuda"
        bar = tqdm(mine, desc="gradient probe", unit="batch", disable=not progress or rank != 0)
        for b, batch in enumerate(bar):
            batch_sums.zero_()
            with torch.autocast("cuda", dtype=compute_dtype) if use_autocast else nullcontext():
                loss, n_tokens = _causal_lm_loss(runner, batch, device)
            index = b if sharded or not collective else rank + b * world
            if not torch.isfinite(loss):
                raise ValueError(
                    f"probe batch {index}: the loss is {loss.item()} (not finite); check the model and data"
                )
            loss.backward()
            if sharded:
                values = _sharded_layer_values(tensors, layer_index, copies, metric, stack.num_layers, comm_device)
                for p in params + flat:
                    p.grad = None
            else:
                values = batch_sums.double().cpu()
            bad = [i for i in range(stack.num_layers) if not math.isfinite(values[i])]
            if bad:
                raise ValueError(f"probe batch {index}: non-finite gradient in layer(s) {bad} of {stack.path}")
            if metric == "grad_rms":
                values = (values / numel.clamp(min=1)).sqrt()
            total += values
            tokens += n_tokens
            bar.set_postfix(loss=f"{loss.item():.3f}")
    except Exception as exc:
        error = exc
    finally:
        _running -= 1
        for handle in handles:
            handle.remove()
        for p, requires_grad, grad in zip(params, saved_requires_grad, saved_grads):
            p.requires_grad_(requires_grad)
            p.grad = grad
        for fp in flat:
            fp.grad = None
        for module, training in saved_modes:
            module.training = training

    if collective:
        agree(error, device=comm_device)  # a failure on any rank is raised on every rank
        if not sharded:
            # float64 sums of the per-batch per-layer sums; rank 0's copy is then sent to all, so every rank
            # holds bit-identical scores and makes the same selection.
            summed = torch.cat([total, torch.tensor([float(tokens)], dtype=torch.float64)]).to(comm_device)
            dist.all_reduce(summed)
            dist.broadcast(summed, src=0)
            summed = summed.cpu()
            total, tokens = summed[:-1], int(summed[-1].item())
    elif error is not None:
        raise error

    meta = {
        "metric": metric,
        "probe_batches": len(batches),
        "batch_size": batch_size,
        "tokens": tokens,
        "seed": int(seed),
        "model_type": stack.model_type,
        "stack_path": stack.path,
        "num_layers": stack.num_layers,
        "world_size": world,
        "sharded": sharded,
    }
    logger.info(
        "probed %d blocks of %s on %d batches (%d tokens)%s",
        stack.num_layers,
        stack.model_type,
        len(batches),
        tokens,
        f" over {world} ranks" if world > 1 else "",
    )
    return LayerScores({i: float(v) for i, v in enumerate(total.tolist())}, meta)


def _sharded_layer_values(
    tensors: list[torch.Tensor],
    layer_index: torch.Tensor,
    copies: torch.Tensor,
    metric: str,
    num_layers: int,
    comm_device: torch.device,
) -> torch.Tensor:
    """Per-layer values of one batch from sharded gradients: per weight, the squared norm (or |g x w| sum) of each
    shard, summed over the ranks (each element counted once), then the root per weight for grad_norm."""
    parts = []
    for p in tensors:
        g = p.grad
        if g is None:
            parts.append(torch.zeros((), dtype=torch.float64, device=comm_device))
            continue
        g = _local(g)
        if metric == "grad_weight":
            value = (g.double() * _local(p.detach()).double()).abs().sum()
        else:
            value = torch.linalg.vector_norm(g, dtype=torch.float64).square()
        parts.append(value.to(comm_device))
    summed = torch.stack(parts)
    dist.all_reduce(summed)
    per_weight = summed.cpu() / copies
    if metric == "grad_norm":
        per_weight = per_weight.sqrt()
    return torch.zeros(num_layers, dtype=torch.float64).index_add_(0, layer_index, per_weight)
