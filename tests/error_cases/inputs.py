"""Inputs past their limits or in conflict: config and JSON files (size, depth, aliases, repeated keys), scores
files whose keys merge or whose scores overflow, conflicting flags, the probe's token ids and labels, and
capped error lines.
"""

from __future__ import annotations

import os
from pathlib import Path

from aletheia_lora import LayerScores, select_layers
from aletheia_lora.probe import ProbeConfig
from aletheia_lora.select import SelectConfig
from error_cases.base import Case, Ctx, Exit2, Raises, config_file, probe
from tiny_models import VOCAB

ALIAS_BOMB = (
    "\n".join(
        ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
        + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
        + ["top_pct: *a8"]
    )
    + "\n"
)


def _huge_file(ctx: Ctx, name: str, size: int) -> Path:
    """A sparse file of ``size`` bytes (nothing written, so it costs no disk)."""
    path = ctx.tmp_path / name
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def _fifo_config(ctx: Ctx) -> Path:
    path = ctx.tmp_path / "fifo.yaml"
    os.mkfifo(path)  # opening it would block until a writer comes
    return path


CASES: list[Case] = [
    # inputs: config and JSON files past their limits
    Case("cli-config-alias-bomb", "--config", "a 360-byte YAML alias bomb (9**9 values) as top_pct's value",
         lambda c: config_file(c, "bomb.yaml", ALIAS_BOMB, "select", "--scores", "x"),
         Exit2(r"--config: '.*bomb.yaml' holds more than 1,000,000 values \(aliases expanded\)")),
    Case("cli-config-alias-recursive", "--config", "a YAML alias inside the node it names (a: &a [1, *a])",
         lambda c: config_file(c, "c.yaml", "a: &a [1, *a]\n", "select", "--scores", "x"),
         Exit2(r"--config: '.*c.yaml' holds the alias \*a inside the node it names")),
    Case("cli-config-nested-yaml", "--config", "YAML nested 100,000 levels deep",
         lambda c: config_file(c, "c.yaml", "top_pct: " + "[" * 100_000 + "]" * 100_000, "select", "--scores", "x"),
         Exit2("--config: '.*c.yaml' is nested deeper than 64 levels")),
    Case("cli-config-nested-json", "--config", "JSON nested 100,000 levels deep (was a RecursionError)",
         lambda c: config_file(c, "c.json", "[" * 100_000, "select", "--scores", "x"),
         Exit2("--config: '.*c.json' is nested deeper than 64 levels")),
    Case("cli-config-huge", "--config", "a 100 GB config file (refused before reading)",
         lambda c: ["select", "--config", str(_huge_file(c, "big.json", 10**11)), "--scores", "x"],
         Exit2("--config: '.*big.json' is too large: 100,000,000,000 bytes, more than the 16,777,216 allowed")),
    Case("cli-config-same-key-twice", "--config", "a config file giving top_pct twice (parsers keep the last)",
         lambda c: config_file(c, "c.yaml", "top_pct: 30\ntop_pct: 40\n", "select", "--scores", "x"),
         Exit2("--config: '.*c.yaml' gives the key 'top_pct' twice in one mapping")),
    Case("cli-config-fifo", "--config", "--config naming a FIFO (never opened)",
         lambda c: ["select", "--config", str(_fifo_config(c)), "--scores", "x"],
         Exit2("--config: cannot read '.*fifo.yaml': not a regular file")),
    Case("scores-json-nested", "LayerScores.from_json", "JSON nested 100,000 levels deep",
         lambda c: LayerScores.from_json(c.file("s.json", "[" * 100_000)),
         Raises(ValueError, "scores file '.*s.json' is nested deeper than 64 levels")),
    # inputs: scores files whose keys merge or overflow
    Case("scores-json-key-leading-zero", "LayerScores.from_json", 'keys "0" and "00" (one index twice)',
         lambda c: LayerScores.from_json(c.scores_file(scores='{"0": 1.0, "00": 2.0}')),
         Raises(ValueError, r"layer key '00' is not an integer layer index written plainly "
                r"\(0, 1, 2, \.\.\.: no sign")),
    Case("scores-json-key-spelling", "LayerScores.from_json", 'a key " 1", "+1" or "1.0"',
         lambda c: LayerScores.from_json(c.scores_file(scores='{"0": 1.0, "+1": 2.0}')),
         Raises(ValueError, r"layer key '\+1' is not an integer layer index written plainly")),
    Case("scores-json-key-twice", "LayerScores.from_json", 'the key "0" twice',
         lambda c: LayerScores.from_json(c.scores_file(scores='{"0": 1.0, "0": 2.0}')),
         Raises(ValueError, "scores file '.*scores.json' gives the key '0' twice in one object")),
    Case("cli-scores-key-too-large", "aletheia-lora select", 'a layer key "99999999999999999999"',
         lambda c: ["select", "--scores", c.scores_file(scores='{"0": 1.0, "99999999999999999999": 2.0}')],
         Exit2(r"layer key '99999999999999999999' is too large for a layer index \(< 1,000,000\)")),
    Case("select-layer-index-too-large", "select_layers", "a layer index of 10**20",
         lambda c: select_layers({0: 1.0, 10**20: 2.0}),
         Raises(ValueError, r"layer_scores key 100000000000000000000 is not a layer index \(a non-negative integer "
                r"below 1,000,000\)")),
    Case("cli-scores-overflow", "aletheia-lora select", "scores of 1e308 each (their sum is inf; was nan% and NaN)",
         lambda c: ["select", "--scores", c.scores_file(scores='{"0": 1e308, "1": 1e308}')],
         Exit2(r"scores file '.*scores.json': the scores add up to more than the largest float \(1.8e\+308\)")),
    Case("select-scores-overflow", "select_layers", "{0: 1e308, 1: 1e308}",
         lambda c: select_layers({0: 1e308, 1: 1e308}),
         Raises(ValueError, "layer_scores: the scores add up to more than the largest float")),
    # inputs: conflicting flags, answered before any model is loaded
    Case("cli-top-pct-and-top-k", "aletheia-lora select", "--top-pct 30 --top-k 2",
         lambda c: ["select", "--scores", c.scores_file(), "--top-pct", "30", "--top-k", "2"],
         Exit2(r"give --top-pct or --top-k, not both \(--top-pct 30.0, --top-k 2\)")),
    Case("cli-top-pct-50-and-top-k", "aletheia-lora select", "--top-pct 50 --top-k 2 (50 given, not the default)",
         lambda c: ["select", "--scores", c.scores_file(), "--top-pct", "50", "--top-k", "2"],
         Exit2(r"give --top-pct or --top-k, not both \(--top-pct 50.0, --top-k 2\)")),
    Case("cli-config-both-budgets", "--config", "a config file giving top_pct 30 and top_k 2",
         lambda c: config_file(c, "c.yaml", "top_pct: 30\ntop_k: 2\n", "select", "--scores", c.scores_file()),
         Exit2(r"--config: '.*c.yaml' gives both top_pct \(30\) and top_k \(2\); keep one")),
    Case("cli-train-layers-and-scores", "aletheia-lora train", "--layers 1 --scores s.json",
         lambda c: ["train", *c.cli_model_args(), "--layers", "1", "--scores", c.scores_file()],
         Exit2(r"give --layers or --scores, not both \(--layers 1, --scores .*scores.json\)")),
    Case("select-config-both-budgets", "SelectConfig", "top_pct=30, top_k=4",
         lambda c: SelectConfig(top_pct=30, top_k=4),
         Raises(ValueError, r"give --top-pct or --top-k, not both \(--top-pct 30, --top-k 4\)")),
    Case("cli-probe-seed-negative", "aletheia-lora probe", "--probe-seed=-1 (torch takes [0, 2**64))",
         lambda c: ["probe", "--probe-seed=-1", "--model", "/nonexistent/model"],
         Exit2("--probe-seed must be an integer from 0 to 18446744073709551615, got -1")),
    Case("probe-config-seed-too-large", "ProbeConfig", "probe_seed=2**64",
         lambda c: ProbeConfig(probe_seed=2**64),
         Raises(ValueError, "--probe-seed must be an integer from 0 to 18446744073709551615, "
                "got 18446744073709551616")),
    Case("cli-select-without-scores", "aletheia-lora select", "no --scores", lambda c: ["select"],
         Exit2(r"give --scores FILE \(the scores.json of `aletheia-lora probe`\)")),
    Case("cli-config-rank-allocation-without-scores", "aletheia-lora config",
         "--layers 0 --rank-allocation scores --model M",
         lambda c: ["config", "--layers", "0", "--rank-allocation", "scores", "--model", str(c.checkpoint_dir)],
         Exit2(r"--rank-allocation scores needs --scores FILE \(which selects the layers too\)")),
    Case("cli-config-target-experts-without-model", "aletheia-lora config", "--layers 0 --target-experts (no --model)",
         lambda c: ["config", "--layers", "0", "--target-experts"],
         Exit2("--target-experts needs --model: fused expert weights are found on the model")),
    Case("cli-value-abridged", "aletheia-lora select", "--strategy of 100,000 characters (quoted abridged)",
         lambda c: ["select", "--scores", c.scores_file(), "--strategy", "z" * 100_000],
         Exit2(r"--strategy must be one of score, contiguous, truncation, got 'zzz.*\.\.\.zzz")),
    # inputs: the probe's token ids, labels and rows
    Case("probe-labels-outside-vocabulary", "gradient_probe", "labels >= the vocabulary size (was an IndexError)",
         lambda c: probe(c, rows=[{"input_ids": [1, 2, 3], "labels": [1, VOCAB + 3, -100]}]),
         Raises(ValueError, rf"dataset row 0 \(probe batch 0\): labels hold token ids outside the model's vocabulary "
                rf"\[0, {VOCAB}\) \(label {VOCAB + 3} at position 1\)")),
    Case("probe-labels-negative", "gradient_probe", "a label of -5 (only -100 is skipped)",
         lambda c: probe(c, rows=[{"input_ids": [1, 2, 3], "labels": [1, -5, 2]}]),
         Raises(ValueError, r"labels hold token ids outside .*\(label -5 at position 1\); a label is a token id, or "
                r"-100 for a token left out of the loss")),
    Case("probe-rows-empty", "gradient_probe", '[{"input_ids": []}] (was "must hold integers, got torch.float32")',
         lambda c: probe(c, rows=[{"input_ids": []}]),
         Raises(ValueError, "dataset row 0: 'input_ids' is empty; a row needs at least 2 tokens")),
]  # fmt: skip
