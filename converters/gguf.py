"""Read a GGUF file (llama.cpp's format) as Hugging Face-named float32 tensors plus a config.

The file is never trusted: :func:`read_header` parses the header with every count and length
checked against the bytes that remain before anything is allocated for it, and checks every
tensor's byte range against the file size and the other tensors; any problem is one line of
:class:`ModelFormatError` naming the file. Tensor data stays memory-mapped and is dequantized
block by block with :func:`gguf.quants.dequantize`, or (:meth:`GGUFModel.packed_chunks`)
re-expressed as MLX affine groups of 32 without a second quantization
(:mod:`.ggml_blocks`).

We parse the header ourselves rather than with :class:`gguf.GGUFReader`: the reader makes
several NumPy objects per metadata array element (for SmolLM2's 49k tokens and 49k merges that
is ~170 MB and ~3 s, more than the whole conversion needs otherwise) and trusts the counts it
reads. The tests check that both read the same metadata and tensor table.

Layout facts this module relies on:

- ggml lists dimensions fastest-first (``ne``); ``ne[0]`` is the contiguous one, i.e. the last
  dimension of the row-major NumPy/Hugging Face tensor. A GGUF matrix with ``ne = [in, out]``
  therefore *is* the Hugging Face ``[out, in]`` matrix, with no transpose.
- llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` (weights and biases) of the
  ``llama`` architecture so that its interleaved RoPE matches Hugging Face's rotate-half RoPE;
  we undo it. ``qwen2`` uses the rotate-half ("NeoX") RoPE in llama.cpp, so nothing is permuted.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from ..config import ModelConfig
from ..errors import ModelFormatError, TokenizerError, UnsupportedModelError
from ..models.llama import TensorSpec, weight_specs
from . import ggml_blocks
from .gguf_tokenizer import GGUFVocab
from .writer import Storage

Q = GGMLQuantizationType
SUPPORTED_TYPES = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K,
)


@dataclass(frozen=True)
class Architecture:
    """How one ``general.architecture`` maps onto a Hugging Face model family."""

    model_type: str
    hf_class: str
    permuted_qk: bool  # whether llama.cpp permuted the q/k rows for its interleaved RoPE
    # llama.cpp's converter stores Gemma's RMSNorm weights as 1 + w (Hugging Face keeps w):
    # subtract the 1 again so the model directory is a Hugging Face checkpoint.
    norm_plus_one: bool = False


ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", permuted_qk=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", permuted_qk=False),
    "gemma3": Architecture("gemma3_text", "Gemma3ForCausalLM", permuted_qk=False,
                           norm_plus_one=True),
}

# GGUF tensor names -> Hugging Face names.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    **{
        f"attn_{g}.{kind}": f"self_attn.{h}_proj.{kind}"
        for g, h in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o"))
        for kind in ("weight", "bias")
    },
    **{
        f"ffn_{g}.{kind}": f"mlp.{g}_proj.{kind}"
        for g in ("gate", "up", "down")
        for kind in ("weight", "bias")
    },
}
# Gemma 3's per-layer tensors where they differ from the Llama names (its ffn_norm is the norm
# before the MLP; post_attention_norm the one after attention).
GEMMA3_BLOCK_NAMES = {
    **BLOCK_NAMES,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
# llama.cpp's Gemma 3: local layers use RoPE base 10k; five local layers per global one; the
# 27B model (62 layers) scales queries by hidden / heads instead of head_dim.
GEMMA3_LOCAL_ROPE_BASE = 10000.0
GEMMA3_PATTERN = 6
GEMMA3_27B_LAYERS = 62
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")
ROPE_FREQS = "rope_freqs.weight"

# --- header parsing ----------------------------------------------------------------------
MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
# Every metadata array element becomes a Python object; real vocabularies (tokens, scores,
# types, merges) stay far below this many in total.
MAX_METADATA_ELEMENTS = 1 << 22
MAX_NESTING = 2
MAX_ELEMENTS = 1 << 40  # per tensor
# Bytes of quantized blocks scanned at a time when checking a tensor's scales.
BLOCK_ROWS_BYTES = 1 << 22
_SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
# Smallest possible encodings, used to reject counts the file is too small to hold.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it; ``dims`` in ggml order (``ne``, fastest first)."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute, in bytes from the start of the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The row-major (NumPy / Hugging Face) shape."""
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        return Q(self.ggml_type).name


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's validated header: metadata values and the tensor table."""

    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_start: int
    file_size: int


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(
                f"truncated GGUF file: {what} needs {n} bytes at offset {self.pos} but only "
                f"{self.size - self.pos} remain"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.unpack("Q", f"length of {what}")
        self.need(n, f"{what} ({n}-byte string)")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None


def read_header(path: str | Path) -> GGUFHeader:
    """Parse and validate a GGUF file's header without trusting any count or length in it.

    Raises :class:`ModelFormatError` (one line, naming the file) for a bad magic, a truncated
    header, counts or lengths the file cannot hold, or tensor data outside the file or
    overlapping another tensor; :class:`UnsupportedModelError` for an unknown version or
    tensor type id.
    """
    f = _MappedFile(Path(path))
    try:
        return _parse(_Cursor(f.buf, f.size, f.path))
    finally:
        f.close()


class _MappedFile:
    """A file's read-only memory map, checked to be long enough to hold a GGUF header."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fh = open(path, "rb")
        except OSError as err:
            raise ModelFormatError(f"{path}: cannot open ({err.strerror or err})") from None
        self.size = os.fstat(self.fh.fileno()).st_size
        if self.size < 24:
            self.fh.close()
            raise ModelFormatError(f"{path}: truncated GGUF file ({self.size} bytes)")
        self.buf = mmap.mmap(self.fh.fileno(), 0, access=mmap.ACCESS_READ)

    def close(self) -> None:
        try:
            self.buf.close()
        except BufferError:  # an array still views the mapping; the GC unmaps it later
            pass
        self.fh.close()


def _parse(cur: _Cursor) -> GGUFHeader:
    path, size = cur.path, cur.size
    if cur.buf[:4] != MAGIC:
        raise cur.fail(f"not a GGUF file (magic {bytes(cur.buf[:4])!r}, expected {MAGIC!r})")
    cur.pos = 4
    version = cur.unpack("I", "version")
    if version & 0xFFFF == 0 and version:
        raise UnsupportedModelError(f"{path}: big-endian GGUF files are not supported")
    if version not in VERSIONS:
        raise UnsupportedModelError(
            f"{path}: GGUF version {version} is not supported (supported: 2, 3)"
        )
    tensor_count = cur.unpack("Q", "tensor count")
    kv_count = cur.unpack("Q", "metadata count")
    room = size - cur.pos
    if kv_count * _MIN_KV_BYTES > room or tensor_count * _MIN_TENSOR_INFO_BYTES > room:
        raise cur.fail(
            f"header claims {tensor_count} tensors and {kv_count} metadata entries, more than "
            f"a {size}-byte file can hold (corrupt or truncated)"
        )
    metadata: dict[str, Any] = {}
    budget = [MAX_METADATA_ELEMENTS]
    for i in range(kv_count):
        key = cur.string(f"metadata key #{i}")
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        vtype = cur.unpack("I", f"type of {key!r}")
        metadata[key] = _value(cur, vtype, key, 0, budget)
    alignment = metadata.get("general.alignment", 32)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two")
    infos = []
    names: set[str] = set()
    for i in range(tensor_count):
        name = cur.string(f"name of tensor #{i}")
        if name in names:
            raise cur.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = cur.unpack("I", f"rank of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = tuple(cur.unpack("Q", f"dimensions of {name!r}") for _ in range(n_dims))
        raw_type = cur.unpack("I", f"type of {name!r}")
        offset = cur.unpack("Q", f"offset of {name!r}")
        try:
            block, type_size = GGML_QUANT_SIZES[Q(raw_type)]
        except (ValueError, KeyError):
            raise UnsupportedModelError(
                f"{path}: tensor {name!r} has unknown ggml type id {raw_type}"
            ) from None
        count = math.prod(dims)
        if not all(d >= 1 for d in dims) or count > MAX_ELEMENTS:
            raise cur.fail(f"tensor {name!r} has implausible dimensions {list(dims)}")
        if dims[0] % block:
            raise cur.fail(
                f"tensor {name!r}: first dimension {dims[0]} is not a multiple of the "
                f"{Q(raw_type).name} block size {block}"
            )
        if offset % alignment:
            raise cur.fail(f"tensor {name!r}: data offset {offset} is not {alignment}-aligned")
        infos.append((name, dims, raw_type, offset, count // block * type_size))
    data_start = cur.pos + (-cur.pos % alignment)
    if data_start > size:
        raise cur.fail(f"truncated GGUF file: tensor data would start at {data_start}")
    tensors = tuple(
        TensorInfo(name, dims, raw_type, data_start + offset, nbytes)
        for name, dims, raw_type, offset, nbytes in infos
    )
    for t in tensors:
        if t.offset + t.nbytes > size:
            raise cur.fail(
                f"tensor {t.name!r} data [{t.offset}, {t.offset + t.nbytes}) lies beyond the end "
                f"of the {size}-byte file (truncated or corrupt)"
            )
    spans = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(spans, spans[1:], strict=False):
        if b.offset < a.offset + a.nbytes:
            raise cur.fail(f"tensors {a.name!r} and {b.name!r} overlap")
    return GGUFHeader(version, metadata, tensors, alignment, data_start, size)


def _value(cur: _Cursor, vtype: int, key: str, depth: int, budget: list[int]) -> Any:
    fmt = _SCALARS.get(vtype)
    if fmt is not None:
        return cur.unpack(fmt, f"value of {key!r}")
    if vtype == GGUFValueType.STRING:
        return cur.string(f"value of {key!r}")
    if vtype != GGUFValueType.ARRAY:
        raise cur.fail(f"metadata {key!r} has unknown value type {vtype}")
    if depth >= MAX_NESTING:
        raise cur.fail(f"metadata {key!r} nests arrays more than {MAX_NESTING} deep")
    itype = cur.unpack("I", f"element type of {key!r}")
    count = cur.unpack("Q", f"length of {key!r}")
    item = _SCALARS.get(itype)
    if item is not None:
        least = struct.calcsize(item)
    elif itype == GGUFValueType.STRING:
        least = 8
    elif itype == GGUFValueType.ARRAY:
        least = 12
    else:
        raise cur.fail(f"metadata {key!r} has unknown element type {itype}")
    # Check the claimed length against the bytes left before allocating anything for it.
    if count * least > cur.size - cur.pos:
        raise cur.fail(
            f"metadata {key!r} claims {count} elements, more than the {cur.size - cur.pos} "
            "remaining bytes can hold (corrupt or truncated)"
        )
    budget[0] -= count
    if budget[0] < 0:
        raise cur.fail(
            f"metadata arrays hold more than {MAX_METADATA_ELEMENTS} elements in total "
            f"({key!r} has {count}); refusing to load"
        )
    if item is not None:
        values = np.frombuffer(cur.buf, np.dtype("<" + item), count, cur.pos).tolist()
        cur.pos += count * least
        return values
    if itype == GGUFValueType.STRING:
        return [cur.string(f"{key!r}[{i}]") for i in range(count)]
    return [_value(cur, itype, key, depth + 1, budget) for _ in range(count)]


# --- the model ---------------------------------------------------------------------------


class GGUFModel:
    """A validated GGUF checkpoint of a supported architecture, memory-mapped.

    Attributes: ``header`` (:class:`GGUFHeader`), ``architecture``, ``vocab``
    (:class:`GGUFVocab`), ``config_dict`` (the Hugging Face ``config.json``), ``config``
    (:class:`ModelConfig`) and ``specs`` (the expected tensors, every one present with the
    right shape and a supported type). :meth:`chunks` streams one tensor as float32 row
    blocks in Hugging Face layout.
    """

    source_format = "gguf"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = self.path.name
        self._file = _MappedFile(self.path)
        self._buf: mmap.mmap | None = self._file.buf
        self._storage: dict[str, Storage] = {}
        try:
            self.header = _parse(_Cursor(self._buf, self._file.size, self.path))
            self._load()
        except BaseException:
            self.close()
            raise

    # -- metadata --------------------------------------------------------------------------
    def _field(self, key: str, kind: type, default: Any = None) -> Any:
        """Metadata ``key`` checked to be of ``kind`` (int, float, str, bool or list)."""
        value = self.header.metadata.get(key)
        if value is None:
            return default
        if kind is list:
            ok = isinstance(value, list)
        elif isinstance(value, bool):
            ok = kind is bool
        elif kind is float:
            ok = isinstance(value, (int, float))
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise ModelFormatError(
                f"{self.path}: metadata {key} is {_describe(value)}, expected {kind.__name__}"
            )
        return float(value) if kind is float else value

    def _required(self, key: str, kind: type) -> Any:
        value = self._field(key, kind)
        if value is None:
            raise ModelFormatError(f"{self.path}: metadata {key} is missing")
        return value

    def _uniform(self, key: str, default: int | None = None) -> int | None:
        """An int that some converters store per layer; every layer must agree."""
        value = self.header.metadata.get(key)
        if value is None:
            return default
        values = value if isinstance(value, list) else [value]
        if not values or not all(type(v) is int for v in values):
            raise ModelFormatError(f"{self.path}: metadata {key} must be an integer")
        if len(set(values)) != 1:
            raise UnsupportedModelError(
                f"{self.path}: {key} differs between layers ({sorted(set(values))}), which "
                "this runtime does not support"
            )
        return values[0]

    def _load(self) -> None:
        arch_name = self._field("general.architecture", str)
        if arch_name is None:
            raise ModelFormatError(f"{self.path}: metadata general.architecture is missing")
        arch = ARCHITECTURES.get(arch_name)
        if arch is None:
            raise UnsupportedModelError(
                f"{self.path}: unsupported GGUF architecture {arch_name!r} "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        self.architecture = arch
        self._tensors = {t.name: t for t in self.header.tensors}
        self.vocab = self._read_vocab()
        self.config_dict = self._config_dict(arch_name, arch)
        try:
            self.config = ModelConfig.from_dict(self.config_dict)
        except ModelFormatError as err:  # its messages speak of config.json; ours is metadata
            raise ModelFormatError(
                f"{self.path}: metadata: {str(err).removeprefix('config.json: ')}"
            ) from None
        self.specs: dict[str, TensorSpec] = weight_specs(self.config)
        self._hf_to_gguf = self._map_tensors()

    def _config_dict(self, arch_name: str, arch: Architecture) -> dict[str, Any]:
        a = arch_name + "."
        hidden = self._required(a + "embedding_length", int)
        n_head = self._uniform(a + "attention.head_count")
        if n_head is None:
            raise ModelFormatError(f"{self.path}: metadata {a}attention.head_count is missing")
        n_kv = self._uniform(a + "attention.head_count_kv", n_head)
        if n_head <= 0 or n_kv <= 0:
            raise ModelFormatError(f"{self.path}: attention head counts must be positive")
        head_dim = self._field(a + "attention.key_length", int)
        if head_dim is None:
            # Left for ModelConfig to derive (and to reject when it does not divide).
            head_dim = hidden // n_head if hidden % n_head == 0 else None
        value_dim = self._field(a + "attention.value_length", int, head_dim)
        rope_dim = self._field(a + "rope.dimension_count", int, head_dim)
        if value_dim != head_dim:
            raise UnsupportedModelError(
                f"{self.path}: key length {head_dim} != value length {value_dim} is not supported"
            )
        if rope_dim != head_dim:
            raise UnsupportedModelError(
                f"{self.path}: partial rotary embeddings ({rope_dim} of {head_dim} dims) are "
                "not supported"
            )
        embd = self._tensors.get("token_embd.weight")
        if embd is None:
            raise ModelFormatError(f"{self.path}: missing tensor token_embd.weight")
        if len(embd.dims) != 2 or embd.dims[0] != hidden:
            raise ModelFormatError(
                f"{self.path}: token_embd.weight has ggml dims {list(embd.dims)}, expected "
                f"[{hidden}, vocab]"
            )
        vocab_size = embd.dims[1]
        declared = self._field(a + "vocab_size", int)
        if declared is not None and declared != vocab_size:
            raise ModelFormatError(
                f"{self.path}: {a}vocab_size is {declared} but token_embd.weight has "
                f"{vocab_size} rows"
            )
        if len(self.vocab.tokens) > vocab_size:
            raise ModelFormatError(
                f"{self.path}: the tokenizer has {len(self.vocab.tokens)} tokens but the "
                f"embedding only {vocab_size} rows"
            )
        ffn = self._uniform(a + "feed_forward_length")
        if ffn is None:
            raise ModelFormatError(f"{self.path}: metadata {a}feed_forward_length is missing")
        has = self._tensors.__contains__
        rope_theta = _float32(self._field(a + "rope.freq_base", float, 10000.0))
        cfg: dict[str, Any] = {
            "architectures": [arch.hf_class],
            "model_type": arch.model_type,
            "hidden_size": hidden,
            "intermediate_size": ffn,
            "num_hidden_layers": self._required(a + "block_count", int),
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": _float32(self._required(a + "attention.layer_norm_rms_epsilon", float)),
            "max_position_embeddings": self._required(a + "context_length", int),
            "rope_theta": rope_theta,
            "rope_scaling": self._rope_scaling(a, head_dim, rope_theta),
            "tie_word_embeddings": not has("output.weight"),
            # qwen2's q/k/v biases are implied by its model_type; llama only has biases when
            # the checkpoint says so (then on o_proj too, as Hugging Face's attention_bias).
            "attention_bias": arch.model_type == "llama" and has("blk.0.attn_q.bias"),
            "mlp_bias": has("blk.0.ffn_up.bias"),
            "vocab_size": vocab_size,
            "bos_token_id": self.vocab.bos_id,
            "eos_token_id": self.vocab.eos_id,
        }
        if arch.model_type == "gemma3_text":
            cfg.update(self._gemma3_config(a, cfg))
        return {k: v for k, v in cfg.items() if v is not None}

    def _gemma3_config(self, a: str, cfg: dict[str, Any]) -> dict[str, Any]:
        """The Gemma 3 keys of ``config.json`` that llama.cpp keeps as metadata or constants."""
        window = self._field(a + "attention.sliding_window", int)
        if window is None:
            raise ModelFormatError(f"{self.path}: metadata {a}attention.sliding_window is missing")
        n = cfg["num_hidden_layers"]
        heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
        scalar = hidden // heads if n == GEMMA3_27B_LAYERS else cfg["head_dim"]
        return {
            "hidden_act": None,  # Gemma names it hidden_activation
            "hidden_activation": "gelu_pytorch_tanh",
            "sliding_window": window,
            "layer_types": [
                "full_attention" if (i + 1) % GEMMA3_PATTERN == 0 else "sliding_attention"
                for i in range(n)
            ] if 0 < n <= 1024 else None,
            "query_pre_attn_scalar": scalar,
            "rope_local_base_freq": GEMMA3_LOCAL_ROPE_BASE,
            "final_logit_softcapping": self._field(a + "final_logit_softcapping", float),
            "tie_word_embeddings": True,
            "attention_bias": False,
            "mlp_bias": False,
        }

    def _rope_scaling(
        self, a: str, head_dim: int | None, theta: float
    ) -> dict[str, Any] | None:
        kind = self._field(a + "rope.scaling.type", str)
        factor = self._field(a + "rope.scaling.factor", float)
        if kind is None and self._field(a + "rope.scale_linear", float) is not None:
            kind, factor = "linear", self._field(a + "rope.scale_linear", float)
        if kind == "linear" and factor is not None and factor != 1.0:
            scaling: dict[str, Any] | None = {"rope_type": "linear", "factor": _float32(factor)}
        elif kind in (None, "none", "linear"):
            scaling = None
        else:
            raise UnsupportedModelError(f"{self.path}: RoPE scaling {kind!r} is not supported")
        if ROPE_FREQS in self._tensors and head_dim:
            if scaling is not None:
                raise UnsupportedModelError(
                    f"{self.path}: both {kind} RoPE scaling and a {ROPE_FREQS} tensor"
                )
            scaling = self._llama3_scaling(head_dim, theta)
        return scaling

    def _llama3_scaling(self, head_dim: int, theta: float) -> dict[str, Any] | None:
        """Recover Llama 3's rope_scaling from the per-frequency factors llama.cpp stores.

        llama.cpp bakes ``rope_scaling`` into ``rope_freqs.weight`` (the divisor of each inverse
        frequency). We accept it only when a llama3 parameter set reproduces every factor, so
        the runtime's own llama3 formula gives the same frequencies.
        """
        info = self._tensors[ROPE_FREQS]
        if info.dims != (head_dim // 2,) or info.ggml_type not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"{self.path}: {ROPE_FREQS} is {info.type_name} {list(info.dims)}, expected "
                f"float [{head_dim // 2}]"
            )
        stored = _dequantize(self._raw(info), info, self.path).reshape(-1).astype(np.float64)
        if np.all(stored == 1.0):
            return None
        inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        wavelen = 2 * math.pi / inv
        factor = float(np.float32(stored.max()))
        for old_ctx in (8192, 4096, 16384, 32768, 2048):
            for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
                smooth = (old_ctx / wavelen - low) / (high - low)
                expect = np.where(
                    wavelen < old_ctx / high, 1.0,
                    np.where(wavelen > old_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth)),
                )
                if np.allclose(stored, expect, rtol=1e-5, atol=0):
                    return {
                        "rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": old_ctx,
                    }
        raise UnsupportedModelError(
            f"{self.path}: {ROPE_FREQS} holds RoPE frequency factors that match no llama3 "
            "rope_scaling; this GGUF's RoPE scaling is not supported"
        )

    def _read_vocab(self) -> GGUFVocab:
        model = self._field("tokenizer.ggml.model", str)
        tokens = self._field("tokenizer.ggml.tokens", list)
        if model is None or tokens is None:
            raise TokenizerError(f"{self.path}: the GGUF file has no tokenizer")
        if not all(isinstance(t, str) for t in tokens):
            raise TokenizerError(f"{self.path}: tokenizer.ggml.tokens must be strings")
        merges = self._field("tokenizer.ggml.merges", list)
        if merges is not None and not all(isinstance(m, str) for m in merges):
            raise TokenizerError(f"{self.path}: tokenizer.ggml.merges must be strings")
        types = self._field("tokenizer.ggml.token_type", list)
        if types is not None and not all(type(t) is int for t in types):
            raise TokenizerError(f"{self.path}: tokenizer.ggml.token_type must be integers")
        scores = self._field("tokenizer.ggml.scores", list)

        def token_id(key: str) -> int | None:
            value = self._field(key, int)
            # Some writers store "no such token" as -1 (or its uint32 form) instead of omitting it.
            return None if value in (-1, 0xFFFFFFFF) else value

        if scores is not None and not all(isinstance(x, (int, float)) for x in scores):
            raise TokenizerError(f"{self.path}: tokenizer.ggml.scores must be numbers")
        try:
            return GGUFVocab(
                model=model,
                tokens=tuple(tokens),
                token_types=_tuple(types),
                scores=_tuple(scores),
                merges=_tuple(merges),
                pre=self._field("tokenizer.ggml.pre", str),
                bos_id=token_id("tokenizer.ggml.bos_token_id"),
                eos_id=token_id("tokenizer.ggml.eos_token_id"),
                unk_id=token_id("tokenizer.ggml.unknown_token_id"),
                pad_id=token_id("tokenizer.ggml.padding_token_id"),
                eot_id=token_id("tokenizer.ggml.eot_token_id"),
                add_bos=self._field("tokenizer.ggml.add_bos_token", bool),
                add_eos=self._field("tokenizer.ggml.add_eos_token", bool),
                add_space_prefix=self._field("tokenizer.ggml.add_space_prefix", bool),
                chat_template=self._field("tokenizer.chat_template", str),
            )
        except TokenizerError as err:
            raise TokenizerError(f"{self.path}: {err}") from None

    # -- tensors ---------------------------------------------------------------------------
    def _map_tensors(self) -> dict[str, TensorInfo]:
        """Check every GGUF tensor against the expected set: name, shape and type."""
        mapping: dict[str, TensorInfo] = {}
        for name, info in self._tensors.items():
            if name == ROPE_FREQS:
                continue  # folded into rope_scaling
            hf = hf_name(name, self.architecture)
            if hf is None:
                raise UnsupportedModelError(
                    f"{self.path}: tensor {name!r} is not part of a supported "
                    f"{self.config.model_type} model"
                )
            spec = self.specs.get(hf)
            if spec is None:
                raise ModelFormatError(
                    f"{self.path}: unexpected tensor {name!r} ({hf}) for this configuration"
                )
            if info.shape != spec.shape:
                raise ModelFormatError(
                    f"{self.path}: tensor {name!r} ({hf}) has shape {list(info.shape)} "
                    f"(ggml dims {list(info.dims)}), expected {list(spec.shape)}"
                )
            if info.ggml_type not in SUPPORTED_TYPES:
                raise UnsupportedModelError(
                    f"{self.path}: tensor {name!r} has type {info.type_name}, which is not "
                    f"supported (supported: {', '.join(t.name for t in SUPPORTED_TYPES)})"
                )
            mapping[hf] = info
        for hf, spec in self.specs.items():
            if hf not in mapping:
                raise ModelFormatError(
                    f"{self.path}: missing tensor {gguf_name(hf, self.architecture)} ({hf}, "
                    f"expected shape "
                    f"{list(spec.shape)})"
                )
        return mapping

    def _qk_heads(self, hf: str) -> int | None:
        """Number of heads whose rows llama.cpp permuted in this tensor, or None."""
        if not self.architecture.permuted_qk:
            return None
        if ".self_attn.q_proj." in hf:
            return self.config.num_attention_heads
        if ".self_attn.k_proj." in hf:
            return self.config.num_key_value_heads
        return None

    def chunks(self, hf: str, max_elements: int) -> Iterator[np.ndarray]:
        """Tensor ``hf`` as consecutive float32 blocks of rows, in Hugging Face layout.

        Blocks hold about ``max_elements`` values (at least one row); 1-D tensors come whole.
        """
        info = self._hf_to_gguf[hf]
        shape, hd = info.shape, self.config.head_dim
        permuted = self._qk_heads(hf) is not None
        data = self._raw(info)  # [rows, bytes per row]; a 1-D tensor is one row
        if len(shape) == 1:
            block = _dequantize(data, info, self.path).reshape(shape)
            if self.architecture.norm_plus_one and self.specs[hf].kind == "norm":
                block = block - np.float32(1)
            yield _unpermute(block, hd) if permuted else block
        else:
            step = max(1, max_elements // math.prod(shape[1:]))
            if permuted:
                # The permutation stays inside a head, so blocks of whole heads undo it exactly.
                step = max(hd, step // hd * hd)
            for r0 in range(0, shape[0], step):
                block = _dequantize(data[r0:r0 + step], info, self.path)
                yield _unpermute(block, hd) if permuted else block
        del data, block
        self._release(info)

    def storage(self, hf: str) -> Storage:
        """How ``keep`` stores tensor ``hf``: ggml's quantized matrices as MLX affine groups of
        32 (:mod:`.ggml_blocks`) with float16 scales and biases where every one of them is
        exact in float16, else float32; F16 stays float16, everything else float32."""
        cached = self._storage.get(hf)
        if cached is not None:
            return cached
        info, spec = self._hf_to_gguf[hf], self.specs[hf]
        qtype = Q(info.ggml_type)
        if qtype in ggml_blocks.BITS and spec.kind in ("embedding", "linear"):
            dtype = np.float16
            if qtype in ggml_blocks.EXACT_TYPES:
                data = self._raw(info)
                step = max(1, BLOCK_ROWS_BYTES // max(1, data.shape[1]))
                for r0 in range(0, data.shape[0], step):
                    s, b = ggml_blocks.params(data[r0:r0 + step], qtype)
                    if not ggml_blocks.f16_exact(s, b):
                        dtype = np.float32
                        break
                del data
                self._release(info)
            st = Storage(np.dtype(dtype), ggml_blocks.BITS[qtype], ggml_blocks.GROUP)
        elif qtype == Q.F16:
            st = Storage(np.dtype(np.float16))
        else:
            st = Storage(np.dtype(np.float32))
        self._storage[hf] = st
        return st

    def packed_chunks(
        self, hf: str, max_elements: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Tensor ``hf`` (quantized in :meth:`storage`) as row blocks of MLX affine
        (packed uint32 weight, float32 scales, float32 biases), in Hugging Face layout.

        The q/k row permutation is undone on the packed rows, which is lossless: rows are
        independent in both layouts.
        """
        info = self._hf_to_gguf[hf]
        qtype = Q(info.ggml_type)
        if qtype not in ggml_blocks.BITS or len(info.shape) != 2:
            raise ValueError(f"{hf} is not stored packed")
        hd = self.config.head_dim
        permuted = self._qk_heads(hf) is not None
        data = self._raw(info)
        step = max(1, max_elements // info.shape[1])
        if permuted:
            step = max(hd, step // hd * hd)
        for r0 in range(0, info.shape[0], step):
            parts = ggml_blocks.packed(data[r0:r0 + step], qtype)
            yield tuple(_unpermute(p, hd) for p in parts) if permuted else parts
        del data
        self._release(info)

    def _raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as a read-only ``[rows, bytes per row]`` view of the mapping.

        Only 1-D and 2-D tensors occur in the Llama family (``_map_tensors`` checked that).
        """
        if self._buf is None:
            raise ValueError(f"{self.path} is closed")
        rows = math.prod(info.dims[1:])
        data = np.frombuffer(self._buf, np.uint8, info.nbytes, info.offset)
        return data.reshape(rows, info.nbytes // rows)

    def _release(self, info: TensorInfo) -> None:
        # The pages just read stay counted in our RSS until the kernel wants them back; drop
        # them now so that peak memory stays near one tensor whatever the file size.
        start = info.offset // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            self._buf.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)
        except (AttributeError, OSError, ValueError):  # no madvise here; harmless to skip
            pass

    def close(self) -> None:
        """Unmap the file (left to the garbage collector while an array still views it)."""
        if self._buf is None:
            return
        self._buf = None
        self._file.close()


def _block_names(arch: Architecture | None) -> dict[str, str]:
    return GEMMA3_BLOCK_NAMES if arch is not None and arch.model_type == "gemma3_text" else BLOCK_NAMES


def hf_name(gguf: str, arch: Architecture | None = None) -> str | None:
    """The Hugging Face name of a GGUF tensor name, or None if it is not a tensor of ``arch``
    (default: the Llama family)."""
    if gguf in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf]
    m = _BLOCK_RE.fullmatch(gguf)
    names = _block_names(arch)
    if m and m.group(2) in names:
        return f"model.layers.{int(m.group(1))}.{names[m.group(2)]}"
    return None


def gguf_name(hf: str, arch: Architecture | None = None) -> str:
    """Inverse of :func:`hf_name` (for messages)."""
    for g, h in GLOBAL_NAMES.items():
        if h == hf:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    if m:
        for g, h in _block_names(arch).items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}"
    return hf


def _unpermute(w: np.ndarray, head_dim: int) -> np.ndarray:
    # Per head, llama.cpp stored row j*2+i of the rotate-half row i*hd/2+j; swap them back.
    return np.ascontiguousarray(
        w.reshape(-1, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _dequantize(data: np.ndarray, info: TensorInfo, path: Path) -> np.ndarray:
    try:
        out = dequantize(data, Q(info.ggml_type))
    except (ValueError, NotImplementedError) as err:
        raise UnsupportedModelError(
            f"{path}: cannot dequantize tensor {info.name!r} ({info.type_name}): {err}"
        ) from None
    return out.astype(np.float32, copy=False)


def _float32(value: float) -> float:
    # GGUF stores these as float32; the shortest repr that round-trips (1e-05, not
    # 9.999999747378752e-06) is the number the original config.json had.
    return float(str(np.float32(value)))


def _describe(value: Any) -> str:
    return f"an array of {len(value)}" if isinstance(value, list) else type(value).__name__


def _tuple(value: list | None) -> tuple | None:
    return None if value is None else tuple(value)

