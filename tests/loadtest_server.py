"""The app's HTTP API (`webui/webapi.py`) over one engine, served by a process of its own: the load tests' server.

`python tests/loadtest_server.py --port P (--model DIR | --default) [--start-size ...]`. In its own process its
`/health` memory readings are the server's alone; in the pytest process they would include every model and
llama.cpp context earlier tests left behind (issue 22), so the verdict would depend on test order. Prints
`kv_bytes_per_token=N` (the model's KV cache bytes per cached token) once the model is loaded, then serves until
killed.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradio as gr  # noqa: E402

from streaming_engine import EngineConfig, StreamingEngine, load  # noqa: E402
from benchmarks.capacity import kv_bytes_per_token  # noqa: E402
from webui import webapi  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default=None, help="a saved model folder; the offline default model when omitted")
    p.add_argument("--start-size", type=int, default=4)
    p.add_argument("--recent-size", type=int, default=64)
    p.add_argument("--prefill-chunk-size", type=int, default=32)
    p.add_argument("--max-active-turns", type=int, default=None)
    args = p.parse_args()
    model, tokenizer = load(args.model)
    extra = {} if args.max_active_turns is None else {"max_active_turns": args.max_active_turns}
    engine = StreamingEngine(model, tokenizer, EngineConfig(start_size=args.start_size, recent_size=args.recent_size,
                                                            prefill_chunk_size=args.prefill_chunk_size, **extra))
    print(f"kv_bytes_per_token={kv_bytes_per_token(model.config, next(model.parameters()).dtype)}", flush=True)
    with gr.Blocks() as demo:
        webapi.register(engine)
    demo.queue(default_concurrency_limit=16).launch(server_name="127.0.0.1", server_port=args.port,
                                                    prevent_thread_lock=True, quiet=True)
    threading.Event().wait()  # serve until the test kills this process


if __name__ == "__main__":
    main()
