"""Sampling settings and next-token choice.

`SamplingParams` validates every user-facing knob with the allowed range in the message; `Sampler` turns the
settings into transformers' own logits processors (repetition penalty, temperature, top-p) plus a top-k cut, and
draws the next token with a per-turn seeded generator. Temperature 0 means greedy (argmax, after the repetition
penalty).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

# The knobs' ranges have one home, shared with the HTTP API's argument check (re-exported here for the UI).
from .validate import (  # noqa: F401
    MAX_NEW_TOKENS_LIMIT,
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    check_sampling,
)

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
        # Every value enters here (engine.chat, the API, the gradio API, the CLI), so here is where it is made the
        # type the sampler needs (`validate.SAMPLING_RANGES`): integer-valued floats (5.0 from JSON) for the integer
        # knobs, floats for the float knobs even when written as ints (`"temperature": 1`), which transformers'
        # warpers would refuse, and a list for `stop`.
        for f in fields(self):
            setattr(self, f.name, check_sampling(f.name, getattr(self, f.name)))

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
            history = list(recent_ids)[-PENALTY_WINDOW:] or [0]  # an empty one penalizes token 0, as the reference
            # An id past the logits (a tokenizer larger than the output layer) cannot be drawn, so it is not
            # penalized: transformers >= 5.2x drops it itself, earlier 5.x releases index out of bounds.
            history = [t for t in history if t < scores.shape[-1]]
            if history:
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
