"""Shared fixtures: tiny random-weight models of every supported family, built from configs (offline, exact)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Exactness tests compare logits in fp32 on every machine; the per-machine default (bf16 where the CPU has native
# bf16 units, see loading.default_cpu_dtype) is tested on its own with the variable removed.
os.environ.setdefault("STREAMING_LLM_DTYPE", "float32")

VOCAB = 96


#: The families a family sweep runs in `make test-fast`: a plain decoder and a hybrid one (local sliding-window
#: layers, per-layer-type RoPE). The other families' cases carry the `slow` mark: `make test` runs them all.
FAST_FAMILIES = ("llama", "gemma3_text")


def pytest_addoption(parser):
    """The size of tests/test_failover.py's run (`make test` keeps it small; the issues' full run is 20 x 8)."""
    group = parser.getgroup("failover", "tests/test_failover.py")
    group.addoption("--failover-cycles", type=int, default=3, help="kill -9 / restart cycles")
    group.addoption("--failover-users", type=int, default=4, help="browsers chatting through the front")
    group.addoption("--failover-report", default=None, help="write the run's counts and provenance as JSON here")


def fast_cases(values, fast=FAST_FAMILIES):
    """`values` for `parametrize`, the ones not in `fast` marked `slow` (left out of `make test-fast` only)."""
    return [value if value in fast else pytest.param(value, marks=pytest.mark.slow) for value in values]


class ManualClock:
    """A monotonic clock that moves only when a test says so (`advance`): rate windows and throttles under test
    never depend on how fast a shared machine runs."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


#: Every case the family tests run: each supported family, plus checkpoints whose layers differ from the family
#: default (Mistral with a sliding window on every layer, Qwen2 with local layers above `max_window_layers`).
FAMILY_CASES = (
    "llama", "mistral", "qwen2", "gpt_neox", "falcon",
    "qwen3", "phi3", "olmo2", "granite", "smollm3", "gemma",
    "gemma2", "gemma3_text", "mistral_sliding", "qwen2_hybrid",
)
#: Sliding window of the tiny hybrid models: shorter than the test caches, so local layers really slide.
TINY_WINDOW = 8


def tiny_config(family: str, layers: int = 1, max_positions: int = 512, vocab_size: int = VOCAB):
    """A small config of `family` whose random weights give clearly position-dependent logits."""
    import transformers as tf

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
        return tf.LlamaConfig(num_key_value_heads=2, **common)
    if family == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    if family == "mistral_sliding":
        # Every layer local; the window is at least the test caches (4 + 28), as check_cache_size requires.
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=40, **common)
    if family == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, use_sliding_window=False, **common)
    if family == "qwen2_hybrid":
        return tf.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=TINY_WINDOW,
                              max_window_layers=1, **common)
    if family == "gpt_neox":
        # Partial rotary (a quarter of each head), as in Pythia.
        return tf.GPTNeoXConfig(
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            **common,
        )
    if family == "falcon":
        return tf.FalconConfig(
            new_decoder_architecture=True, num_kv_heads=2, alibi=False, bias=False, parallel_attn=True,
            **{k: v for k, v in common.items() if k not in ("intermediate_size", "max_position_embeddings")},
            max_position_embeddings=max_positions,
        )
    if family == "qwen3":  # q/k RMSNorm per head before RoPE
        return tf.Qwen3Config(num_key_value_heads=2, head_dim=16, **common)
    if family == "phi3":  # fused qkv projection; half of each head rotary (as in Phi-4-mini)
        return tf.Phi3Config(
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            **common,
        )
    if family == "olmo2":  # q/k RMSNorm over all heads before RoPE
        return tf.Olmo2Config(num_key_value_heads=2, **common)
    if family == "granite":  # embedding / attention / residual multipliers
        return tf.GraniteConfig(num_key_value_heads=2, embedding_multiplier=2.0, attention_multiplier=0.3,
                                residual_multiplier=0.5, logits_scaling=2.0, **common)
    if family == "smollm3":  # every 2nd layer without RoPE (NoPE), so a 3-layer model mixes both
        return tf.SmolLM3Config(num_key_value_heads=2, no_rope_layer_interval=2, **common)
    if family == "gemma":
        return tf.GemmaConfig(num_key_value_heads=2, head_dim=16, **common)
    if family == "gemma2":  # local, global, local, ... (a 1-layer model is one local layer); logit soft-capping
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=TINY_WINDOW,
                               query_pre_attn_scalar=16, **common)
    if family == "gemma3_text":  # global, local, global, ... with separate RoPE bases; q/k norms
        return tf.Gemma3TextConfig(
            num_key_value_heads=2, head_dim=16, sliding_window=TINY_WINDOW, query_pre_attn_scalar=16,
            layer_types=["full_attention" if i % 2 == 0 else "sliding_attention" for i in range(layers)],
            **common,
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


@pytest.fixture
def cuda_chat_model(request):
    """A copy of `tiny_chat_model` on CUDA and the default tokenizer, or a skip saying which is missing: the GPU
    machine may lack the offline default model's files the tokenizer comes from."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (scripts/gpu_check.sh runs it on one)")
    try:
        model, tokenizer = (request.getfixturevalue(name) for name in ("tiny_chat_model", "default_tokenizer"))
    except Exception as exc:  # noqa: BLE001 - any failure to find the tokenizer means: cannot run here
        pytest.skip(f"the default tokenizer is not available here: {exc}")
    return copy.deepcopy(model).to("cuda"), tokenizer


@pytest.fixture(scope="session")
def tiny_chat_model(default_tokenizer):
    """A 2-layer random Llama over the default tokenizer's vocabulary: real chat templating, instant forward."""
    model = tiny_model("llama", layers=2, vocab_size=len(default_tokenizer), max_positions=4096)
    model.generation_config.eos_token_id = default_tokenizer.eos_token_id
    return model


# --- the conversation store over both engines ---------------------------------------------------------------------

from pg_server import fresh_database, postgres_server  # noqa: E402,F401 - fixtures (a real PostgreSQL 15)
from replica_cluster import replica_browser, replica_database, replicas  # noqa: E402,F401 - fixtures (two app replicas)
from fronts import stub_replicas  # noqa: E402


@pytest.fixture(name="stub_replicas")
def stub_replica_ports():
    """Two stand-in replicas (`fronts.stub_replicas`) for tests of what a front itself does: their ports."""
    with stub_replicas() as ports:
        yield ports

#: The store engines every engine-neutral store test runs on (the PostgreSQL case skips, saying why, without it).
STORE_ENGINES = ("sqlite", "postgresql")


class StoreOpener:
    """Opens store objects on one database: each call is another process on the same data (a restarted server, or
    a second replica). Closes them all at the end of the test."""

    def __init__(self, engine: str, where):
        self.engine, self.where, self.opened = engine, where, []

    def __call__(self, **limits):
        from streaming_engine.stores import open_store

        if self.engine == "sqlite":
            store = open_store(self.where, **limits)
        else:
            store = open_store(database_url=self.where, **limits)
        self.opened.append(store)
        return store

    def close(self):
        for store in self.opened:
            store.close()


@pytest.fixture(params=STORE_ENGINES)
def store_opener(request, tmp_path):
    where = tmp_path / "data" if request.param == "sqlite" else request.getfixturevalue("fresh_database")
    opener = StoreOpener(request.param, where)
    yield opener
    opener.close()
