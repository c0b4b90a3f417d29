"""The wgpu backend beyond single ops (those are in test_conformance.py): adapter choice and
listing, one submit per step with cached GPU objects, float16 and quantized paths, tensors split
over several storage bindings, GPU top-k and its use by the engine, engine tokens equal to
NumPy's (batched = alone etc.: test_engine_backends.py), the CLI,
and the golden check on the real model at float32.

Runs for real on whatever adapter wgpu finds (Mesa lavapipe on a machine without a GPU). Under
CI a missing adapter is a failure; elsewhere the module is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from test_engine import GREEDY, mixed_prompts, run_all
from tiny import tiny_config, write_model

import ondevice
from ondevice.apps.cli import cli
from ondevice.backends import available_backends
from ondevice.backends.numpy_backend import NumpyBackend
from ondevice.batch import BatchInput
from ondevice.engine import Engine
from ondevice.errors import BackendUnavailableError, OndeviceError
from ondevice.modeldir import ModelDir
from ondevice.sampling import SamplingParams

pytest.importorskip("wgpu")
_ok, _why = available_backends()["wgpu"]
if not _ok:
    if os.environ.get("CI"):
        pytest.fail(f"wgpu must run in CI: {_why}", pytrace=False)
    pytest.skip(_why, allow_module_level=True)

from ondevice.backends.wgpu import WgpuBackend, WgpuOptions  # noqa: E402
from ondevice.backends.wgpu import adapter as wgpu_adapter  # noqa: E402

F32 = {"options": WgpuOptions(dtype="float32")}
HAS_F16 = "float16" in WgpuBackend.dtypes()


def nmse(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(((got - ref) ** 2).sum() / max((ref**2).sum(), 1e-30))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return ModelDir(tiny_model_dir)


@pytest.fixture(scope="module")
def quant_dirs(tmp_path_factory):
    """Tiny models quantized to q4 (groups of 32) and q8 (groups of 64)."""
    return {bits: ModelDir(write_model(tmp_path_factory.mktemp(f"q{bits}"), tiny_config(),
                                       bits=bits, group_size=gs))
            for bits, gs in ((4, 32), (8, 64))}


def _steps(be, prompt: list[int], decode: int) -> list[np.ndarray]:
    """Logits of a prefill then ``decode`` greedy steps, on any backend."""
    bs = be.block_size
    blocks = list(range(1, 2 + (len(prompt) + decode) // bs))
    out = [be.forward(BatchInput.build([(prompt, 0, blocks)], bs))]
    for i in range(decode):
        tok = int(out[-1][-1].argmax())
        out.append(be.forward(BatchInput.build([([tok], len(prompt) + i, blocks)], bs)))
    return out


# -- adapters -----------------------------------------------------------------------------------
def test_backends_lists_every_adapter_and_the_one_used():
    r = CliRunner().invoke(cli, ["backends"])
    assert r.exit_code == 0, r.output
    lines = [ln.strip() for ln in r.output.splitlines() if "wgpu adapter:" in ln]
    assert len(lines) == len(wgpu_adapter.all_adapters()) >= 1
    assert sum(ln.endswith("<- used") for ln in lines) == 1
    used = wgpu_adapter.adapter_info(wgpu_adapter.choose_adapter())
    assert any(used.describe() in ln and ln.endswith("<- used") for ln in lines)
    wgpu_line = next(ln for ln in r.output.splitlines() if ln.startswith("wgpu "))
    assert "available" in wgpu_line and used.name in wgpu_line


def test_adapter_chosen_by_name(monkeypatch):
    first = wgpu_adapter.adapter_info(wgpu_adapter.all_adapters()[0])
    monkeypatch.setenv("ONDEVICE_WGPU_ADAPTER", first.backend_type.upper())
    ok, device = WgpuBackend.availability()
    assert ok and first.backend_type in device


def test_options_win_over_the_environment(model_dir, monkeypatch):
    first = wgpu_adapter.adapter_info(wgpu_adapter.all_adapters()[0])
    monkeypatch.setenv("ONDEVICE_WGPU_ADAPTER", "no-such-gpu-9000")
    monkeypatch.setenv("ONDEVICE_WGPU_DTYPE", "float64")
    opts = WgpuOptions(adapter=first.backend_type, dtype="float32")
    assert WgpuBackend.availability(opts)[0]
    be = WgpuBackend(model_dir, num_blocks=4, options=opts)
    assert be.dtype_name == "float32" and be.adapter_info.backend_type == first.backend_type
    assert be.describe()["device"] == first.describe()


def test_adapter_probe_prints_nothing_and_leaves_the_environment_alone():
    """Enumerating adapters probes OpenGL through EGL, whose Wayland connection complains on
    stderr without XDG_RUNTIME_DIR (Mesa 25; a relative WAYLAND_DISPLAY makes it look there
    even on a machine without libwayland-egl); the probes run with a private one."""
    code = ("import os; from ondevice.backends.wgpu import adapter_report; "
            "print(len(adapter_report())); print(os.environ.get('XDG_RUNTIME_DIR'))")
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["WAYLAND_DISPLAY"] = "wayland-0"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert "XDG_RUNTIME_DIR" not in p.stderr
    assert p.stdout.split()[1] == "None"


def test_unknown_adapter_is_a_clear_error(model_dir, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("ONDEVICE_WGPU_ADAPTER", "no-such-gpu-9000")
    ok, why = WgpuBackend.availability()
    assert not ok and "'no-such-gpu-9000' matches no adapter" in why and "seen:" in why
    with pytest.raises(BackendUnavailableError, match="no-such-gpu-9000"):
        WgpuBackend(model_dir, num_blocks=4)
    r = CliRunner().invoke(cli, ["generate", "-m", str(tiny_model_dir), "--backend", "wgpu",
                                 "-p", "hi", "-n", "2"])
    assert r.exit_code == 1
    assert "no-such-gpu-9000" in r.output and "Traceback" not in r.output


def test_dtype_choices(model_dir, monkeypatch):
    monkeypatch.setenv("ONDEVICE_WGPU_DTYPE", "float64")
    ok, why = WgpuBackend.availability()
    assert not ok and "ONDEVICE_WGPU_DTYPE" in why
    monkeypatch.delenv("ONDEVICE_WGPU_DTYPE")
    with pytest.raises(BackendUnavailableError, match="bfloat16"):
        WgpuBackend(model_dir, num_blocks=4, options=WgpuOptions(dtype="bfloat16"))
    be = WgpuBackend(model_dir, num_blocks=4)
    assert be.dtype_name == ("float16" if HAS_F16 else "float32")
    f32_bytes = NumpyBackend.kv_bytes_per_token(model_dir.config)  # float32 KV
    assert WgpuBackend.kv_bytes_per_token(model_dir.config) == \
        (f32_bytes // 2 if HAS_F16 else f32_bytes)
    assert WgpuBackend.kv_bytes_per_token(model_dir.config, WgpuOptions(dtype="float32")) == \
        f32_bytes


def test_kv_pool_over_the_binding_limits_is_a_clear_error(model_dir):
    # 2 KiB blocks in parts of 4 KiB: 32 parts, more than the adapter's bindings allow.
    with pytest.raises(OndeviceError, match="needs 32 storage bindings"):
        WgpuBackend(model_dir, num_blocks=64, block_size=16, max_binding=4096, **F32)
    with pytest.raises(OndeviceError, match="one KV block of 4096 bytes exceeds"):
        WgpuBackend(model_dir, num_blocks=4, block_size=32, max_binding=2048, **F32)


def test_kv_pool_split_over_bindings_gives_the_same_results(model_dir):
    """A pool of 12 blocks in parts of 4 (one storage binding each): block tables that jump
    between parts, writes, attention, copy-on-write and block I/O across parts."""
    cfg = model_dir.config
    block_bytes = 8 * cfg.num_key_value_heads * cfg.head_dim * 4
    be = WgpuBackend(model_dir, num_blocks=12, block_size=8, max_binding=4 * block_bytes, **F32)
    assert (be.kv.parts, be.kv.blocks_per_part) == (3, 4)
    ref = NumpyBackend(model_dir, num_blocks=12, block_size=8)
    rng = np.random.default_rng(8)
    tables = [[11, 2, 5], [7, 0]]
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (20, 9)]
    batch = BatchInput.build([(p, 0, t) for p, t in zip(prompts, tables, strict=True)], 8)
    got, want = be.forward(batch), ref.forward(batch)
    assert nmse(got, want) <= 1e-7
    step = BatchInput.build([([int(w.argmax())], len(p), t)
                             for w, p, t in zip(want, prompts, tables, strict=True)], 8)
    assert nmse(be.forward(step), ref.forward(step)) <= 1e-7
    pairs = [(11, 4), (2, 9), (7, 3)]
    be.copy_blocks(pairs)
    ref.copy_blocks(pairs)
    every = list(range(12))
    np.testing.assert_allclose(be.read_blocks(every), ref.read_blocks(every), rtol=0, atol=2e-5)
    data = be.read_blocks([3, 4, 5, 6])
    be.write_blocks([8, 9, 10, 1], data)
    np.testing.assert_array_equal(be.read_blocks([8, 9, 10, 1]), data)
    # The engine over the split pool (preempting when 12 blocks run out) = NumPy's.
    prompts = mixed_prompts(cfg.vocab_size, count=4, lengths=(5, 30), seed=6)
    reqs = [(p, GREEDY) for p in prompts]
    split = Engine(WgpuBackend(model_dir, num_blocks=12, block_size=8,
                               max_binding=4 * block_bytes, **F32), None,
                   context_length=cfg.context_length, model_id="tiny")
    numpy = Engine(NumpyBackend(model_dir, num_blocks=12, block_size=8), None,
                   context_length=cfg.context_length, model_id="tiny")
    assert run_all(split, reqs) == run_all(numpy, reqs)


def test_default_kv_pool_is_clamped_to_the_bindings(tiny_model_dir, monkeypatch):
    cfg = ModelDir(tiny_model_dir).config
    cap = WgpuBackend.max_kv_blocks(cfg, 16)
    limits = wgpu_adapter.choose_adapter().limits
    per_block = WgpuBackend.kv_bytes_per_token(cfg) // (2 * cfg.num_hidden_layers) * 16
    parts = (limits["max-storage-buffers-per-shader-stage"] - 6) // 2
    assert cap == limits["max-storage-buffer-binding-size"] // per_block * parts
    # A default-sized pool larger than the cap is clamped; an explicit one is the user's call.
    monkeypatch.setattr(WgpuBackend, "max_kv_blocks", classmethod(lambda cls, c, bs, options=None: 10))
    model = ondevice.load(tiny_model_dir, backend="wgpu")
    assert model.runtime.backend.num_blocks == 10
    model.close()
    model = ondevice.load(tiny_model_dir, backend="wgpu", kv_memory="1MiB")
    assert model.runtime.backend.num_blocks > 10
    model.close()


# -- one submit per step, cached GPU objects --------------------------------------------------
def test_one_submit_per_step_and_no_new_gpu_objects_when_warm(model_dir, monkeypatch):
    be = WgpuBackend(model_dir, num_blocks=16, block_size=8, **F32)
    prompt = list(range(3, 30))
    _steps(be, prompt, 2)  # warm: pipelines, bind groups, parameters, pooled buffers
    submits = []
    queue = be.dev.queue
    real = queue.submit

    def submit(bufs):
        # wgpu-py's buffer mapping submits an empty command list of its own: count ours.
        if sys._getframe(1).f_globals["__name__"].startswith("ondevice.backends.wgpu."):
            submits.append(len(bufs))
        return real(bufs)

    monkeypatch.setattr(queue, "submit", submit)
    counts = (len(be.dev._pipelines), len(be.dev._params), len(be.ops._groups))
    _steps(be, prompt, 2)
    assert submits == [1, 1, 1]  # one command buffer per forward
    assert (len(be.dev._pipelines), len(be.dev._params), len(be.ops._groups)) == counts


# -- precision and weight formats -------------------------------------------------------------
@pytest.mark.skipif(not HAS_F16, reason="the adapter has no shader-f16")
def test_float16_forward_close_to_numpy(model_dir):
    prompt = np.random.default_rng(3).integers(3, model_dir.config.vocab_size, 45).tolist()
    be = WgpuBackend(model_dir, num_blocks=32, block_size=8,
                     options=WgpuOptions(dtype="float16"))
    ref = NumpyBackend(model_dir, num_blocks=32, block_size=8)
    for got, want in zip(_steps(be, prompt, 3), _steps(ref, prompt, 3), strict=True):
        assert got.dtype == np.float32
        assert nmse(got, want) <= 5e-4


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_quantized_forward_matches_numpy(quant_dirs, bits, dtype):
    if dtype == "float16" and not HAS_F16:
        pytest.skip("the adapter has no shader-f16")
    md = quant_dirs[bits]
    prompt = np.random.default_rng(bits).integers(3, md.config.vocab_size, 37).tolist()
    be = WgpuBackend(md, num_blocks=32, block_size=8, options=WgpuOptions(dtype=dtype))
    assert be.params.layers[0].q_proj.quant == (md.config.quantization["group_size"], bits)
    ref = NumpyBackend(md, num_blocks=32, block_size=8)
    tol = 1e-7 if dtype == "float32" else 5e-4  # same dequantized values; f16 KV rounds
    for got, want in zip(_steps(be, prompt, 3), _steps(ref, prompt, 3), strict=True):
        assert nmse(got, want) <= tol


@pytest.mark.parametrize("quantized", [False, True], ids=["f32", "q4"])
def test_tensors_split_over_small_bindings_give_the_same_logits(model_dir, quant_dirs,
                                                                quantized, tmp_path):
    """A binding limit of a few KiB splits the embedding, the head and every matrix into row
    parts (biases too, on a config that has them); the logits stay those of the reference."""
    if quantized:  # smaller matrices: a smaller limit, and a KV pool that fits under it
        md, limit, bs, blocks, n = quant_dirs[4], 2560, 4, 5, 10
    else:
        md = ModelDir(write_model(tmp_path, tiny_config(attention_bias=True, mlp_bias=True),
                                  tokenizer=False))
        limit, bs, blocks, n = 4096, 8, 4, 20
    be = WgpuBackend(md, num_blocks=blocks, block_size=bs, max_binding=limit, **F32)
    assert len(be.params.embed.parts) > 1 and len(be.params.lm_head.parts) > 1
    assert all(len(m.parts) > 1 for m in (be.params.layers[0].gate_proj,
                                           be.params.layers[0].down_proj))
    prompt = np.random.default_rng(4).integers(3, md.config.vocab_size, n).tolist()
    ref = NumpyBackend(md, num_blocks=blocks, block_size=bs)
    for got, want in zip(_steps(be, prompt, 2), _steps(ref, prompt, 2), strict=True):
        assert nmse(got, want) <= 1e-7
    # Logits of many rows, cut into several readback buffers by the limit.
    batch = BatchInput.build([(prompt, 0, [0, 1, 2])], bs, logits_for="all")
    assert nmse(be.forward(batch), ref.forward(batch)) <= 1e-7


def test_gpu_topk_matches_sorted_logits(model_dir):
    be = WgpuBackend(model_dir, num_blocks=16, block_size=8, **F32)
    ref = NumpyBackend(model_dir, num_blocks=16, block_size=8)
    rng = np.random.default_rng(5)
    seqs = [(rng.integers(3, 200, n).tolist(), 0, blocks)
            for n, blocks in ((9, [1, 2]), (1, [3]), (17, [4, 5, 6]))]
    batch = BatchInput.build(seqs, 8)
    ids, vals = be.forward_topk(batch, k=5)
    logits = ref.forward(batch)
    assert ids.shape == vals.shape == (3, 5) and ids.dtype == np.int32
    want = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(vals, np.take_along_axis(logits, want, 1), rtol=0, atol=1e-4)
    # Ties go to the lower id, like a stable sort.
    x = be.ops.from_host(np.zeros((1, model_dir.config.hidden_size), np.float32))
    tie_ids, _ = be.ops.topk(x, be.params.lm_head, 3)
    np.testing.assert_array_equal(tie_ids, [[0, 1, 2]])


# -- the engine on wgpu (batched = alone etc. for every backend: test_engine_backends.py) ------
def make_engine(md, num_blocks=512, block_size=8, caching=True, **kw) -> Engine:
    backend = WgpuBackend(md, num_blocks=num_blocks, block_size=block_size, **F32)
    return Engine(backend, md.tokenizer, context_length=md.config.context_length,
                  enable_prefix_caching=caching, model_id="tiny", **kw)


@pytest.mark.parametrize("quantized", [False, True], ids=["f32", "q4"])
def test_engine_tokens_match_numpy(model_dir, quant_dirs, quantized):
    md = quant_dirs[4] if quantized else model_dir
    prompts = mixed_prompts(md.config.vocab_size, count=6, lengths=(4, 90), seed=9)
    reqs = [(p, GREEDY) for p in prompts]
    np_engine = Engine(NumpyBackend(md, num_blocks=512, block_size=8), None,
                       context_length=md.config.context_length, model_id="tiny")
    engine = make_engine(md)
    assert run_all(engine, reqs) == run_all(np_engine, reqs)
    assert engine.num_topk_steps == engine.num_steps  # greedy rows: argmax picked on the GPU


def test_engine_reads_whole_rows_when_a_request_needs_them(model_dir):
    """Logprobs or penalties need the whole row: such steps read the logits back, and a
    greedy request batched with them gets the same tokens either way."""
    prompts = mixed_prompts(model_dir.config.vocab_size, count=2, lengths=(6, 40), seed=4)
    needs_row = SamplingParams(max_tokens=6, temperature=0, logprobs=2, ignore_eos=True)
    engine = make_engine(model_dir)
    mixed = run_all(engine, [(prompts[0], GREEDY), (prompts[1], needs_row)])
    assert engine.num_topk_steps < engine.num_steps
    alone = make_engine(model_dir)
    assert run_all(alone, [(prompts[0], GREEDY)]) == mixed[:1]
    assert alone.num_topk_steps == alone.num_steps


def test_cli_generate_with_wgpu(tiny_model_dir):
    r = CliRunner().invoke(cli, ["generate", "-m", str(tiny_model_dir), "--backend", "wgpu", "-p",
                                 "hi", "-n", "5", "--temperature", "0", "--ignore-eos", "--json",
                                 "--kv-memory", "8MiB"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["backend"] == "wgpu" and len(data["generated_ids"]) == 5


# -- the real model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_wgpu(real_model_dir):
    model = ondevice.load(real_model_dir, backend="wgpu", kv_memory="64MiB",
                          options=WgpuOptions(dtype="float32"))
    assert model.runtime.backend.dtype_name == "float32"
    yield model
    model.close()


@pytest.mark.real_model
def test_golden_on_wgpu_float32(real_wgpu, golden_cases):
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    for case in golden_cases:
        if "messages" in case:
            ids = real_wgpu.tokenizer.encode_chat(case["messages"], add_generation_prompt=True)
        else:
            ids = real_wgpu.tokenizer.encode(case["prompt"], add_special_tokens=False)
        assert ids == case["prompt_ids"]
        logits = real_wgpu.runtime.logits_for(case["prompt_ids"])[-1]
        assert logits.dtype == np.float32
        assert np.argsort(-logits, kind="stable")[:5].tolist() == case["top5_ids"]
        err = np.abs(logits[case["top5_ids"]] - np.asarray(case["top5_logits"])).max()
        assert err < 1e-3, err
        got = [c.token_id for c in real_wgpu.stream(case["prompt_ids"], params)]
        assert got == case["greedy_ids"], case.get("prompt_text")


@pytest.mark.real_model
def test_cli_generate_wgpu_with_the_default_model(real_model_dir):
    # No --model: the default model, found through ONDEVICE_HOME where the fixture put it; the
    # adapter's default dtype (float16 on lavapipe).
    env = dict(os.environ, ONDEVICE_HOME=str(real_model_dir.parents[1]))
    p = subprocess.run(
        [sys.executable, "-m", "ondevice", "generate", "--backend", "wgpu", "--prompt",
         "What is the capital of France?", "--max-tokens", "8", "--temperature", "0",
         "--kv-memory", "32MiB"],
        capture_output=True, text=True, timeout=1200, env=env,
    )
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout
