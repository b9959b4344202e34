"""Sampling settings and next-token choice.

`SamplingParams` validates every user-facing knob with the allowed range in the message; `Sampler` turns the
settings into transformers' own logits processors (repetition penalty, temperature, top-k, top-p) and draws the
next token with a per-turn seeded generator. Temperature 0 means greedy (argmax, after the repetition penalty).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .checks import check_int, check_number

#: Hard upper bound on `max_new_tokens` for one reply (the UI slider and the API share it).
MAX_NEW_TOKENS_LIMIT = 4096
MAX_TEMPERATURE = 5.0
MAX_REPETITION_PENALTY = 10.0
MAX_STOP_STRINGS = 8
MAX_STOP_STRING_CHARS = 100
MAX_SEED = 2**63 - 1
#: The repetition penalty looks at most this many recent tokens.
PENALTY_WINDOW = 1024

@dataclass(kw_only=True)
class SamplingDefaults:
    """The decoding knobs with a library-wide default, declared once: `SamplingParams` (one reply) and
    `EngineConfig` (an engine's per-call defaults) both inherit these fields. Keyword-only, so a subclass's own
    fields can never be filled positionally by mistake."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1

    def sampling_defaults(self) -> dict:
        """This object's values of the `SamplingDefaults` fields."""
        return {f.name: getattr(self, f.name) for f in fields(SamplingDefaults)}


@dataclass(kw_only=True)
class SamplingParams(SamplingDefaults):
    """One reply's decoding settings. Raises `ValueError` naming the allowed range on bad values."""

    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.max_new_tokens, float) and self.max_new_tokens.is_integer():
            self.max_new_tokens = int(self.max_new_tokens)
        if isinstance(self.top_k, float) and self.top_k.is_integer():
            self.top_k = int(self.top_k)
        check_int("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS_LIMIT)
        check_number("temperature", self.temperature, 0, MAX_TEMPERATURE, note=" (0 = greedy)")
        check_number("top_p", self.top_p, 0, 1, low_open=True)
        check_int("top_k", self.top_k, 0, note=" (0 = off)")
        check_number("repetition_penalty", self.repetition_penalty, 0, MAX_REPETITION_PENALTY, low_open=True,
                     note=" (1 = off)")
        if self.seed is not None:
            check_int("seed", self.seed, 0, MAX_SEED, note=" or None")
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
    """Chooses the next token from last-position logits, with transformers' processors and a seeded generator."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if not params.greedy:
            processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
        self.processors = processors
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, recent_ids: list[int]) -> int:
        """logits: `[vocab]` for the last position; `recent_ids`: tokens the repetition penalty looks at."""
        scores = logits.float().unsqueeze(0)  # [1, vocab]
        if self.processors:
            history = torch.tensor([recent_ids[-PENALTY_WINDOW:] or [0]], device=logits.device, dtype=torch.long)
            scores = self.processors(history, scores)
        if self.params.greedy:
            return int(scores.argmax(dim=-1).item())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator).item())
