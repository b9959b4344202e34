"""Reproducing the paper on your machine: perplexity (`ppl`), streaming chat over MT-Bench (`mtbench`) and decode
(`bench`) CLIs, plus a load test of the running app (`loadtest`).

Run them as `python -m benchmarks.ppl|mtbench|bench|loadtest --help`. They share text loading
(`texts`), the attention variants (`methods`), plotting (`plots`), statistics (`stats`) and command-line plumbing
(`cli`).
"""
