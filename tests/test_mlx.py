"""The MLX backend beyond single ops (those are in test_conformance.py): registry and device
selection, lazy evaluation with in-place KV updates, engine tokens equal to NumPy's with quantized
weights kept or expanded (the equivalence guarantees are in test_engine_backends.py), the golden check on MLX's CPU device at float32, and interop with mlx-lm both ways."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from test_engine import GREEDY, mixed_prompts, run_all
from tiny import random_weights, tiny_config, write_model

import ondevice
from ondevice.apps.cli import cli
from ondevice.backends import _auto_order, available_backends, resolve
from ondevice.backends.numpy_backend import NumpyBackend
from ondevice.batch import BatchInput
from ondevice.engine import Engine
from ondevice.errors import BackendUnavailableError
from ondevice.modeldir import ModelDir
from ondevice.sampling import SamplingParams
from ondevice.settings import MlxOptions

mx = pytest.importorskip("mlx.core")
if not available_backends()["mlx"][0]:
    pytest.skip(available_backends()["mlx"][1], allow_module_level=True)

from ondevice.backends import mlx_backend  # noqa: E402
from ondevice.backends.mlx_backend import MlxBackend  # noqa: E402


def cpu_f32(**kw) -> MlxOptions:
    return MlxOptions(device="cpu", dtype="float32", **kw)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return ModelDir(tiny_model_dir)


@pytest.fixture(scope="module")
def q4_dir(tmp_path_factory):
    return ModelDir(write_model(tmp_path_factory.mktemp("q4"), tiny_config(), bits=4,
                                group_size=32))


# -- registry, devices ----------------------------------------------------------------------
def test_registry_reports_the_device():
    ok, device = available_backends()["mlx"]
    assert ok and device == ("gpu (Metal)" if mlx_backend._metal() else "cpu")
    r = CliRunner().invoke(cli, ["backends"])
    assert r.exit_code == 0
    line = next(ln for ln in r.output.splitlines() if ln.startswith("mlx"))
    assert "available" in line and "unavailable" not in line and device in line


def test_auto_prefers_mlx_only_on_apple_silicon():
    # Elsewhere the packed-weight cpu backend comes first, the NumPy reference after it.
    assert _auto_order("darwin", "arm64") == ("mlx", "cpu", "numpy")
    assert _auto_order("linux", "x86_64") == ("cpu", "numpy", "mlx")
    assert _auto_order("linux", "aarch64")[0] == "cpu"
    assert _auto_order("darwin", "x86_64")[0] == "cpu"
    on_apple_silicon = (sys.platform, platform.machine()) == ("darwin", "arm64")
    assert resolve("auto") == ("mlx" if on_apple_silicon else "cpu")


def test_missing_mlx_is_a_clear_error(tiny_model_dir):
    code = (
        "import sys; sys.modules['mlx'] = None\n"
        "from ondevice.apps.cli import cli\n"
        f"cli(['generate', '-m', {str(tiny_model_dir)!r}, '--backend', 'mlx', '-p', 'hi'])\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "backend 'mlx' needs 'mlx" in p.stderr and "not installed" in p.stderr


def test_device_and_dtype_choices(model_dir, monkeypatch):
    # The environment is read once, into the options' defaults (ondevice/settings.py).
    monkeypatch.setenv("ONDEVICE_MLX_DEVICE", "tpu")
    ok, why = MlxBackend.availability()
    assert not ok and "'tpu'" in why
    monkeypatch.setenv("ONDEVICE_MLX_DEVICE", "cpu")
    assert MlxBackend.availability() == (True, "cpu")
    with pytest.raises(BackendUnavailableError, match="float64"):
        MlxBackend(model_dir, num_blocks=4, options=MlxOptions(dtype="float64"))
    be = MlxBackend(model_dir, num_blocks=4, options=MlxOptions(device="cpu"))
    assert be.device_name == "cpu" and be.dtype_name == "float32"
    assert MlxBackend.kv_bytes_per_token(model_dir.config) == \
        NumpyBackend.kv_bytes_per_token(model_dir.config)


# -- lazy evaluation, in-place KV ------------------------------------------------------------
def _prefill_then_decode(be, prompt: list[int], steps: int) -> list[np.ndarray]:
    bs = be.block_size
    blocks = list(range(1, 2 + (len(prompt) + steps) // bs))
    out = [be.forward(BatchInput.build([(prompt, 0, blocks)], bs))]
    for i in range(steps):
        tok = int(out[-1][-1].argmax())
        out.append(be.forward(BatchInput.build([([tok], len(prompt) + i, blocks)], bs)))
    return out


def test_one_evaluation_per_step(model_dir, monkeypatch):
    be = MlxBackend(model_dir, num_blocks=16, block_size=8, options=cpu_f32())
    calls = []
    real = mx.eval
    monkeypatch.setattr(mx, "eval", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    _prefill_then_decode(be, list(range(3, 40)), 3)
    assert len(calls) == 4


def test_kv_writes_update_the_pool_in_place(model_dir):
    # A pool of 2 x 2 layers x 64 MiB: a step that copied a layer's pool would show in the peak.
    c = model_dir.config
    per_slot = c.num_key_value_heads * c.head_dim * 4
    blocks = (64 << 20) // (per_slot * 16)
    be = MlxBackend(model_dir, num_blocks=blocks, block_size=16, options=cpu_f32())
    _prefill_then_decode(be, list(range(3, 30)), 1)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    _prefill_then_decode(be, list(range(3, 30)), 2)
    assert mx.get_peak_memory() - base < (16 << 20)


@pytest.mark.parametrize("quantized", [False, True], ids=["f32", "q4"])
def test_cpu_stream_split_matches_one_stream(model_dir, q4_dir, monkeypatch, quantized):
    """Every matrix split over 1, 2 or 3 CPU streams, prefill cut into pieces: same logits."""
    md = q4_dir if quantized else model_dir
    monkeypatch.setattr(mlx_backend, "SPLIT_MIN_OUT", 1)
    monkeypatch.setattr(mlx_backend, "MIN_PIECE_ROWS", 8)
    prompt = np.random.default_rng(0).integers(3, md.config.vocab_size, 70).tolist()
    runs = [_prefill_then_decode(MlxBackend(md, num_blocks=32, block_size=8,
                                            options=cpu_f32(quantized="keep", threads=t)), prompt, 3)
            for t in (1, 2, 3)]
    ref = _prefill_then_decode(NumpyBackend(md, num_blocks=32, block_size=8), prompt, 3)
    for run in runs:
        for got, want in zip(run, ref, strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_gpu_code_paths_on_the_cpu_device(tmp_path):
    """mx.fast.rope (positions as per-row offsets, llama3-scaled periods) and the compiled
    silu_mul, which the GPU uses, give the CPU path's logits too (checkable without a Mac)."""
    cfg = tiny_config(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64})
    md = ModelDir(write_model(tmp_path, cfg, tokenizer=False))
    prompt = np.random.default_rng(1).integers(3, cfg["vocab_size"], 90).tolist()
    be = MlxBackend(md, num_blocks=32, block_size=8, options=cpu_f32())
    be.ops.fast_rope = be.ops.fuse = True
    ref = NumpyBackend(md, num_blocks=32, block_size=8)
    for got, want in zip(_prefill_then_decode(be, prompt, 3), _prefill_then_decode(ref, prompt, 3),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-5)


# -- the engine on MLX (batched = alone etc. for every backend: test_engine_backends.py) -------
def make_engine(md, num_blocks=512, block_size=8, caching=True, quantized=None,
                **kw) -> Engine:
    backend = MlxBackend(md, num_blocks=num_blocks, block_size=block_size,
                         options=cpu_f32(quantized=quantized))
    return Engine(backend, md.tokenizer, context_length=md.config.context_length,
                  enable_prefix_caching=caching, model_id="tiny", **kw)


@pytest.mark.parametrize("quantized", [None, "expand", "keep"], ids=["f32", "q4-expanded",
                                                                       "q4-kept"])
def test_engine_tokens_match_numpy(model_dir, q4_dir, quantized):
    md = q4_dir if quantized else model_dir
    prompts = mixed_prompts(md.config.vocab_size, count=6, lengths=(4, 90), seed=9)
    reqs = [(p, GREEDY) for p in prompts]
    np_engine = Engine(NumpyBackend(md, num_blocks=512, block_size=8), None,
                       context_length=md.config.context_length, model_id="tiny")
    assert run_all(make_engine(md, quantized=quantized), reqs) == run_all(np_engine, reqs)


def test_quantized_weights_expanded_on_the_cpu_only_when_they_fit(q4_dir, monkeypatch):
    """auto: a small quantized model is expanded to dense matrices on the CPU device (MLX's
    CPU quantized kernel is scalar code); one that would not fit in a quarter of the available
    memory keeps its packed weights and mx.quantized_matmul."""
    def quantized_parts(be):
        return sum(isinstance(p, mlx_backend._Linear) and p.quant is not None
                   for layer in be.params.layers for p in vars(layer).values())

    small = MlxBackend(q4_dir, num_blocks=8, block_size=8, options=cpu_f32())
    assert small.expanded and quantized_parts(small) == 0
    monkeypatch.setattr(mlx_backend, "available_memory_bytes", lambda: 1 << 20)
    tight = MlxBackend(q4_dir, num_blocks=8, block_size=8, options=cpu_f32())
    assert not tight.expanded and quantized_parts(tight) > 0
    assert MlxBackend(q4_dir, num_blocks=8, block_size=8,
                      options=cpu_f32(quantized="expand")).expanded
    kept = MlxBackend(q4_dir, num_blocks=8, block_size=8, options=cpu_f32(quantized="keep"))
    assert not kept.expanded and quantized_parts(kept) > 0
    with pytest.raises(BackendUnavailableError, match="quantized='sometimes'"):
        MlxBackend(q4_dir, num_blocks=8, block_size=8, options=cpu_f32(quantized="sometimes"))


def test_cli_generate_with_mlx(tiny_model_dir):
    r = CliRunner().invoke(cli, ["generate", "-m", str(tiny_model_dir), "--backend", "mlx", "-p",
                                 "hi", "-n", "5", "--temperature", "0", "--ignore-eos", "--json",
                                 "--kv-memory", "8MiB"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["backend"] == "mlx" and len(data["generated_ids"]) == 5


# -- the real model: golden check on the CPU device at float32 ---------------------------------
@pytest.fixture(scope="module")
def real_mlx(real_model_dir):
    model = ondevice.load(real_model_dir, backend="mlx", kv_memory="64MiB", options=cpu_f32())
    assert model.runtime.backend.device_name == "cpu"
    assert model.runtime.backend.dtype_name == "float32"
    yield model
    model.close()


@pytest.mark.real_model
def test_golden_on_mlx_cpu_float32(real_mlx, golden_cases):
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    for case in golden_cases:
        if "messages" in case:
            ids = real_mlx.tokenizer.encode_chat(case["messages"], add_generation_prompt=True)
        else:
            ids = real_mlx.tokenizer.encode(case["prompt"], add_special_tokens=False)
        assert ids == case["prompt_ids"]
        logits = real_mlx.runtime.logits_for(case["prompt_ids"])[-1]
        assert logits.dtype == np.float32
        assert np.argsort(-logits, kind="stable")[:5].tolist() == case["top5_ids"]
        err = np.abs(logits[case["top5_ids"]] - np.asarray(case["top5_logits"])).max()
        assert err < 1e-3, err
        got = [c.token_id for c in real_mlx.stream(case["prompt_ids"], params)]
        assert got == case["greedy_ids"], case.get("prompt_text")


# -- interop with mlx-lm ---------------------------------------------------------------------
PROMPT = [5, 17, 33, 80, 120, 9, 44, 250, 3]
STEPS = 24


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Hugging Face checkpoint with sharper (x2) weights, so greedy text varies."""
    cfg = tiny_config()
    w = {k: v * 2 if v.ndim == 2 else v for k, v in random_weights(cfg, 0).items()}
    return write_model(tmp_path_factory.mktemp("hf") / "tiny-hf", cfg, w)


def _mlx_lm_greedy(path, float32: bool = False) -> list[int]:
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx_lm.generate import generate_step

    model, _tokenizer = mlx_lm.load(str(path))  # loads the tokenizer files too
    if float32:
        model.set_dtype(mx.float32)
    steps = generate_step(mx.array(PROMPT), model, max_tokens=STEPS)
    return [int(tok) for tok, _ in steps]


def _ondevice_greedy(path) -> list[int]:
    model = ondevice.load(path, backend="mlx", kv_memory="8MiB",
                          options=MlxOptions(device="cpu"))
    try:
        params = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True)
        return [c.token_id for c in model.stream(PROMPT, params)]
    finally:
        model.close()


def test_our_q4_conversion_generates_in_mlx_lm(hf_dir, tmp_path):
    from ondevice.converters import convert

    out = convert(hf_dir, tmp_path / "tiny-q4", quantize="q4", group_size=64, progress=False)
    ours = _ondevice_greedy(out)
    assert len(set(ours)) > 8  # a varied continuation, so that agreement means something
    assert _mlx_lm_greedy(out) == ours


def test_mlx_community_q4_directory_runs_in_ondevice(hf_dir, tmp_path):
    mlx_lm = pytest.importorskip("mlx_lm")
    out = tmp_path / "tiny-4bit"
    # What mlx-community publishes: bfloat16 dense weights and scales, 4-bit groups of 64,
    # a sharded-index layout and its own config keys.
    mlx_lm.convert(str(hf_dir), str(out), quantize=True, q_group_size=64, q_bits=4,
                   dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    ours = _ondevice_greedy(out)
    assert len(set(ours)) > 8
    # mlx-lm computes in the checkpoint's bfloat16; at float32 it does our arithmetic.
    assert _mlx_lm_greedy(out, float32=True) == ours
