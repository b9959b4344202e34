"""Shared fixtures: tiny random-weight models of every supported family, built from configs (offline, exact)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 96


def tiny_config(family: str, layers: int = 1, max_positions: int = 512, vocab_size: int = VOCAB):
    """A small config of `family` whose random weights give clearly position-dependent logits."""
    from transformers import FalconConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if family == "llama":
        return LlamaConfig(num_key_value_heads=2, **common)
    if family == "mistral":
        return MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    if family == "qwen2":
        return Qwen2Config(num_key_value_heads=2, use_sliding_window=False, **common)
    if family == "gpt_neox":
        # Partial rotary (a quarter of each head), as in Pythia.
        return GPTNeoXConfig(
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            **common,
        )
    if family == "falcon":
        return FalconConfig(
            new_decoder_architecture=True, num_kv_heads=2, alibi=False, bias=False, parallel_attn=True,
            **{k: v for k, v in common.items() if k not in ("intermediate_size", "max_position_embeddings")},
            max_position_embeddings=max_positions,
        )
    raise ValueError(family)


def tiny_model(family: str, layers: int = 1, seed: int = 0, max_positions: int = 512, vocab_size: int = VOCAB):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, layers, max_positions, vocab_size)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def default_model():
    """The real offline default model (SmolLM2-135M-Instruct), loaded once per test session."""
    import streaming_engine

    return streaming_engine.load()


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer (chat template included), without loading its weights."""
    from transformers import AutoTokenizer

    from streaming_engine.loading import ensure_default_model

    return AutoTokenizer.from_pretrained(ensure_default_model())


@pytest.fixture(scope="session")
def tiny_chat_model(default_tokenizer):
    """A 2-layer random Llama over the default tokenizer's vocabulary: real chat templating, instant forward."""
    model = tiny_model("llama", layers=2, vocab_size=len(default_tokenizer), max_positions=4096)
    model.generation_config.eos_token_id = default_tokenizer.eos_token_id
    return model
