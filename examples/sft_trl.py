"""Layer-selective LoRA with TRL's SFTTrainer.

    python examples/sft_trl.py                        # a tiny random Llama, a few steps, plain text rows
    python examples/sft_trl.py --conversational       # TRL's conversational rows, loss on the assistant turns
    python examples/sft_trl.py --model smollm2-135m --steps 20

The dataset stays untokenized (``text`` rows, or with ``--conversational`` ``messages`` rows; ``prompt``/
``completion`` rows work too): SFTTrainer tokenizes it for training, and ``prepare_aletheia_model`` tokenizes only
the rows the probe samples, with the loss where SFT puts it (the assistant's turns of ``messages``, the
completion of ``prompt``/``completion``). Conversations need a chat template; the tiny model's tokenizer has none,
so it gets this package's plain one (``FALLBACK_CHAT_TEMPLATE``), whose ``{% generation %}`` tags let TRL's
``assistant_only_loss=True`` mask the same tokens the probe masked.

Two things matter with TRL. SFTConfig turns gradient checkpointing on by default, and SFTTrainer then makes the
embeddings' output require grad, which runs every backward pass down to block 0: ``AletheiaCallback`` removes
those hooks (checkpointing is non-reentrant, so they are not needed). And a PeftModel is passed as the model with
no ``peft_config``, so SFTTrainer trains the adapters it was given.
"""

from __future__ import annotations

import argparse
import tempfile

from example_utils import TINY, cpu_training_args, load, text_rows
from trl import SFTConfig, SFTTrainer

from aletheia_lora.data import FALLBACK_CHAT_TEMPLATE
from aletheia_lora.integrations import AletheiaCallback, prepare_aletheia_model


def conversation_rows(max_docs: int = 16, max_doc_chars: int = 400):
    """The same documents as ``text_rows``, each the answer to a question about its topic (``messages`` rows)."""
    docs = text_rows(max_docs=max_docs, max_doc_chars=max_doc_chars)
    return docs.map(
        lambda row, i: {
            "messages": [
                {"role": "system", "content": "You explain Python."},
                {"role": "user", "content": f"Explain topic {i} of the Python reference manual."},
                {"role": "assistant", "content": row["text"]},
            ]
        },
        with_indices=True,
        remove_columns=docs.column_names,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY, help="'tiny' (random), 'smollm2-135m' or a checkpoint folder")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps")
    parser.add_argument("--strategy", default="truncation", choices=["score", "contiguous", "truncation"])
    parser.add_argument(
        "--conversational", action="store_true", help="train on 'messages' rows, loss on the assistant turns only"
    )
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model)
    if args.conversational:
        dataset = conversation_rows(max_docs=16, max_doc_chars=400)
        if not tokenizer.chat_template:
            tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    else:
        dataset = text_rows(max_docs=16, max_doc_chars=400)

    model, report = prepare_aletheia_model(
        model, dataset, tokenizer=tokenizer, max_length=128, top_pct=50, strategy=args.strategy, r=8, lora_alpha=16
    )
    print(report.summary())

    callback = AletheiaCallback(report)
    overrides = {"max_length": 128}
    if args.conversational:  # the same tokens train as the probe measured: the assistant's
        overrides["assistant_only_loss"] = True
    with tempfile.TemporaryDirectory() as scratch:
        config = SFTConfig(**cpu_training_args(scratch, args.steps, **overrides))
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[callback],
        )
        if args.conversational:
            row = trainer.train_dataset[0]
            trained = sum(label != -100 for label in row["labels"]) if "labels" in row else None
            print(f"first row: {len(row['input_ids'])} tokens, {trained} of them trained (the assistant's)")
        trainer.train()

    print(f"gradient checkpointing: {config.gradient_checkpointing}")
    print(f"input-grad hooks removed: {callback.removed_hooks}")
    print("backward depth per step:", report.backward_depths)
    print(f"the backward pass reached down to block {report.lowest_layer_reached}")


if __name__ == "__main__":
    main()
