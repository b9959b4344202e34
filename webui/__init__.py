"""The web app's modules beside the Gradio UI (`app.py`): HTTP APIs mounted on the same server.

`openai_api` (OpenAI-compatible chat completions over the engine) and `metrics` (Prometheus text). Every model
decision is the engine's (`streaming_engine`); nothing here computes with the model.
"""
