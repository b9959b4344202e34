"""Reproducing the paper on your machine: perplexity (`ppl`), streaming chat (`chat`) and decode (`bench`) CLIs.

Run them as `python -m streaming_engine.eval.ppl|chat|bench --help`. They share text loading (`texts`), the
attention variants (`methods`) and plotting (`plots`).
"""
