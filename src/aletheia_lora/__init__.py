"""Aletheia-LoRA: gradient-guided layer selection for efficient LoRA fine-tuning."""

__version__ = "0.2.0"
