"""Tests for ondevice.sampling: parameter validation, each logit processor, and the sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ondevice.errors import SamplingError
from ondevice.sampling import (
    Sampler,
    SampleResult,
    SamplingParams,
    apply_penalties,
    log_softmax,
    min_p_mask,
    softmax,
    top_k_mask,
    top_p_mask,
)

F32 = np.float32


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=F32)


def random_logits(seed: int, vocab: int = 1000, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(vocab) * scale).astype(F32)


# ------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.01}, "min_p"),
        ({"min_p": float("inf")}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"frequency_penalty": float("-inf")}, "frequency_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"stop_token_ids": 7}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": 2.0}, "logprobs"),
        ({"n": 0}, "n"),
    ],
)
def test_invalid_params_raise(kwargs: dict, name: str) -> None:
    with pytest.raises(SamplingError) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    assert message.startswith(name)
    assert info.value.field == name  # callers read the field, never parse the message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_errors_not_about_a_field_have_none() -> None:
    with pytest.raises(SamplingError) as info:
        Sampler(SamplingParams()).sample(np.array([np.nan, 1.0], dtype=F32))
    assert info.value.field is None


def test_error_message_names_range() -> None:
    with pytest.raises(SamplingError, match=r"^temperature must be >= 0, got -1$"):
        SamplingParams(temperature=-1)
    with pytest.raises(SamplingError, match=r"top_p must be in \(0, 1\], got 0$"):
        SamplingParams(top_p=0)


def test_params_normalize_lists_and_scalars() -> None:
    p = SamplingParams(
        stop=["a", "b"], stop_token_ids=[3, np.int64(4)], temperature=np.float32(0.5)
    )
    assert p.stop == ("a", "b")
    assert p.stop_token_ids == (3, 4)
    assert type(p.stop_token_ids[1]) is int
    assert type(p.temperature) is float
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(temperature=1).temperature == 1.0
    hash(p)  # frozen and made of tuples: usable as a key


def test_params_boundaries_accepted() -> None:
    SamplingParams(
        max_tokens=1,
        temperature=0,
        top_k=0,
        top_p=1.0,
        min_p=1.0,
        repetition_penalty=1e-3,
        presence_penalty=-2,
        frequency_penalty=2,
        seed=0,
        logprobs=20,
    )
    SamplingParams(min_p=0.0, logprobs=0)


def test_params_are_frozen() -> None:
    p = SamplingParams()
    with pytest.raises(AttributeError):
        p.temperature = 0.5  # type: ignore[misc]


def test_greedy_constructor() -> None:
    p = SamplingParams.greedy(max_tokens=7, stop=["x"])
    assert p.temperature == 0.0 and p.is_greedy
    assert p.max_tokens == 7 and p.stop == ("x",)
    assert not SamplingParams().is_greedy


# ------------------------------------------------------------------------------- helpers


def test_softmax_and_log_softmax_are_float32_and_stable() -> None:
    x = f32(1000.0, 999.0, -np.inf, -1000.0)
    p = softmax(x)
    lp = log_softmax(x)
    assert p.dtype == F32 and lp.dtype == F32
    assert np.isfinite(p).all()
    assert p[2] == 0 and lp[2] == -np.inf
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-6)
    np.testing.assert_allclose(np.exp(lp), p, rtol=1e-6, atol=1e-30)
    # float64 and float16 inputs come back as float32 too.
    assert softmax(x.astype(np.float64)).dtype == F32
    assert log_softmax(f32(1, 2).astype(np.float16)).dtype == F32


def test_top_k_mask_keeps_exactly_k() -> None:
    x = random_logits(0, 500)
    for k in (1, 2, 17, 499):
        mask = top_k_mask(x, k)
        assert mask.dtype == bool and mask.sum() == k
        assert x[mask].min() >= x[~mask].max()
    assert top_k_mask(x, 0).all()
    assert top_k_mask(x, 500).all()
    assert top_k_mask(x, 10_000).all()


def test_top_k_mask_ties_keep_lowest_ids() -> None:
    x = f32(1.0, 3.0, 3.0, 3.0, 0.0, 3.0)
    assert top_k_mask(x, 2).tolist() == [False, True, True, False, False, False]
    assert top_k_mask(x, 5).tolist() == [True, True, True, True, False, True]


def test_top_p_mask_small_cases() -> None:
    p = f32(0.1, 0.4, 0.2, 0.3)
    assert top_p_mask(p, 0.6).tolist() == [False, True, False, True]
    assert top_p_mask(p, 0.75).tolist() == [False, True, True, True]
    assert top_p_mask(p, 0.95).tolist() == [True, True, True, True]
    assert top_p_mask(p, 1e-6).tolist() == [False, True, False, False]  # top token always
    assert top_p_mask(p, 1.0).all()
    # Ties: the lowest id is taken first.
    assert top_p_mask(f32(0.3, 0.3, 0.3, 0.1), 0.5).tolist() == [True, True, False, False]


def reference_top_p(p: np.ndarray, top_p: float) -> np.ndarray:
    order = np.argsort(-p.astype(np.float64), kind="stable")
    cumulative = np.cumsum(p[order].astype(np.float64))
    cut = int(np.searchsorted(cumulative, top_p * cumulative[-1], side="left"))
    mask = np.zeros(p.shape[0], dtype=bool)
    mask[order[: cut + 1]] = True
    return mask


@pytest.mark.parametrize("vocab", [10, 300, 49152])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_mask_matches_full_sort(vocab: int, top_p: float) -> None:
    # Large vocabularies with flat distributions force the candidate window to widen.
    p = softmax(random_logits(vocab, vocab, scale=1.0))
    mask = top_p_mask(p, top_p)
    expected = reference_top_p(p, top_p)
    # float32 vs float64 cumulative sums may differ by one token exactly at the boundary.
    assert abs(int(mask.sum()) - int(expected.sum())) <= 1
    kept = min(int(mask.sum()), int(expected.sum()))
    order = np.argsort(-p, kind="stable")
    assert mask[order[:kept]].all()
    # Smallest set: the kept mass reaches top_p, and without its least likely token it would not.
    kept_p = np.sort(p[mask].astype(np.float64))
    assert kept_p.sum() >= top_p - 1e-5
    assert kept_p[1:].sum() < top_p + 1e-5


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=40),
    st.floats(min_value=0.01, max_value=0.99),
)
def test_top_p_mask_property(weights: list[int], top_p: float) -> None:
    if sum(weights) == 0:
        weights = [*weights[:-1], 1]
    p = (np.array(weights, dtype=np.float64) / sum(weights)).astype(F32)
    cumulative = np.cumsum(np.sort(p.astype(np.float64))[::-1])
    if np.min(np.abs(cumulative - top_p)) < 1e-5:
        return  # exactly on a boundary: float32 rounding decides, both answers are fine
    assert top_p_mask(p, top_p).tolist() == reference_top_p(p, top_p).tolist()


def test_min_p_mask() -> None:
    p = f32(0.5, 0.3, 0.1, 0.05, 0.05)
    assert min_p_mask(p, 0.2).tolist() == [True, True, True, False, False]
    assert min_p_mask(p, 0.1).tolist() == [True, True, True, True, True]
    assert min_p_mask(p, 1.0).tolist() == [True, False, False, False, False]
    assert min_p_mask(p, 0.0).all()


def test_apply_penalties_repetition() -> None:
    x = f32(2.0, -1.0, 1.0, -3.0)
    out = apply_penalties(x, [0, 1], [1, 1], repetition_penalty=2.0)
    # Ids 0 and 1 seen (1 three times, penalized once); 2 and 3 untouched.
    np.testing.assert_array_equal(out, f32(1.0, -2.0, 1.0, -3.0))
    assert out.dtype == F32
    np.testing.assert_array_equal(x, f32(2.0, -1.0, 1.0, -3.0))  # input not modified


def test_apply_penalties_presence_and_frequency_use_output_only() -> None:
    x = f32(1.0, 1.0, 1.0, 1.0)
    out = apply_penalties(x, [3, 3, 3], [0, 0, 1], presence_penalty=0.25, frequency_penalty=0.5)
    np.testing.assert_allclose(out, f32(1.0 - 1.25, 1.0 - 0.75, 1.0, 1.0))
    assert out.dtype == F32
    # Negative penalties encourage repetition.
    out = apply_penalties(x, [], [2], presence_penalty=-1.0)
    assert out[2] == 2.0


def test_apply_penalties_keeps_float32_for_other_dtypes() -> None:
    x64 = np.array([1.0, 2.0, 3.0], dtype=np.float64)
    out = apply_penalties(x64, [0], [1, 2], repetition_penalty=1.3, frequency_penalty=0.1)
    assert out.dtype == F32
    assert apply_penalties(x64).dtype == F32


def test_apply_penalties_rejects_out_of_range_ids() -> None:
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        apply_penalties(f32(1, 2), [5], [], repetition_penalty=1.1)
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        apply_penalties(f32(1, 2), [], [-1], frequency_penalty=0.5)


# ------------------------------------------------------------------------------- sampler


def test_greedy_is_argmax_with_lowest_index_on_ties() -> None:
    s = Sampler(SamplingParams.greedy())
    for seed in range(20):
        x = random_logits(seed)
        assert s.sample(x).token_id == int(np.argmax(x))
    assert s.sample(f32(0.0, 5.0, 5.0, 1.0)).token_id == 1


def test_greedy_consumes_no_randomness() -> None:
    s = Sampler(SamplingParams.greedy(seed=3))
    before = s.rng.bit_generator.state
    s.sample(random_logits(0))
    assert s.rng.bit_generator.state == before


def test_seed_reproducibility() -> None:
    logits = [random_logits(i, 200, scale=1.0) for i in range(50)]

    def run(seed: int, index: int = 0) -> list[int]:
        s = Sampler(SamplingParams(seed=seed, top_k=50, top_p=0.95), index=index)
        return [s.sample(x).token_id for x in logits]

    assert run(1234) == run(1234)
    assert run(1234) != run(4321)
    assert run(1234, index=0) != run(1234, index=1)  # the n sequences of a request differ


def test_sample_streams_depend_on_seed_and_index_only() -> None:
    """Sample i of a seeded request draws from SeedSequence(seed, spawn_key=(i,)) whatever
    else is sampled in between (other rows of the batch, other requests): interleaving
    other samplers' draws changes nothing."""
    logits = [random_logits(i, 200, scale=1.0) for i in range(30)]
    singles = [Sampler(SamplingParams(seed=5, n=2), index=i) for i in range(2)]
    alone = [[s.sample(x).token_id for x in logits] for s in singles]
    pair = [Sampler(SamplingParams(seed=5, n=2), index=i) for i in range(2)]
    noise = [Sampler(SamplingParams(seed=s)) for s in range(15)]
    got: list[list[int]] = [[], []]
    for x in logits:
        for s in noise:
            s.sample(x)
        for i in (1, 0):  # the engine samples forked children before their parent
            got[i].append(pair[i].sample(x).token_id)
    assert got == alone
    one = Sampler(SamplingParams(seed=5, n=1))
    assert [one.sample(x).token_id for x in logits] == alone[0]  # n does not change sample 0


def test_unseeded_samplers_differ() -> None:
    x = np.zeros(1000, dtype=F32)
    a = [Sampler(SamplingParams()).sample(x).token_id for _ in range(20)]
    assert len(set(a)) > 1


@pytest.mark.parametrize("temperature", [0.01, 0.5, 1.0, 2.0, 100.0])
def test_top_k_1_is_argmax_at_any_temperature(temperature: float) -> None:
    s = Sampler(SamplingParams(temperature=temperature, top_k=1, seed=0))
    for seed in range(20):
        x = random_logits(seed)
        assert s.sample(x).token_id == int(np.argmax(x))


def test_tiny_temperature_does_not_overflow() -> None:
    x = f32(80.0, 79.0, -50.0, 10.0)
    for t in (1e-3, 1e-6, 1e-30):
        s = Sampler(SamplingParams(temperature=t, seed=1))
        assert all(s.sample(x).token_id == 0 for _ in range(10))


def test_repetition_penalty_flips_argmax() -> None:
    x = f32(2.0, 1.9, -1.0)
    assert Sampler(SamplingParams.greedy()).sample(x, [0]).token_id == 0
    s = Sampler(SamplingParams.greedy(repetition_penalty=1.2))
    assert s.sample(x, [0], []).token_id == 1  # 2.0 / 1.2 < 1.9
    assert s.sample(x, [], [0]).token_id == 1  # generated tokens count as well
    # Negative logits are multiplied: -1.0 * 1.2 < -1.1.
    assert s.sample(f32(-1.0, -1.1), [0]).token_id == 1


def test_frequency_and_presence_penalties_change_choice() -> None:
    x = f32(3.0, 2.0, 0.0)
    freq = Sampler(SamplingParams.greedy(frequency_penalty=0.6))
    assert freq.sample(x, [], [0]).token_id == 0  # 3.0 - 0.6 > 2.0
    assert freq.sample(x, [], [0, 0]).token_id == 1  # 3.0 - 1.2 < 2.0
    pres = Sampler(SamplingParams.greedy(presence_penalty=1.5))
    assert pres.sample(x, [], [0]).token_id == 1
    assert pres.sample(x, [0, 0, 0], []).token_id == 0  # prompt tokens are not penalized


def test_logprobs() -> None:
    x = random_logits(7, 300)
    params = SamplingParams(temperature=0.7, top_k=20, logprobs=5, seed=11)
    r = Sampler(params).sample(x)
    assert isinstance(r, SampleResult)
    lp = log_softmax(x)  # reported before temperature and filters
    assert r.logprob == float(lp[r.token_id])
    assert r.top_logprobs is not None and len(r.top_logprobs) == 5
    values = [v for _, v in r.top_logprobs]
    assert values == sorted(values, reverse=True)
    assert [i for i, _ in r.top_logprobs] == np.argsort(-lp, kind="stable")[:5].tolist()
    assert all(type(i) is int and type(v) is float for i, v in r.top_logprobs)


def test_logprobs_after_penalties_and_greedy() -> None:
    x = f32(2.0, 1.9, -1.0)
    r = Sampler(SamplingParams.greedy(repetition_penalty=1.2, logprobs=2)).sample(x, [0])
    lp = log_softmax(apply_penalties(x, [0], repetition_penalty=1.2))
    assert r.token_id == 1
    assert r.logprob == float(lp[1]) == r.top_logprobs[0][1]
    assert [i for i, _ in r.top_logprobs] == [1, 0]


def test_logprobs_zero_and_off() -> None:
    x = random_logits(1, 50)
    r = Sampler(SamplingParams(logprobs=0, seed=0)).sample(x)
    assert r.top_logprobs == [] and r.logprob is not None
    r = Sampler(SamplingParams(seed=0)).sample(x)
    assert r.logprob is None and r.top_logprobs is None


def test_masked_tokens_are_never_sampled() -> None:
    x = f32(0.0, -np.inf, 0.0, -np.inf)
    s = Sampler(SamplingParams(seed=5))
    assert {s.sample(x).token_id for _ in range(200)} == {0, 2}


def test_filters_restrict_support() -> None:
    x = np.log(f32(0.4, 0.3, 0.2, 0.06, 0.04))
    assert support(SamplingParams(top_k=2, seed=0), x) == {0, 1}
    assert support(SamplingParams(top_p=0.8, seed=0), x) == {0, 1, 2}
    assert support(SamplingParams(min_p=0.4, seed=0), x) == {0, 1, 2}
    assert support(SamplingParams(top_k=3, top_p=0.5, seed=0), x) == {0, 1}


def support(params: SamplingParams, x: np.ndarray, draws: int = 2000) -> set[int]:
    s = Sampler(params)
    return {s.sample(x).token_id for _ in range(draws)}


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# Critical values of chi-square at p = 0.001 (df = categories - 1). The seed is fixed, so the
# outcome is deterministic; the bound only says the fixed sample is typical, not lucky.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(seed=2024), [0.4, 0.3, 0.2, 0.06, 0.04]),
        (SamplingParams(seed=7, top_k=2), [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0]),
        (SamplingParams(seed=8, top_p=0.85), [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0, 0]),
        (SamplingParams(seed=9, min_p=0.3), [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0, 0]),
        (
            SamplingParams(seed=10, temperature=2.0),
            np.sqrt([0.4, 0.3, 0.2, 0.06, 0.04]) / np.sqrt([0.4, 0.3, 0.2, 0.06, 0.04]).sum(),
        ),
    ],
)
def test_sampling_matches_distribution(params: SamplingParams, expected: list[float]) -> None:
    x = np.log(f32(0.4, 0.3, 0.2, 0.06, 0.04))
    s = Sampler(params)
    draws = 20_000
    counts = np.bincount([s.sample(x).token_id for _ in range(draws)], minlength=5)
    expected = np.asarray(expected, dtype=np.float64)
    assert (counts[expected == 0] == 0).all()
    nonzero = expected > 0
    stat = chi_square(counts[nonzero].astype(np.float64), expected[nonzero])
    assert stat < CHI2_999[int(nonzero.sum()) - 1]


def test_bad_logits_raise() -> None:
    s = Sampler(SamplingParams(seed=0))
    for bad in (f32(1.0, np.nan), f32(np.inf, 0.0), f32(-np.inf, -np.inf)):
        with pytest.raises(SamplingError):
            s.sample(bad)
    with pytest.raises(SamplingError, match="1-D"):
        s.sample(np.zeros((2, 3), dtype=F32))
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        Sampler(SamplingParams(repetition_penalty=1.1)).sample(f32(1, 2), [0, 9])


def test_sample_does_not_modify_logits() -> None:
    x = random_logits(3, 100)
    copy = x.copy()
    Sampler(
        SamplingParams(
            temperature=0.5, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=1
        )
    ).sample(x, [1, 2], [3])
    np.testing.assert_array_equal(x, copy)


def test_float32_pipeline_with_python_floats(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every array the sampler builds on the way to a draw stays float32."""
    import ondevice.sampling as sampling

    seen: list[np.dtype] = []
    real_softmax, real_top_p, real_min_p = (
        sampling.softmax,
        sampling.top_p_mask,
        sampling.min_p_mask,
    )

    def spy_softmax(x: np.ndarray) -> np.ndarray:
        seen.append(x.dtype)
        out = real_softmax(x)
        seen.append(out.dtype)
        return out

    def spy_top_p(p: np.ndarray, v: float) -> np.ndarray:
        seen.append(p.dtype)
        return real_top_p(p, v)

    def spy_min_p(p: np.ndarray, v: float) -> np.ndarray:
        seen.append(p.dtype)
        return real_min_p(p, v)

    monkeypatch.setattr(sampling, "softmax", spy_softmax)
    monkeypatch.setattr(sampling, "top_p_mask", spy_top_p)
    monkeypatch.setattr(sampling, "min_p_mask", spy_min_p)
    params = SamplingParams(
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        min_p=0.01,
        repetition_penalty=1.1,
        presence_penalty=0.3,
        frequency_penalty=0.2,
        logprobs=3,
        seed=0,
    )
    r = Sampler(params).sample(random_logits(0, 1000), list(range(50)), [1, 2, 2])
    assert seen and all(d == F32 for d in seen)
    assert isinstance(r.logprob, float)
