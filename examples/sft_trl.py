"""Layer-selective LoRA with TRL's SFTTrainer.

    python examples/sft_trl.py                        # a tiny random Llama, a few steps
    python examples/sft_trl.py --model smollm2-135m --steps 20

The dataset stays text (``text`` here; ``messages`` and ``prompt``/``completion`` rows work too): SFTTrainer
tokenizes it for training, and ``prepare_aletheia_model`` tokenizes only the rows the probe samples. Two
things matter with TRL. SFTConfig turns gradient checkpointing on by default, and SFTTrainer then makes the
embeddings' output require grad, which runs every backward pass down to block 0: ``AletheiaCallback``
removes those hooks (checkpointing is non-reentrant, so they are not needed). And a PeftModel is passed as
the model with no ``peft_config``, so SFTTrainer trains the adapters it was given.
"""

from __future__ import annotations

import argparse
import tempfile

from example_utils import TINY, cpu_training_args, load, text_rows
from trl import SFTConfig, SFTTrainer

from aletheia_lora.integrations import AletheiaCallback, prepare_aletheia_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY, help="'tiny' (random), 'smollm2-135m' or a checkpoint folder")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps")
    parser.add_argument("--strategy", default="truncation", choices=["score", "contiguous", "truncation"])
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model)
    dataset = text_rows(max_docs=16, max_doc_chars=400)

    model, report = prepare_aletheia_model(
        model, dataset, tokenizer=tokenizer, max_length=128, top_pct=50, strategy=args.strategy, r=8, lora_alpha=16
    )
    print(report.summary())

    callback = AletheiaCallback(report)
    with tempfile.TemporaryDirectory() as scratch:
        config = SFTConfig(**cpu_training_args(scratch, args.steps, max_length=128))
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[callback],
        )
        trainer.train()

    print(f"gradient checkpointing: {config.gradient_checkpointing}")
    print(f"input-grad hooks removed: {callback.removed_hooks}")
    print("backward depth per step:", report.backward_depths)
    print(f"the backward pass reached down to block {report.lowest_layer_reached}")


if __name__ == "__main__":
    main()
