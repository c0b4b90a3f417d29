"""A model whose requests are placed one by one by the policy: on the local engine or on the
cloud endpoint, with fallbacks where the request allows them.

Built by ``ondevice.load(model, policy=...)``. It has the :class:`ondevice.Model` methods an app
uses (``stream``, ``generate``, ``encode_prompt``, ``tokenizer``, ``timings``, ``stats``,
``close``) and tells where the last reply ran in :attr:`RoutedModel.last_route`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..api import Chunk, Model, Prompt, Timings, load, sampling_params
from ..errors import BackendUnavailableError, CloudError, PolicyError, RequestError
from ..sampling import SamplingParams
from ..settings import BackendOptions, EngineConfig
from .cloud import CloudChunk, CloudClient, CloudConfig, reachable
from .decide import DEFAULT_BATTERY_THRESHOLD, MODES, Decision, Request, decide
from .device import DeviceProfile
from .model import ModelRequirements

# What a local failure looks like: out of memory, a prompt past the KV pool or context, a
# backend that cannot start. Anything else is a bug and is raised as it is.
LOCAL_FAILURES = (MemoryError, RequestError, BackendUnavailableError)
# Chat --policy names for the inference modes.
POLICY_NAMES = {"auto": "prefer_local", "local": "only_local", "cloud": "prefer_cloud"}


@dataclass(frozen=True)
class Policy:
    """How a routed model places requests.

    Args:
        mode: the default inference mode (``prefer_local``, ``only_local``, ``prefer_cloud``,
            ``only_cloud``); a request may override it.
        private: the default privacy of requests (private requests never leave the device).
        cloud: the cloud endpoint (None: no cloud; :meth:`named` loads the configured one).
        profile: the device (None: detected on this machine).
        fallback: retry on the other side when one side fails, where the request allows it.
        battery_threshold: battery percent below which energy comes before speed.
        ttft_target_s, min_tokens_per_s, max_cost_usd: default request targets.
    """

    mode: str = "prefer_local"
    private: bool = False
    cloud: CloudConfig | None = None
    profile: DeviceProfile | None = None
    fallback: bool = True
    battery_threshold: float = DEFAULT_BATTERY_THRESHOLD
    ttft_target_s: float | None = None
    min_tokens_per_s: float | None = None
    max_cost_usd: float | None = None
    probe_timeout: float = 1.0

    @classmethod
    def named(cls, name: str, *, cloud_url: str | None = None, **kwargs: Any) -> Policy:
        """``auto`` (prefer local), ``local`` (only local), ``cloud`` (prefer cloud), or a mode
        name; the cloud endpoint from ``cloud_url`` or the cloud config."""
        mode = POLICY_NAMES.get(name, name)
        if mode not in MODES:
            raise PolicyError(f"unknown policy {name!r} (auto, local, cloud, or one of "
                              f"{', '.join(MODES)})")
        cloud = kwargs.pop("cloud", None) or CloudConfig.load(url=cloud_url)
        return cls(mode=mode, cloud=cloud, **kwargs)


@dataclass(frozen=True)
class RouteInfo:
    """Where one reply ran: ``where`` is ``local:BACKEND`` or ``cloud:URL``; ``fallback_from``
    names the side that failed first (with ``error``), when a fallback happened."""

    where: str
    decision: Decision = field(repr=False)
    fallback_from: str | None = None
    error: str | None = None

    def describe(self) -> str:
        if self.fallback_from:
            return f"{self.where} (fallback after {self.fallback_from} failed: {self.error})"
        return self.where

    def notice(self) -> str:
        """One line for a user when this reply fell back: what failed, why, where it runs."""
        why = " ".join(str(self.error or "unknown error").split())
        return f"({self.fallback_from} failed: {why}; falling back to {self.where})"


class RoutedModel:
    """A model placed per request by a :class:`Policy` (see the module docstring)."""

    routes_requests = True

    def __init__(self, path: Path, policy: Policy, backend: str = "auto",
                 load_kwargs: dict[str, Any] | None = None):
        from ..modeldir import ModelDir

        self.path = Path(path)
        self.policy = policy
        self.requirements = ModelRequirements.from_model_dir(self.path)
        profile = policy.profile or DeviceProfile.detect()
        if backend != "auto":  # the caller chose a backend: the policy only says local or cloud
            profile = replace(profile, backends=tuple(b for b in profile.backends if b == backend)
                              or (backend,))
        self.profile = profile
        self._detected = policy.profile is None
        self._md = ModelDir(self.path)
        self._load_kwargs = dict(load_kwargs or {})
        self._local: Model | None = None
        self._lock = threading.Lock()
        self._cloud = CloudClient(policy.cloud) if policy.cloud else None
        self.timings = Timings()
        self.last_route: RouteInfo | None = None
        self.routes: dict[str, int] = {}
        # Called with the route when a reply falls back to the other side, before its first
        # chunk (the CLI prints RouteInfo.notice() on stderr): a fallback is never silent.
        self.on_fallback: Callable[[RouteInfo], None] | None = None

    def __repr__(self) -> str:
        cloud = self.policy.cloud.base_url if self.policy.cloud else None
        return f"RoutedModel({self.path.name!r}, mode={self.policy.mode!r}, cloud={cloud!r})"

    # -- Model-like surface ------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self._md.tokenizer

    @property
    def config(self):
        return self._md.config

    @property
    def backend(self) -> str:
        """The local backend in use (or that would be), and the cloud when one is set."""
        local = self._local.backend if self._local else "local (not loaded)"
        return f"{local}, cloud {self.policy.cloud.base_url}" if self.policy.cloud else local

    @property
    def context_limit(self) -> int:
        if self._local is not None:
            return self._local.context_limit
        return self.requirements.context_length

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return Model.encode_prompt(self, prompt)  # type: ignore[arg-type]

    def stats(self) -> dict[str, Any]:
        """Where the last reply ran, replies per place, and the local engine's metrics."""
        out: dict[str, Any] = {
            "last_reply_ran_on": self.last_route.describe() if self.last_route else "none yet",
            "last_decision_reasons": " | ".join(self.last_route.decision.reasons)
            if self.last_route else "",
            "replies_by_place": dict(self.routes),
        }
        if self._local is not None:
            out.update(self._local.stats())
        return out

    def save_prompt_cache(self, path, prompt: Prompt) -> int:
        """See :meth:`ondevice.Model.save_prompt_cache` (a local engine feature)."""
        return self.load_local().save_prompt_cache(path, prompt)

    def load_prompt_cache(self, path) -> int:
        """See :meth:`ondevice.Model.load_prompt_cache` (a local engine feature)."""
        return self.load_local().load_prompt_cache(path)

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
        if self._cloud is not None:
            self._cloud.close()

    def __enter__(self) -> RoutedModel:  # like Model: ``with ondevice.load(policy=...) as m``
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load_local(self) -> Model:
        """The local model, loaded on first use on the backend the policy picks for it."""
        with self._lock:
            if self._local is not None:
                return self._local
            # The backend for a typical request (weights dominate; the size barely matters).
            n = max(min(256, self.requirements.context_length // 4), 1)
            typical = Request(prompt_tokens=n, max_new_tokens=n, mode="only_local")
            d = decide(self.profile, self.requirements, typical, None)
            if d.backend is None:
                raise BackendUnavailableError(f"no local backend can run {self.path.name}: "
                                              f"{d.message()}")
            try:
                kwargs = dict(self._load_kwargs)
                opts = kwargs.get("options")
                if isinstance(opts, BackendOptions) and opts.backend != d.backend:
                    kwargs.pop("options")  # options of another backend than the one chosen
                self._local = load(self.path, d.backend, quiet=True, **kwargs)
            except LOCAL_FAILURES:
                # That backend cannot run here after all: later decisions must not count on it.
                self.profile = replace(self.profile, backends=tuple(
                    b for b in self.profile.backends if b != d.backend))
                raise
            # From now on the estimates are those of the backend actually loaded.
            self.profile = replace(self.profile, backends=(self._local.backend,))
            return self._local

    # -- routing -----------------------------------------------------------------------------
    def request_for(self, n_prompt: int, params: SamplingParams, **overrides: Any) -> Request:
        p = self.policy
        fields = dict(prompt_tokens=n_prompt, max_new_tokens=params.max_tokens,
                      private=p.private, ttft_target_s=p.ttft_target_s,
                      min_tokens_per_s=p.min_tokens_per_s, max_cost_usd=p.max_cost_usd,
                      mode=p.mode)
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return Request(**fields)

    def decide(self, request: Request) -> Decision:
        """The decision for ``request`` now: probes the cloud only if the request may use it."""
        profile = self.profile
        if self._detected:
            profile = _refresh_power(profile)
        online = None
        if self.policy.cloud is not None and request.cloud_permitted:
            online = reachable(self.policy.cloud, self.policy.probe_timeout)
        profile = replace(profile, online=online)
        return decide(profile, self.requirements, request, self.policy.cloud,
                      battery_threshold=self.policy.battery_threshold)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *,
               private: bool | None = None, mode: str | None = None,
               ttft_target_s: float | None = None, min_tokens_per_s: float | None = None,
               max_cost_usd: float | None = None, **sampling: Any) -> Iterator[Chunk]:
        """Stream the reply to ``prompt`` from wherever the policy places it (see
        :meth:`ondevice.Model.stream` for prompts and sampling). ``private``, ``mode`` and the
        targets override the policy's defaults for this request. Raises :class:`PolicyError`
        when the request may run nowhere, or when it failed where it ran and may not fall
        back."""
        params = sampling_params(params, **sampling)
        ids = self.encode_prompt(prompt)
        request = self.request_for(len(ids), params, private=private, mode=mode,
                                   ttft_target_s=ttft_target_s, min_tokens_per_s=min_tokens_per_s,
                                   max_cost_usd=max_cost_usd)
        decision = self.decide(request)
        if decision.target == "refuse":
            self._record(RouteInfo("refused", decision))
            raise PolicyError(f"cannot run this request: {decision.message()}")
        allow_fallback = self.policy.fallback
        if decision.target == "local":
            yield from self._local_then_cloud(prompt, ids, params, decision, allow_fallback)
        else:
            yield from self._cloud_then_local(prompt, ids, params, decision, allow_fallback)

    def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                 **kwargs: Any) -> str | list[str]:
        """The whole reply (see :meth:`stream`); a list of replies when n > 1."""
        texts: dict[int, list[str]] = {}
        n = params.n if params else int(kwargs.get("n", 1))
        for chunk in self.stream(prompt, params, **kwargs):
            texts.setdefault(chunk.index, []).append(chunk.text)
        replies = ["".join(texts.get(i, [])) for i in range(n)]
        return replies[0] if n == 1 else replies

    def _record(self, route: RouteInfo, count: int = 1) -> None:
        """Set the last route; ``count`` adds to (or, -1, takes back from) its tally."""
        self.last_route = route
        key = route.where if route.fallback_from is None else f"{route.where} (fallback)"
        self.routes[key] = self.routes.get(key, 0) + count
        if not self.routes[key]:
            del self.routes[key]

    def _fell_back(self, route: RouteInfo) -> None:
        self._record(route)
        if self.on_fallback is not None:
            self.on_fallback(route)

    # -- the two sides -----------------------------------------------------------------------
    def _local_then_cloud(self, prompt, ids, params, decision: Decision, allow: bool):
        yielded = False
        try:
            model = self.load_local()
            where = f"local:{model.backend}"
            for chunk in model.stream(ids, params):
                if not yielded:
                    self._record(RouteInfo(where, decision))
                yielded = True
                yield chunk
            if not yielded:
                self._record(RouteInfo(where, decision))
            self.timings = model.timings
            return
        except LOCAL_FAILURES as err:
            local_err = err
        reason = f"{type(local_err).__name__}: {local_err}"
        if yielded or not (allow and decision.fallback == "cloud"):
            if decision.fallback != "cloud" and decision.request and \
                    not decision.request.cloud_permitted:
                raise PolicyError(f"local generation failed ({reason}); the request may not go "
                                  "to the cloud (private or only_local)") from local_err
            raise local_err
        self._fell_back(RouteInfo(f"cloud:{decision.endpoint}", decision,
                                  f"local:{decision.backend}", reason))
        yield from self._cloud_chunks(prompt, ids, params)

    def _cloud_then_local(self, prompt, ids, params, decision: Decision, allow: bool):
        assert self.policy.cloud is not None
        route = RouteInfo(f"cloud:{decision.endpoint}", decision)
        self._record(route, 0)
        parts: list[str] = []
        try:
            for chunk in self._cloud_chunks(prompt, ids, params):
                if not parts:
                    self._record(route)  # counted once something arrived
                parts.append(chunk.text)
                yield chunk
            if not parts:
                self._record(route)
            return
        except CloudError as err:
            cloud_err = err
        if not (allow and decision.fallback == "local") or (parts and params.n > 1):
            raise cloud_err
        if parts:  # the reply is the fallback's now: count it there only
            self._record(route, -1)
        # Continue locally from where the cloud stopped: the prompt plus the text so far.
        partial = "".join(parts)
        done = self.tokenizer.encode(partial) if partial else []
        remaining = params.max_tokens - len(done)
        model = self.load_local()
        self._fell_back(RouteInfo(f"local:{model.backend}", decision,
                                  f"cloud:{decision.endpoint}", str(cloud_err)))
        if remaining <= 0:
            yield Chunk("", None, "length")
            return
        for chunk in model.stream(ids + done, replace(params, max_tokens=remaining)):
            yield chunk
        self.timings = model.timings

    def _cloud_chunks(self, prompt, ids, params: SamplingParams) -> Iterator[Chunk]:
        assert self._cloud is not None
        body: dict[str, Any] = {"max_tokens": params.max_tokens, "temperature": params.temperature,
                                "top_p": params.top_p}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.n > 1:
            body["n"] = params.n
        if isinstance(prompt, str):
            source = self._cloud.stream_completion(prompt, **body)
        elif ids and list(prompt) == ids:  # token ids: send their text
            source = self._cloud.stream_completion(self.tokenizer.decode(ids), **body)
        else:
            source = self._cloud.stream_chat(list(prompt), **body)
        t = Timings(prompt_tokens=len(ids))
        start = time.perf_counter()
        first = None
        text: list[str] = []
        c: CloudChunk
        for c in source:
            now = time.perf_counter()
            if first is None:
                first = now
                t.prefill_seconds = now - start
            t.decode_seconds = now - first
            text.append(c.text)
            yield Chunk(c.text, None, c.finish_reason, index=c.index)
        # The endpoint's token counts are its own; count the reply with the local tokenizer.
        t.generated_tokens = len(self.tokenizer.encode("".join(text))) if text else 0
        self.timings = t


def _refresh_power(profile: DeviceProfile) -> DeviceProfile:
    """The live battery state (it changes while an app runs; the rest of a profile does not)."""
    try:
        import psutil

        battery = psutil.sensors_battery()
    except (ImportError, AttributeError, OSError):
        return profile
    if battery is None:
        return profile
    return replace(profile, battery_percent=float(battery.percent),
                   charging=bool(battery.power_plugged))


def load_routed(model: Any, backend: str, policy: Any, *, engine: EngineConfig | None = None,
                options: Any = None, quiet: bool = False, **engine_fields: Any) -> RoutedModel:
    """``ondevice.load(model, policy=...)``: a :class:`RoutedModel` over ``model`` (a directory,
    a GGUF file, or None for the default model) with the engine settings a local load uses."""
    from ..default_model import resolve_model

    if not isinstance(policy, Policy):
        policy = Policy.named(str(policy))
    engine = (engine or EngineConfig()).merged(**engine_fields)
    path = resolve_model(model, quiet=quiet)
    return RoutedModel(path, policy, backend, dict(engine=engine, options=options))
