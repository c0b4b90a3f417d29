"""Continuous batching over the paged KV cache: requests, scheduler, engine and its fronts."""

from .engine import Engine
from .frontends import AsyncEngine, EngineLoop, SyncEngine
from .request import RequestOutput, Status
from .scheduler import Scheduler

__all__ = ["AsyncEngine", "Engine", "EngineLoop", "RequestOutput", "Scheduler", "Status",
           "SyncEngine"]
