"""The Gradio web UI of StreamingLLM chat: one module per tab, composed by the root `app.py`.

Rooms: `settings` (flags, environment, UI defaults), `render` (the inert markdown sanitizer, gauges, reply text,
plots), `assets` (static files), `sessions` (whom a tab's sessions count against, and freeing them when the tab
goes), `handlers` (binding handlers to the engine, ZeroGPU), `startup` (loading the model and saying so), `health`
(`GET /health`), one module per tab (`chat_tab` with its `conversation_list`, `compare_tab`, `about`), `webapi`
(the HTTP API for scripts), `security` (response headers), the HTTP APIs mounted on the same server: `openai_api`
(OpenAI-compatible chat completions), `metrics` (Prometheus text) and `http_auth` (the UI's login for them).
Several app processes behind one address are the job of nginx or HAProxy (`deploy/`), not of this package.
Every model decision is the engine's (`streaming_engine`); nothing here computes with the model.
"""
