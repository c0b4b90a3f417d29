import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_config, write_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (GQA, tied embeddings) with a byte-level BPE tokenizer."""
    return write_model(tmp_path_factory.mktemp("tiny") / "model", tiny_config())


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    # Tests never touch the user's cache, except the shared converted default model.
    if "ONDEVICE_HOME" not in os.environ:
        monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path_factory.getbasetemp() / "home"))
