"""Token sampling: per-request parameters, logit processors and a seeded sampler.

The processing order follows vLLM and llama.cpp::

    penalties -> (temperature == 0: argmax) -> temperature -> top-k -> top-p -> min-p -> draw

Everything runs in float32 on one ``[vocab]`` logits row. The helpers (`apply_penalties`,
`top_k_mask`, `top_p_mask`, `min_p_mask`, `softmax`, `log_softmax`) are plain functions on
small arrays so that each step can be tested on its own; `Sampler` chains them.

Tie-breaking is deterministic everywhere: among equal values the lowest token id wins, which is
what ``np.argmax`` does for the greedy path.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ondevice.constraints import Constraint
from ondevice.errors import SamplingError

__all__ = [
    "SampleResult",
    "Sampler",
    "SamplingParams",
    "apply_penalties",
    "log_softmax",
    "min_p_mask",
    "softmax",
    "top_k_mask",
    "top_p_mask",
]

MAX_LOGPROBS = 20
"""Largest number of alternatives `SamplingParams.logprobs` may ask for (the OpenAI limit)."""

MAX_LOGIT_BIAS = 100.0
"""``logit_bias`` values lie in [-100, 100] (OpenAI's range: -100 bans a token, 100 forces it)."""

GREEDY_TEMPERATURE_EPS = 1e-5
"""Temperatures below this are treated as greedy: dividing by them overflows float32 logits."""

_F32 = np.float32


# --------------------------------------------------------------------------------------------
# Parameters


def _check_real(name: str, value: object) -> float:
    # bool is an int subclass; `temperature=True` is a caller bug, not a number.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingError(f"{name} must be a number, got {value!r}", field=name)
    value = float(value)
    if not math.isfinite(value):
        raise SamplingError(f"{name} must be a finite number, got {value}", field=name)
    return value


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SamplingError(f"{name} must be an integer, got {value!r}", field=name)
    return int(value)


def _fmt(value: float) -> str:
    # "got -1" reads better than "got -1.0" for values the user typed as integers.
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _check_logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    # A mapping (OpenAI's JSON object, whose keys are strings of digits) or pairs.
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    if not isinstance(items, (list, tuple)) and not isinstance(value, Mapping):
        raise SamplingError(f"logit_bias must map token ids to numbers, got {value!r}"[:200],
                            field="logit_bias")
    out: dict[int, float] = {}
    for pair in items:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise SamplingError("logit_bias must map token ids to numbers", field="logit_bias")
        key, bias = pair
        if isinstance(key, str) and key.strip().isdigit():
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, numbers.Integral) or key < 0:
            raise SamplingError(f"logit_bias keys must be token ids (integers >= 0), got "
                                f"{key!r}"[:200], field="logit_bias")
        bias = _check_real("logit_bias", bias)
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise SamplingError(f"logit_bias values must be in [-100, 100], got {_fmt(bias)}",
                                field="logit_bias")
        out[int(key)] = bias
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    Attributes:
        max_tokens: Upper bound on generated tokens (>= 1).
        temperature: Softmax temperature (>= 0). 0 means greedy decoding (exact argmax).
        top_k: Keep only the k most likely tokens; 0 turns it off.
        top_p: Nucleus sampling: keep the smallest set of tokens whose probability mass is
            >= top_p, in (0, 1]; 1 turns it off.
        min_p: Keep tokens whose probability is >= min_p * (probability of the top token),
            in [0, 1]; 0 turns it off.
        repetition_penalty: HF/llama.cpp style, > 0: for every token id seen in the prompt or
            the output so far, positive logits are divided by it and negative ones multiplied.
            1 turns it off.
        presence_penalty: OpenAI style, in [-2, 2]: subtracted once from the logit of every
            token that occurs in the generated output.
        frequency_penalty: OpenAI style, in [-2, 2]: subtracted from a token's logit once per
            occurrence in the generated output.
        seed: Seed for the request's random generator (a non-negative integer); None draws
            one from OS entropy.
        stop: Stop strings. The text up to the first one is returned; the stop string itself
            is not. A single string is accepted and becomes a 1-tuple.
        stop_token_ids: Extra token ids that end generation (in addition to EOS).
        ignore_eos: Keep generating past EOS tokens (benchmarks).
        logprobs: None turns logprobs off; N in [0, 20] returns the sampled token's logprob
            and the N most likely alternatives.
        n: Number of completions to generate for the prompt (>= 1).
        speculative: False opts this request out of the engine's speculative decoding (its
            output is the same either way for greedy; this only saves the proposal work).
        constraint: A :class:`~ondevice.constraints.Constraint` (JSON schema, any JSON
            object, regex or grammar) the reply must match; each of the ``n`` samples walks
            its own matcher. Constrained requests are not speculated.
        logit_bias: ``{token_id: bias}`` (or pairs) added to the logits before sampling, each
            bias in [-100, 100]; stored as ``(token_id, bias)`` pairs sorted by id.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    speculative: bool = True
    constraint: Constraint | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        # Normalized values are written back with object.__setattr__ (the dataclass is frozen)
        # so that numpy scalars and lists from JSON become plain Python ints/floats/tuples.
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        max_tokens = _check_int("max_tokens", self.max_tokens)
        if max_tokens < 1:
            raise SamplingError(f"max_tokens must be >= 1, got {max_tokens}", field="max_tokens")
        put("max_tokens", max_tokens)

        temperature = _check_real("temperature", self.temperature)
        if temperature < 0:
            raise SamplingError(f"temperature must be >= 0, got {_fmt(temperature)}",
                                field="temperature")
        put("temperature", temperature)

        top_k = _check_int("top_k", self.top_k)
        if top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 = off), got {top_k}", field="top_k")
        put("top_k", top_k)

        top_p = _check_real("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {_fmt(top_p)}", field="top_p")
        put("top_p", top_p)

        min_p = _check_real("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise SamplingError(f"min_p must be in [0, 1], got {_fmt(min_p)}", field="min_p")
        put("min_p", min_p)

        rep = _check_real("repetition_penalty", self.repetition_penalty)
        if rep <= 0:
            raise SamplingError(f"repetition_penalty must be > 0, got {_fmt(rep)}",
                                field="repetition_penalty")
        put("repetition_penalty", rep)

        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_real(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise SamplingError(f"{name} must be in [-2, 2], got {_fmt(value)}", field=name)
            put(name, value)

        if self.seed is not None:
            seed = _check_int("seed", self.seed)
            if seed < 0:
                raise SamplingError(f"seed must be >= 0 or None, got {seed}", field="seed")
            put("seed", seed)

        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)):
            raise SamplingError(f"stop must be a string or a list of strings, got {stop!r}",
                                field="stop")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise SamplingError(f"stop must contain non-empty strings, got {s!r}", field="stop")
        put("stop", tuple(stop))

        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)):
            raise SamplingError(f"stop_token_ids must be a list of integers, got {ids!r}",
                                field="stop_token_ids")
        checked = tuple(_check_int("stop_token_ids", i) for i in ids)
        for i in checked:
            if i < 0:
                raise SamplingError(f"stop_token_ids must be >= 0, got {i}", field="stop_token_ids")
        put("stop_token_ids", checked)

        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise SamplingError(f"ignore_eos must be a bool, got {self.ignore_eos!r}",
                                field="ignore_eos")
        put("ignore_eos", bool(self.ignore_eos))

        if self.logprobs is not None:
            logprobs = _check_int("logprobs", self.logprobs)
            if not 0 <= logprobs <= MAX_LOGPROBS:
                raise SamplingError(
                    f"logprobs must be in [0, {MAX_LOGPROBS}] or None, got {logprobs}",
                    field="logprobs",
                )
            put("logprobs", logprobs)

        n = _check_int("n", self.n)
        if n < 1:
            raise SamplingError(f"n must be >= 1, got {n}", field="n")
        put("n", n)

        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise SamplingError(f"constraint must be a Constraint or None, got "
                                f"{type(self.constraint).__name__}", field="constraint")
        put("logit_bias", _check_logit_bias(self.logit_bias))

        if not isinstance(self.speculative, (bool, np.bool_)):
            raise SamplingError(f"speculative must be a bool, got {self.speculative!r}",
                                field="speculative")
        put("speculative", bool(self.speculative))

    @classmethod
    def greedy(cls, **kwargs: object) -> SamplingParams:
        """Parameters for greedy decoding (temperature 0); other fields as keyword arguments."""
        return cls(temperature=0.0, **kwargs)  # type: ignore[arg-type]

    @property
    def is_greedy(self) -> bool:
        """True when tokens are picked by argmax (no randomness is consumed)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS


@dataclass(frozen=True)
class SampleResult:
    """One sampled token.

    Attributes:
        token_id: The chosen token.
        logprob: Its log-probability under the penalized (pre-temperature) distribution, or
            None when logprobs were not requested.
        top_logprobs: The N most likely ``(token_id, logprob)`` pairs of that same
            distribution, most likely first (ties: lowest id first), or None.
    """

    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None


# --------------------------------------------------------------------------------------------
# Array helpers (1-D float32)


def _as_row(values: np.ndarray, name: str = "logits") -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise SamplingError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    return arr


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax of a 1-D array, in float32. ``-inf`` entries get 0."""
    x = _as_row(logits).astype(_F32, copy=False)
    e = np.exp(x - x.max())
    return e / e.sum(dtype=_F32)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax of a 1-D array, in float32. ``-inf`` stays ``-inf``."""
    x = _as_row(logits).astype(_F32, copy=False)
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum(dtype=_F32))


def _top_indices(values: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` largest values, largest first, ties broken by lowest index.

    Uses a partition (O(V)) and sorts only the ``m`` winners, so the cost stays small for a
    large vocabulary when ``m`` is small.
    """
    n = values.shape[0]
    if m >= n:
        return np.argsort(-values, kind="stable")
    if m <= 0:
        return np.empty(0, dtype=np.intp)
    # The m-th largest value is the threshold; everything strictly above it is in, and the
    # remaining slots go to the lowest indices equal to it. argpartition alone would pick
    # among ties arbitrarily, which would make results depend on numpy internals.
    threshold = values[np.argpartition(-values, m - 1)[m - 1]]
    above = np.flatnonzero(values > threshold)
    equal = np.flatnonzero(values == threshold)[: m - above.shape[0]]
    chosen = np.concatenate([above, equal])
    # lexsort sorts by the last key first: descending value, then ascending index.
    return chosen[np.lexsort((chosen, -values[chosen]))]


def top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask (True = keep) of the ``k`` largest logits.

    Exactly ``k`` entries are kept: when several tokens tie with the k-th largest value, the
    lowest token ids are kept (llama.cpp keeps an arbitrary subset; vLLM keeps all ties).
    ``k <= 0`` or ``k >= len(logits)`` keeps everything.
    """
    x = _as_row(logits)
    n = x.shape[0]
    mask = np.ones(n, dtype=bool) if k <= 0 or k >= n else np.zeros(n, dtype=bool)
    if 0 < k < n:
        mask[_top_indices(x, k)] = True
    return mask


def top_p_mask(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Boolean mask (True = keep) of the nucleus of a probability vector.

    Keeps the smallest set of tokens, taken in order of decreasing probability (ties: lowest
    id first), whose cumulative probability is >= ``top_p`` times the total mass (the total is
    ~1; using it makes float32 rounding harmless). The most likely token is always kept;
    ``top_p >= 1`` keeps everything.
    """
    p = _as_row(probs, "probs").astype(_F32, copy=False)
    n = p.shape[0]
    if top_p >= 1:
        return np.ones(n, dtype=bool)
    target = _F32(top_p) * p.sum(dtype=_F32)
    # The nucleus is usually tiny compared with the vocabulary: look at the top m candidates
    # and widen only if their mass is not enough, instead of sorting the whole vocabulary.
    m = min(n, 64)
    while True:
        order = _top_indices(p, m)
        cumulative = np.cumsum(p[order], dtype=_F32)
        cut = int(np.searchsorted(cumulative, target, side="left"))
        if cut < m or m >= n:
            break
        m = min(n, m * 8)
    mask = np.zeros(n, dtype=bool)
    mask[order[: min(cut, m - 1) + 1]] = True
    return mask


def min_p_mask(probs: np.ndarray, min_p: float) -> np.ndarray:
    """Boolean mask (True = keep) of tokens with ``prob >= min_p * max(prob)``.

    ``min_p <= 0`` keeps everything; the most likely token is always kept.
    """
    p = _as_row(probs, "probs").astype(_F32, copy=False)
    if min_p <= 0:
        return np.ones(p.shape[0], dtype=bool)
    return p >= _F32(min_p) * p.max()


def _ids_array(ids: Sequence[int] | np.ndarray, vocab_size: int, name: str) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise SamplingError(
            f"{name} contains token id {bad}, outside the vocabulary [0, {vocab_size})"
        )
    return arr


def apply_penalties(
    logits: np.ndarray,
    prompt_ids: Sequence[int] | np.ndarray = (),
    output_ids: Sequence[int] | np.ndarray = (),
    *,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> np.ndarray:
    """Return a float32 copy of ``logits`` with the repetition/presence/frequency penalties.

    - repetition (HF/llama.cpp): every token id in ``prompt_ids`` or ``output_ids``, counted
      once: a positive logit is divided by the penalty, a negative one multiplied by it.
    - presence and frequency (OpenAI): over ``output_ids`` only,
      ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``.

    Repetition is applied first, as in vLLM and llama.cpp. The input is never modified.
    """
    x = np.array(_as_row(logits), dtype=_F32, copy=True)
    vocab = x.shape[0]
    if repetition_penalty != 1.0:
        seen = np.unique(
            np.concatenate(
                [
                    _ids_array(prompt_ids, vocab, "prompt_ids"),
                    _ids_array(output_ids, vocab, "output_ids"),
                ]
            )
        )
        if seen.size:
            penalty = _F32(repetition_penalty)
            vals = x[seen]
            x[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    if presence_penalty != 0.0 or frequency_penalty != 0.0:
        out = _ids_array(output_ids, vocab, "output_ids")
        if out.size:
            ids, counts = np.unique(out, return_counts=True)
            # Cast counts first: int64 * float32 would promote the subtraction to float64.
            x[ids] -= counts.astype(_F32) * _F32(frequency_penalty) + _F32(presence_penalty)
    return x


# --------------------------------------------------------------------------------------------
# Sampler


def filtered_probs(x: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The distribution a sampled row is drawn from: temperature, top-k, softmax, top-p,
    min-p (float32, not renormalized; filtered tokens are 0). ``x`` is a penalized float32
    row and is modified."""
    # Shift before dividing so that a tiny temperature sends the other logits to -inf
    # instead of overflowing the top one to +inf (which would make softmax NaN).
    x -= x.max()
    if p.temperature != 1.0:
        x /= _F32(p.temperature)
    if p.top_k:
        x[~top_k_mask(x, p.top_k)] = -np.inf
    probs = softmax(x)
    if p.top_p < 1.0:
        probs[~top_p_mask(probs, p.top_p)] = 0
    if p.min_p > 0.0:
        probs[~min_p_mask(probs, p.min_p)] = 0
    return probs


class Sampler:
    """Samples tokens for one sequence of one request.

    It owns a ``numpy.random.Generator``. With a seed, the generator is derived from
    ``SeedSequence(seed, spawn_key=(index,))``, so the same seed, index and logits give the
    same tokens, and the ``n`` sequences of one request (index 0..n-1) differ from each other.
    Without a seed it is seeded from OS entropy. Greedy sampling consumes no randomness.
    """

    def __init__(self, params: SamplingParams, *, index: int = 0) -> None:
        """Build a sampler for ``params``; ``index`` is the sequence number within ``n``."""
        if not isinstance(params, SamplingParams):
            raise SamplingError(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or index < 0:
            raise SamplingError(f"index must be an integer >= 0, got {index!r}")
        self.params = params
        self.index = int(index)
        self.rng = np.random.default_rng(
            np.random.SeedSequence(params.seed, spawn_key=(self.index,))
        )

    def sample(
        self,
        logits: np.ndarray,
        prompt_ids: Sequence[int] | np.ndarray = (),
        output_ids: Sequence[int] | np.ndarray = (),
    ) -> SampleResult:
        """Pick the next token from one ``[vocab]`` row of logits.

        Args:
            logits: Raw model logits for this sequence, shape ``[vocab]`` (converted to
                float32 if needed; never modified).
            prompt_ids: The prompt's token ids (used by the repetition penalty only).
            output_ids: The tokens generated so far (repetition, presence and frequency
                penalties).

        Returns:
            The chosen token and, if requested, logprobs. Logprobs are the log-softmax of the
            logits after penalties but before temperature and the top-k/top-p/min-p filters:
            they describe the model's (penalized) distribution, independent of how it was
            truncated for sampling, so a greedy and a sampled request report the same values.

        Raises:
            SamplingError: Logits that are not 1-D, contain NaN or +inf, or are all -inf, or
                token ids outside the vocabulary.
        """
        p = self.params
        row = _as_row(logits)
        top = row.max()
        if not np.isfinite(top):
            # max() propagates NaN, so one check covers NaN, +inf and an all -inf row.
            raise SamplingError(f"logits contain NaN or +inf, or are all -inf (max is {top})")
        x = apply_penalties(
            row,
            prompt_ids,
            output_ids,
            repetition_penalty=p.repetition_penalty,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
        )
        if not np.isfinite(x.max()):
            # A tiny repetition_penalty can push a positive logit past the float32 range.
            raise SamplingError(
                "logits overflowed after penalties; use a larger repetition_penalty"
            )

        logprob: float | None = None
        top_logprobs: list[tuple[int, float]] | None = None
        lp = log_softmax(x) if p.logprobs is not None else None

        if p.is_greedy:
            token = int(np.argmax(x))
        else:
            token = self._draw(x)

        if lp is not None:
            logprob = float(lp[token])
            assert p.logprobs is not None
            top_logprobs = [(int(i), float(lp[i])) for i in _top_indices(lp, p.logprobs)]
        return SampleResult(token_id=token, logprob=logprob, top_logprobs=top_logprobs)

    def _draw(self, x: np.ndarray) -> int:
        """Temperature, filters, then one draw. ``x`` is a penalized float32 row (modified)."""
        probs = filtered_probs(x, self.params)
        # Inverse-CDF draw over the surviving tokens only; scaling u by the total renormalizes
        # and never lands on a zero-probability token.
        candidates = np.flatnonzero(probs > 0)
        cdf = np.cumsum(probs[candidates], dtype=_F32)
        u = self.rng.random(dtype=_F32) * cdf[-1]
        pos = min(int(np.searchsorted(cdf, u, side="right")), candidates.shape[0] - 1)
        return int(candidates[pos])
