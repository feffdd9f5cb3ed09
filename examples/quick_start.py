"""Quick start: probe every block, select half of them, put LoRA on those only, and take one training step.

    python examples/quick_start.py                        # a tiny random Llama: seconds on a CPU
    python examples/quick_start.py --model smollm2-135m   # the bundled pretrained SmolLM2-135M

It prints the per-block probe scores, the selection with its predicted speedup, the adapters' size, and the
block the training step's backward pass stopped at: the lowest selected one, which is where the time goes.
"""

from __future__ import annotations

import argparse

import torch
from example_utils import TINY, load, token_rows
from peft import get_peft_model

from aletheia_lora import apply_aletheia_lora, gradient_probe, predict_speedup, select_layers
from aletheia_lora.data import pad_collate
from aletheia_lora.train import EMBEDDINGS, BackwardDepthMonitor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY, help="'tiny' (random), 'smollm2-135m' or a checkpoint folder")
    parser.add_argument("--top-pct", type=float, default=50, help="share of blocks to adapt")
    parser.add_argument("--strategy", default="score", choices=["score", "contiguous", "truncation"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    # 1. A model and a few tokenized rows of the task (here: the Python reference manual).
    model, tokenizer = load(args.model)
    rows = token_rows(tokenizer, max_length=64)
    print(f"model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"data: {len(rows)} rows of {len(rows[0]['input_ids'])} tokens")

    # 2. The gradient probe: one forward/backward per batch scores every decoder block.
    scores = gradient_probe(model, rows, probe_batches=4, progress=False)
    print("layer scores:", ", ".join(f"{layer}: {score:.3g}" for layer, score in scores.items()))

    # 3. Select blocks. The backward pass stops at the lowest selected block: that sets the speed-up.
    selected = select_layers(scores, top_pct=args.top_pct, strategy=args.strategy)
    speedup = predict_speedup(model, selected, seq_len=64, batch_size=4)
    print(f"selected layers: {selected}")
    print(f"predicted speedup over LoRA on all layers: {speedup:.2f}x")
    for strategy in ("score", "truncation", "contiguous"):  # the same number of blocks, placed differently
        layers = select_layers(scores, top_pct=args.top_pct, strategy=strategy)
        print(f"  {strategy:>10}: {layers} -> {predict_speedup(model, layers, seq_len=64, batch_size=4):.2f}x")

    # 4. A PEFT config that adapts the selected blocks only, under the architecture's own module names.
    config = apply_aletheia_lora(model, selected, r=8, lora_alpha=16)
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"LoRA on {sorted(config.target_modules)}: {trainable:,} trainable parameters")

    # 5. One training step, watching how deep the backward pass goes.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = pad_collate([rows[i] for i in range(4)], pad_token_id=tokenizer.pad_token_id)
    model.train()
    with BackwardDepthMonitor(model) as depth:
        loss = model(**batch).loss
        loss.backward()
    optimizer.step()
    lowest = "the embeddings" if depth.lowest == EMBEDDINGS else f"block {depth.lowest}"
    print(f"training step: loss {loss.item():.3f}; the backward pass stopped at {lowest}")


if __name__ == "__main__":
    main()
