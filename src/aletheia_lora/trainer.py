"""The HF Trainer as :func:`~aletheia_lora.train.train_lora` runs it.

* **Guarded**: a non-finite loss, gradient norm or adapter weight stops training (:class:`TrainingDiverged`); every
  checkpoint is listed in the output folder's manifest before it is written, and only listed ones are rotated.
* **One held-out number**: the Trainer's evaluations compute :func:`~aletheia_lora.evaluation.evaluate_loss`, the
  token-weighted mean over the held-out rows that the evaluations before and after training report too.
  ``Trainer.evaluate`` averages per-batch means, each weighted by the batch's rows, so a batch of short rows
  counts as much as one of long rows: on rows of unequal length (prompt/response pairs, conversations, unpacked
  text) it is not the loss per token, and its ``exp`` is not the perplexity (``tests/test_report.py`` shows the
  difference).
* **One console line per logging step** through the ``aletheia_lora.train`` logger (``step 10/100: loss 2.3100,
  grad norm 0.812, lr 0.00029``), in place of the dicts transformers' progress and printer callbacks print; the
  last step is always logged, so a run shorter than ``logging_steps`` still has its train loss.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import ProgressCallback, Trainer, TrainerCallback

from aletheia_lora.distributed import fsdp1_units
from aletheia_lora.evaluation import evaluate_loss
from aletheia_lora.files import update_manifest
from aletheia_lora.resume import rotate_checkpoints

logger = logging.getLogger("aletheia_lora.train")


class TrainingDiverged(ValueError):
    """Training produced a non-finite loss, gradient norm or adapter weight: it stopped, and saved no adapter."""


def diverged(step: int, what: str, value: object, config: Any) -> TrainingDiverged:
    """The error for a non-finite ``what`` at ``step``, with the settings (a ``TrainConfig``) that would help."""
    clip = f"lower --max-grad-norm (now {config.max_grad_norm:g})" if config.max_grad_norm else "set --max-grad-norm 1"
    return TrainingDiverged(
        f"training diverged at step {step}: {what} is {value}; stopped, no adapter saved. Lower --learning-rate "
        f"(now {config.learning_rate:g}), {clip}, or check the data"
    )


def finite_weights(model: nn.Module) -> bool:
    """Whether every trainable weight is finite."""
    # at save steps and at the end only: a sync per tensor is nothing beside a save (and tensors may sit on
    # several devices, so they are not stacked)
    return all(bool(torch.isfinite(p.detach()).all()) for p in model.parameters() if p.requires_grad)


_LOGGED = {"loss": "the loss", "grad_norm": "the gradient norm", "eval_loss": "the evaluation loss"}


def guarded_trainer(config: Any, output_dir: Path, pad_token_id: int = 0) -> tuple[type, TrainerCallback]:
    """A Trainer class and a callback for a run of ``config`` (a ``TrainConfig``) writing into ``output_dir``.

    The Trainer stops at a non-finite loss and evaluates with :func:`evaluate_loss`. The callback stops at a
    non-finite logged value or weight before a checkpoint, lists each checkpoint in the manifest before it is
    written, rotates only the listed ones, and has the last step logged.
    """

    class GuardedTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            # One host sync per micro-batch, in place of the Trainer's NaN filter (switched off: it hides NaNs).
            if not bool(torch.isfinite(loss).all()):
                raise diverged(self.state.global_step + 1, "the loss", float(loss.float().mean()), config)
            return loss

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
            # The same computation as the evaluations before and after training (see the module's docstring).
            dataset = self.eval_dataset if eval_dataset is None else eval_dataset
            wrapped = self.model_wrapped
            # an FSDP1 model runs only through its wrapper; everything else (DDP too) through the model itself
            model = wrapped if wrapped is not None and any(u is wrapped for u in fsdp1_units(wrapped)) else self.model
            start = time.perf_counter()
            result = evaluate_loss(
                model,
                dataset,
                batch_size=self.args.per_device_eval_batch_size,
                pad_token_id=pad_token_id,
                distributed=True,
            )
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in result.items()}
            metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - start, 4)
            self.log(dict(metrics))
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    class Guard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key, value in (logs or {}).items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise diverged(state.global_step, _LOGGED.get(key, key), value, config)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_log = True  # the last step's train loss, whatever logging_steps is
            if not control.should_save:
                return
            if model is not None and not finite_weights(model):
                raise diverged(state.global_step, "an adapter weight", "not finite (the gradient overflowed)", config)
            if state.is_world_process_zero:  # listed before the Trainer writes it: a kill mid-save leaves it ours
                update_manifest(output_dir, claim=[f"checkpoints/checkpoint-{state.global_step}"])

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                rotate_checkpoints(output_dir, config.save_total_limit)

    return GuardedTrainer, Guard()


class QuietProgress(ProgressCallback):
    """transformers' progress bars, without the log dicts it prints to stdout (:class:`StepLog` logs them)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def log_line(record: dict, max_steps: int | None = None) -> str | None:
    """One console line for a Trainer log record (``record["step"]`` is the step), or None for the closing record.

    >>> log_line({"step": 10, "loss": 2.31, "grad_norm": 0.8123, "learning_rate": 2.9e-4}, 100)
    'step 10/100: loss 2.3100, grad norm 0.812, lr 0.00029'
    """
    step = f"step {record.get('step')}" + (f"/{max_steps}" if max_steps else "")
    if "loss" in record:
        parts = [f"loss {record['loss']:.4f}"]
        if isinstance(record.get("grad_norm"), (int, float)):
            parts.append(f"grad norm {record['grad_norm']:.3f}")
        if isinstance(record.get("learning_rate"), (int, float)):
            parts.append(f"lr {record['learning_rate']:.3g}")
        return f"{step}: " + ", ".join(parts)
    if "eval_loss" in record:
        text = f"{step}: held-out loss {record['eval_loss']:.4f}"
        if "eval_perplexity" in record:
            text += f" (perplexity {record['eval_perplexity']:.2f}, {record.get('eval_tokens', '?')} tokens)"
        return text
    return None


class StepLog(TrainerCallback):
    """Times each optimizer step; logs one line per log record on the main process, and hands each record (with its
    ``step``) to ``on_log``."""

    def __init__(self, on_log: Callable[[dict], None] | None = None, epochs: bool = False) -> None:
        self.step_times: list[float] = []
        self._on_log = on_log
        self._epochs = epochs
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        record = {"step": state.global_step, **logs}
        line = log_line(record, state.max_steps)
        if line is not None:
            if self._epochs and isinstance(logs.get("epoch"), (int, float)):
                line += f", epoch {logs['epoch']:.2f}"
            _write(line)
        else:
            logger.debug("step %d: %s", state.global_step, logs)
        if self._on_log is not None:
            self._on_log(record)


def _write(line: str) -> None:
    """Log ``line``, clearing any progress bar first and redrawing it after, so the two never share a line."""
    from tqdm.auto import tqdm  # the class transformers draws its bars with

    with tqdm.external_write_mode():
        logger.info(line)
