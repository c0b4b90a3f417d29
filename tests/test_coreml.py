"""Core ML: the exporter's MIL ops against the NumPy backend (through the NumPy MIL
interpreter, on the saved package), the package's spec and manifest, option errors, the CLI,
the backend's availability, the Mac embedding example, and the real model.

Core ML prediction itself needs macOS 15; the one test that calls it skips elsewhere.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from realmodel import require_real_model
from tiny import tiny_config, tiny_gemma_config, write_model

from ondevice.apps.cli import cli
from ondevice.backends.numpy_backend import NumpyOps, _Linear
from ondevice.batch import BatchInput
from ondevice.bench.verify_coreml import verify_coreml
from ondevice.converters.coreml import MANIFEST_NAME, _ct, export_coreml, read_manifest
from ondevice.converters.coreml.exporter import to_mlmodel
from ondevice.converters.coreml.interpreter import (
    OPS,
    STATE_OPS,
    MILInterpreter,
    UnsupportedMILOpError,
)
from ondevice.converters.coreml.mil_ops import MilLinear, MilOps, SymbolicBatch
from ondevice.converters.coreml.package import BlobFile, TensorType
from ondevice.errors import ModelFormatError, OndeviceError, UnsupportedModelError

ct = _ct.coremltools()
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import get_new_symbol, types  # noqa: E402

F32, F16 = np.float32, np.float16
RNG = np.random.default_rng(0)


def _f16(shape, scale=1.0) -> np.ndarray:
    """float16 random values, returned as float32 (exactly representable in float16)."""
    return (scale * RNG.standard_normal(shape)).astype(F16).astype(F32)


def _save(prog, path: Path, quantize: str = "f16") -> MILInterpreter:
    model = to_mlmodel(prog, quantize)
    with _ct.quiet():
        model.save(str(path))
    return MILInterpreter.open(path)


def _run(interp: MILInterpreter, feeds: list[dict]) -> tuple[list[np.ndarray], object]:
    state = interp.make_state()
    outs = []
    for feed in feeds:
        out = interp.predict(feed, state)
        assert len(out) == 1
        outs.append(next(iter(out.values())))
    return outs, state


def _close(got, want, rel=2e-3):
    """float16 storage: relative to the output's scale, with float32 accumulation."""
    got, want = np.asarray(got, F32), np.asarray(want, F32)
    assert got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=rel * scale, rtol=0)


# -- every op the exporter emits, one small program each ----------------------------------

T, H, HEADS, KVH, HD, BS, NB, CTX = 5, 64, 4, 2, 16, 4, 6, 16
INV_FREQ = (1.0 / (10000.0 ** (np.arange(0, HD, 2) / HD))).astype(F32)
NP = NumpyOps(np.zeros((1, 2, NB, BS, KVH, HD), F32), BS)  # the reference ops


def _ops(key=None, value=None) -> MilOps:
    return MilOps(mb, types, key_state=key, value_state=value, block_size=BS, max_context=CTX)


def _case_embedding(tmp):
    table = _f16((40, H))
    sym = get_new_symbol()

    def main(ids):
        return _ops().embedding(mb.const(val=table.astype(F16)), ids)

    prog = mb.program(input_specs=[mb.TensorSpec((sym,), dtype=types.int32)],
                      opset_version=ct.target.iOS18)(main)
    ids = np.array([3, 0, 39, 7, 3], np.int32)
    return prog, [{"ids": ids}], [table[ids]]


def _case_rms_norm(tmp):
    x, w = _f16((T, H), 3.0), (1 + 0.1 * RNG.standard_normal(H)).astype(F32)

    def main(x):
        return _ops().rms_norm(x, mb.const(val=w), 1e-5)

    prog = mb.program(input_specs=[mb.TensorSpec((T, H), dtype=types.fp16)],
                      opset_version=ct.target.iOS18)(main)
    return prog, [{"x": x}], [NP.rms_norm(x, w, 1e-5)]


def _linear_case(bias: bool):
    def case(tmp):
        x, w, b = _f16((T, H)), _f16((48, H), 0.2), _f16((48,))

        def main(x):
            lin = MilLinear(mb.const(val=w.astype(F16)),
                            mb.const(val=b.astype(F16)) if bias else None)
            return _ops().linear(x, lin)

        prog = mb.program(input_specs=[mb.TensorSpec((T, H), dtype=types.fp16)],
                          opset_version=ct.target.iOS18)(main)
        ref = NP.linear(x, _Linear(w, b if bias else None))
        return prog, [{"x": x}], [ref]
    return case


def _case_rope(tmp):
    x, pos = _f16((T, HEADS * HD)), np.array([0, 1, 2, 9, 15], np.int32)

    def main(x, positions):
        return _ops().rope(x, positions, INV_FREQ, HEADS, HD)

    prog = mb.program(input_specs=[mb.TensorSpec((T, HEADS * HD), dtype=types.fp16),
                                   mb.TensorSpec((T,), dtype=types.int32)],
                      opset_version=ct.target.iOS18)(main)
    ref = NP.rope(x, pos, INV_FREQ, HEADS, HD)
    return prog, [{"x": x, "positions": pos}], [ref]


def _case_attention(tmp, window: int = 0):
    """write_kv + paged_attention over two steps (4-token prefill, then 1 decode) through a
    shuffled block table; the reference is NumpyOps on a float32 pool. ``window``: Gemma 3's
    local-layer attention (keys p-window+1..p)."""
    sym = get_new_symbol()
    pool = (2, NB * BS, KVH * HD)

    def main(q, k, v, positions, slot_mapping, block_table, seq_len, key_cache, value_cache):
        ops = _ops(key_cache, value_cache)
        batch = SymbolicBatch(None, positions, slot_mapping, block_table, seq_len, None)
        ops.write_kv(1, k, v, slot_mapping)
        return ops.paged_attention(1, q, batch, HEADS, KVH, HD, 0.25, window=window)

    prog = mb.program(input_specs=[
        mb.TensorSpec((sym, HEADS * HD), dtype=types.fp16),
        mb.TensorSpec((sym, KVH * HD), dtype=types.fp16),
        mb.TensorSpec((sym, KVH * HD), dtype=types.fp16),
        mb.TensorSpec((sym,), dtype=types.int32), mb.TensorSpec((sym,), dtype=types.int32),
        mb.TensorSpec((CTX // BS,), dtype=types.int32), mb.TensorSpec((1,), dtype=types.int32),
        mb.StateTensorSpec(pool, dtype=types.fp16), mb.StateTensorSpec(pool, dtype=types.fp16),
    ], opset_version=ct.target.iOS18)(main)

    blocks = [4, 1]
    kv = np.zeros((2, 2, NB, BS, KVH, HD), F32)
    ref_ops = NumpyOps(kv, BS)
    feeds, refs = [], []
    for new, start in ((5, 0), (1, 5)):
        b = BatchInput.build([(list(range(new)), start, blocks)], BS)
        q, k, v = _f16((new, HEADS * HD)), _f16((new, KVH * HD)), _f16((new, KVH * HD))
        table = np.zeros(CTX // BS, np.int32)
        table[: len(blocks)] = blocks
        feeds.append({"q": q, "k": k, "v": v, "positions": b.positions,
                      "slot_mapping": b.slot_mapping, "block_table": table,
                      "seq_len": b.seq_lens})
        ref_ops.write_kv(1, k, v, b.slot_mapping)
        refs.append(ref_ops.paged_attention(1, q, b, HEADS, KVH, HD, 0.25, window=window))
    return prog, feeds, refs, kv


def _case_gelu_tanh_mul(tmp):
    g, u = _f16((T, H), 4.0), _f16((T, H))

    def main(g, u):
        return _ops().gelu_tanh_mul(g, u)

    prog = mb.program(input_specs=[mb.TensorSpec((T, H), dtype=types.fp16) for _ in range(2)],
                      opset_version=ct.target.iOS18)(main)
    return prog, [{"g": g, "u": u}], [NP.gelu_tanh_mul(g, u)]


def _case_head_rms_norm(tmp):
    x, w = _f16((T, HEADS * HD), 3.0), (1 + 0.1 * RNG.standard_normal(HD)).astype(F32)

    def main(x):
        return _ops().head_rms_norm(x, mb.const(val=w), 1e-6, HEADS, HD)

    prog = mb.program(input_specs=[mb.TensorSpec((T, HEADS * HD), dtype=types.fp16)],
                      opset_version=ct.target.iOS18)(main)
    return prog, [{"x": x}], [NP.head_rms_norm(x, w, 1e-6, HEADS, HD)]


def _case_scale(tmp):
    x = _f16((T, H))

    def main(x):
        return _ops().scale(x, 25.298221)

    prog = mb.program(input_specs=[mb.TensorSpec((T, H), dtype=types.fp16)],
                      opset_version=ct.target.iOS18)(main)
    return prog, [{"x": x}], [NP.scale(x, 25.298221)]


def _case_silu_mul(tmp):
    g, u = _f16((T, H), 4.0), _f16((T, H))

    def main(g, u):
        return _ops().silu_mul(g, u)

    prog = mb.program(input_specs=[mb.TensorSpec((T, H), dtype=types.fp16) for _ in range(2)],
                      opset_version=ct.target.iOS18)(main)
    return prog, [{"g": g, "u": u}], [NP.silu_mul(g, u)]


def _case_add(tmp):
    a, b = _f16((T, H)), _f16((T, H))

    def main(a, b):
        return _ops().add(a, b)

    prog = mb.program(input_specs=[mb.TensorSpec((T, H), dtype=types.fp16) for _ in range(2)],
                      opset_version=ct.target.iOS18)(main)
    return prog, [{"a": a, "b": b}], [a + b]


def _case_take_rows_logits(tmp):
    """The model's tail: the last row (index from the flexible input's shape), then the
    float32 logits through a (tied) head."""
    sym = get_new_symbol()
    x, head = _f16((T, H)), _f16((40, H), 0.2)

    def main(x, ids):
        ops = _ops()
        last = mb.sub(x=mb.shape(x=ids), y=np.int32(1))
        return ops.logits(ops.take_rows(x, last), MilLinear(mb.const(val=head.astype(F16)), None))

    prog = mb.program(input_specs=[mb.TensorSpec((T, H), dtype=types.fp16),
                                   mb.TensorSpec((sym,), dtype=types.int32)],
                      opset_version=ct.target.iOS18)(main)
    ref = NP.logits(x[[T - 1]], _Linear(head, None))
    return prog, [{"x": x, "ids": np.zeros(T, np.int32)}], [ref]


OP_CASES = {
    "embedding": _case_embedding,
    "rms_norm": _case_rms_norm,
    "linear": _linear_case(False),
    "linear_bias": _linear_case(True),
    "rope": _case_rope,
    "write_kv+paged_attention": _case_attention,
    "silu_mul": _case_silu_mul,
    "write_kv+paged_attention(window=3)": lambda tmp: _case_attention(tmp, window=3),
    "gelu_tanh_mul": _case_gelu_tanh_mul,
    "head_rms_norm": _case_head_rms_norm,
    "scale": _case_scale,
    "add": _case_add,
    "take_rows+logits": _case_take_rows_logits,
}


@pytest.fixture(scope="module")
def op_programs(tmp_path_factory):
    """Each case's saved package, interpreter, feeds and NumPy reference (built once)."""
    root = tmp_path_factory.mktemp("ops")
    built = {}
    for name, make in OP_CASES.items():
        prog, feeds, refs, *extra = make(root)
        interp = _save(prog, root / f"{name}.mlpackage")
        built[name] = (interp, feeds, refs, extra)
    yield built
    for interp, *_ in built.values():
        interp.close()


@pytest.mark.parametrize("name", list(OP_CASES))
def test_op_matches_numpy_backend(op_programs, name):
    interp, feeds, refs, extra = op_programs[name]
    outs, state = _run(interp, feeds)
    for got, want in zip(outs, refs, strict=True):
        _close(got, want)
    if name == "take_rows+logits":
        assert outs[0].dtype == F32 and interp.program.outputs == ["logits"]
    if extra:  # the KV state equals the reference pool at every slot
        (kv,) = extra
        for i, s in enumerate(("key_cache", "value_cache")):
            _close(state.values[s], kv[:, i].reshape(2, NB * BS, KVH * HD))


def test_ops_cover_every_op_of_an_export(op_programs, tiny_exports):
    """The per-op programs exercise every MIL op a whole export contains (constexpr ops are
    tested on their own below), and the interpreter knows each of them."""
    covered = set().union(*(i.program.op_types for i, *_ in op_programs.values()))
    for q in ("f16", "int4"):
        interp = MILInterpreter.open(tiny_exports[q])
        try:
            used = interp.program.op_types
        finally:
            interp.close()
        assert used <= set(OPS) | set(STATE_OPS)
        assert used - covered <= {"constexpr_blockwise_shift_scale"}, used - covered


@pytest.mark.parametrize("quantize,levels", [("int8", 127), ("int4", 7)])
def test_blockwise_dequantization_matches_weights(tmp_path, quantize, levels):
    w, x = _f16((96, 128), 0.2), _f16((3, 128))

    def main(x):
        return _ops().linear(x, MilLinear(mb.const(val=w.astype(F16)), None))

    prog = mb.program(input_specs=[mb.TensorSpec((3, 128), dtype=types.fp16)],
                      opset_version=ct.target.iOS18)(main)
    interp = _save(prog, tmp_path / "q.mlpackage", quantize)
    try:
        assert "constexpr_blockwise_shift_scale" in interp.program.op_types
        (deq,) = [v for k, v in interp.consts.items() if k.endswith("_quantized")]
        # Symmetric per-block: at most half a step (block max / levels) off, plus fp16.
        step = np.abs(w.reshape(96, 4, 32)).max(axis=-1, keepdims=True) / levels
        err = np.abs(deq.reshape(96, 4, 32) - w.reshape(96, 4, 32))
        assert (err <= step / 2 + 1e-3 * np.abs(w).max()).all()
        assert np.abs(deq - w).max() > 0  # it really was quantized
        (got,), _ = _run(interp, [{"x": x}])
        _close(got, x @ deq.T)
    finally:
        interp.close()


def test_unknown_op_is_named(tmp_path):
    def main(x):
        return mb.erf(x=x)

    prog = mb.program(input_specs=[mb.TensorSpec((2, 3), dtype=types.fp16)],
                      opset_version=ct.target.iOS18)(main)
    model = to_mlmodel(prog)
    with _ct.quiet():
        model.save(str(tmp_path / "erf.mlpackage"))
    with pytest.raises(UnsupportedMILOpError, match="does not implement erf"):
        MILInterpreter.open(tmp_path / "erf.mlpackage")


# -- whole tiny-model exports ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("coreml-src") / "tiny", tiny_config())


@pytest.fixture(scope="module")
def tiny_exports(tiny_src, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coreml-out")
    return {
        q: export_coreml(tiny_src, root / q / "tiny.mlpackage", quantize=q, max_context=64,
                         block_size=16, num_blocks=8, progress=False)
        for q in ("f16", "int8", "int4")
    }


def test_spec_has_state_flexible_input_and_manifest_names(tiny_exports):
    pkg = tiny_exports["f16"]
    spec = ct.utils.load_spec(str(pkg))
    assert spec.specificationVersion >= 9  # iOS 18 / macOS 15: stateful programs
    manifest = read_manifest(pkg)
    assert {f.name for f in spec.description.input} == {i["name"] for i in manifest["inputs"]}
    assert [f.name for f in spec.description.output] == ["logits"]
    states = {f.name: f for f in spec.description.state}
    assert set(states) == {"key_cache", "value_cache"} == {s["name"] for s in manifest["states"]}
    arr = states["key_cache"].type.stateType.arrayType
    assert list(arr.shape) == [2, 8 * 16, 2 * 16]  # layers, slots, kv_heads * head_dim
    assert arr.dataType == arr.FLOAT16
    ids = next(f for f in spec.description.input if f.name == "input_ids")
    (rng,) = ids.type.multiArrayType.shapeRange.sizeRanges
    assert (rng.lowerBound, rng.upperBound) == (1, 64)
    table = next(f for f in spec.description.input if f.name == "block_table")
    assert list(table.type.multiArrayType.shape) == [4]
    # The manifest's keys that other modules size models with.
    for key in ("format", "version", "model_id", "architecture", "config", "quantization",
                "weight_bytes", "kv_bytes_per_token", "block_size", "num_blocks",
                "max_context", "inputs", "outputs", "states", "eos_token_ids",
                "end_of_turn_ids", "tokenizer", "chat_template"):
        assert key in manifest, key
    assert manifest["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2
    assert manifest["weight_bytes"] == (pkg / "Data/com.apple.CoreML/weights/weight.bin"
                                        ).stat().st_size
    assert manifest["end_of_turn_ids"] == [2] and 2 in manifest["eos_token_ids"]
    assert (pkg.parent / manifest["tokenizer"]).is_file()
    assert (pkg.parent / manifest["chat_template"]).is_file()
    assert manifest["inputs"][0] == {"name": "input_ids", "shape": ["1..64"], "dtype": "int32"}


def test_quantized_exports_are_smaller(tiny_exports):
    sizes = {q: read_manifest(p)["weight_bytes"] for q, p in tiny_exports.items()}
    assert sizes["int4"] < sizes["int8"] < sizes["f16"]


def test_tiny_f16_export_reproduces_numpy_backend(tiny_exports):
    report = verify_coreml(tiny_exports["f16"], steps=8)
    assert report.passed and report.greedy_identical, report.failure
    assert report.max_abs_logit_error < 0.05
    assert report.max_abs_kv_error < 0.05
    assert len(report.reference_tokens) == 9 and len(report.steps) == 10
    assert len(report.block_table) == 2 and report.block_table != [0, 1]


def test_tiny_gemma_f16_export_reproduces_numpy_past_the_window(tmp_path):
    """A Gemma 3-shaped model (q/k norms, GELU-tanh, two RoPE bases, a 20-token window):
    prompt and decode run well past the window, greedy tokens identical to NumPy's."""
    src = write_model(tmp_path / "gemma", tiny_gemma_config(sliding_window=20))
    pkg = export_coreml(src, tmp_path / "gemma.mlpackage", quantize="f16", max_context=64,
                        block_size=16, num_blocks=8, progress=False)
    report = verify_coreml(pkg, src, steps=24, prompt_tokens=30)
    assert report.greedy_identical and report.passed, report.to_dict()


def test_tiny_int4_export_reports_its_error(tiny_exports):
    f16 = verify_coreml(tiny_exports["f16"], steps=4)
    int4 = verify_coreml(tiny_exports["int4"], steps=4, min_agreement=0.0)
    assert int4.passed
    assert int4.max_abs_logit_error > f16.max_abs_logit_error


def test_verify_fails_against_another_model(tiny_exports, tmp_path):
    other = write_model(tmp_path / "other", tiny_config(), seed=5)
    report = verify_coreml(tiny_exports["f16"], other, steps=4)
    assert not report.passed and "greedy agreement" in report.failure


def test_blob_reader_checks_bounds_and_matches_coremltools(tiny_exports, tmp_path):
    pkg = tmp_path / "copy.mlpackage"
    shutil.copytree(tiny_exports["int4"], pkg)
    weights = pkg / "Data/com.apple.CoreML/weights/weight.bin"
    interp = MILInterpreter.open(pkg)
    ops = interp.program.operations
    interp.close()
    # An int4 blob read by our reader equals coremltools' native reader.
    from coremltools import libmilstoragepython

    native = libmilstoragepython._BlobStorageReader(str(weights))
    blob = BlobFile(weights)
    try:
        checked = 0
        for op in ops:
            if op.type == "constexpr_blockwise_shift_scale":
                data = op.inputs["data"][0]
                assert isinstance(data, np.ndarray) and data.dtype == np.int8
                checked += 1
        assert checked
        raw = weights.read_bytes()
        offset = 64
        count, version = struct.unpack_from("<II", raw, 0)
        found = 0
        for _ in range(count):
            sentinel, code, nbytes, data_off = struct.unpack_from("<IIQQ", raw, offset)
            assert sentinel == 0xDEADBEEF
            if code == 8:  # int4
                n = nbytes * 2
                ours = blob.read(offset, TensorType("INT4", (n,)))
                np.testing.assert_array_equal(ours, np.array(native.read_int4_data(offset)))
                found += 1
            offset = data_off + nbytes
            offset += -offset % 64
        assert found
        with pytest.raises(ModelFormatError, match="outside"):
            blob.read(len(raw) - 8, TensorType("INT4", (2,)))
        with pytest.raises(ModelFormatError, match="sentinel"):
            blob.read(72, TensorType("INT4", (2,)))
    finally:
        blob.close()
    # A truncated weight file is a clear error, not a crash or garbage.
    weights.write_bytes(weights.read_bytes()[: len(raw) // 2])
    with pytest.raises(ModelFormatError, match="outside the"):
        MILInterpreter.open(pkg)


# -- options and errors ----------------------------------------------------------------------


def test_bad_options_are_clear_errors(tiny_src, tmp_path):
    out = tmp_path / "x.mlpackage"
    with pytest.raises(OndeviceError, match="not a multiple of the block size 16"):
        export_coreml(tiny_src, out, max_context=100, block_size=16, progress=False)
    with pytest.raises(OndeviceError, match="not available for Core ML"):
        export_coreml(tiny_src, out, quantize="q4", progress=False)
    with pytest.raises(OndeviceError, match="exceeds the model's context length"):
        export_coreml(tiny_src, out, max_context=4096, progress=False)
    with pytest.raises(OndeviceError, match="cannot hold the max context"):
        export_coreml(tiny_src, out, max_context=64, num_blocks=2, progress=False)
    with pytest.raises(OndeviceError, match="must end in .mlpackage"):
        export_coreml(tiny_src, tmp_path / "x.bin", progress=False)
    gpt2 = write_model(tmp_path / "gpt2", tiny_config(), tokenizer=False)
    cfg = json.loads((gpt2 / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (gpt2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gpt2'"):
        export_coreml(gpt2, out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


def test_existing_output_needs_force(tiny_exports, tiny_src):
    pkg = tiny_exports["f16"]
    with pytest.raises(OndeviceError, match="already exists"):
        export_coreml(tiny_src, pkg, max_context=64, progress=False)


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_convert_and_verify(tiny_src, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli" / "tiny.mlpackage"
    res = runner.invoke(cli, ["convert", str(tiny_src), "--to", "coreml", "-o", str(out),
                              "-q", "int8", "--max-context", "48", "--block-size", "16",
                              "--num-blocks", "5"])
    assert res.exit_code == 0, res.output
    assert "Failed to load" not in res.output
    manifest = json.loads((out.parent / MANIFEST_NAME).read_text())
    assert (manifest["quantization"]["mode"], manifest["max_context"],
            manifest["num_blocks"]) == ("int8", 48, 5)
    res = runner.invoke(cli, ["verify-coreml", str(out), "--steps", "4", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["passed"] and data["quantization"] == "int8"
    res = runner.invoke(cli, ["verify-coreml", str(out), "--steps", "4", "--max-error", "1e-9"])
    assert res.exit_code == 1 and "FAIL: max abs logit error" in res.output


@pytest.mark.parametrize("args,message", [
    (["--to", "coreml", "-q", "q4"], "not available for Core ML"),
    (["--to", "coreml", "--max-context", "40"], "not a multiple of the block size"),
    (["-q", "int4"], "is for --to coreml"),
    (["--max-context", "64"], "--max-context applies to --to coreml only"),
    (["--to", "coreml", "--group-size", "32"], "--group-size applies to --to ondevice only"),
])
def test_cli_bad_options(tiny_src, tmp_path, args, message):
    res = CliRunner().invoke(cli, ["convert", str(tiny_src), "-o",
                                   str(tmp_path / "o.mlpackage"), *args])
    assert res.exit_code == 1
    assert message in res.output and "Traceback" not in res.output


def test_cli_verify_missing_package(tmp_path):
    res = CliRunner().invoke(cli, ["verify-coreml", str(tmp_path / "none.mlpackage")])
    assert res.exit_code == 1 and "no manifest" in res.output


# -- backend -----------------------------------------------------------------------------------


def test_backend_availability_here():
    from ondevice.backends import available_backends
    from ondevice.backends.coreml_backend import CoreMLBackend

    ok, why = CoreMLBackend.availability()
    if sys.platform != "darwin":
        assert not ok and "macOS 15+" in why and "verify-coreml" in why
        assert available_backends()["coreml"][0] is False
    else:  # a Mac: usable, or says which requirement (macOS 15, the runtime library) is missing
        assert ok == available_backends()["coreml"][0]
        assert ("Core ML" in why) if ok else ("macOS" in why or "coremltools" in why)


def test_backend_compute_units_are_validated():
    from ondevice.backends.coreml_backend import compute_units

    assert compute_units("cpu_and_ne") == "cpu_and_ne"
    assert compute_units() == "all"
    with pytest.raises(OndeviceError, match="cpu_and_ne"):
        compute_units("gpu_only")


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS 15+")
def test_backend_runs_package_on_macos(tiny_exports, tiny_src):
    from ondevice.backends.coreml_backend import CoreMLBackend
    from ondevice.backends.numpy_backend import NumpyBackend
    from ondevice.modeldir import ModelDir

    ok, why = CoreMLBackend.availability()
    if not ok:
        pytest.skip(why)
    md = ModelDir(tiny_src)
    be = CoreMLBackend.from_package(tiny_exports["f16"], compute_units="cpu_only")
    ref = NumpyBackend(md, num_blocks=8, block_size=16)
    b = BatchInput.build([(list(range(10)), 0, [3, 5])], 16)
    np.testing.assert_allclose(be.forward(b), ref.forward(b), atol=0.05)


# -- the real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_exports(real_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("coreml-real")
    # A 256-token context keeps the interpreted run short; the program is the same one a
    # 2048-token export has, with a smaller state and block table.
    return {
        q: export_coreml(real_model_dir, root / q / "SmolLM2.mlpackage", quantize=q,
                         max_context=256, progress=False)
        for q in ("f16", "int8")
    }


@pytest.mark.real_model
def test_real_model_f16_export_greedy_identical(real_exports, real_model_dir):
    require_real_model()
    report = verify_coreml(real_exports["f16"], real_model_dir, steps=16)
    assert report.greedy_identical and len(report.reference_tokens) == 17, report.to_dict()
    assert report.passed
    assert len(report.block_table) == 3
    print(f"f16: max abs logit error {report.max_abs_logit_error:.4f}, "
          f"KV {report.max_abs_kv_error:.4f}")


@pytest.mark.real_model
def test_real_model_int8_export_reports_error(real_exports, real_model_dir):
    require_real_model()
    report = verify_coreml(real_exports["int8"], real_model_dir, steps=16)
    assert report.passed, report.failure
    assert np.isfinite(report.max_abs_logit_error) and report.max_abs_logit_error > 0
    print(f"int8: max abs logit error {report.max_abs_logit_error:.4f}, "
          f"greedy agreement {report.greedy_agreement:.3f}")


@pytest.mark.real_model
def test_gemma3_270m_f16_export_greedy_identical(gemma_f32_dir, tmp_path):
    """Gemma 3 270M exported at float16 and interpreted: 16 greedy steps identical to the
    NumPy backend's (262k-token vocabulary, q/k norms, local and global layers)."""
    pkg = export_coreml(gemma_f32_dir, tmp_path / "gemma3.mlpackage", quantize="f16",
                        max_context=256, progress=False)
    report = verify_coreml(pkg, gemma_f32_dir, steps=16)
    assert report.greedy_identical and report.passed, report.to_dict()
    print(f"gemma3 f16: max abs logit error {report.max_abs_logit_error:.4f}")


# -- the Mac embedding kit ----------------------------------------------------------------------


def test_embed_example_streams_through_callbacks(tiny_src):
    from ondevice.apps.mac.embed_example import Assistant

    assistant = Assistant(str(tiny_src), backend="numpy")
    try:
        pieces, finished = [], []
        reply = assistant.ask("Hello", on_text=pieces.append, on_done=finished.append,
                              max_tokens=12, temperature=0, ignore_eos=True)
        assert reply.wait(120)
        assert reply.finish_reason == "length" and reply.tokens == 12
        assert "".join(pieces) == reply.text and finished == [reply]
        same = assistant.model.generate([{"role": "user", "content": "Hello"}], max_tokens=12,
                                        temperature=0, ignore_eos=True)
        assert reply.text == same
    finally:
        assistant.close()


def test_embed_example_cancels_and_frees_the_request(tiny_src):
    from ondevice.apps.mac.embed_example import Assistant

    assistant = Assistant(str(tiny_src), backend="numpy")
    try:
        seen = []
        holder = {}

        def on_text(text):
            seen.append(text)
            if len(seen) == 3:
                holder["reply"].cancel()

        # The callback may fire before ask() returns; hold it until the reply is stored.
        gate = threading.Event()
        reply = assistant.ask("Hello", on_text=lambda t: (gate.wait(10), on_text(t)),
                              max_tokens=500, temperature=0, ignore_eos=True)
        holder["reply"] = reply
        gate.set()
        assert reply.wait(120)
        assert reply.finish_reason == "cancelled" and reply.cancelled
        assert 3 <= reply.tokens < 500
        stats = assistant.stats()
        assert stats["running"] == 0 and stats["kv_blocks_used"] == 0
    finally:
        assistant.close()


def test_embed_example_command_line(tiny_src, capsys):
    from ondevice.apps.mac.embed_example import main

    assert main(["Hi", "--model", str(tiny_src), "--backend", "numpy", "--max-tokens", "40",
                 "--cancel-after", "2"]) == 0
    err = capsys.readouterr().err
    assert "[cancelled:" in err or "[stop:" in err


class _InterpretedModel:
    """``MLModel.predict`` / ``MLState`` over the NumPy MIL interpreter, so the backend's paged
    glue (per-sequence calls, block tables, state copies) runs here without Core ML."""

    def __init__(self, interp):
        self.interp = interp

    def predict(self, inputs, state):
        return self.interp.predict(inputs, state.inner)


class _InterpretedState:
    def __init__(self, inner):
        self.inner = inner

    def read_state(self, name):
        return self.inner.values[name].astype(F16)

    def write_state(self, name, value):
        assert value.dtype == F16 and value.shape == self.inner.values[name].shape
        self.inner.values[name] = value.astype(F32)


def test_backend_paged_glue_through_the_interpreter(tiny_exports, tiny_src):
    from ondevice.backends.coreml_backend import CoreMLBackend
    from ondevice.backends.numpy_backend import NumpyBackend
    from ondevice.modeldir import ModelDir

    class Interpreted(CoreMLBackend):
        def _open(self):
            interp = MILInterpreter.open(self.package)
            return _InterpretedModel(interp), _InterpretedState(interp.make_state())

    be = Interpreted.from_package(tiny_exports["f16"], model=tiny_src)
    ref = NumpyBackend(ModelDir(tiny_src), num_blocks=8, block_size=16)
    # Two sequences in one batch (prefill of 20 and of 5 tokens), then a joint decode step.
    steps = [
        BatchInput.build([(list(range(1, 21)), 0, [6, 2]), (list(range(30, 35)), 0, [5])], 16),
        BatchInput.build([([7], 20, [6, 2]), ([8], 5, [5])], 16),
    ]
    for b in steps:
        got, want = be.forward(b), ref.forward(b)
        assert got.shape == want.shape == (2, ref.config.vocab_size)
        np.testing.assert_allclose(got, want, atol=0.05)
        assert (got.argmax(-1) == want.argmax(-1)).all()
    # Copy-on-write and prompt-cache block I/O act on the Core ML state.
    be.copy_blocks([(6, 1)])
    ref.copy_blocks([(6, 1)])
    np.testing.assert_allclose(be.read_blocks([1, 2]), ref.read_blocks([1, 2]), atol=0.02)
    data = ref.read_blocks([6])
    be.write_blocks([3], data)
    np.testing.assert_allclose(be.read_blocks([3]), data, atol=0.02)
    # Rows other than a sequence's last need an export with logits="all".
    with pytest.raises(OndeviceError, match="last position"):
        be.forward(BatchInput.build([([1, 2, 3], 0, [4])], 16, logits_for="all"))
