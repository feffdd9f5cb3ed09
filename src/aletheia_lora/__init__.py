"""Aletheia-LoRA: gradient-guided layer selection for efficient LoRA fine-tuning."""

from aletheia_lora.config import aletheia_lora_config, apply_aletheia_lora
from aletheia_lora.cost import predict_speedup
from aletheia_lora.layers import DecoderStack, find_decoder_stack
from aletheia_lora.probe import LayerScores, gradient_probe
from aletheia_lora.ranks import RankAllocation, allocate_ranks
from aletheia_lora.select import Selection, select_layers, selection_frontier

__version__ = "0.2.0"  # the one place the version is written: pyproject.toml reads this literal

__all__ = [
    "DecoderStack",
    "LayerScores",
    "RankAllocation",
    "Selection",
    "aletheia_lora_config",
    "allocate_ranks",
    "apply_aletheia_lora",
    "find_decoder_stack",
    "gradient_probe",
    "predict_speedup",
    "select_layers",
    "selection_frontier",
]
