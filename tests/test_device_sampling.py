"""Device sampling (streaming_engine/device_sampling.py): greedy is argmax, a (seed, step) is one token whatever
the batch, draws follow the reference sampler's distribution, top-k / top-p never leave their allowed set."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from streaming_engine.device_sampling import DeviceSampler, allowed_tokens, sample_tokens, uniform_noise
from streaming_engine.sampling import SamplingParams

VOCAB = 12


def settings(rows: int, temperature: float, top_k: int, top_p: float):
    return (torch.full((rows,), temperature), torch.full((rows,), top_k, dtype=torch.long),
            torch.full((rows,), top_p))


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution `sampling.Sampler` draws from: exactly k best, temperature, transformers' top-p."""
    scores = logits.float().unsqueeze(0)
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


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0),
                                                       (1.0, 0, 0.8), (0.8, 6, 0.9)])
def test_draw_frequencies_match_the_reference_distribution(temperature, top_k, top_p):
    """N draws with distinct seeds; each token's count is Binomial(N, p). Bound: 5 standard deviations plus one
    count, so each token fails by chance with probability < 6e-7 (under 1e-5 for the whole test)."""
    torch.manual_seed(2)
    logits = torch.randn(VOCAB) * 1.5
    n = 20000
    seeds = torch.arange(n, dtype=torch.long) * 7919 + 11
    ids = sample_tokens(logits.expand(n, -1), *settings(n, temperature, top_k, top_p), seeds,
                        torch.full((n,), 3, dtype=torch.long))
    counts = torch.bincount(ids, minlength=VOCAB).double()
    expected = reference_probs(logits, temperature, top_k, top_p).double()
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


def test_sampler_refuses_a_repetition_penalty():
    with pytest.raises(ValueError, match="repetition penalty"):
        DeviceSampler(1).set_row(0, SamplingParams(repetition_penalty=1.2))


def test_sampler_rows_move_with_their_state():
    sampler = DeviceSampler(2)
    sampler.set_row(1, SamplingParams(temperature=0.5, top_k=3, top_p=0.7, seed=123, repetition_penalty=1.0))
    sampler.sample(torch.zeros(2, VOCAB))
    sampler.move_row(1, 0)
    assert (float(sampler.temperature[0]), int(sampler.top_k[0]), int(sampler.seed[0]), int(sampler.step[0])) == (
        0.5, 3, 123, 1)
    assert math.isclose(float(sampler.top_p[0]), 0.7, rel_tol=1e-6)


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


def test_an_all_greedy_batch_takes_the_argmax_and_counts_its_steps():
    sampler = DeviceSampler(4)
    for row in range(4):
        sampler.set_row(row, SamplingParams(temperature=0, repetition_penalty=1.0))
    torch.manual_seed(7)
    logits = torch.randn(3, VOCAB)
    assert torch.equal(sampler.sample(logits), logits.argmax(-1))
    assert sampler.step.tolist() == [1, 1, 1, 0]
