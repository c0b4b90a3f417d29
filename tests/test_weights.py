"""Hostile or broken safetensors files and model directories give one clear error."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file
from tiny import tiny_config, write_model

from ondevice.errors import ModelFormatError, UnsupportedModelError
from ondevice.modeldir import ModelDir
from ondevice.weights import SafetensorsFile, SafetensorsWriter


def _raw(path, header: dict, data: bytes = b"") -> None:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def test_roundtrip_and_zero_copy(tmp_path):
    arrs = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float16)}
    save_file(arrs, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(f.get("a"), arrs["a"])
    assert f.get("b").dtype == np.float16
    assert not f.get("a").flags.owndata  # a view of the memory map


def test_bf16_is_widened_exactly(tmp_path):
    x = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
    h = {"t": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}
    _raw(tmp_path / "b.safetensors", h, bits.tobytes())
    np.testing.assert_array_equal(SafetensorsFile(tmp_path / "b.safetensors").get("t"), x)


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"t": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4 << 40]}}, b"\0" * 16,
         "outside"),
        ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 16, "needs 16 bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 16, "overlap"),
        ({"t": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype"),
        ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "bad shape"),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, b"\0" * 16, "outside"),
        ({"t": [1, 2]}, b"", "not an object"),
    ],
)
def test_hostile_headers(tmp_path, header, data, message):
    p = tmp_path / "bad.safetensors"
    _raw(p, header, data)
    with pytest.raises(ModelFormatError, match=message):
        SafetensorsFile(p)


def test_header_length_beyond_file(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(ModelFormatError, match="claims"):
        SafetensorsFile(p)


def test_truncated_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": np.ones((64, 64), np.float32)}, str(good))
    raw = good.read_bytes()
    for cut in (0, 5, 20, len(raw) - 1):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(raw[:cut])
        with pytest.raises(ModelFormatError):
            SafetensorsFile(p)


def test_header_not_json(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        SafetensorsFile(p)


def test_writer_streams_and_checks_order(tmp_path):
    specs = [("a", np.float32, (2, 3)), ("b", np.uint32, (4,))]
    w = SafetensorsWriter(tmp_path / "o.safetensors", specs)
    with pytest.raises(ValueError):
        w.write("b", np.zeros(4, np.uint32))
    w.write("a", np.ones((2, 3), np.float32))
    w.write("b", np.arange(4, dtype=np.uint32))
    w.close()
    f = SafetensorsFile(tmp_path / "o.safetensors")
    np.testing.assert_array_equal(f.get("b"), np.arange(4))
    assert not (tmp_path / "o.safetensors.partial").exists()


def test_model_dir_missing_tensor(tmp_path):
    from tiny import random_weights

    cfg = tiny_config()
    w = random_weights(cfg)
    del w["model.layers.1.mlp.up_proj.weight"]
    write_model(tmp_path, cfg, w)
    with pytest.raises(ModelFormatError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        ModelDir(tmp_path)


def test_model_dir_wrong_shape(tmp_path):
    from tiny import random_weights

    cfg = tiny_config()
    w = random_weights(cfg)
    w["model.norm.weight"] = np.ones(63, np.float32)
    write_model(tmp_path, cfg, w)
    with pytest.raises(ModelFormatError, match=r"model.norm.weight has shape \[63\], expected \[64\]"):
        ModelDir(tmp_path)


def test_model_dir_unexpected_tensor(tmp_path):
    from tiny import random_weights

    cfg = tiny_config()
    w = random_weights(cfg)
    w["model.layers.9.mlp.up_proj.weight"] = np.ones(3, np.float32)
    write_model(tmp_path, cfg, w)
    with pytest.raises(ModelFormatError, match="unexpected tensors"):
        ModelDir(tmp_path)


def test_unknown_architecture(tmp_path):
    write_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'mamba'"):
        ModelDir(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_attention_heads": 3}, "not divisible"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"hidden_size": -4}, "positive"),
        ({"rms_norm_eps": "x"}, "positive number"),
        ({"quantization": {"bits": 7, "group_size": 64}}, "unsupported quantization"),
    ],
)
def test_bad_config_values(tmp_path, change, message):
    write_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((ModelFormatError, UnsupportedModelError), match=message):
        ModelDir(tmp_path)


def test_missing_or_corrupt_config(tmp_path):
    write_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        ModelDir(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="not found"):
        ModelDir(tmp_path)


def test_quantized_shape_mismatch(tmp_path):
    write_model(tmp_path, bits=4, group_size=32)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization"]["group_size"] = 64  # scales no longer match
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="scales has shape"):
        ModelDir(tmp_path)


# --- MLX's affine layout (ondevice.quant) ----------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_is_a_little_endian_bit_stream(bits):
    from ondevice.quant import pack, unpack

    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, (3, 64), dtype=np.uint8)
    words = pack(codes, bits)
    assert words.dtype == np.uint32 and words.shape == (3, 64 * bits // 32)
    stream = np.unpackbits(words.astype("<u4").view(np.uint8), axis=-1, bitorder="little")
    place = 1 << np.arange(bits)
    np.testing.assert_array_equal((stream.reshape(3, 64, bits) * place).sum(-1), codes)
    np.testing.assert_array_equal(unpack(words, bits), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quant_layout_is_mlx_bit_for_bit(bits, group_size):
    mx = pytest.importorskip("mlx.core")
    from ondevice.quant import dequantize, packed_shape, quantize

    rng = np.random.default_rng(bits * 1000 + group_size)
    w = rng.standard_normal((6, 256)).astype(np.float32)
    # MLX's packing read by us ...
    q, s, b = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
    theirs = np.array(mx.dequantize(q, s, b, group_size=group_size, bits=bits))
    ours = dequantize(np.array(q), np.array(s), np.array(b), group_size, bits)
    np.testing.assert_array_equal(ours, theirs)
    assert packed_shape(w.shape, group_size, bits) == {
        "weight": tuple(q.shape), "scales": tuple(s.shape), "biases": tuple(b.shape)
    }
    # ... and ours read by MLX, in dequantize and in the quantized matmul.
    p, s2, b2 = quantize(w, group_size, bits)
    args = (mx.array(p), mx.array(s2.astype(np.float32)), mx.array(b2.astype(np.float32)))
    back = np.array(mx.dequantize(*args, group_size=group_size, bits=bits))
    np.testing.assert_array_equal(back, dequantize(p, s2, b2, group_size, bits))
    x = rng.standard_normal((3, 256)).astype(np.float32)
    y = np.array(mx.quantized_matmul(mx.array(x), *args, transpose=True, group_size=group_size,
                                     bits=bits))
    np.testing.assert_allclose(y, x @ back.T, rtol=1e-5, atol=1e-5)
    # Quantization error stays within half a step.
    step = np.repeat(s2.astype(np.float32), group_size, axis=-1)
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)


def test_quant_rejects_impossible_layouts():
    from ondevice.quant import dequantize, pack, packed_shape

    with pytest.raises(UnsupportedModelError, match="7-bit"):
        packed_shape((4, 64), 32, 7)
    with pytest.raises(UnsupportedModelError, match="group size"):
        packed_shape((4, 48), 32, 4)
    with pytest.raises(UnsupportedModelError, match="words"):
        packed_shape((4, 16), 16, 5)  # 80 bits: not whole words
    with pytest.raises(UnsupportedModelError):
        pack(np.zeros((2, 20), np.uint8), 6)
    with pytest.raises(UnsupportedModelError, match="disagree"):
        dequantize(np.zeros((2, 5), np.uint32), np.zeros((2, 2)), np.zeros((2, 2)), 32, 5)


@pytest.mark.parametrize("bits", [8, 5, 6])
def test_model_dir_with_per_layer_overrides(tmp_path, bits):
    """mlx-lm's per-module overrides in config["quantization"] pick each tensor's layout."""
    from ondevice.config import ModelConfig
    from ondevice.quant import quantize

    write_model(tmp_path, bits=4, group_size=32)
    cfg = json.loads((tmp_path / "config.json").read_text())
    prefix = "model.layers.0.mlp.down_proj"
    cfg["quantization"][prefix] = {"group_size": 64, "bits": bits}
    try:
        ModelConfig.from_dict(cfg)
    except UnsupportedModelError:
        pytest.xfail(f"ondevice/config.py does not accept {bits}-bit quantization yet")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    f = SafetensorsFile(tmp_path / "model.safetensors")
    tensors = {n: np.array(f.get(n)) for n in f.keys()}
    f.close()
    w = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    q, s, b = quantize(w, 64, bits)
    tensors.update({prefix + ".weight": q, prefix + ".scales": s, prefix + ".biases": b})
    save_file(tensors, str(tmp_path / "model.safetensors"))
    md = ModelDir(tmp_path)
    try:
        t = md.get(prefix)
        assert (t.group_size, t.bits, t.shape) == (64, bits, (64, 128))
        assert np.abs(t.dequantize() - w).max() <= s.astype(np.float32).max() / 2 + 1e-6
        assert md.get("model.layers.1.mlp.down_proj").bits == 4
    finally:
        md.close()
