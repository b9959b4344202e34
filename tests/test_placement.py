"""Device maps: a model spread over CPU and disk (accelerate hooks) streams exactly like the single-device model.

With only a CPU here, "spread" means layers whose weights stay in memory and layers offloaded to disk that
accelerate loads in for every forward pass; the cache, eviction and key re-rotation must not notice. The same
comparison on a GPU (layers on two devices) is `python -m benchmarks.devicemap_check`.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import fast_cases, tiny_model
from streaming_engine import SUPPORTED_FAMILIES, EngineConfig, StreamingEngine, chat, enable_streaming_llm, load
from benchmarks import devicemap_check
from benchmarks.runinfo import PROVENANCE_KEY
from streaming_engine.generation import forward
from streaming_engine.loading import ensure_default_model
from streaming_engine.placement import (
    Placement,
    describe_placement,
    format_bytes,
    input_device,
    parse_max_memory,
    parse_size,
    weight_bytes_by_placement,
)

TOL = 1e-4


def interleaved_map(model, embedding: str = "disk") -> dict:
    """Decoder layers alternate cpu/disk (even/odd); the input embedding on `embedding`, the output head on disk,
    everything else on cpu. Tied input/output embeddings share the embedding's placement."""
    layers = devicemap_check.decoder_layers(model)
    layer_names = {id(layer): name for name, layer in model.named_modules() if any(layer is l for l in layers)}
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    device_map = {}
    for index, layer in enumerate(layers):
        device_map[layer_names[id(layer)]] = "cpu" if index % 2 == 0 else "disk"
    for name, module in model.named_modules():
        if any(name.startswith(n + ".") for n in device_map) or name in device_map:
            continue
        owns = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
        if not owns:
            continue
        if module is model.get_input_embeddings():
            device_map[name] = embedding
        elif module is head:
            device_map[name] = embedding if tied else "disk"
        else:
            device_map[name] = "cpu"
    return device_map


def stream(model, ids: list[int], start_size: int, recent_size: int, chunk: int):
    """Feed `ids[:chunk*2]` in evicting chunks, then the rest one by one; logits after every forward pass."""
    cache = enable_streaming_llm(model, start_size, recent_size)
    out = []
    head, tail = ids[: 2 * chunk], ids[2 * chunk :]
    for begin in range(0, len(head), chunk):
        cache.evict_for_space(chunk)
        out.append(forward(model, cache, head[begin : begin + chunk]))
    for token in tail:
        cache.evict_for_space(1)
        out.append(forward(model, cache, [token]))
    return torch.stack(out), cache


def assert_same_stream(reference, spread):
    (ref_logits, ref_cache), (logits, cache) = reference, spread
    assert cache.evicted_tokens == ref_cache.evicted_tokens > 0
    assert cache.stream_positions == ref_cache.stream_positions
    assert (logits - ref_logits).abs().max().item() <= TOL
    for ref_layer, layer in zip(ref_cache.layers, cache.layers, strict=True):
        assert (layer.keys - ref_layer.keys).abs().max().item() <= TOL
        assert (layer.values - ref_layer.values).abs().max().item() <= TOL


def offloaded_layers(model) -> int:
    """Decoder layers whose weights are not in memory (accelerate left them on `meta`, read from disk per call)."""
    return sum(
        all(p.device.type == "meta" for p in layer.parameters()) for layer in devicemap_check.decoder_layers(model)
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A 4-layer random checkpoint per family, saved once."""
    folders = {}
    for family in SUPPORTED_FAMILIES:
        folder = tmp_path_factory.mktemp(f"ckpt-{family}")
        tiny_model(family, layers=4, seed=3).save_pretrained(folder)
        devicemap_check.placeholder_tokenizer().save_pretrained(folder)
        folders[family] = str(folder)
    return folders


@pytest.mark.parametrize("family", fast_cases(SUPPORTED_FAMILIES, fast=("llama",)))  # offload: one is enough
def test_layers_on_cpu_and_disk_stream_the_same_logits_keys_and_evictions_as_one_device(family, checkpoints, tmp_path):
    single, _ = load(checkpoints[family], "cpu", "float32")
    device_map = interleaved_map(single)
    spread, _ = load(checkpoints[family], dtype="float32", device_map=device_map, offload_folder=str(tmp_path))
    assert set(spread.hf_device_map.values()) == {"cpu", "disk"}
    assert offloaded_layers(spread) == 2  # layers 1 and 3 really live on disk
    assert spread.device.type == "meta" and input_device(spread) == torch.device("cpu")  # embedding on disk
    ids = torch.randint(3, single.config.vocab_size, (150,), generator=torch.Generator().manual_seed(5)).tolist()
    assert_same_stream(stream(single, ids, 4, 28, 12), stream(spread, ids, 4, 28, 12))


@pytest.mark.slow
def test_auto_map_with_a_cpu_budget_offloads_the_rest_to_disk_and_streams_exactly(checkpoints):
    single, _ = load(checkpoints["llama"], "cpu", "float32")
    total = sum(weight_bytes_by_placement(single).values())
    spread, _ = load(checkpoints["llama"], dtype="float32", device_map="auto", max_memory=f"cpu={total // 2}")
    placed = weight_bytes_by_placement(spread)
    assert set(placed) == {"cpu", "disk"} and sum(placed.values()) == total
    assert placed["cpu"] <= total // 2 and offloaded_layers(spread) >= 1
    ids = torch.randint(3, single.config.vocab_size, (120,), generator=torch.Generator().manual_seed(6)).tolist()
    assert_same_stream(stream(single, ids, 2, 30, 10), stream(spread, ids, 2, 30, 10))


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory, tiny_chat_model, default_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-chat")
    tiny_chat_model.save_pretrained(folder)
    default_tokenizer.save_pretrained(folder)
    return str(folder)


def test_the_footer_names_a_single_place_once_and_every_place_of_a_spread_model(chat_checkpoint):
    single, tokenizer = load(chat_checkpoint, "cpu", "float32")
    spread, _ = load(chat_checkpoint, dtype="float32", device_map=interleaved_map(single))
    where = StreamingEngine(single, tokenizer, EngineConfig()).backend.describe().where
    assert where == (f"cpu, {format_bytes(sum(weight_bytes_by_placement(single).values()))} of weights", "float32")
    where = StreamingEngine(spread, tokenizer, EngineConfig()).backend.describe().where
    assert where[0] == f"cpu (weights: {describe_placement(spread)})" and "disk" in where[0]


@pytest.mark.slow
def test_engine_chat_over_an_offloaded_model_equals_the_single_device_chat(chat_checkpoint):
    single, tokenizer = load(chat_checkpoint, "cpu", "float32")
    spread, _ = load(chat_checkpoint, dtype="float32", device_map=interleaved_map(single))
    assert offloaded_layers(spread) == 1
    config = EngineConfig(recent_size=60, prefill_chunk_size=16, max_new_tokens=12, temperature=0.0)
    transcripts = []
    for model in (single, spread):
        engine = StreamingEngine(model, tokenizer, config)
        session = engine.new_session("streaming")
        turns = []
        for prompt in ("Hello there", "Tell me about sinks " * 6, "And the recent window?", "Thanks"):
            *deltas, done = list(engine.chat(session, prompt))
            assert done.kind == "done", done.text
            turns.append(("".join(d.text for d in deltas), done.stats["evicted_tokens"], done.stats["cache_tokens"]))
        transcripts.append(turns)
    assert transcripts[1] == transcripts[0]
    assert transcripts[0][-1][1] > 0  # the comparison covered evictions


@pytest.mark.model
def test_default_model_on_cpu_and_disk_streams_like_the_single_device_model(default_model, tmp_path):
    single, _ = default_model
    spread, _ = load(ensure_default_model(), dtype="float32", device_map=interleaved_map(single, embedding="cpu"),
                     offload_folder=str(tmp_path))
    assert offloaded_layers(spread) == 15
    ids = torch.randint(3, 40000, (90,), generator=torch.Generator().manual_seed(7)).tolist()
    assert_same_stream(stream(single, ids, 4, 44, 16), stream(spread, ids, 4, 44, 16))


@pytest.mark.slow  # the whole CLI, twice
def test_devicemap_check_cli_reports_exact_offload_and_split_runs(tmp_path, capsys):
    output = tmp_path / "check.json"
    assert devicemap_check.main(["--model", "random-tiny", "--device", "cpu", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    provenance = result.pop(PROVENANCE_KEY)  # the file alone carries how it was made
    assert json.loads(capsys.readouterr().out) == result
    assert provenance["command"].endswith(f"--output {output}") and provenance["config"]["device"] == "cpu"
    assert result["ok"] and result["offloaded_to_cpu_and_disk"]
    for name in ("offload", "split"):
        variant = result["variants"][name]
        assert variant["max_abs_logit_diff"] <= TOL and variant["stream_positions_equal"]
        assert variant["evicted_tokens"] == result["variants"]["single"]["evicted_tokens"] > 0


def test_chat_cli_offloads_what_exceeds_max_memory_to_disk_and_still_streams(chat_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first question\nsecond question is longer than the first one\nthird\n")
    # 2 MB of CPU cannot hold the 12.6 MB embedding (accelerate also reserves room for the largest offloaded
    # module), so every weight goes to disk and is read back on each forward pass.
    argv = [str(prompts), "--model", chat_checkpoint, "--recent-size", "40", "--max-new-tokens", "8",
            "--device-map", "auto", "--max-memory", "cpu=2MB", "--offload-folder", str(tmp_path / "off")]
    assert chat.main(argv) == 0
    captured = capsys.readouterr()
    assert "[weights: disk 25.5 MB]" in captured.err
    cache_lines = [line for line in captured.out.splitlines() if line.startswith("[cache ")]
    assert len(cache_lines) == 3 and "evicted 0 " not in cache_lines[-1]


def test_chat_cli_refuses_max_memory_without_a_device_map(chat_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    assert chat.main([str(prompts), "--model", chat_checkpoint, "--max-memory", "cpu=1GB"]) == 2
    assert "only apply with --device-map" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0=20GiB,cpu=30GiB", {0: 20 * 2**30, "cpu": 30 * 2**30}),
        ("cuda:1=1.5GB, cpu = 512MiB", {1: 1_500_000_000, "cpu": 512 * 2**20}),
        ("cpu=1000", {"cpu": 1000}),
        ("MPS=2gb", {"mps": 2_000_000_000}),
    ],
)
def test_max_memory_strings_parse_to_bytes_per_device(text, expected):
    assert parse_max_memory(text) == expected


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("20GiB", "DEVICE=SIZE"),
        ("gpu=1GB", "unknown device"),
        ("disk=1TB", "no disk budget"),
        ("cpu=1GB,cpu=2GB", "twice"),
        ("cpu=lots", "bad memory size"),
        ("cpu=10XB", "bad memory size"),
        ("cpu=0GB", "more than 0"),
    ],
)
def test_bad_max_memory_strings_are_refused_with_the_reason(text, match):
    with pytest.raises(ValueError, match=match):
        parse_max_memory(text)


def test_sizes_use_decimal_and_binary_units_like_accelerate():
    assert parse_size("1KB") == 1000 and parse_size("1KiB") == 1024 and parse_size("2.5GiB") == int(2.5 * 2**30)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_memory="cpu=1GB"), "only apply with --device-map"),
        (dict(offload_folder="/tmp/x"), "only apply with --device-map"),
        (dict(device_map="everywhere"), "unknown device map"),
        (dict(device_map={}), "at least one module"),
        (dict(device_map={"model": "gpu"}), "is not a GPU index"),
    ],
)
def test_bad_placements_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Placement(**kwargs)


def test_load_refuses_a_device_together_with_a_device_map(chat_checkpoint):
    with pytest.raises(ValueError, match="either a device or a device map"):
        load(chat_checkpoint, "cpu", device_map="auto")


@pytest.mark.skipif(torch.cuda.device_count() > 3, reason="needs a machine with fewer than 4 GPUs")
def test_a_max_memory_for_an_absent_gpu_is_refused_before_loading():
    with pytest.raises(ValueError, match="names GPU 3"):
        load("/nonexistent", device_map="auto", max_memory="3=1GiB")


def test_weights_by_placement_count_tied_weights_once():
    model = tiny_model("llama", layers=2)
    untied = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    model.get_output_embeddings().weight = embedding
    assert weight_bytes_by_placement(model) == {"cpu": untied - embedding.numel() * embedding.element_size()}
