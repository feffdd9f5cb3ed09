"""Training: LoRA on the selected blocks with the HF Trainer, on a path that keeps the backward pass short.

Autograd stops the backward pass at the lowest block with a trainable parameter; that is where most of
selective LoRA's speed comes from. Two common set-ups silently throw it away by making the embeddings'
output require grad: ``enable_input_require_grads()`` (PEFT's k-bit preparation, transformers'
checkpointing) and reentrant gradient checkpointing. Here checkpointing is always non-reentrant, every
input-require-grads hook is removed, and a monitor records how deep each backward pass really went
(:mod:`aletheia_lora.depth`). With ``--cache-prefix`` the frozen blocks' forward is skipped too
(:mod:`aletheia_lora.prefix_cache`).
Training that diverges stops at once (:class:`TrainingDiverged`); ``--resume`` is checked (:func:`check_resume`).
The Trainer itself (its evaluation, its console lines, its guard) is set up in :mod:`aletheia_lora.trainer`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from aletheia_lora.checks import check_number
from aletheia_lora.data import pad_collate
from aletheia_lora.depth import (  # noqa: F401 - EMBEDDINGS and the hook counter are imported from here by callers
    EMBEDDINGS,
    BackwardDepthMonitor,
    count_input_require_grads_hooks,
    remove_input_require_grads_hooks,
)
from aletheia_lora.distributed import DEFAULT_TIMEOUT_S, barrier, on_main_process
from aletheia_lora.evaluation import evaluate_loss  # noqa: F401 - imported from here by callers since 0.1
from aletheia_lora.files import (
    atomic_dir,
    claim_outputs,
    last_complete_checkpoint,
    read_manifest,
    update_manifest,
)
from aletheia_lora.forecast import MAX_FROZEN_PCT_HELP
from aletheia_lora.freeze import DEFAULT_FREEZE_EVERY, DEFAULT_MAX_FROZEN_PCT, FreezeCallback, FrozenPrefixCache
from aletheia_lora.layers import DecoderStack
from aletheia_lora.prefix_cache import PrefixCache, index_rows, row_id_collator
from aletheia_lora.reprobe import ReprobeCallback
from aletheia_lora.resume import check_resume, rotate_checkpoints
from aletheia_lora.trainer import (
    QuietProgress,
    StepLog,
    TrainingDiverged,  # noqa: F401 - imported from here by callers
    diverged,
    finite_weights,
    guarded_trainer,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_STEPS = 100  # without --max-steps and --num-train-epochs
# pip packages of the Trainer's integrations whose name is not the integration's
_INTEGRATION_PACKAGES = {"azure_ml": "azureml-core", "flyte": "flytekit", "kubeflow": "kubeflow"}


@dataclass
class TrainConfig:
    """How to train the adapters. Field help strings are shared by the CLI and the docs."""

    # The help of max_steps is the benchmark's too (bench.config.stage_field): the rule of the two is told below.
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps to train for."})
    num_train_epochs: float | None = field(
        default=None,
        metadata={
            "help": f"Passes over the training rows to train for (fractions allowed) in place of --max-steps, which "
            f"is {DEFAULT_MAX_STEPS} by default; given both, --max-steps wins, as in the HF Trainer."
        },
    )
    learning_rate: float = field(
        default=1.2e-3,
        metadata={
            "help": "Peak learning rate of AdamW. The default is the rate the quality protocol chose on validation "
            "for all-layer LoRA on both of its tasks and for the default strategy on code (2.4e-3 on dialogue; "
            "SmolLM2-135M, alpha / r = 2, docs/QUALITY.md); larger models usually want less."
        },
    )
    batch_size: int = field(default=4, metadata={"help": "Sequences per device per step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches accumulated per step."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Learning-rate schedule: linear, cosine or constant."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 turns it off)."})
    logging_steps: int = field(
        default=10, metadata={"help": "Log the training loss every this many steps (and at the last step)."}
    )
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every this many steps (0: only at the end)."})
    save_steps: int = field(default=50, metadata={"help": "Write a resumable checkpoint every this many steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass to save memory (non-reentrant, slower)."},
    )
    bf16: bool = field(
        default=False,
        metadata={
            "help": "Train in bfloat16 mixed precision (the Trainer's bf16: autocast). On by itself where the "
            "model's weights are bfloat16 on a GPU (--dtype auto there), as TRL does; on a float32 model it "
            "gives mixed precision."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of data order and adapter initialisation."})
    reprobe_every: int = field(
        default=0,
        metadata={
            "help": "Re-run the probe every this many steps and move the trainable adapters to its selection "
            "(0: select once). LoRA then goes on every block: blocks never selected stay switched off, blocks "
            "selected earlier keep what they learned, frozen. One process only."
        },
    )
    freeze_every: int = field(
        default=DEFAULT_FREEZE_EVERY,
        metadata={
            "help": "With --strategy progressive: steps per interval of the freezing rule; at the end of each, "
            "the lowest blocks whose gradient norm changed less than the median block's are frozen"
        },
    )
    max_frozen_pct: float = field(default=DEFAULT_MAX_FROZEN_PCT, metadata={"help": MAX_FROZEN_PCT_HELP})
    cache_prefix: bool = field(
        default=False,
        metadata={
            "help": "Run the frozen blocks below the lowest adapted one once per training row, before training, and "
            "feed their stored output to the adapted blocks at every step: the same loss and gradients, without "
            "the prefix's forward. Pays over several epochs; the cache takes one hidden state per training token."
        },
    )
    cache_budget: float = field(
        default=4.0,
        metadata={
            "help": "With --cache-prefix: GiB kept in memory; a larger cache is memory-mapped in OUT/prefix-cache"
        },
    )
    cache_dtype: str = field(
        default="auto",
        metadata={"help": "With --cache-prefix: auto (the model's dtype, exact) or bfloat16 (half a float32 cache)."},
    )
    keep_cache: bool = field(
        default=False,
        metadata={"help": "With --cache-prefix: keep a memory-mapped cache after training for a later run to reuse."},
    )
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={
            "help": "Send the Trainer's logs to these integrations, e.g. tensorboard (into OUT/checkpoints/runs) or "
            "wandb; each must be installed. none: to none; all: to every one installed."
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
            "freeze_every",
        )
        non_negative = ("warmup_steps", "eval_steps", "save_steps", "seed", "reprobe_every")
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if value is None and f.type.endswith("| None"):
                continue
            if f.type.startswith("int") or f.name in positive + non_negative:
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise TypeError(f"{flag} must be an integer, got {value!r}")
                if f.name in positive and value <= 0:
                    raise ValueError(f"{flag} must be a positive integer, got {value!r}")
                if f.name in non_negative and value < 0:
                    raise ValueError(f"{flag} must be >= 0, got {value!r}")
            elif f.type.startswith("float"):
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                    raise TypeError(f"{flag} must be a finite number, got {value!r}")
                if f.name in ("learning_rate", "num_train_epochs") and value <= 0:
                    raise ValueError(f"{flag} must be positive, got {value!r}")
                if value < 0:
                    raise ValueError(f"{flag} must be >= 0, got {value!r}")
            elif f.type == "bool" and not isinstance(value, bool):
                raise TypeError(f"{flag} must be true or false, got {value!r}")
        check_number("--max-frozen-pct", self.max_frozen_pct, minimum=0, maximum=100)  # as SelectConfig words it
        if self.cache_budget <= 0:
            raise ValueError(f"--cache-budget must be positive, got {self.cache_budget!r}")
        if self.cache_dtype not in ("auto", "bfloat16"):
            raise ValueError(f"--cache-dtype must be auto or bfloat16, got {self.cache_dtype!r}")
        if self.lr_scheduler_type not in ("linear", "cosine", "constant"):
            raise ValueError(f"--lr-scheduler-type must be linear, cosine or constant, got {self.lr_scheduler_type!r}")
        self.report_to = _check_report_to(self.report_to)

    @property
    def steps(self) -> int:
        """The Trainer's ``max_steps``: ``--max-steps``, else -1 (``--num-train-epochs`` decides), else 100."""
        if self.max_steps is not None:
            return self.max_steps
        return -1 if self.num_train_epochs is not None else DEFAULT_MAX_STEPS

    def check_packages(self) -> None:
        """Refuse an integration of ``report_to`` that is not installed, naming its package, before anything loads.

        Raises:
            ValueError: ``--report-to NAME needs the package P, which is not installed: pip install P``.
        """
        from transformers.integrations import get_available_reporting_integrations

        installed = set(get_available_reporting_integrations())
        for name in self.report_to:
            package = _INTEGRATION_PACKAGES.get(name, name)
            if name in ("none", "all") or name in installed or _importable(package.replace("-", "_")):
                continue
            raise ValueError(
                f"--report-to {name} needs the package {package}, which is not installed: pip install {package} "
                "(or leave --report-to out)"
            )


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _check_report_to(value: object) -> list[str]:
    """``report_to`` as a list of the Trainer's integration names (a single name is taken as a list of one)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = ["none"] if value is None else [value] if isinstance(value, str) else value  # a config file's `none`
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"--report-to must be a list of integration names, got {value!r}")
    names = [n.strip().lower() for n in names]
    known = sorted(INTEGRATION_TO_CALLBACK)
    unknown = [n for n in names if n not in ("none", "all", *known)]
    if unknown:
        raise ValueError(f"--report-to {unknown[0]!r} is not an integration of the HF Trainer: give none, all, or "
                         f"some of {', '.join(known)}")  # fmt: skip
    if len(names) > 1 and ({"none", "all"} & set(names)):
        raise ValueError(f"--report-to {' '.join(names)}: none and all stand alone")
    return list(dict.fromkeys(names))


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
    global_step: int = 0  # the optimizer steps the adapter has had, a resumed run's earlier ones included
    max_steps: int = 0  # the steps the run was to train for (from --num-train-epochs where --max-steps is not given)
    mean_train_loss: float | None = None  # the Trainer's mean training loss over this call's steps (None: no step)
    bf16: bool = False  # whether the Trainer trained in bfloat16 mixed precision
    prefix_cache: dict | None = None  # with --cache-prefix: what the cache held and cost (PrefixCache.summary)


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
    from transformers import PrinterCallback, ProgressCallback, TrainingArguments

    config = config or TrainConfig()
    if len(train_dataset) == 0:
        raise ValueError("train_dataset is empty")
    if config.reprobe_every and not any(isinstance(c, ReprobeCallback) for c in callbacks):
        raise ValueError(
            f"--reprobe-every {config.reprobe_every} needs a ReprobeCallback among the callbacks to move the adapters"
        )
    config.check_packages()
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
        for callback in callbacks:
            if isinstance(callback, FreezeCallback):  # before the Trainer builds its optimizer
                callback.restore(peft_model, resume_from)
        resume_from = str(resume_from)
    if config.max_steps is not None and config.num_train_epochs is not None:
        logger.info("--max-steps %d wins over --num-train-epochs %g", config.max_steps, config.num_train_epochs)

    use_cuda = torch.cuda.is_available() and next(model.parameters()).is_cuda
    bf16 = config.bf16 or (use_cuda and _floating_dtype(model) == torch.bfloat16)
    if bf16 and not config.bf16:
        logger.debug("bfloat16 mixed precision: the model's weights are bfloat16 on a GPU")
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=config.steps,
        num_train_epochs=config.num_train_epochs or 1.0,  # read only when max_steps is -1
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
        save_steps=config.save_steps or 1,
        save_total_limit=None,  # rotated by the guard callback: only this tool's checkpoints
        logging_nan_inf_filter=False,  # a NaN loss stops training; the filter would hide it
        bf16=bf16,
        seed=config.seed,
        data_seed=config.seed,
        report_to=list(config.report_to),
        disable_tqdm=not config.progress,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        use_cpu=not use_cuda,
        ddp_timeout=dist_timeout,
    )
    if "tensorboard" in args.report_to and not os.environ.get("TENSORBOARD_LOGGING_DIR"):
        # its default folder, checkpoints/runs: listed before it is written, like every output
        on_main_process(update_manifest, output_dir, claim=["checkpoints/runs"])
    # Checkpointing is left off in the Trainer's arguments: its own set-up would add an input-grad hook.
    collate = partial(pad_collate, pad_token_id=pad_token_id)
    cache = late = None
    if config.cache_prefix:
        _refuse_cache(config, args, callbacks)
        kwargs = _cache_settings(config, output_dir, pad_token_id)
        freezing = next((c for c in callbacks if isinstance(c, FreezeCallback)), None)
        if freezing is not None:  # cached once the frozen prefix has settled (freeze.py)
            late = FrozenPrefixCache(freezing, train_dataset, **kwargs)
            callbacks = [*callbacks, late]
        else:
            rows_seen = config.steps * config.batch_size * config.gradient_accumulation_steps * args.world_size
            if config.steps > 0 and rows_seen < len(train_dataset):
                logger.warning(
                    "--cache-prefix: %d steps see %d of the %d training rows, each at most once; the cache runs the "
                    "prefix over every row first, so it cannot pay back in this run (it does over several epochs)",
                    config.steps, rows_seen, len(train_dataset),
                )  # fmt: skip
            cache = PrefixCache.for_run(peft_model, train_dataset, stack=stack, **kwargs)
        train_dataset, collate = index_rows(train_dataset), row_id_collator(collate)
    trainer_cls, guard = guarded_trainer(config, output_dir, pad_token_id)
    steps = StepLog(on_log, epochs=config.num_train_epochs is not None)
    trainer = trainer_cls(
        model=peft_model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collate,
        callbacks=[guard, steps, *callbacks],
    )
    # Losses reach the user as one line per logging step through logging (StepLog), never print()ed dicts;
    # the progress bar stays when progress is on.
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(QuietProgress())
    if args.world_size > 1:
        logger.info(
            "training on %d processes (%s), %d sequences per step",
            args.world_size,
            "FSDP" if getattr(trainer, "is_fsdp_enabled", False) else "DDP",
            config.batch_size * config.gradient_accumulation_steps * args.world_size,
        )
    try:
        with BackwardDepthMonitor(peft_model, stack) as depth, cache.attach(peft_model) if cache else nullcontext():
            for callback in callbacks:
                if isinstance(callback, FreezeCallback):
                    callback.depth_monitor = depth  # each step's depth goes into its timeline
            output = trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        last = last_complete_checkpoint(checkpoints) if checkpoints.is_dir() else None
        logger.error(
            "training interrupted at step %d; %s",
            trainer.state.global_step,
            f"last checkpoint {last} (continue with --resume)" if last else "no checkpoint was written yet",
        )
        raise
    finally:
        if cache is not None:
            cache_summary = cache.summary()
            cache.close(keep=config.keep_cache)
        if late is not None:
            late.close()
            cache_summary = late.summary()
    seconds = float(output.metrics.get("train_runtime", 0.0))
    # counted after training: a re-probing run trains a subset of its adapters at a time
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    adapter_dir = output_dir / "adapter"
    if not finite_weights(peft_model):
        raise diverged(trainer.state.global_step, "an adapter weight", "not finite (the gradient overflowed)", config)
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
        step_times=steps.step_times,
        lowest_layer_reached=depth.lowest,
        trainable_parameters=trainable,
        train_seconds=seconds,
        processes=args.world_size,
        wrapped=getattr(trainer, "model_wrapped", None),
        global_step=trainer.state.global_step,
        max_steps=trainer.state.max_steps,
        mean_train_loss=output.training_loss if steps.step_times else None,
        bf16=bf16,
        prefix_cache=cache_summary if config.cache_prefix else None,
    )


def _cache_settings(config: TrainConfig, output_dir: Path, pad_token_id: int) -> dict:
    """:meth:`PrefixCache.for_run`'s settings from ``--cache-*``."""
    return {
        "output_dir": output_dir,
        "pad_token_id": pad_token_id,
        "batch_size": config.batch_size,
        "budget_gib": config.cache_budget,
        "dtype": torch.bfloat16 if config.cache_dtype == "bfloat16" else None,
        "progress": config.progress,
    }


def _refuse_cache(config: TrainConfig, args, callbacks: Sequence) -> None:
    """Refuse what the prefix cache cannot serve exactly."""
    if config.reprobe_every or any(isinstance(c, ReprobeCallback) for c in callbacks):
        raise ValueError("--cache-prefix cannot be combined with re-probing: the adapted blocks move during training")
    if args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise ValueError("--cache-prefix does not work under FSDP (its blocks are sharded in its wrappers); use DDP")


def _floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point weight (None: it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
