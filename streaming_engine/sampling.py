"""Sampling settings and next-token choice.

`SamplingParams` validates every user-facing knob with the allowed range in the message; `Sampler` turns the
settings into transformers' own logits processors (repetition penalty, temperature, top-p) plus a top-k cut, and
draws the next token with a per-turn seeded generator. Temperature 0 means greedy (argmax, after the repetition
penalty).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

#: Hard upper bound on `max_new_tokens` for one reply (the UI slider and the API share it).
MAX_NEW_TOKENS_LIMIT = 4096
MAX_TEMPERATURE = 5.0
MAX_REPETITION_PENALTY = 10.0
MAX_STOP_STRINGS = 8
MAX_STOP_STRING_CHARS = 100
#: The repetition penalty looks at most this many recent tokens.
PENALTY_WINDOW = 1024


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    """One reply's decoding settings. Raises `ValueError` naming the allowed range on bad values."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.max_new_tokens, float) and self.max_new_tokens.is_integer():
            self.max_new_tokens = int(self.max_new_tokens)
        if isinstance(self.top_k, float) and self.top_k.is_integer():
            self.top_k = int(self.top_k)
        if not _is_int(self.max_new_tokens) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE}] (0 = greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(
                f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}] (1 = off), got {self.repetition_penalty!r}"
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {self.seed!r}")
        if self.stop is None:
            self.stop = []
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s != ""]
        if len(self.stop) > MAX_STOP_STRINGS or any(
            not isinstance(s, str) or len(s) > MAX_STOP_STRING_CHARS for s in self.stop
        ):
            raise ValueError(
                f"stop must be at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_STRING_CHARS} characters"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Chooses the next token from last-position logits, with transformers' processors and a seeded generator.

    With top-k on (the default), only the k best tokens can be drawn, so temperature, top-p, softmax and the draw
    run on those k scores instead of the whole vocabulary: the same distribution (top-k keeps exactly k tokens
    here; transformers' warper would also keep ties with the k-th score) at a fraction of the cost, which matters
    because every row of a batched step samples on the worker thread.
    """

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        # Only the repetition penalty reads the recent tokens; the other processors look at the scores alone.
        self.penalty = (RepetitionPenaltyLogitsProcessor(params.repetition_penalty)
                        if params.repetition_penalty != 1.0 else None)
        warpers = LogitsProcessorList()
        if not params.greedy:
            warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(params.top_p))
        self.warpers = warpers
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, recent_ids) -> int:
        """logits: `[vocab]` for the last position; `recent_ids`: the tokens the repetition penalty looks at (any
        iterable; at most the last `PENALTY_WINDOW` are used, so the cost per token is bounded)."""
        scores = logits.float().unsqueeze(0)  # [1, vocab]
        if self.penalty is not None:
            history = list(recent_ids)[-PENALTY_WINDOW:] or [0]
            scores = self.penalty(torch.tensor([history], device=logits.device, dtype=torch.long), scores)
        if self.params.greedy:
            return int(scores.argmax(dim=-1).item())
        candidates = None
        if 0 < self.params.top_k < scores.shape[-1]:
            scores, candidates = torch.topk(scores, self.params.top_k, dim=-1)  # [1, k], best first
        scores = self.warpers(None, scores)  # temperature, then top-p (neither reads input_ids)
        probs = torch.softmax(scores, dim=-1)
        choice = torch.multinomial(probs, 1, generator=self.generator)  # [1, 1]
        if candidates is not None:
            choice = candidates.gather(-1, choice)
        return int(choice.item())
