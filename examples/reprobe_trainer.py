"""Re-probing with the Hugging Face Trainer: the probe runs again every few steps and the adapters follow it.

    python examples/reprobe_trainer.py                       # a tiny random Llama, 6 steps, re-probed every 2
    python examples/reprobe_trainer.py --model smollm2-135m --steps 40 --every 10

LoRA goes on every block once; ``ReprobeCallback`` then trains only the selected blocks' adapters and, every
``--every`` steps, probes the model being trained and moves them. Blocks that leave the selection keep what
they learned (frozen); blocks never selected stay switched off. The saved adapter loads with plain PEFT.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial

from example_utils import TINY, cpu_training_args, load, token_rows
from transformers import Trainer, TrainingArguments

from aletheia_lora import apply_aletheia_lora, find_decoder_stack
from aletheia_lora.data import pad_collate
from aletheia_lora.reprobe import ReprobeCallback
from aletheia_lora.select import SelectConfig
from aletheia_lora.train import prepare_lora_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY, help="'tiny' (random), 'smollm2-135m' or a checkpoint folder")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps")
    parser.add_argument("--every", type=int, default=2, help="steps between probes")
    parser.add_argument("--output-dir", default=None, help="Trainer output folder (default: a temporary one)")
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model)
    train_rows = token_rows(tokenizer, max_length=64)
    num_layers = find_decoder_stack(model).num_layers

    # LoRA on every block, all trainable while the Trainer builds its optimizer: it must hold them all.
    model = prepare_lora_model(model, apply_aletheia_lora(model, list(range(num_layers)), r=8, lora_alpha=16))
    reprobe = ReprobeCallback(
        train_rows, args.every, select=SelectConfig(top_pct=50), pad_token_id=tokenizer.pad_token_id
    )

    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(**cpu_training_args(args.output_dir or scratch, args.steps))
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=train_rows,
            data_collator=partial(pad_collate, pad_token_id=tokenizer.pad_token_id),
            callbacks=[reprobe],
        )
        result = trainer.train()

    for entry in reprobe.history:
        moved = f" (in {entry['moved_in']}, out {entry['moved_out']})" if entry["step"] else ""
        print(f"step {entry['step']}: training layers {entry['layers']}{moved}, probe {entry['probe_seconds']:.2f} s")
    summary = reprobe.summary()
    print(f"re-probed {summary['probes']} times in {summary['seconds']:.2f} s")
    print(f"layers trained at some point: {summary['layers_ever_trained']}")
    print(f"trained {result.global_step} steps, final loss {trainer.state.log_history[-2]['loss']:.3f}")


if __name__ == "__main__":
    main()
