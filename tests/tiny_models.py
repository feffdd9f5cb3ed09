"""Tiny randomly initialised causal LMs, one per architecture family the library supports."""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, intermediate_size=64)


def _configs(n_layers: int) -> dict:
    common = dict(_COMMON, num_hidden_layers=n_layers)
    return {
        "llama": lambda: T.LlamaConfig(**common, num_key_value_heads=2),
        "qwen2": lambda: T.Qwen2Config(**common, num_key_value_heads=2),
        "mistral": lambda: T.MistralConfig(**common, num_key_value_heads=2),
        "gemma2": lambda: T.Gemma2Config(**common, num_key_value_heads=2, head_dim=8),
        "gemma3": lambda: T.Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=8),
        "phi3": lambda: T.Phi3Config(**common, num_key_value_heads=2, pad_token_id=0),
        "stablelm": lambda: T.StableLmConfig(**common, num_key_value_heads=2),
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=n_layers, n_head=4),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common),
        "falcon": lambda: T.FalconConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4
        ),
        "bloom": lambda: T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=n_layers, n_head=4),
        "opt": lambda: T.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            ffn_dim=64,
            word_embed_proj_dim=32,
        ),
        "mpt": lambda: T.MptConfig(vocab_size=VOCAB, d_model=32, n_layers=n_layers, n_heads=4),
        "mixtral": lambda: T.MixtralConfig(
            **common, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
        ),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(
            **common,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
        ),
    }


ARCHITECTURES = list(_configs(1))


def tiny_model(arch: str = "llama", n_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised causal LM of the given family, in eval mode on the CPU."""
    config = _configs(n_layers)[arch]()
    config.pad_token_id = 0
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def token_rows(n: int = 8, length: int = 12, seed: int = 0, vary: bool = False) -> list[dict]:
    """Rows of random token ids (ids >= 1, so 0 stays free for padding)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        size = length - (i % 4 if vary else 0)
        rows.append({"input_ids": torch.randint(1, VOCAB, (size,), generator=g).tolist()})
    return rows
