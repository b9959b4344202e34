"""The About tab: what attention sinks are, the cache diagram and the paper. Static content, no handlers."""

from __future__ import annotations

import gradio as gr

from .assets import ASSETS

WHY_SINKS = (
    "## Why attention sinks?\n"
    "Autoregressive LLMs put a surprising share of their attention on the very first tokens of a "
    "sequence, whatever those tokens say: softmax attention must sum to one, and the first tokens, "
    "visible to every later token, become a place to park attention that is not needed elsewhere. "
    "Window attention evicts them as soon as the text outgrows the cache, and quality collapses. "
    "**StreamingLLM** keeps a few of them (the *attention sinks*, `start_size`) next to a sliding window "
    "of the `recent_size` most recent tokens, and gives every cached token its position *in the cache*. "
    "Memory and per-token cost stay constant, and quality stays close to dense attention, for streams "
    "of millions of tokens."
)
HOW_AND_PAPER = (
    "In this app the cache is a `transformers.Cache` subclass: when tokens are evicted, the keys "
    "behind the gap are re-rotated once to their new positions; attention code is untouched.\n\n"
    "**Paper:** Guangxuan Xiao, Yuandong Tian, Beidi Chen, Song Han, Mike Lewis. *Efficient Streaming "
    "Language Models with Attention Sinks.* ICLR 2024. "
    "[arXiv:2309.17453](https://arxiv.org/abs/2309.17453)"
)


def build_about_tab() -> None:
    """The About tab inside the current `gr.Blocks`."""
    with gr.Tab("About", id="about"):
        gr.Markdown(WHY_SINKS)
        gr.Image(str(ASSETS / "attention_sinks.png"), show_label=False, interactive=False, elem_id="diagram",
                 buttons=[])
        gr.Markdown(HOW_AND_PAPER)
