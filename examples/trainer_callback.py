"""Layer-selective LoRA with the Hugging Face Trainer: two added lines.

    python examples/trainer_callback.py                        # a tiny random Llama, a few steps
    python examples/trainer_callback.py --model smollm2-135m --steps 20

``prepare_aletheia_model`` probes the training data, selects blocks and wraps the model before the
Trainer exists (the Trainer builds its optimizer from the parameters that are trainable by then).
``AletheiaCallback`` removes the input-grad hooks that the Trainer's activation checkpointing adds, which
would otherwise run every backward pass down to the embeddings, and records how deep it really went.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial

from example_utils import TINY, cpu_training_args, load, token_rows
from transformers import Trainer, TrainingArguments

from aletheia_lora.data import pad_collate
from aletheia_lora.integrations import AletheiaCallback, prepare_aletheia_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY, help="'tiny' (random), 'smollm2-135m' or a checkpoint folder")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps")
    parser.add_argument("--strategy", default="truncation", choices=["score", "contiguous", "truncation"])
    parser.add_argument("--rank-allocation", default="scores", choices=["uniform", "scores"])
    parser.add_argument("--output-dir", default=None, help="Trainer output folder (default: a temporary one)")
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model)
    train_rows = token_rows(tokenizer, max_length=64)

    # Added line 1: probe, select, configure, wrap. Ranks follow the scores under the budget of r=8.
    model, report = prepare_aletheia_model(
        model, train_rows, top_pct=50, strategy=args.strategy, r=8, lora_alpha=16, rank_allocation=args.rank_allocation
    )
    print(report.summary())

    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            # activation checkpointing adds an input-grad hook; the callback takes it off again
            **cpu_training_args(args.output_dir or scratch, args.steps, activation_checkpointing=True)
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=train_rows,
            data_collator=partial(pad_collate, pad_token_id=tokenizer.pad_token_id),
            callbacks=[AletheiaCallback(report)],  # Added line 2
        )
        result = trainer.train()

    print(f"trained {result.global_step} steps, final loss {trainer.state.log_history[-2]['loss']:.3f}")
    print("backward depth per step:", report.backward_depths)
    print(f"the backward pass reached down to block {report.lowest_layer_reached}")


if __name__ == "__main__":
    main()
