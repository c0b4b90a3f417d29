"""Local or cloud, and which backend: per device and per request, with the reasons.

- :class:`DeviceProfile` (detected or loaded from a shipped/own TOML or JSON profile),
  :class:`ModelRequirements` (model directory, Core ML manifest or a published architecture),
  :class:`Request` facts, and the pure :func:`decide` returning a :class:`Decision`.
- :class:`CloudConfig` and :class:`CloudClient` for any OpenAI-compatible endpoint.
- :class:`Policy` and :class:`RoutedModel`: ``ondevice.load(model, policy="auto")``.
"""

from .cloud import CloudChunk, CloudClient, CloudConfig, CloudEstimate, Secret, reachable
from .decide import MODES, Decision, Request, decide
from .device import DeviceProfile, GPUAdapter, shipped_profiles
from .estimate import LocalEstimate, estimate_local
from .model import ModelRequirements, synthetic
from .router import Policy, RoutedModel, RouteInfo, load_routed

__all__ = [
    "load_routed",
    "MODES", "CloudChunk", "CloudClient", "CloudConfig", "CloudEstimate", "Decision",
    "DeviceProfile", "GPUAdapter", "LocalEstimate", "ModelRequirements", "Policy", "Request",
    "RouteInfo", "RoutedModel", "Secret", "decide", "estimate_local", "reachable",
    "shipped_profiles", "synthetic",
]
