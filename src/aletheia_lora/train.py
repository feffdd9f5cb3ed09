"""Training: LoRA on the selected blocks with the HF Trainer, on a path that keeps the backward pass short.

Autograd stops the backward pass at the lowest block with a trainable parameter; that is where most of
selective LoRA's speed comes from. Two common set-ups silently throw it away by making the embeddings'
output require grad: ``enable_input_require_grads()`` (PEFT's k-bit preparation, transformers'
checkpointing) and reentrant gradient checkpointing. Here checkpointing is always non-reentrant, every
input-require-grads hook is removed, and a monitor records how deep each backward pass really went.
Training that diverges stops at once (:class:`TrainingDiverged`); ``--resume`` is checked (:func:`check_resume`).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from aletheia_lora.data import IGNORE_INDEX, pad_collate
from aletheia_lora.distributed import (
    DEFAULT_TIMEOUT_S,
    barrier,
    collective_device,
    is_distributed,
    is_sharded_model,
    on_main_process,
)
from aletheia_lora.files import (
    atomic_dir,
    check_checkpoint_files,
    claim_outputs,
    last_complete_checkpoint,
    read_manifest,
    rotate_checkpoints,
    update_manifest,
)
from aletheia_lora.layers import DecoderStack, resolve_stack, unwrap_model
from aletheia_lora.probe import is_probing
from aletheia_lora.reprobe import ReprobeCallback

logger = logging.getLogger(__name__)

EMBEDDINGS = -1  # "lowest layer reached" when the backward pass ran down into the embeddings
_INPUT_GRAD_HOOKS = {"make_inputs_require_grads", "make_inputs_require_grad"}


@dataclass
class TrainConfig:
    """How to train the adapters. Field help strings are shared by the CLI and the docs."""

    max_steps: int = field(default=100, metadata={"help": "Optimizer steps to train for."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate of AdamW."})
    batch_size: int = field(default=4, metadata={"help": "Sequences per device per step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches accumulated per step."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Learning-rate schedule: linear, cosine or constant."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 turns it off)."})
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every this many steps."})
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every this many steps (0: only at the end)."})
    save_steps: int = field(default=50, metadata={"help": "Write a resumable checkpoint every this many steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass to save memory (non-reentrant, slower)."},
    )
    bf16: bool = field(default=False, metadata={"help": "Train in bfloat16 mixed precision (GPU)."})
    seed: int = field(default=0, metadata={"help": "Seed of data order and adapter initialisation."})
    reprobe_every: int = field(
        default=0,
        metadata={
            "help": "Re-run the probe every this many steps and move the trainable adapters to its selection "
            "(0: select once). LoRA then goes on every block: blocks never selected stay switched off, blocks "
            "selected earlier keep what they learned, frozen. One process only."
        },
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        positive = (
            "max_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_total_limit",
        )
        non_negative = ("warmup_steps", "eval_steps", "save_steps", "seed", "reprobe_every")
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if f.type == "int" or f.name in positive + non_negative:
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise TypeError(f"{flag} must be an integer, got {value!r}")
                if f.name in positive and value <= 0:
                    raise ValueError(f"{flag} must be a positive integer, got {value!r}")
                if f.name in non_negative and value < 0:
                    raise ValueError(f"{flag} must be >= 0, got {value!r}")
            elif f.type == "float":
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                    raise TypeError(f"{flag} must be a finite number, got {value!r}")
                if value < 0 or (f.name == "learning_rate" and value == 0):
                    raise ValueError(
                        f"{flag} must be {'positive' if f.name == 'learning_rate' else '>= 0'}, got {value!r}"
                    )
            elif f.type == "bool" and not isinstance(value, bool):
                raise TypeError(f"{flag} must be true or false, got {value!r}")
        if self.lr_scheduler_type not in ("linear", "cosine", "constant"):
            raise ValueError(f"--lr-scheduler-type must be linear, cosine or constant, got {self.lr_scheduler_type!r}")


def remove_input_require_grads_hooks(model: nn.Module) -> int:
    """Remove every forward hook that makes an embedding output require grad; return how many were removed.

    ``enable_input_require_grads()`` is needed only by reentrant checkpointing; with it, the backward pass
    runs down to the embeddings whatever layers are adapted. Enabling checkpointing and then wrapping with
    PEFT registers two such hooks, and one ``disable_input_require_grads()`` removes only one.
    """
    removed = 0
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") in _INPUT_GRAD_HOOKS:
                del module._forward_hooks[key]
                removed += 1
    for wrapper in (model, unwrap_model(model)):
        # transformers keeps the handle to remove the hook later; it is gone now
        if hasattr(wrapper, "_require_grads_hook"):
            try:
                del wrapper._require_grads_hook
            except AttributeError:
                pass
    return removed


def count_input_require_grads_hooks(model: nn.Module) -> int:
    """How many input-require-grads hooks the model carries."""
    return sum(
        getattr(hook, "__name__", "") in _INPUT_GRAD_HOOKS
        for m in model.modules()
        for hook in m._forward_hooks.values()
    )


def prepare_lora_model(
    model: nn.Module, lora_config: LoraConfig, *, gradient_checkpointing: bool = False
) -> PeftModel:
    """Wrap ``model`` with the LoRA adapters of ``lora_config``, keeping the backward pass as short as it can be.

    Args:
        model: The base causal LM (not yet a PeftModel).
        lora_config: From :func:`apply_aletheia_lora`.
        gradient_checkpointing: Enable non-reentrant activation checkpointing (no input grads needed).

    Returns:
        The PeftModel, with no input-require-grads hook left.
    """
    if isinstance(model, PeftModel):
        raise TypeError("model is already a PeftModel; pass the base model (model.get_base_model())")
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a peft LoraConfig, got {type(lora_config).__name__}")
    found = count_input_require_grads_hooks(model)
    if found:
        logger.warning(
            "the model carries %d input-require-grads hook(s) (enable_input_require_grads or k-bit preparation): "
            "they force the backward pass down to the embeddings and cancel the speed-up of layer selection; "
            "removing them",
            found,
        )
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    peft_model = get_peft_model(model, lora_config)
    remove_input_require_grads_hooks(peft_model)
    return peft_model


class BackwardDepthMonitor:
    """Records the lowest decoder block the backward pass actually reached (``EMBEDDINGS`` = below block 0).

    A tensor hook on each block's output fires only when autograd computes the gradient there, so this
    measures what happened, not what the configuration suggests. Passes of a gradient probe run meanwhile
    (re-probing) are not training passes and are left out.
    """

    def __init__(self, model: nn.Module, stack: DecoderStack | None = None) -> None:
        self.stack = resolve_stack(model, stack)
        self.lowest: int | None = None
        self._handles = []

    def _record(self, index: int) -> None:
        self.lowest = index if self.lowest is None else min(self.lowest, index)

    def _on_output(self, index: int, module: nn.Module, args, output) -> None:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if not is_probing() and torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(lambda grad: self._record(index) or grad)

    def _on_first_input(self, module: nn.Module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not is_probing() and torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(lambda grad: self._record(EMBEDDINGS) or grad)

    def __enter__(self) -> BackwardDepthMonitor:
        for i, block in enumerate(self.stack.blocks):
            self._handles.append(block.register_forward_hook(partial(self._on_output, i)))
        self._handles.append(self.stack.blocks[0].register_forward_pre_hook(self._on_first_input, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    dataset: Sequence,
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
    max_batches: int | None = None,
    distributed: bool = False,
) -> dict[str, float]:
    """Token-weighted mean next-token loss (and perplexity) over a tokenized dataset, padding excluded.

    Args:
        model: A causal LM; under several processes also an FSDP-sharded one (every rank then runs as many
            forward passes as the busiest rank, the extra ones not counted).
        dataset: Tokenized rows.
        batch_size: Rows per forward pass.
        pad_token_id: Padding id; padding never enters the loss.
        max_batches: Evaluate only the first this many batches.
        distributed: Under several processes, each rank evaluates its share of the batches and the sums
            are added across ranks, so every rank returns the whole dataset's loss. Every rank must call it.
    """
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = next(model.parameters()).device
    starts = list(range(0, len(dataset), batch_size))[:max_batches]
    collective = distributed and is_distributed()
    counted = len(starts)
    if collective:
        world = dist.get_world_size()
        mine = starts[dist.get_rank() :: world]
        counted = len(mine)
        # A sharded model needs every rank in every forward pass: a rank with one batch fewer repeats one
        # without counting it.
        if is_sharded_model(model):
            mine += starts[:1] * (-(-len(starts) // world) - len(mine))
        starts = mine
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for b, start in enumerate(starts):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in pad_collate(rows, pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            n = int((targets != IGNORE_INDEX).sum())
            if n == 0 or b >= counted:
                continue
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total += float(loss)
            tokens += n
    finally:
        model.train(was_training)
    if collective:
        sums = torch.tensor([total, float(tokens)], dtype=torch.float64, device=collective_device(device))
        dist.all_reduce(sums)
        total, tokens = float(sums[0]), int(sums[1])
    if tokens == 0:
        raise ValueError("the evaluation data has no tokens to predict")
    mean = total / tokens
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": tokens}


@dataclass
class TrainResult:
    """What :func:`train_lora` did."""

    model: PeftModel
    adapter_dir: Path | None
    log_history: list[dict]
    step_times: list[float]
    lowest_layer_reached: int | None
    trainable_parameters: int
    train_seconds: float
    processes: int = 1  # data-parallel ranks the Trainer trained on
    wrapped: nn.Module | None = None  # the model as the Trainer wrapped it (DDP, FSDP); FSDP1 runs only through it


class TrainingDiverged(ValueError):
    """Training produced a non-finite loss, gradient norm or adapter weight: it stopped, and saved no adapter."""


def _diverged(step: int, what: str, value: object, config: TrainConfig) -> TrainingDiverged:
    clip = f"lower --max-grad-norm (now {config.max_grad_norm:g})" if config.max_grad_norm else "set --max-grad-norm 1"
    return TrainingDiverged(
        f"training diverged at step {step}: {what} is {value}; stopped, no adapter saved. Lower --learning-rate "
        f"(now {config.learning_rate:g}), {clip}, or check the data"
    )


def _finite_weights(model: nn.Module) -> bool:
    # at save steps and at the end only: a sync per tensor is nothing beside a save (and tensors may sit on
    # several devices, so they are not stacked)
    return all(bool(torch.isfinite(p.detach()).all()) for p in model.parameters() if p.requires_grad)


_LOGGED = {"loss": "the loss", "grad_norm": "the gradient norm", "eval_loss": "the evaluation loss"}


def _guarded_trainer(config: TrainConfig, output_dir: Path) -> tuple[type, object]:
    """A Trainer stopping at a non-finite loss; a callback stopping at a non-finite logged value or weight before a
    checkpoint, listing each checkpoint in the manifest before it is written, rotating only the listed ones."""
    from transformers import Trainer, TrainerCallback

    class GuardedTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            # One host sync per micro-batch, in place of the Trainer's NaN filter (switched off: it hides NaNs).
            if not bool(torch.isfinite(loss).all()):
                raise _diverged(self.state.global_step + 1, "the loss", float(loss.float().mean()), config)
            return loss

    class Guard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key, value in (logs or {}).items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise _diverged(state.global_step, _LOGGED.get(key, key), value, config)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if not control.should_save:
                return
            if model is not None and not _finite_weights(model):
                raise _diverged(state.global_step, "an adapter weight", "not finite (the gradient overflowed)", config)
            if state.is_world_process_zero:  # listed before the Trainer writes it: a kill mid-save leaves it ours
                update_manifest(output_dir, claim=[f"checkpoints/checkpoint-{state.global_step}"])

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                rotate_checkpoints(output_dir, config.save_total_limit)

    return GuardedTrainer, Guard()


# What a resumed run's adapters must share with the checkpoint's: LoraConfig fields, by the flag that sets them.
_RESUMED = ("layers_to_transform", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")
_RESUMED += ("target_parameters", "lora_dropout", "use_rslora", "use_dora")
_FLAGS = {"layers_to_transform": "--layers", "rank_pattern": "--attention-r/--mlp-r/--rank-allocation"}
_FLAGS |= {"alpha_pattern": "--attention-alpha/--mlp-alpha", "target_parameters": "--target-experts"}


def _shown(value: object) -> str:
    """A LoraConfig value as text, the same for the config and its JSON (sets, lists in any order, 8 and 8.0)."""
    if isinstance(value, (set, frozenset, list, tuple)):
        items = sorted(map(_shown, value))
        return " ".join(sorted(items, key=int) if all(v.isdigit() for v in items) else items) or "None"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_shown(v)}" for k, v in sorted(value.items())) or "None"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def check_resume(checkpoint: str | os.PathLike, lora_config: LoraConfig, model: nn.Module | None = None) -> None:
    """Check, changing nothing, that a run with ``lora_config`` (and with ``model``, its PeftModel, whose adapter
    tensors are compared shape by shape) may resume from the ``checkpoint-N`` folder ``checkpoint``.

    Raises:
        ValueError: a damaged file (named), or adapters that differ: the flag, the checkpoint's value and the run's.
    """
    checkpoint = Path(checkpoint)
    check_checkpoint_files(checkpoint)
    redo = "resume with the checkpoint's settings, or start again with --overwrite"
    saved_config = checkpoint / "adapter_config.json"
    saved = json.loads(saved_config.read_text(encoding="utf-8")) if saved_config.is_file() else {}
    new = lora_config.to_dict()
    for key in _RESUMED:
        before, now, flag = _shown(saved.get(key)), _shown(new.get(key)), _FLAGS.get(key, "--" + key.replace("_", "-"))
        if key in saved and before != now:
            raise ValueError(
                f"--resume: {checkpoint} was trained with {flag} {before}, this run has {flag} {now}; {redo}"
            )
    weights = checkpoint / "adapter_model.safetensors"
    if model is not None and weights.is_file():
        from peft import get_peft_model_state_dict
        from safetensors import safe_open

        expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
        with safe_open(str(weights), framework="pt") as handle:
            found = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        differ = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        if differ:
            raise ValueError(
                f"--resume: the adapter in {weights} does not fit this run's: {len(differ)} tensors differ, e.g. "
                f"{differ[0]} ({found.get(differ[0], 'missing')} there, {expected.get(differ[0], 'missing')} "
                f"here); {redo}"
            )


def _atomic_save_adapter(model: PeftModel | None, target: Path, staged: Path | None = None) -> None:
    # A crash mid-save keeps the previous adapter and leaves no half-written folder. In an output folder with a
    # manifest the old folder, replaced whole, may hold only this tool's files (checked before training and again
    # here: else the adapter goes beside it), and the new files are listed before they are renamed in.
    claim = read_manifest(target.parent).found
    if claim:
        try:
            claim_outputs(target.parent, [f"{target.name}/"])
        except ValueError as exc:
            fallback = Path(tempfile.mkdtemp(prefix=f"{target.name}-saved-", dir=target.parent))
            update_manifest(target.parent, claim=[fallback.name])
            _fill_adapter(model, fallback, staged)
            raise ValueError(f"{exc}; the trained adapter was saved to {str(fallback)!r} instead") from None
    with atomic_dir(target) as tmp:
        _fill_adapter(model, tmp, staged)
        if claim:
            update_manifest(target.parent, claim=[f"{target.name}/{p.name}" for p in tmp.iterdir()])


def _save_staged_adapter(staged: Path, target: Path) -> None:
    _atomic_save_adapter(None, target, staged)


def _fill_adapter(model: PeftModel | None, folder: Path, staged: Path | None) -> None:
    if staged is None:
        model.save_pretrained(folder)
        return
    for item in staged.iterdir():
        os.replace(item, folder / item.name)
    staged.rmdir()


def _claim_training_outputs(output_dir: Path, resume: bool) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    claim_outputs(output_dir, ["checkpoints/", "adapter/"], adopt=resume)
    if not resume:
        rotate_checkpoints(output_dir, 0)


def train_lora(
    model: nn.Module,
    lora_config: LoraConfig,
    train_dataset,
    eval_dataset=None,
    config: TrainConfig | None = None,
    *,
    output_dir: str | os.PathLike,
    pad_token_id: int = 0,
    resume: bool = False,
    callbacks: Sequence = (),
    on_log: Callable[[dict], None] | None = None,
    dist_timeout: int = int(DEFAULT_TIMEOUT_S),
    stack: DecoderStack | None = None,
) -> TrainResult:
    """Fine-tune LoRA adapters on the selected blocks with the HF Trainer (single process, DDP or FSDP alike).

    Args:
        model: The base causal LM.
        lora_config: From :func:`apply_aletheia_lora`.
        train_dataset: Tokenized rows (``input_ids``, optional ``attention_mask``/``labels``).
        eval_dataset: Optional held-out rows, evaluated every ``config.eval_steps`` steps.
        config: Training settings.
        output_dir: Where checkpoints (``checkpoints/``) and the final adapter (``adapter/``) go.
        pad_token_id: Padding id for batches; padding never enters the loss.
        resume: Continue from the last checkpoint in ``output_dir/checkpoints``.
        callbacks: Extra ``TrainerCallback`` objects. With ``config.reprobe_every`` one of them must be the
            :class:`~aletheia_lora.reprobe.ReprobeCallback` that moves the adapters (``run_pipeline`` adds it).
        on_log: Called with each log record (loss, learning rate, eval loss).
        dist_timeout: Multi-process runs: seconds a rank waits for the others in a collective
            (:attr:`ModelConfig.dist_timeout <aletheia_lora.models.ModelConfig.dist_timeout>`).
        stack: The model's decoder stack, when already found (the PeftModel keeps the same blocks).

    Returns:
        A :class:`TrainResult`; ``adapter_dir`` loads with ``PeftModel.from_pretrained``.

    Raises:
        TrainingDiverged: a non-finite loss, gradient norm or weight (a ``ValueError``); no adapter is saved.
        ValueError: :func:`check_resume`; files this tool did not write in ``checkpoints/`` or ``adapter/``.

    Only checkpoints listed in ``output_dir``'s manifest are rotated, and without ``resume`` removed first.
    """
    from transformers import PrinterCallback, TrainerCallback, TrainingArguments

    config = config or TrainConfig()
    if len(train_dataset) == 0:
        raise ValueError("train_dataset is empty")
    if config.reprobe_every and not any(isinstance(c, ReprobeCallback) for c in callbacks):
        raise ValueError(
            f"--reprobe-every {config.reprobe_every} needs a ReprobeCallback among the callbacks to move the adapters"
        )
    output_dir = Path(output_dir)
    checkpoints = output_dir / "checkpoints"
    resume_from = None
    if resume:
        resume_from = last_complete_checkpoint(checkpoints) if checkpoints.is_dir() else None
        if resume_from is None:
            raise ValueError(f"--resume: no checkpoint found in {str(checkpoints)!r}")
        check_resume(resume_from, lora_config)
        logger.info("resuming from %s", resume_from)
    on_main_process(_claim_training_outputs, output_dir, resume)

    torch.manual_seed(config.seed)
    peft_model = prepare_lora_model(model, lora_config, gradient_checkpointing=config.gradient_checkpointing)
    if resume_from is not None:
        check_resume(resume_from, lora_config, peft_model)
        resume_from = str(resume_from)
    step_times: list[float] = []

    class _Recorder(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self._start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                logger.debug("step %d: %s", state.global_step, logs)
                if on_log is not None:
                    on_log({"step": state.global_step, **logs})

    use_cuda = torch.cuda.is_available() and next(model.parameters()).is_cuda
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if eval_dataset is not None and config.eval_steps else "no",
        eval_steps=config.eval_steps or None,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or config.max_steps,
        save_total_limit=None,  # rotated by the guard callback: only this tool's checkpoints
        logging_nan_inf_filter=False,  # a NaN loss stops training; the filter would hide it
        bf16=config.bf16,
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        disable_tqdm=not config.progress,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        use_cpu=not use_cuda,
        ddp_timeout=dist_timeout,
    )
    # Checkpointing is left off in the Trainer's arguments: its own set-up would add an input-grad hook.
    trainer_cls, guard = _guarded_trainer(config, output_dir)
    trainer = trainer_cls(
        model=peft_model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=partial(pad_collate, pad_token_id=pad_token_id),
        callbacks=[guard, _Recorder(), *callbacks],
    )
    # Progress and losses reach the user through the progress bar and logging, not print().
    trainer.remove_callback(PrinterCallback)
    if args.world_size > 1:
        logger.info(
            "training on %d processes (%s), %d sequences per step",
            args.world_size,
            "FSDP" if getattr(trainer, "is_fsdp_enabled", False) else "DDP",
            config.batch_size * config.gradient_accumulation_steps * args.world_size,
        )
    start = time.perf_counter()
    try:
        with BackwardDepthMonitor(peft_model, stack) as depth:
            trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        last = last_complete_checkpoint(checkpoints) if checkpoints.is_dir() else None
        logger.error(
            "training interrupted at step %d; %s",
            trainer.state.global_step,
            f"last checkpoint {last} (continue with --resume)" if last else "no checkpoint was written yet",
        )
        raise
    seconds = time.perf_counter() - start
    # counted after training: a re-probing run trains a subset of its adapters at a time
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    adapter_dir = output_dir / "adapter"
    if not _finite_weights(peft_model):
        raise _diverged(trainer.state.global_step, "an adapter weight", "not finite (the gradient overflowed)", config)
    if getattr(trainer, "is_fsdp_enabled", False):
        # The weights are sharded: every rank takes part in gathering the adapter (with FSDP's
        # FULL_STATE_DICT it is whole), and the Trainer writes it on rank 0, into a staging folder first.
        staging = output_dir / ".adapter.tmp-fsdp"  # a temporary name of files.py: a leftover is the tool's
        on_main_process(shutil.rmtree, staging, ignore_errors=True)
        trainer.save_model(str(staging))
        barrier()
        on_main_process(_save_staged_adapter, staging, adapter_dir)
    else:
        # One rank writes the adapter for all; the others wait and learn of a failure.
        on_main_process(_atomic_save_adapter, peft_model, adapter_dir)
    if depth.lowest is not None:
        lowest_name = "the embeddings" if depth.lowest == EMBEDDINGS else f"block {depth.lowest}"
        logger.info("the backward pass reached down to %s", lowest_name)
    return TrainResult(
        model=peft_model,
        adapter_dir=adapter_dir,
        log_history=list(trainer.state.log_history),
        step_times=step_times,
        lowest_layer_reached=depth.lowest,
        trainable_parameters=trainable,
        train_seconds=seconds,
        processes=args.world_size,
        wrapped=getattr(trainer, "model_wrapped", None),
    )
