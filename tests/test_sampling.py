"""Sampling: validation, greedy, seeding, top-k/top-p sets, repetition penalty vs transformers."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from npu.engine.sampling import Sampler, SamplingParams, _nucleus_threshold, apply_repetition_penalty

VOCAB = 151655
logit_arrays = hnp.arrays(np.float32, st.integers(1, 300),
                          elements=st.floats(-30, 30, width=32, allow_subnormal=False))


def softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = x.astype(np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def nucleus_reference(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Ids a top-p sampler may return, by a full sort: every token at least as likely as
    the least likely one the transformers rule keeps (ties at the edge are all allowed)."""
    order = np.argsort(-probs, kind="stable")
    mass_above = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
    num_kept = max(1, int(np.sum(mass_above < top_p)))
    threshold = probs[order[num_kept - 1]]
    return np.flatnonzero(probs >= threshold * (1 - 1e-6))


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be finite"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"top_k": True}, "top_k must be an integer"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_p": float("inf")}, "top_p must be finite"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"repetition_penalty": -1.2}, "repetition_penalty must be > 0"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"seed": 1.5}, "seed must be a non-negative integer"),
])
def test_invalid_params_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_defaults_are_greedy_and_off():
    params = SamplingParams()
    assert params.greedy and params.top_k == 0 and params.top_p == 1.0
    assert params.repetition_penalty == 1.0 and params.seed is None


@settings(max_examples=100, deadline=None)
@given(logits=logit_arrays)
def test_greedy_is_argmax_and_leaves_logits_alone(logits):
    before = logits.copy()
    logits.flags.writeable = False  # the greedy path must not write (or need to)
    assert Sampler(SamplingParams()).sample(logits, [0]) == int(np.argmax(before))
    np.testing.assert_array_equal(logits, before)


def test_greedy_works_on_bf16_logits():
    logits = np.zeros(1000, dtype=ml_dtypes.bfloat16)
    logits[777] = 3.5
    assert Sampler(SamplingParams()).sample(logits, []) == 777
    assert Sampler(SamplingParams(temperature=0.01, repetition_penalty=1.5)).sample(logits, [1]) == 777


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, seed=1234),
    SamplingParams(temperature=0.8, top_k=50, seed=7),
    SamplingParams(temperature=1.2, top_p=0.9, repetition_penalty=1.1, seed=99),
])
def test_same_seed_gives_same_tokens(params):
    logits = np.random.default_rng(0).standard_normal(VOCAB).astype(np.float32)
    runs = []
    for _ in range(2):
        sampler, ids = Sampler(params), []
        for _ in range(30):
            ids.append(sampler.sample(logits, ids))
        runs.append(ids)
    assert runs[0] == runs[1]
    other = Sampler(SamplingParams(**{**params.__dict__, "seed": params.seed + 1}))
    assert [other.sample(logits, []) for _ in range(30)] != runs[0]


@settings(max_examples=150, deadline=None)
@given(logits=logit_arrays, top_k=st.integers(1, 50), seed=st.integers(0, 2**32),
       temperature=st.floats(0.05, 5))
def test_top_k_never_leaves_the_k_most_likely(logits, top_k, seed, temperature):
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=top_k, seed=seed))
    kth = np.sort(logits)[::-1][min(top_k, logits.size) - 1]
    for _ in range(5):
        assert logits[sampler.sample(logits, [])] >= kth


@settings(max_examples=150, deadline=None)
@given(logits=logit_arrays, top_p=st.floats(0.01, 1.0, exclude_max=True),
       seed=st.integers(0, 2**32), temperature=st.floats(0.05, 5))
def test_top_p_never_leaves_the_nucleus(logits, top_p, seed, temperature):
    sampler = Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=seed))
    allowed = set(nucleus_reference(softmax(logits, temperature), top_p).tolist())
    for _ in range(5):
        assert sampler.sample(logits, []) in allowed


@settings(max_examples=100, deadline=None)
@given(logits=logit_arrays, top_k=st.integers(1, 20), top_p=st.floats(0.05, 0.95),
       seed=st.integers(0, 2**32))
def test_top_k_then_top_p(logits, top_k, top_p, seed):
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, seed=seed))
    k = min(top_k, logits.size)
    top = np.argsort(-logits, kind="stable")[:k]
    kth = logits[top[-1]]
    # Renormalised over the top-k (ties at the k-th value may substitute each other).
    in_k = np.flatnonzero(logits >= kth)
    probs = np.zeros(logits.size)
    probs[top] = softmax(logits[top])
    allowed = set(nucleus_reference(probs, top_p).tolist()) | set(in_k[logits[in_k] == kth].tolist())
    for _ in range(5):
        assert sampler.sample(logits, []) in allowed


def test_temperature_sampling_follows_softmax():
    logits = np.array([2.0, 1.0, 0.0, -1.0, 0.5], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0.7, seed=5))
    n = 20000
    counts = np.bincount([sampler.sample(logits, []) for _ in range(n)], minlength=5)
    expected = softmax(logits, 0.7) * n
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected) + 1)


def test_top_p_renormalises_over_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=11))
    n = 20000
    counts = np.bincount([sampler.sample(logits, []) for _ in range(n)], minlength=4)
    assert counts[2] == counts[3] == 0  # 0.5 + 0.3 >= 0.7: the nucleus is {0, 1}
    assert abs(counts[0] / n - 0.5 / 0.8) < 0.02


def test_repetition_penalty_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(3)
    for penalty in (0.7, 1.0, 1.3, 2.0):
        logits = (rng.standard_normal(5000) * 4).astype(np.float32)
        previous = rng.integers(0, 5000, 300)  # duplicates included
        expected = RepetitionPenaltyLogitsProcessor(penalty)(
            torch.from_numpy(previous[None]), torch.from_numpy(logits[None].copy()))[0].numpy()
        ours = logits.copy()
        apply_repetition_penalty(ours, np.unique(previous), penalty)
        np.testing.assert_allclose(ours, expected, rtol=1e-6)
        sampled = Sampler(SamplingParams(repetition_penalty=penalty)).sample(logits, previous.tolist())
        assert sampled == int(np.argmax(expected))


def test_repetition_penalty_changes_the_greedy_choice():
    logits = np.array([1.0, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams(repetition_penalty=1.2)).sample(logits, [1, 1]) == 2
    assert Sampler(SamplingParams()).sample(logits, [1, 1]) == 1


def test_previous_ids_outside_the_vocabulary_raise():
    sampler = Sampler(SamplingParams(repetition_penalty=1.1))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        sampler.sample(np.zeros(4, np.float32), [2, 9])
    with pytest.raises(ValueError, match="1-D"):
        sampler.sample(np.zeros((1, 4), np.float32), [])


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, seed=0)])
def test_nan_logits_are_an_error(params):
    logits = np.array([0.0, np.nan, 1.0], dtype=np.float32)
    with pytest.raises(ValueError, match="NaN"):
        Sampler(params).sample(logits, [])


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(st.integers(1, 6), min_size=1, max_size=60),  # small ints: many ties
       top_p=st.floats(0.01, 1.0))
def test_quickselect_threshold_equals_the_sorted_rule(weights, top_p):
    probs = np.array(weights, dtype=np.float64)
    order = np.argsort(-probs, kind="stable")
    mass_above = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
    num_kept = max(1, int(np.sum(mass_above < top_p * probs.sum())))
    assert _nucleus_threshold(probs, top_p * probs.sum()) == probs[order[num_kept - 1]]


@pytest.mark.parametrize("shape", ["peaked", "flat"])
def test_top_p_on_a_full_vocabulary(shape):
    """Both nucleus paths: a peaked distribution (nucleus among the most likely few) and
    a flat one (nucleus of ~100k tokens, found by quickselect)."""
    rng = np.random.default_rng(4)
    logits = rng.standard_normal(VOCAB).astype(np.float32)  # (vocab,)
    if shape == "peaked":
        logits[rng.integers(0, VOCAB, 20)] += 12
    allowed = np.zeros(VOCAB, dtype=bool)
    allowed[nucleus_reference(softmax(logits, 0.9), 0.7)] = True
    assert (allowed.sum() < 64) == (shape == "peaked")
    sampler = Sampler(SamplingParams(temperature=0.9, top_p=0.7, seed=8))
    chosen = [sampler.sample(logits, []) for _ in range(40)]
    assert allowed[chosen].all()
    assert len(set(chosen)) > (5 if shape == "peaked" else 35)


def test_sample_candidates_greedy_and_penalty():
    ids = np.array([500, 7, 90210, 3])
    values = np.array([1.0, 3.0, 2.9, -2.0], dtype=np.float32)
    assert Sampler(SamplingParams()).sample_candidates(values, ids) == 7
    penalised = Sampler(SamplingParams(repetition_penalty=1.2))
    assert penalised.sample_candidates(values, ids, previous_ids=[7, 123456]) == 90210
    assert values[1] == 3.0  # the post graph's buffer is untouched


@settings(max_examples=100, deadline=None)
@given(values=hnp.arrays(np.float32, st.integers(1, 40),
                         elements=st.floats(-20, 20, width=32, allow_subnormal=False)),
       seed=st.integers(0, 2**32), top_k=st.integers(0, 10), top_p=st.floats(0.1, 1.0))
def test_sample_candidates_returns_a_candidate(values, seed, top_k, top_p):
    ids = np.arange(values.size) * 3 + 1
    sampler = Sampler(SamplingParams(temperature=0.9, top_k=top_k, top_p=top_p, seed=seed))
    for _ in range(3):
        assert sampler.sample_candidates(values, ids, previous_ids=[1, 4]) in set(ids.tolist())


def test_sample_candidates_equals_sample_on_a_sparse_vocabulary():
    """Candidates are a slice of a vocabulary where every other token is impossible, so
    the same seed draws the same token either way."""
    values = np.random.default_rng(1).standard_normal(40).astype(np.float32)
    ids = np.arange(values.size) * 3 + 1
    full = np.full(ids[-1] + 1, -np.inf, dtype=np.float32)  # (vocab,)
    full[ids] = values
    params = SamplingParams(temperature=0.9, seed=21)
    a, b = Sampler(params), Sampler(params)
    assert [a.sample_candidates(values, ids) for _ in range(50)] == [b.sample(full) for _ in range(50)]
