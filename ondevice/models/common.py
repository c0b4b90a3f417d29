"""What every model family shares: the description of one checkpoint tensor."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    """One logical weight: its dense shape and role ("embedding", "linear", "norm", "bias")."""

    shape: tuple[int, ...]
    kind: str
