"""Device sampling (streaming_engine/device_sampling.py): greedy is argmax, a (seed, step) is one token whatever
the batch, draws follow the reference sampler's distribution, top-k / top-p never leave their allowed set, the
repetition penalty is `sampling.Sampler`'s (same greedy choice, same distribution, over a sliding window of the
history), and a step wrapped with a sampler sets each row from its turn."""

from __future__ import annotations

import math
import random
from collections import deque

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from streaming_engine.device_sampling import (
    DeviceSampler,
    SampledDecodeStep,
    allowed_tokens,
    repetition_penalty,
    sample_tokens,
    uniform_noise,
)
from streaming_engine.generation import RowSampling
from streaming_engine.sampling import PENALTY_WINDOW, Sampler, SamplingParams

VOCAB = 12


def settings(rows: int, temperature: float, top_k: int, top_p: float):
    return (torch.full((rows,), temperature), torch.full((rows,), top_k, dtype=torch.long),
            torch.full((rows,), top_p))


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, penalty: float = 1.0,
                    history: list[int] = ()) -> torch.Tensor:
    """The distribution `sampling.Sampler` draws from: transformers' repetition penalty over `history`, exactly k
    best, temperature, transformers' top-p."""
    scores = logits.float().unsqueeze(0)
    if penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([list(history) or [0]]), scores)
    candidates = torch.arange(logits.shape[-1]).unsqueeze(0)
    if 0 < top_k < scores.shape[-1]:
        scores, candidates = torch.topk(scores, top_k, dim=-1)
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    probs = torch.zeros(logits.shape[-1])
    probs[candidates[0]] = torch.softmax(scores, dim=-1)[0]
    return probs


def test_greedy_rows_take_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(64, VOCAB) * 3
    temperature, top_k, top_p = settings(64, 0.0, 5, 0.5)
    ids = sample_tokens(logits, temperature, top_k, top_p, torch.arange(64), torch.zeros(64, dtype=torch.long))
    assert torch.equal(ids, logits.argmax(-1))


def test_same_seed_and_step_give_the_same_token_whatever_the_companions():
    torch.manual_seed(1)
    logits = torch.randn(1, VOCAB)
    alone = sample_tokens(logits, *settings(1, 1.0, 0, 1.0), torch.tensor([77]), torch.tensor([5]))
    companions = torch.cat((torch.randn(7, VOCAB), logits))  # the row last, among others with other seeds
    seeds = torch.cat((torch.arange(7) * 1000 + 3, torch.tensor([77])))
    steps = torch.cat((torch.arange(7), torch.tensor([5])))
    batched = sample_tokens(companions, *settings(8, 1.0, 0, 1.0), seeds, steps)
    assert batched[-1] == alone[0]


def test_noise_differs_by_seed_step_and_token():
    u = uniform_noise(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 1000)
    assert ((u > 0) & (u < 1)).all()
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not torch.equal(u[a], u[b])
    assert u[0].unique().numel() > 990  # token ids give different draws too


#: A history for the penalized draws: some of the vocabulary seen (one token twice, which counts once), the rest not.
HISTORY = [3, 0, 7, 3, 10, 5]


@pytest.mark.parametrize("temperature, top_k, top_p, penalty", [
    (1.0, 0, 1.0, 1.0), (0.7, 0, 1.0, 1.0), (1.3, 5, 1.0, 1.0), (1.0, 0, 0.8, 1.0), (0.8, 6, 0.9, 1.0),
    (1.0, 0, 1.0, 1.8), (0.9, 8, 0.95, 1.4), (1.0, 0, 1.0, 0.6)])
def test_draw_frequencies_match_the_reference_distribution(temperature, top_k, top_p, penalty):
    """N draws by N sampler rows with distinct seeds (with a penalty: each row holding `HISTORY`); each token's
    count is Binomial(N, p) under the reference distribution. Bound: 5 standard deviations plus one count, so a
    correct sampler fails a token by chance with probability < 6e-7: under 1e-5 per case (12 tokens), under 1e-4
    for all 8 cases together. The seeds are fixed, so the outcome is the same on every run."""
    torch.manual_seed(2)
    logits = torch.randn(VOCAB) * 1.5
    n = 20000
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    sampler = DeviceSampler(n, window=len(HISTORY))  # the history fits: the window's length changes nothing
    for row in range(n):
        sampler.set_row(row, params, seed=row * 7919 + 11, history=HISTORY, step=3)
    ids = sampler.sample(logits.expand(n, -1))
    counts = torch.bincount(ids, minlength=VOCAB).double()
    expected = reference_probs(logits, temperature, top_k, top_p, penalty, HISTORY).double()
    if penalty != 1.0:  # the penalty really moved probability: the test would notice a sampler that ignored it
        assert (expected - reference_probs(logits, temperature, top_k, top_p).double()).abs().max() > 0.01
    bound = 5 * torch.sqrt(n * expected * (1 - expected)) + 1
    assert (counts[expected == 0] == 0).all()
    assert ((counts - n * expected).abs() <= bound).all(), (counts / n, expected)


def test_one_seed_over_many_steps_follows_the_distribution():
    torch.manual_seed(3)
    logits = torch.randn(VOCAB)
    n = 20000
    ids = sample_tokens(logits.expand(n, -1), *settings(n, 1.0, 0, 1.0), torch.full((n,), 42),
                        torch.arange(n, dtype=torch.long))
    counts = torch.bincount(ids, minlength=VOCAB).double()
    expected = torch.softmax(logits.double(), -1)
    assert ((counts - n * expected).abs() <= 5 * torch.sqrt(n * expected * (1 - expected)) + 1).all()


@pytest.mark.parametrize("top_k, top_p", [(1, 1.0), (3, 1.0), (0, 0.3), (4, 0.6), (0, 1e-6)])
def test_top_k_and_top_p_never_leave_the_allowed_set(top_k, top_p):
    torch.manual_seed(4)
    n = 4000
    logits = torch.randn(n, VOCAB) * 2
    temperature = torch.rand(n) * 2 + 0.1
    ids = sample_tokens(logits, temperature, torch.full((n,), top_k), torch.full((n,), top_p),
                        torch.arange(n), torch.zeros(n, dtype=torch.long))
    for row in range(0, n, 97):
        allowed = reference_probs(logits[row], float(temperature[row]), top_k, top_p) > 0
        assert allowed[ids[row]]
    _, mask = allowed_tokens(logits, temperature, torch.full((n,), top_k), torch.full((n,), top_p))
    assert mask.gather(-1, ids[:, None]).all()
    if top_k:
        assert (mask.sum(-1) <= top_k).all()


def test_sampler_rows_keep_their_own_settings_and_counters():
    sampler = DeviceSampler(3)
    sampler.set_row(0, SamplingParams(temperature=0, repetition_penalty=1.0))
    sampler.set_row(1, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=9, repetition_penalty=1.0))
    sampler.set_row(2, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=9, repetition_penalty=1.0))
    torch.manual_seed(5)
    logits = torch.randn(3, VOCAB)
    logits[2] = logits[1]
    first, second = sampler.sample(logits), sampler.sample(logits)
    assert first[0] == second[0] == logits[0].argmax()
    assert first[1] == first[2] and second[1] == second[2]  # same seed, same step, same logits
    assert sampler.step.tolist() == [2, 2, 2]
    replay = sample_tokens(logits[1:2], *settings(1, 1.0, 0, 1.0), torch.tensor([9]), torch.tensor([1]))
    assert replay[0] == second[1]


def random_history(rng: random.Random, vocab: int) -> list[int]:
    """A history as a session holds one: empty (the reference's stand-in token 0), short, or past the penalty's
    window; ids beyond the logits' vocabulary included (the reference ignores them)."""
    length = rng.choice([0, 1, 7, 60, PENALTY_WINDOW - 3, PENALTY_WINDOW + 40])
    return [rng.randrange(vocab + 3) if rng.random() < 0.05 else rng.randrange(vocab // 3) for _ in range(length)]


def test_greedy_with_a_repetition_penalty_takes_the_reference_samplers_choice():
    """Rows of mixed penalties (1 = off, < 1 rewards) and histories decode for 40 steps; each step every row's
    token is the one `sampling.Sampler` picks from the same logits and the session's own window of recent ids,
    which the device keeps up to date itself (windows past `PENALTY_WINDOW` slide as tokens come in)."""
    rng, vocab, rows, steps = random.Random(8), 90, 8, 40
    torch.manual_seed(8)
    penalties = [1.0, 1.3, 2.5, 0.7, 1.1, 1.3, 4.0, 1.05]
    histories = [deque(random_history(rng, vocab), maxlen=PENALTY_WINDOW) for _ in range(rows)]
    sampler = DeviceSampler(rows)
    references = []
    for row, penalty in enumerate(penalties):
        params = SamplingParams(temperature=0, repetition_penalty=penalty)
        sampler.set_row(row, params, history=histories[row])
        references.append(Sampler(params, torch.device("cpu")))
    changed = 0
    for _ in range(steps):
        logits = torch.randn(rows, vocab) * 0.5
        logits[:, : vocab // 3] += 1.0  # the tokens histories hold score high: the penalty decides often
        ids = sampler.sample(logits).tolist()
        for row in range(rows):
            assert ids[row] == references[row](logits[row], histories[row]), row
            changed += ids[row] != int(logits[row].argmax())
            histories[row].append(ids[row])
    assert changed > steps  # the penalty changed many choices: a sampler without it would fail


def test_a_token_that_falls_out_of_the_window_is_no_longer_penalized():
    """Token 5 is only the oldest of a full window: the first new token pushes it out, so at the next step it is
    not penalized any more (for the reference as for the device), while the token just drawn is."""
    params = SamplingParams(temperature=0, repetition_penalty=3.0)
    history = deque([5] + [1] * (PENALTY_WINDOW - 1), maxlen=PENALTY_WINDOW)
    sampler, reference = DeviceSampler(1), Sampler(params, torch.device("cpu"))
    sampler.set_row(0, params, history=history)
    for scores, expected in (({5: 2.0, 2: 1.0}, 2), ({5: 2.0, 3: 1.5}, 5)):
        logits = torch.full((1, 8), -5.0)
        for token, score in scores.items():
            logits[0, token] = score
        token = int(sampler.sample(logits)[0])
        assert token == reference(logits[0], history) == expected
        history.append(token)


def test_the_penalty_follows_transformers_rule_for_positive_and_negative_scores():
    scores = torch.tensor([[2.0, -2.0, 2.0, -2.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    penalized = repetition_penalty(scores, seen, torch.tensor([2.0]))
    assert penalized.tolist() == [[1.0, -4.0, 2.0, -2.0, 0.0]]
    reference = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1, 4]]), scores.clone())
    assert torch.equal(penalized, reference)


def test_a_penalized_rows_draws_do_not_depend_on_its_batch_companions():
    """A sampled row with a penalty and a sliding window, alone and as row 2 among companions with other settings
    (penalized, greedy, unpenalized) fed other logits: the same tokens at every step."""
    rng, vocab, steps = random.Random(9), 60, 30
    torch.manual_seed(9)
    history = [rng.randrange(vocab) for _ in range(PENALTY_WINDOW - 10)]
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.5, seed=4242)
    alone, batch = DeviceSampler(1), DeviceSampler(5)
    alone.set_row(0, params, history=history)
    companions = [SamplingParams(temperature=1.2, top_k=0, top_p=1.0, repetition_penalty=2.0, seed=1),
                  SamplingParams(temperature=0, repetition_penalty=1.3),
                  None,
                  SamplingParams(temperature=0.5, top_k=5, top_p=0.5, repetition_penalty=1.0, seed=3)]
    for row, other in zip((0, 1, 3, 4), companions):
        batch.set_row(row, other, history=[rng.randrange(vocab) for _ in range(rng.randrange(300))])
    batch.set_row(2, params, history=history)
    mine = []
    for _ in range(steps):
        logits = torch.randn(5, vocab) * 2
        mine.append(int(batch.sample(logits)[2]))
        assert int(alone.sample(logits[2:3])[0]) == mine[-1]
    assert len(set(mine)) > 3  # it really sampled


def test_sampler_rows_move_with_their_state():
    sampler = DeviceSampler(2)
    sampler.set_row(1, SamplingParams(temperature=0.5, top_k=3, top_p=0.7, seed=123, repetition_penalty=1.6),
                    history=[4, 5])
    sampler.sample(torch.zeros(2, VOCAB))
    sampler.move_row(1, 0)
    assert (float(sampler.temperature[0]), int(sampler.top_k[0]), int(sampler.seed[0]), int(sampler.step[0])) == (
        0.5, 3, 123, 1)
    assert math.isclose(float(sampler.top_p[0]), 0.7, rel_tol=1e-6)
    assert math.isclose(float(sampler.penalty[0]), 1.6, rel_tol=1e-6)
    drawn = int(sampler.ring[1, 2])  # the token row 1 drew went into its window, and moved with it
    assert sampler.seen(1, VOCAB)[0].nonzero().flatten().tolist() == sorted({4, 5, drawn})


def test_an_empty_history_penalizes_token_zero_until_a_token_comes_in_as_the_reference_does():
    params = SamplingParams(temperature=0, repetition_penalty=5.0)
    sampler, reference = DeviceSampler(1), Sampler(params, torch.device("cpu"))
    sampler.set_row(0, params, history=[])
    logits = torch.tensor([[3.0, 2.0, -1.0, -1.0]])  # token 0 wins unpenalized, loses to token 1 penalized
    assert int(sampler.sample(logits)[0]) == reference(logits[0], []) == 1
    logits = torch.tensor([[3.0, 0.5, 2.9, -1.0]])  # token 1 is seen now and token 0 no longer: 0 wins
    assert int(sampler.sample(logits)[0]) == reference(logits[0], [1]) == 0


@pytest.mark.parametrize("history, winner", [([7], 0), ([7, 0], 1), ([0, 9, 8], 1)])
def test_an_id_past_the_logits_is_never_penalized_by_either_sampler(history, winner):
    """A tokenizer larger than the output layer can put ids past the logits in a history. Neither sampler may
    fail on one (transformers 5.17's processor indexes out of bounds), and it penalizes nothing: an id that
    cannot be drawn has no score. Only the history's ids inside the logits count, so [7] alone penalizes nothing
    (not even token 0, unlike an empty history)."""
    params = SamplingParams(temperature=0, repetition_penalty=5.0)
    sampler, reference = DeviceSampler(1), Sampler(params, torch.device("cpu"))
    sampler.set_row(0, params, history=history)
    logits = torch.tensor([[3.0, 2.0, -1.0, -1.0]])  # 4 scores: ids 7, 8, 9 lie past them
    assert reference(logits[0], history) == winner == int(sampler.sample(logits)[0])


class EchoStep:
    """A decode step whose logits favour the token each row was just fed (a fixed random base in [0, 3) plus 3 for
    it), so whether a row's window holds its last token decides its draw (a penalty of 3 takes it below the
    others); `fail` makes the next call raise, as a failed forward pass does."""

    def __init__(self, vocab: int):
        self.base, self.fail = torch.rand(vocab) * 3, False

    def __call__(self, token_ids):
        if self.fail:
            self.fail = False
            raise RuntimeError("forward pass failed")
        logits = self.base.repeat(len(token_ids), 1)
        logits[torch.arange(len(token_ids)), torch.tensor(token_ids)] += 3.0
        return logits

    def sampled(self, token_ids, sampler):
        """The step's logits and the sampler's draw from them (the `GraphedDecodeStep.sampled` contract)."""
        logits = self(token_ids)
        return logits, sampler.sample(logits), len(token_ids)


def test_a_sampled_step_sets_each_row_from_its_turn_and_again_when_the_row_changes_hands():
    """Two turns decode; after a step turn B's row moves to index 0 (A left): it is set again from its live
    history and draw count, so its draws are those of B decoding alone all along. After a failed step the turn
    draws the token itself (the scheduler's eager retry): every row is set again, that token included."""
    torch.manual_seed(10)
    vocab = 40
    params = {name: SamplingParams(temperature=0.2, top_k=0, top_p=1.0, repetition_penalty=3.0, seed=seed)
              for name, seed in (("a", 5), ("b", 6))}
    history = {"a": deque([1, 2, 3], maxlen=PENALTY_WINDOW), "b": deque([3, 4], maxlen=PENALTY_WINDOW)}
    rows = {name: RowSampling(params[name], history[name], drawn=1) for name in "ab"}
    together = SampledDecodeStep(EchoStep(vocab), rows=2, device="cpu")

    def alone_from_here():
        """B decoding alone from its state now, in a step of its own."""
        step = SampledDecodeStep(EchoStep(vocab), rows=1, device="cpu")
        step.step.base = together.step.base
        own = deque(history["b"], maxlen=PENALTY_WINDOW)
        return step, own, RowSampling(params["b"], own, drawn=rows["b"].drawn)

    alone, alone_history, alone_row = alone_from_here()
    drawn = []
    for step in range(9):
        if step == 5:  # a failed step; B's turn samples the token itself and feeds it
            together.step.fail = True
            with pytest.raises(RuntimeError):
                together.decode([history["b"][-1]], [rows["b"]])
            history["b"].append(17)
            rows["b"].drawn += 1
            alone, alone_history, alone_row = alone_from_here()
        fed = [7, 8] if step == 0 else [history["b"][-1]]
        _, ids = together.decode(fed, [rows["a"], rows["b"]] if step == 0 else [rows["b"]])
        _, alone_ids = alone.decode(fed[-1:], [alone_row])
        if step == 0:
            history["a"].append(ids.pop(0))
        assert ids == alone_ids
        drawn.append(ids[0])
        for own, row in ((history["b"], rows["b"]), (alone_history, alone_row)):
            own.append(ids[0])
            row.drawn += 1
    assert rows["a"].seed == 5 and rows["b"].seed == 6 and len(set(drawn)) > 3


def test_rows_whose_turns_sample_themselves_get_logits_and_no_ids():
    step = SampledDecodeStep(EchoStep(VOCAB), rows=2, device="cpu")
    got, ids = step.decode([1, 2], [None, None])
    assert ids is None and torch.equal(got, step.step([1, 2]))
    with pytest.raises(ValueError, match="sampling settings"):
        step.decode([1, 2], [None])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it on one)")
def test_cuda_draws_the_same_tokens_as_the_cpu():
    torch.manual_seed(6)
    n = 512
    logits = torch.randn(n, 1000) * 2
    args = (torch.rand(n) + 0.2, torch.randint(0, 50, (n,)), torch.rand(n) * 0.9 + 0.1,
            torch.arange(n, dtype=torch.long) * 31 + 2**40, torch.arange(n, dtype=torch.long))
    cpu = sample_tokens(logits, *args)
    cuda = sample_tokens(logits.cuda(), *(a.cuda() for a in args)).cpu()
    assert (cpu == cuda).float().mean() >= 0.99  # a rare tie broken by float rounding may differ


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it on one)")])])
def test_the_batched_penalty_equals_the_references_bit_for_bit(device):
    """CUDA divides by a Python number as a multiplication by its reciprocal, the CPU divides: the batched penalty
    computes as the reference does on each, or a greedy choice could differ from `sampling.Sampler`'s on a
    rounding tie."""
    torch.manual_seed(11)
    rows, vocab = 16, 5000
    scores = torch.randn(rows, vocab, device=device) * 4
    history = torch.randint(0, vocab, (rows, 300), device=device)
    penalties = [1.1, 1.3, 0.7, 2.9] * (rows // 4)
    seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device).scatter_(1, history, True)
    ours = repetition_penalty(scores, seen, torch.tensor(penalties, device=device))
    for row, penalty in enumerate(penalties):
        reference = RepetitionPenaltyLogitsProcessor(penalty)(history[row:row + 1], scores[row:row + 1].clone())
        assert torch.equal(ours[row], reference[0]), row


def test_an_all_greedy_batch_takes_the_argmax_and_counts_its_steps():
    sampler = DeviceSampler(4)
    for row in range(4):
        sampler.set_row(row, SamplingParams(temperature=0, repetition_penalty=1.0))
    torch.manual_seed(7)
    logits = torch.randn(3, VOCAB)
    assert torch.equal(sampler.sample(logits), logits.argmax(-1))
    assert sampler.step.tolist() == [1, 1, 1, 0]
