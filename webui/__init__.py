"""The Gradio web UI of StreamingLLM chat: one module per tab, composed by the root `app.py`.

Rooms: `settings` (flags, environment, UI defaults), `render` (the inert markdown sanitizer, gauges, reply text,
plots), `assets` (static files), `sessions` (a browser tab's engine sessions), `handlers` (binding handlers to the
engine, ZeroGPU), `startup` (loading the model and saying so), `health` (`GET /health`), one module per tab
(`chat_tab`, `compare_tab`, `about`) and `webapi` (the HTTP API for scripts).
Every model decision is the engine's (`streaming_engine`); nothing here computes with the model.
"""
