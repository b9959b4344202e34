"""How much of the worker prompts may take while replies decode (issue 28: a paste must not slow a reply by 2x).

Job: the rule, as plain bookkeeping the schedulers call; it never touches a model, a clock or a queue. Two parts:

* `PromptShare`, a credit counter in seconds. Every decode step earns the waiting prompts `PREFILL_SHARE / (1 -
  PREFILL_SHARE)` of its duration, every prompt pass run while replies decode spends its duration, and a
  *continuing* prompt (a long paste's next slice) is fed only while the credit is positive. Over any stretch of
  decoding, prompts therefore take at most `PREFILL_SHARE` of the worker's time, plus one pass: a decoding reply's
  time per token is at most `1 / (1 - PREFILL_SHARE)` its time alone, however long the paste, and the paste still
  advances. When one slice costs as much as a decode step (a CPU: per-pass overhead, not tokens), slices then run
  on fewer than half the iterations, so most of a reply's tokens wait for no prompt at all.
* `new_turns_first`: a turn whose prompt has not started yet is fed its first slice before any continuing prompt
  and without waiting for credit (its time is still spent from the credit, so a paste pays for it). A short
  prompt is done in that slice and joins the batch at the next step, so a new turn's first token never waits
  behind a paste's remaining chunks; each turn gets this once, so it cannot carry a long paste past the share.

Boundary: which turns wait and how passes are run belong to `scheduler.py`; this module only answers "may the
next continuing slice run" and "which turns go first".
"""

from __future__ import annotations

from typing import Iterable, TypeVar

from .validate import check_number

#: Most of the worker's time that prompt passes may take while any reply decodes (see the module doc). At 0.3 a
#: reply waits at most ~1.43x its time alone per token, and a slice as dear as a step runs on ~43% of steps.
PREFILL_SHARE = 0.3

T = TypeVar("T")


class PromptShare:
    """Credit, in worker seconds, that waiting continuing prompts may still spend while replies decode."""

    def __init__(self, share: float = PREFILL_SHARE):
        check_number("share", share, 0.0, 1.0, low_open=True, high_open=True)
        self.share = share
        self.credit = 0.0

    def decoded(self, seconds: float, prompts_waiting: bool) -> None:
        """A decode step took `seconds`. While prompts wait they earn their share of it, banked for one step at
        most (no burst of slices after a long quiet stretch); with none waiting, credit and debt are forgotten."""
        if not prompts_waiting:
            self.credit = 0.0
            return
        earned = seconds * self.share / (1.0 - self.share)
        self.credit = min(self.credit + earned, earned)

    def fed(self, seconds: float) -> None:
        """A prompt pass ran beside decoding replies for `seconds` (a new turn's first slice too: it may go into
        debt, which the next continuing slices wait out)."""
        self.credit -= seconds

    def may_continue(self) -> bool:
        """Whether a continuing prompt's next slice may run now."""
        return self.credit > 0.0


def new_turns_first(waiting: Iterable[T], started) -> tuple[list[T], list[T]]:
    """Split `waiting` turns into (those whose prompt has not started: `started(turn)` is false, in arrival order;
    the others, in their queue order)."""
    fresh, going = [], []
    for turn in waiting:
        (going if started(turn) else fresh).append(turn)
    return fresh, going
