"""The decision: local (on which backend) or cloud, for one request on one device, and why.

:func:`decide` is pure: it reads a :class:`DeviceProfile`, :class:`ModelRequirements`, a
:class:`Request` and an optional :class:`CloudConfig`, and returns a :class:`Decision`. Rules,
in order:

1. A private request, or mode ``only_local``, never goes to the cloud, not even as a fallback.
2. ``only_cloud`` goes to the cloud or nowhere; ``prefer_cloud`` goes to the cloud when it can.
3. Offline (the endpoint did not answer) means local.
4. No local backend fits (memory, context) -> cloud if allowed.
5. On battery below a threshold (or in low-power mode, or hot): the most efficient local
   backend (Core ML on the Neural Engine when an export exists), else the cloud, else the
   least energy-hungry local backend.
6. Local is too slow for the request's TTFT or tok/s target and the cloud is faster -> cloud
   if allowed.
7. Otherwise the fastest local backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .cloud import CloudConfig, CloudEstimate
from .device import LOCAL_BACKENDS, DeviceProfile
from .estimate import LocalEstimate, estimate_local
from .model import ModelRequirements

MODES = ("prefer_local", "only_local", "prefer_cloud", "only_cloud")
DEFAULT_BATTERY_THRESHOLD = 30.0  # percent


@dataclass(frozen=True)
class Request:
    """The facts of one request that matter for placing it.

    ``private`` requests never leave the device. ``ttft_target_s`` and ``min_tokens_per_s``
    are latency targets (None: none); ``max_cost_usd`` caps what the cloud may cost.
    """

    prompt_tokens: int
    max_new_tokens: int = 256
    private: bool = False
    ttft_target_s: float | None = None
    min_tokens_per_s: float | None = None
    max_cost_usd: float | None = None
    mode: str = "prefer_local"

    def __post_init__(self) -> None:
        from ..errors import PolicyConfigError

        if self.mode not in MODES:
            raise PolicyConfigError(f"unknown inference mode {self.mode!r} "
                                    f"(known: {', '.join(MODES)})")
        if self.prompt_tokens < 0 or self.max_new_tokens < 1:
            raise PolicyConfigError(f"a request needs prompt_tokens >= 0 and max_new_tokens >= 1"
                                    f", got {self.prompt_tokens} and {self.max_new_tokens}")

    @property
    def cloud_permitted(self) -> bool:
        """Whether this request may ever reach a cloud endpoint (rule 1)."""
        return not self.private and self.mode != "only_local"


@dataclass(frozen=True)
class Decision:
    """Where a request runs and why.

    ``target`` is ``"local"``, ``"cloud"`` or ``"refuse"`` (nowhere it may run; ``reasons``
    say why). ``fallback`` is where to go if the target fails at run time (``"cloud"``,
    ``"local"`` or None), already restricted to what the request allows.
    """

    target: str
    backend: str | None
    endpoint: str | None
    estimates: tuple[LocalEstimate, ...]
    cloud: CloudEstimate | None
    reasons: tuple[str, ...]
    fallback: str | None = None
    fallback_backend: str | None = None
    request: Request | None = field(default=None, compare=False)

    @property
    def where(self) -> str:
        """``local:mlx``, ``cloud:https://...`` or ``refused``."""
        if self.target == "local":
            return f"local:{self.backend}"
        if self.target == "cloud":
            return f"cloud:{self.endpoint}"
        return "refused"

    def message(self) -> str:
        """One line for an error when the request is refused."""
        return "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "backend": self.backend, "endpoint": self.endpoint,
            "fallback": self.fallback, "fallback_backend": self.fallback_backend,
            "reasons": list(self.reasons),
            "estimates": {e.backend: e.to_dict() for e in self.estimates},
            "cloud": self.cloud.to_dict() if self.cloud else None,
        }


def decide(profile: DeviceProfile, model: ModelRequirements, request: Request,
           cloud_config: CloudConfig | None = None, *,
           battery_threshold: float = DEFAULT_BATTERY_THRESHOLD) -> Decision:
    """Place ``request`` for ``model`` on ``profile``: a local backend, the cloud, or nowhere.

    Pure: no I/O. ``profile.online`` is the endpoint's reachability (None: unknown, assumed
    reachable; the caller probes only requests that may go to the cloud).
    """
    estimates = tuple(estimate_local(profile, model, b, request.prompt_tokens,
                                     request.max_new_tokens) for b in LOCAL_BACKENDS)
    runnable = [e for e in estimates if e.runnable]
    fastest = min(runnable, key=lambda e: e.total_s, default=None)
    reasons: list[str] = []

    # Rule 1 and the cloud's own conditions.
    cloud_est = (cloud_config.estimate(request.prompt_tokens, request.max_new_tokens)
                 if cloud_config else None)
    cloud_ok, cloud_why = True, ""
    if request.private:
        cloud_ok, cloud_why = False, "the request is private: it never leaves the device"
    elif request.mode == "only_local":
        cloud_ok, cloud_why = False, "mode only_local: the cloud is not allowed"
    elif cloud_config is None:
        cloud_ok, cloud_why = False, "no cloud endpoint is configured"
    elif profile.online is False:
        cloud_ok, cloud_why = False, f"offline: {cloud_config.base_url} is unreachable"
    elif (request.max_cost_usd is not None and cloud_est is not None
          and cloud_est.cost_usd > request.max_cost_usd):
        cloud_ok, cloud_why = False, (f"the cloud would cost ${cloud_est.cost_usd:.4f}, over the "
                                      f"ceiling of ${request.max_cost_usd:.4f}")
    endpoint = cloud_config.base_url if cloud_config else None

    def local(est: LocalEstimate, why: str) -> Decision:
        reasons.append(why)
        fb = "cloud" if cloud_ok else None
        if not cloud_ok and cloud_why:
            reasons.append(f"no cloud fallback: {cloud_why}")
        return Decision("local", est.backend, None, estimates, cloud_est, tuple(reasons),
                        fb, None, request)

    def cloud(why: str) -> Decision:
        reasons.append(why)
        fb_est = _fallback_local(runnable, request)
        return Decision("cloud", None, endpoint, estimates, cloud_est, tuple(reasons),
                        "local" if fb_est else None, fb_est.backend if fb_est else None, request)

    def refuse(why: str) -> Decision:
        reasons.append(why)
        return Decision("refuse", None, None, estimates, cloud_est, tuple(reasons), None, None,
                        request)

    # Rule 2: the cloud modes.
    if request.mode == "only_cloud":
        if cloud_ok:
            return cloud("mode only_cloud")
        return refuse(f"mode only_cloud, but {cloud_why}")
    if request.mode == "prefer_cloud":
        if cloud_ok:
            return cloud("mode prefer_cloud")
        reasons.append(f"mode prefer_cloud, but {cloud_why}")

    # Rules 3-4: nothing local can take it.
    if fastest is None:
        why = _why_no_local(estimates)
        if cloud_ok:
            return cloud(f"no local backend can run it ({why})")
        return refuse(f"no local backend can run it ({why}), and {cloud_why}")

    # Rule 5 comes before speed: a constrained battery trades speed for energy.
    constrained = _power_constrained(profile, battery_threshold)
    if constrained:
        frugal = min(runnable, key=lambda e: (e.energy_rank, e.total_s))
        if frugal.processor == "ane":
            return local(frugal, f"{constrained}: {frugal.backend} on the Neural Engine uses the "
                                 "least energy")
        if cloud_ok:
            why = ("no Core ML export of this model" if profile.has_neural_engine
                   and "coreml" in profile.backends else "no Neural Engine backend here")
            return cloud(f"{constrained}: the cloud spares the battery ({why})")
        return local(frugal, f"{constrained}: {frugal.backend} ({frugal.processor}) is the "
                             "least energy-hungry local backend")

    # Rule 6: latency targets.
    misses = _misses(fastest, request)
    if misses and cloud_ok and cloud_est is not None and _cloud_better(cloud_est, fastest, request):
        return cloud(f"local is too slow: {misses}; the cloud is estimated faster")
    if misses:
        reasons.append(f"local misses a target ({misses}) but the cloud is "
                       + ("not faster" if cloud_ok else f"not an option: {cloud_why}"))
    return local(fastest, f"{fastest.backend} fits ({_gb(fastest.memory_needed)} of "
                          f"{_gb(fastest.memory_usable)} usable) and is the fastest local "
                          f"backend (~{fastest.decode_tps:.0f} tok/s decode, "
                          f"TTFT ~{fastest.ttft_s:.2f} s)")


def _fallback_local(runnable: list[LocalEstimate], request: Request) -> LocalEstimate | None:
    """The local backend a cloud request falls back to on a network failure."""
    if request.mode == "only_cloud":
        return None
    return min(runnable, key=lambda e: e.total_s, default=None)


def _power_constrained(profile: DeviceProfile, threshold: float) -> str:
    if profile.low_power_mode:
        return "low-power mode"
    if profile.thermal_state in ("serious", "critical"):
        return f"thermal state {profile.thermal_state}"
    if profile.on_battery and profile.battery_percent is not None \
            and profile.battery_percent < threshold:
        return f"on battery at {profile.battery_percent:.0f}% (< {threshold:.0f}%)"
    return ""


def _misses(est: LocalEstimate, request: Request) -> str:
    out = []
    if request.ttft_target_s is not None and est.ttft_s > request.ttft_target_s:
        out.append(f"TTFT ~{est.ttft_s:.2f} s > {request.ttft_target_s:.2f} s")
    if request.min_tokens_per_s is not None and est.decode_tps < request.min_tokens_per_s:
        out.append(f"~{est.decode_tps:.1f} tok/s < {request.min_tokens_per_s:.1f} tok/s")
    return ", ".join(out)


def _cloud_better(cloud: CloudEstimate, local: LocalEstimate, request: Request) -> bool:
    better_ttft = request.ttft_target_s is None or cloud.ttft_s < local.ttft_s
    better_tps = request.min_tokens_per_s is None or cloud.decode_tps > local.decode_tps
    return better_ttft and better_tps


def _why_no_local(estimates: tuple[LocalEstimate, ...]) -> str:
    present = [e for e in estimates if e.processor]
    shown = present or list(estimates)
    return "; ".join(f"{e.backend}: {e.why}" for e in shown if e.why)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
