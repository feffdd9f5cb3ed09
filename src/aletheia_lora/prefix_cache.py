"""Prefix caching: train the adapted blocks without running the frozen blocks below them again.

With adapters only in blocks ``m`` and above, the embeddings and blocks ``0..m-1`` are a fixed function of a
training row. :class:`PrefixCache` runs them once per row (a forward-only pass that stops at block ``m``) and keeps
the hidden state entering block ``m``; while training, a batch of known rows skips the embeddings' blocks below
``m`` and feeds the stored states to block ``m``. The loss and its gradients are those of the full forward (tested
on every supported family), and the saved adapters are ordinary PEFT adapters.

How it plugs in, without touching the model's code or its ``state_dict``:

* the training rows carry their index (:meth:`PrefixCache.indexed`) and the collator passes it on as
  ``aletheia_row_ids`` (:meth:`PrefixCache.collator`);
* :meth:`PrefixCache.attach` hooks the model: a pre-hook on the outer model takes the row ids out of the inputs
  (so any Trainer, DDP included, passes them), the blocks below ``m`` return their input unchanged for that one
  forward, the last of them returning the stored states in place of its output. A forward without row ids
  (evaluation, generation) runs the whole model as usual.

Choices, and why:

* **Built before training, not during the first epoch**: the build runs the prefix once per row without autograd,
  no more than the first epoch's forward would, and then every epoch, the first included, skips it. Each process of
  a distributed run builds the whole cache: the sampler gives a rank different rows every epoch, and the build
  needs no communication (its cost is one prefix pass per rank).
* **Exact or refused**: anything random below ``m`` in train mode (dropout of any kind, router noise) would be
  frozen into the cache, so it is refused, as are trainable parameters below ``m``, MoE router losses (they need
  every block's router) and FSDP (blocks are sharded inside its wrappers). Each refusal names its cause.
* **Storage**: in memory up to a budget, else memory-mapped files in the run's folder; a row's tokens are checked
  against a checksum taken at build time on every read, and a kept cache is reused only under the same
  fingerprint (prefix weights, data, ``m``, dtype), so a stale state is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from aletheia_lora.data import pad_collate
from aletheia_lora.distributed import on_main_process, rank, world_size
from aletheia_lora.files import update_manifest, write_json
from aletheia_lora.layers import DecoderStack, resolve_stack, unwrap_model

logger = logging.getLogger(__name__)

ROW_IDS = "aletheia_row_ids"  # the batch key that carries the training rows' indices
_META = "prefix_cache.json"
_STATES = "states.bin"
_MODULUS = (1 << 61) - 1  # row checksums: a Mersenne prime keeps the products in int64


class _StopForward(Exception):
    """Raised at block ``m`` while building: the blocks above it have nothing to add to the cache."""


def lowest_trainable_block(model: nn.Module, stack: DecoderStack | None = None) -> int | None:
    """The lowest decoder block holding a parameter that requires grad (None: none does)."""
    stack = resolve_stack(model, stack)
    for index, block in enumerate(stack.blocks):
        if any(p.requires_grad for p in block.parameters()):
            return index
    return None


def _row_tokens(row: Mapping) -> torch.Tensor:
    return pad_collate([row])["input_ids"][0]


def row_checksum(ids: torch.Tensor) -> int:
    """An order-sensitive checksum of a row's token ids (to catch a row that is not the one cached)."""
    ids = ids.to(torch.long).flatten()
    weights = torch.arange(1, ids.numel() + 1, dtype=torch.long)
    return int((((ids + 1) % _MODULUS) * weights).remainder(_MODULUS).sum().remainder(_MODULUS))


def estimate_bytes(lengths: Sequence[int], hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes the cache of rows of these lengths takes: one hidden state per token."""
    return int(sum(lengths)) * int(hidden_size) * torch.empty((), dtype=dtype).element_size()


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _prefix_named_tensors(model: nn.Module, stack: DecoderStack, block: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer that is not in blocks ``block`` and above (a superset of what the cache reads)."""
    above = {id(t) for b in stack.blocks[block:] for t in (*b.parameters(), *b.buffers())}
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if id(tensor) not in above:
            yield name, tensor


def check_cacheable(model: nn.Module, block: int | None, stack: DecoderStack | None = None) -> None:
    """Refuse, naming why, a model whose prefix below ``block`` cannot be cached exactly.

    Raises:
        ValueError: no adapted block, or block 0 (nothing to skip); a trainable parameter below ``block``; MoE
            router losses switched on; a dropout module with ``p > 0`` below ``block``.
    """
    stack = resolve_stack(model, stack)
    if block is None:
        raise ValueError("--cache-prefix: the model has no trainable parameter in its decoder blocks")
    if block == 0:
        raise ValueError(
            "--cache-prefix: the lowest adapted block is 0, so there is no frozen prefix to skip; select blocks "
            "above block 0 (e.g. --strategy truncation or contiguous) or leave --cache-prefix out"
        )
    for name, tensor in _prefix_named_tensors(model, stack, block):
        if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
            raise ValueError(
                f"--cache-prefix: {name} is trainable but lies outside the adapted blocks {block} and above; the "
                "cache holds the output of everything below them, so only those blocks may train"
            )
    config = getattr(unwrap_model(model), "config", None)
    if getattr(config, "output_router_logits", False):
        raise ValueError(
            "--cache-prefix: the model's router auxiliary loss is on (config.output_router_logits); it needs the "
            "router of every block, including the skipped ones. Switch it off or leave --cache-prefix out"
        )
    dropouts = dropout_modules(stack, block, model)
    if dropouts:
        raise ValueError(
            f"--cache-prefix: a dropout of p={dropouts[0].p:g} runs below block {block} in training; the cache "
            "would freeze one draw of it. Set the model's dropout (and LoRA's, on blocks below) to 0"
        )


def dropout_modules(stack: DecoderStack, block: int, model: nn.Module | None = None) -> list[nn.Dropout]:
    """The dropout modules with ``p > 0`` in the blocks below ``block``: what a cache of them would freeze.

    Args:
        stack: The decoder stack.
        block: The first block not scanned.
        model: Also scan its modules outside the decoder blocks (embeddings' dropout and the like), after the blocks.
    """
    modules = [m for b in stack.blocks[:block] for m in b.modules()]
    if model is not None:
        inside = {id(m) for b in stack.blocks for m in b.modules()}
        modules += [m for m in unwrap_model(model).modules() if id(m) not in inside]
    return [m for m in modules if isinstance(m, nn.Dropout) and m.p > 0]


def _stochastic_settings(model: nn.Module) -> list[str]:
    config = getattr(unwrap_model(model), "config", None)
    found = []
    for key, value in (config.to_dict() if hasattr(config, "to_dict") else {}).items():
        if any(w in key for w in ("drop", "jitter", "noise")) and isinstance(value, float) and value > 0:
            found.append(f"{key}={value:g}")
    return found


class PrefixCache:
    """The hidden states entering block ``block`` for every training row, and the hooks that feed them in.

    Build with :meth:`build`; use with :meth:`indexed`, :meth:`collator` and :meth:`attach` (the HF Trainer of
    :func:`~aletheia_lora.train.train_lora` does all three with ``TrainConfig(cache_prefix=True)``):

    .. code-block:: python

        cache = PrefixCache.build(peft_model, train_rows, pad_token_id=tok.pad_token_id)
        args = TrainingArguments(..., remove_unused_columns=False)  # keeps the row ids in the batches
        trainer = Trainer(model=peft_model, args=args, train_dataset=cache.indexed(train_rows),
                          data_collator=cache.collator(my_collator))
        with cache.attach(peft_model):
            trainer.train()
        cache.close()
    """

    def __init__(
        self,
        states: torch.Tensor,
        offsets: list[int],
        lengths: list[int],
        checksums: list[int],
        *,
        block: int,
        stack: DecoderStack,
        folder: Path | None = None,
        fingerprint: str = "",
        build_seconds: float = 0.0,
        reused: bool = False,
    ) -> None:
        self.states, self.offsets, self.lengths, self.checksums = states, offsets, lengths, checksums
        self.block, self.stack, self.folder = block, stack, folder
        self.fingerprint, self.build_seconds, self.reused = fingerprint, build_seconds, reused
        self.hits = 0  # batches served from the cache
        self._batch_rows: torch.Tensor | None = None
        self._tuple_len = 0  # blocks that return (hidden, None, ...) tuples: their length

    # --- building -----------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: nn.Module,
        rows: Sequence[Mapping],
        *,
        pad_token_id: int = 0,
        block: int | None = None,
        stack: DecoderStack | None = None,
        batch_size: int = 8,
        budget_gib: float = 4.0,
        dtype: torch.dtype | None = None,
        folder: str | os.PathLike | None = None,
        progress: bool = False,
    ) -> PrefixCache:
        """Run the prefix (embeddings and blocks below ``block``) once over ``rows`` and keep what enters ``block``.

        Args:
            model: The model as it will train (a PeftModel or any causal LM), adapters in place.
            rows: The training rows (``input_ids``, optional ``attention_mask``), indexable.
            pad_token_id: Padding id of the build's batches.
            block: The first block that runs during training; default: the lowest with a trainable parameter.
            stack: The decoder stack, when already found.
            batch_size: Rows per forward pass of the build.
            budget_gib: Keep the states in memory up to this size, else in memory-mapped files in ``folder``.
            dtype: Storage dtype (default: the model's); ``torch.bfloat16`` halves a float32 model's cache at the
                price of exactness.
            folder: Where the memory-mapped files go (needed above the budget); a cache kept there by an earlier run
                of the same fingerprint is reused.
            progress: Show a progress bar.

        Raises:
            ValueError: :func:`check_cacheable`; a prefix that is random in train mode; over the budget without a
                folder; empty ``rows``.
        """
        stack = resolve_stack(model, stack)
        block = lowest_trainable_block(model, stack) if block is None else block
        check_cacheable(model, block, stack)
        if not isinstance(rows, Sequence) and not hasattr(rows, "__getitem__"):
            raise TypeError(f"rows must be an indexable dataset, got {type(rows).__name__}")
        n = len(rows)
        if n == 0:
            raise ValueError("--cache-prefix: the training dataset is empty")
        dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        hidden = _hidden_size(model, stack)
        tokens = [_row_tokens(rows[i]) for i in range(n)]
        lengths = [int(t.numel()) for t in tokens]
        checksums = [row_checksum(t) for t in tokens]
        offsets = [0]
        for length in lengths[:-1]:
            offsets.append(offsets[-1] + length)
        size = estimate_bytes(lengths, hidden, dtype)
        in_memory = size <= budget_gib * 1024**3
        if not in_memory and folder is None:
            raise ValueError(
                f"--cache-prefix: the cache needs {_fmt_bytes(size)}, over --cache-budget {budget_gib:g} GiB, and "
                "no folder was given for its memory-mapped files"
            )
        fingerprint = _fingerprint(model, stack, block, dtype, lengths, checksums)
        where = "in memory" if in_memory else f"memory-mapped in {folder}"
        logger.info(
            "prefix cache: %d rows, %d tokens x %d = %s (%s), %s; blocks 0-%d are skipped while training",
            n, sum(lengths), hidden, _fmt_bytes(size), str(dtype).replace("torch.", ""), where, block - 1,
        )  # fmt: skip
        folder = None if folder is None else Path(folder)
        # before any reuse: a kept cache matches the weights, not the dropout settings of this run
        _check_deterministic(model, stack, rows, pad_token_id, block)
        if folder is not None and not in_memory:
            reused = _load_kept(folder, fingerprint, sum(lengths) * hidden, dtype)
            if reused is not None:
                logger.info("prefix cache: reusing the states kept in %s (same fingerprint)", folder)
                cache = cls(reused.view(-1, hidden), offsets, lengths, checksums, block=block, stack=stack,
                            folder=folder, fingerprint=fingerprint, reused=True)  # fmt: skip
                cache._tuple_len = _probe_tuple_len(model, stack, rows, pad_token_id, block)
                return cache
        if in_memory:
            states = torch.empty((sum(lengths), hidden), dtype=dtype)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            _remove_files(folder)  # only the cache's own two files: anything else in the folder is left alone
            states = torch.from_file(str(folder / _STATES), shared=True, size=sum(lengths) * hidden, dtype=dtype)
            states = states.view(-1, hidden)
        start = time.perf_counter()
        seen: dict = {}
        shape = [(stack.blocks[block - 1], _tuple_len_hook(seen))]
        was_training = model.training
        model.train()  # as in training (deterministic, checked above)
        try:
            bar = tqdm(range(0, n, batch_size), desc="prefix cache", unit="batch", disable=not progress)
            for lo in bar:
                ids = list(range(lo, min(n, lo + batch_size)))
                out = _run_prefix(model, stack, [rows[i] for i in ids], pad_token_id, block, hooks=shape)
                for j, i in enumerate(ids):
                    states[offsets[i] : offsets[i] + lengths[i]] = out[j, : lengths[i]].to("cpu", dtype)
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
        logger.info("prefix cache built in %.1f s", seconds)
        if folder is not None and not in_memory:
            meta = {"fingerprint": fingerprint, "block": block, "numel": sum(lengths) * hidden,
                    "dtype": str(dtype).replace("torch.", "")}  # fmt: skip
            # the description goes last and atomically: a states file without it is never read (see _load_kept)
            write_json(folder / _META, meta)
        cache = cls(states, offsets, lengths, checksums, block=block, stack=stack,
                    folder=None if in_memory else folder, fingerprint=fingerprint, build_seconds=seconds)  # fmt: skip
        cache._tuple_len = seen.get("tuple", 0)
        return cache

    @classmethod
    def for_run(
        cls, model: nn.Module, rows: Sequence[Mapping], *, output_dir: str | os.PathLike | None, **kwargs
    ) -> PrefixCache:
        """:meth:`build` for a training run writing into ``output_dir``: a memory-mapped cache goes to
        ``OUT/prefix-cache`` (``OUT/prefix-cache/rankR`` per process of a distributed run: each builds the whole
        cache, see the module's docstring), listed in the folder's manifest before it is written. Without
        ``output_dir`` the cache stays in memory (over the budget it is refused)."""
        if output_dir is None:
            return cls.build(model, rows, **kwargs)
        output_dir = Path(output_dir)
        subs = [f"prefix-cache/rank{r}" for r in range(world_size())] if world_size() > 1 else ["prefix-cache"]
        claims = list(dict.fromkeys(["prefix-cache/", *(f"{sub}/" for sub in subs)]))
        claims += [f"{sub}/{name}" for sub in subs for name in (_STATES, _META)]
        on_main_process(update_manifest, output_dir, claim=claims)
        return cls.build(model, rows, folder=output_dir / subs[rank() if world_size() > 1 else 0], **kwargs)

    def summary(self) -> dict:
        """What the cache holds and what it cost, for the run's report."""
        return {
            "block": self.block,
            "rows": len(self.lengths),
            "tokens": sum(self.lengths),
            "bytes": self.nbytes,
            "dtype": str(self.states.dtype).replace("torch.", ""),
            "memory_mapped": self.folder is not None,
            "build_seconds": round(self.build_seconds, 3),
            "reused": self.reused,
            "batches_served": self.hits,
        }

    @property
    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size()

    def close(self, keep: bool = False) -> None:
        """Drop the states; remove the memory-mapped files unless ``keep`` (a later run may reuse them)."""
        self.states = torch.empty(0)
        if self.folder is not None and self.folder.exists() and not keep:
            _remove_files(self.folder)
            if not any(self.folder.iterdir()):
                self.folder.rmdir()

    # --- using --------------------------------------------------------------------------------------------

    def indexed(self, dataset) -> _IndexedRows:
        """``dataset`` whose rows carry their index under :data:`ROW_IDS` (:func:`index_rows`)."""
        if len(dataset) != len(self.lengths):
            raise ValueError(
                f"the dataset has {len(dataset)} rows; the prefix cache was built for {len(self.lengths)}"
            )
        return index_rows(dataset)

    def collator(self, collate: Callable[[list], dict]) -> Callable[[list], dict]:
        """``collate`` that passes the rows' indices on as a ``ROW_IDS`` tensor (:func:`row_id_collator`)."""
        return row_id_collator(collate)

    @contextmanager
    def attach(self, model: nn.Module) -> Iterator[PrefixCache]:
        """Hook ``model`` so that its forwards with row ids skip the prefix (see the module's docstring)."""
        lowest = lowest_trainable_block(model, self.stack)
        if lowest is not None and lowest < self.block:
            raise ValueError("--cache-prefix: a block below the cached prefix's end has become trainable")
        outer = model
        handles = [
            # first among the pre-hooks: a strip_row_ids hook registered earlier must not drop the ids before
            outer.register_forward_pre_hook(self._take_row_ids, with_kwargs=True, prepend=True),
            outer.register_forward_hook(self._release, always_call=True),
        ]
        skipped = list(self.stack.blocks[: self.block])
        for module in skipped:
            module.forward = self._skipping(module, last=module is skipped[-1])
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for module in skipped:
                if "forward" in vars(module):
                    del module.forward
            self._batch_rows = None

    def _skipping(self, module: nn.Module, last: bool) -> Callable:
        # The last skipped block returns the stored states itself (rather than a pre-hook on block m replacing its
        # input): a checkpointed block m that recomputes its forward in the backward pass then sees them again.
        real = type(module).forward.__get__(module)

        def forward(*args, **kwargs):
            if self._batch_rows is None:
                return real(*args, **kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            if last:
                hidden = self._stored(hidden)
            return (hidden,) + (None,) * (self._tuple_len - 1) if self._tuple_len else hidden

        return forward

    def _take_row_ids(self, module, args, kwargs):
        if ROW_IDS not in kwargs:
            return None
        kwargs = dict(kwargs)
        row_ids = kwargs.pop(ROW_IDS)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            raise ValueError(
                "--cache-prefix: a forward that skips the prefix has no hidden states or attentions of the blocks "
                "below it; ask for them in a forward without row ids"
            )
        if row_ids is not None and ids is not None:
            self._check_rows(row_ids, ids)
            self._batch_rows = row_ids.detach().to("cpu")
        return args, kwargs

    def _release(self, module, args, kwargs_or_output, output=None):
        self._batch_rows = None

    def _check_rows(self, row_ids: torch.Tensor, input_ids: torch.Tensor) -> None:
        ids = input_ids.detach().to("cpu")
        for j, row in enumerate(row_ids.tolist()):
            if not 0 <= row < len(self.lengths):
                raise ValueError(f"--cache-prefix: row id {row} is not one of the {len(self.lengths)} cached rows")
            n = self.lengths[row]
            if n > ids.shape[1] or row_checksum(ids[j, :n]) != self.checksums[row]:
                raise ValueError(
                    f"--cache-prefix: the tokens of training row {row} differ from those cached; the dataset changed "
                    "after the cache was built"
                )

    def _stored(self, hidden: torch.Tensor) -> torch.Tensor:
        """The batch's stored states, shaped like ``hidden`` (padding positions zero: no real token attends them)."""
        states = torch.zeros_like(hidden)
        for j, row in enumerate(self._batch_rows.tolist()):
            lo, n = self.offsets[row], self.lengths[row]
            states[j, :n] = self.states[lo : lo + n].to(hidden.device, hidden.dtype, non_blocking=True)
        self.hits += 1
        return states


def index_rows(dataset) -> _IndexedRows:
    """``dataset`` (indexable) whose rows carry their index under :data:`ROW_IDS`."""
    return _IndexedRows(dataset)


def row_id_collator(collate: Callable[[list], dict]) -> Callable[[list], dict]:
    """``collate`` that passes the rows' indices on as a ``ROW_IDS`` long tensor in the batch (rows without one,
    e.g. evaluation rows, give a batch without it)."""

    def with_row_ids(features: list) -> dict:
        ids = [f[ROW_IDS] if ROW_IDS in f else None for f in features]
        batch = collate([{k: v for k, v in f.items() if k != ROW_IDS} for f in features])
        if all(i is not None for i in ids):
            batch[ROW_IDS] = torch.tensor(ids, dtype=torch.long)
        return batch

    return with_row_ids


def _drop_row_ids(module, args, kwargs):
    if ROW_IDS not in kwargs:
        return None
    return args, {k: v for k, v in kwargs.items() if k != ROW_IDS}


def strip_row_ids(model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Let ``model`` take batches with row ids while no cache is attached (a cache built later, during training):
    the ids are dropped before its forward. Returns the hook's handle."""
    return model.register_forward_pre_hook(_drop_row_ids, with_kwargs=True)


class _IndexedRows(Sequence):
    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], ROW_IDS: int(index)}


def _remove_files(folder: Path) -> None:
    for name in (_META, _STATES):  # the description first: a half-removed cache is never taken for whole
        (folder / name).unlink(missing_ok=True)


def _hidden_size(model: nn.Module, stack: DecoderStack) -> int:
    config = getattr(unwrap_model(model), "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("--cache-prefix: cannot tell the model's hidden size from its config")


def _fingerprint(model, stack, block, dtype, lengths, checksums) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([type(unwrap_model(model)).__name__, block, str(dtype), lengths, checksums]).encode())
    for name, tensor in _prefix_named_tensors(model, stack, block):
        digest.update(name.encode())
        data = tensor.detach().to("cpu").contiguous()
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _load_kept(folder: Path, fingerprint: str, numel: int, dtype: torch.dtype) -> torch.Tensor | None:
    meta_path, states = folder / _META, folder / _STATES
    if not (meta_path.is_file() and states.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != fingerprint or meta.get("numel") != numel:
        logger.info("prefix cache: the states kept in %s are for other weights or data; rebuilding", folder)
        return None
    element = torch.empty((), dtype=dtype).element_size()
    if states.stat().st_size != numel * element:
        return None
    return torch.from_file(str(states), shared=False, size=numel, dtype=dtype)


def _run_prefix(model, stack, rows, pad_token_id, block, hooks=()) -> torch.Tensor:
    """The hidden states entering block ``block`` for ``rows`` (one padded batch), without autograd; the forward
    stops there. ``hooks``: ``(module, forward hook)`` pairs registered for this one forward.

    Raises:
        RuntimeError: the forward finished without running block ``block``.
    """
    captured = {}

    def take(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        raise _StopForward

    handles = [stack.blocks[block].register_forward_pre_hook(take, with_kwargs=True)]
    handles += [module.register_forward_hook(hook) for module, hook in hooks]
    device = next(model.parameters()).device
    batch = pad_collate(rows, pad_token_id=pad_token_id)
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  use_cache=False)  # fmt: skip
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if "hidden" not in captured:
        raise RuntimeError(f"block {block} never ran: the model's forward finished without reaching it")
    return captured["hidden"]


def _check_deterministic(model, stack, rows, pad_token_id, block) -> None:
    """Run the prefix twice in train mode on a few rows; differing states mean something below is random."""
    sample = [rows[i] for i in range(min(2, len(rows)))]
    was_training = model.training
    model.train()
    # the check leaves the training's random streams (CPU and every GPU) as they were
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            first = _run_prefix(model, stack, sample, pad_token_id, block)
            second = _run_prefix(model, stack, sample, pad_token_id, block)
        finally:
            model.train(was_training)
    if not torch.equal(first, second):
        settings = _stochastic_settings(model)
        raise ValueError(
            f"--cache-prefix: the blocks below block {block} are random in train mode (dropout or router noise"
            + (f": {', '.join(settings)}" if settings else "")
            + "), so caching them would freeze one draw; set those to 0 in the model's config"
        )


def _tuple_len_hook(seen: dict) -> Callable:
    """A forward hook recording whether a block returns a tuple, and its length (see ``PrefixCache._skipping``)."""

    def shape(module, args, output):
        seen["tuple"] = len(output) if isinstance(output, tuple) else 0

    return shape


def _probe_tuple_len(model, stack, rows, pad_token_id, block) -> int:
    seen = {}
    _run_prefix(model, stack, [rows[0]], pad_token_id, block, hooks=[(stack.blocks[block - 1], _tuple_len_hook(seen))])
    return seen.get("tuple", 0)
