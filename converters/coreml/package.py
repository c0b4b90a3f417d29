"""Reading a saved ``.mlpackage`` without Core ML: the protobuf program and its weight blobs.

A package holds ``Data/com.apple.CoreML/model.mlmodel`` (a ``Model`` protobuf whose
``mlProgram`` is the MIL program) and ``Data/com.apple.CoreML/weights/weight.bin``, which
large consts point into by byte offset. The blob file is a 64-byte header
(``uint32 count, uint32 version`` + padding) followed by blobs, each a 64-byte metadata record
(``uint32 sentinel 0xDEADBEEF, uint32 dtype, uint64 size_in_bytes, uint64 data_offset`` +
padding) and then its data. Every offset and size is checked against the file before a read.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelFormatError

MODEL_PATH = Path("Data") / "com.apple.CoreML" / "model.mlmodel"
WEIGHTS_PREFIX = "@model_path/"
SENTINEL = 0xDEADBEEF
HEADER = struct.Struct("<II")
METADATA = struct.Struct("<IIQQ")
RECORD = 64
MAX_MODEL_BYTES = 256 << 20  # the protobuf holds the graph only; weights are in the blob

# MIL storage dtype codes of the blob metadata -> (numpy dtype, bits per element).
BLOB_DTYPES = {
    1: ("float16", 16), 2: ("float32", 32), 3: ("uint8", 8), 4: ("int8", 8),
    6: ("int16", 16), 7: ("uint16", 16), 8: ("int4", 4), 12: ("uint4", 4), 14: ("int32", 32),
    15: ("uint32", 32),
}
# Protobuf MIL DataType names -> the numpy dtype the interpreter holds them in.
NUMPY_DTYPES = {
    "FLOAT16": np.float16, "FLOAT32": np.float32, "FLOAT64": np.float64, "INT8": np.int8,
    "UINT8": np.uint8, "INT16": np.int16, "UINT16": np.uint16, "INT32": np.int32,
    "INT64": np.int64, "UINT32": np.uint32, "BOOL": np.bool_, "INT4": np.int8,
    "UINT4": np.uint8, "STRING": object,
}


def _pb():
    from . import _ct

    _ct.coremltools()
    from coremltools.proto import MIL_pb2, Model_pb2

    return Model_pb2, MIL_pb2


@dataclass
class TensorType:
    """A MIL tensor type: dtype name (``FLOAT16``...) and shape (None for unknown dims)."""

    dtype: str
    shape: tuple[int | None, ...]

    @classmethod
    def from_proto(cls, vt: Any) -> TensorType:
        _, MIL_pb2 = _pb()
        which = vt.WhichOneof("type")
        if which == "stateType":
            return cls.from_proto(vt.stateType.wrappedType)
        if which != "tensorType":
            raise ModelFormatError(f"unsupported MIL value type {which!r}")
        t = vt.tensorType
        dims = tuple(
            d.constant.size if d.WhichOneof("dimension") == "constant" else None
            for d in t.dimensions
        )
        return cls(MIL_pb2.DataType.Name(t.dataType), dims)

    @property
    def numpy(self) -> Any:
        try:
            return NUMPY_DTYPES[self.dtype]
        except KeyError:
            raise ModelFormatError(f"unsupported MIL dtype {self.dtype}") from None


class BlobFile:
    """Bounds-checked reader of a ``weight.bin`` blob file (memory-mapped)."""

    def __init__(self, path: Path):
        self.path = path
        self._map = None
        if not path.exists():  # a program whose consts are all small has no weight file
            self.size = 0
            return
        try:
            self._file = open(path, "rb")  # noqa: SIM115  (closed in close())
        except OSError as err:
            raise ModelFormatError(f"{path}: cannot open the weight file ({err})") from None
        self.size = path.stat().st_size
        if self.size < RECORD:
            raise ModelFormatError(f"{path}: {self.size} bytes is too short for a weight file")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        count, version = HEADER.unpack_from(self._map, 0)
        if version != 2:
            raise ModelFormatError(f"{path}: unsupported weight file version {version}")

    def read(self, offset: int, tt: TensorType) -> np.ndarray:
        """The blob whose metadata record is at ``offset``, as an array of type ``tt``."""
        where = f"{self.path} at offset {offset}"
        if self._map is None:
            raise ModelFormatError(f"{self.path}: the program reads weights from a missing file")
        if offset < RECORD or offset + RECORD > self.size:
            raise ModelFormatError(f"{where}: blob record outside the {self.size}-byte file")
        sentinel, code, nbytes, data_offset = METADATA.unpack_from(self._map, offset)
        if sentinel != SENTINEL:
            raise ModelFormatError(f"{where}: bad blob sentinel {sentinel:#x}")
        if code not in BLOB_DTYPES:
            raise ModelFormatError(f"{where}: unsupported blob dtype code {code}")
        name, bits = BLOB_DTYPES[code]
        if name != tt.dtype.lower():
            raise ModelFormatError(f"{where}: blob holds {name}, the program expects {tt.dtype}")
        if None in tt.shape:
            raise ModelFormatError(f"{where}: a weight blob with an unknown dimension")
        count = int(np.prod(tt.shape, dtype=np.int64))
        expected = (count * bits + 7) // 8
        if nbytes != expected:
            raise ModelFormatError(
                f"{where}: blob has {nbytes} bytes, {list(tt.shape)} {tt.dtype} needs {expected}"
            )
        if data_offset < offset + RECORD or data_offset + nbytes > self.size:
            raise ModelFormatError(f"{where}: blob data outside the {self.size}-byte file")
        raw = np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=data_offset)
        if bits == 4:  # two per byte, the first element in the low nibble
            nib = np.empty(nbytes * 2, dtype=np.uint8)
            nib[0::2], nib[1::2] = raw & 0x0F, raw >> 4
            nib = nib[:count]
            if name == "int4":
                return (nib.astype(np.int8) - ((nib & 0x8).astype(np.int8) << 1)).reshape(
                    tt.shape)
            return nib.reshape(tt.shape)
        return raw.view(np.dtype(name)).reshape(tt.shape).copy()

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._file.close()
            self._map = None


def _immediate(value: Any, tt: TensorType) -> np.ndarray:
    t = value.immediateValue.tensor
    which = t.WhichOneof("value")
    if which is None:  # an empty tensor
        return np.zeros(tuple(d or 0 for d in tt.shape), dtype=tt.numpy)
    if which == "bytes":
        raw = np.frombuffer(t.bytes.values, dtype=np.uint8)
        if tt.dtype in ("INT4", "UINT4"):
            raise ModelFormatError("immediate 4-bit values are not supported")
        data = raw.view(tt.numpy)
    elif which == "strings":
        return np.array(list(t.strings.values), dtype=object)
    else:
        data = np.asarray(list(getattr(t, which).values)).astype(tt.numpy)
    shape = tuple(d if d is not None else -1 for d in tt.shape)
    return data.reshape(shape) if shape else data.reshape(())


@dataclass
class Operation:
    """One MIL operation: its type, inputs (param -> names or values), outputs, attributes."""

    type: str
    name: str
    inputs: dict[str, list[str | np.ndarray]]
    outputs: list[tuple[str, TensorType]]
    attributes: dict[str, Any]


@dataclass
class MILProgram:
    """The ``main`` function of a saved ML Program."""

    opset: str
    inputs: dict[str, TensorType]
    states: dict[str, TensorType]
    outputs: list[str]
    operations: list[Operation]
    description: Any
    blobs: BlobFile

    def close(self) -> None:
        self.blobs.close()

    @property
    def op_types(self) -> set[str]:
        return {op.type for op in self.operations}


def load_program(package: str | Path) -> MILProgram:
    """Parse ``package``'s ML Program, resolving every const (blob values read lazily)."""
    package = Path(package)
    if not package.is_dir():
        raise ModelFormatError(f"{package}: not a .mlpackage directory")
    manifest = package / "Manifest.json"
    if manifest.is_file():
        try:
            json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelFormatError(f"{manifest}: unreadable ({err})") from None
    model_path = package / MODEL_PATH
    if not model_path.is_file():
        raise ModelFormatError(f"{package}: no {MODEL_PATH} inside")
    size = model_path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise ModelFormatError(f"{model_path}: {size} bytes is implausibly large for a graph")
    Model_pb2, _ = _pb()
    model = Model_pb2.Model()
    try:
        model.ParseFromString(model_path.read_bytes())
    except Exception as err:  # protobuf's DecodeError
        raise ModelFormatError(f"{model_path}: not a Core ML model ({err})") from None
    if model.WhichOneof("Type") != "mlProgram":
        raise ModelFormatError(f"{model_path}: not an ML Program")
    functions = model.mlProgram.functions
    if "main" not in functions:
        raise ModelFormatError(f"{model_path}: the program has no main function")
    fn = functions["main"]
    if fn.opset not in fn.block_specializations:
        raise ModelFormatError(f"{model_path}: no block for opset {fn.opset}")
    block = fn.block_specializations[fn.opset]

    blob_paths: set[str] = set()
    inputs, states = {}, {}
    for nv in fn.inputs:
        tt = TensorType.from_proto(nv.type)
        (states if nv.type.WhichOneof("type") == "stateType" else inputs)[nv.name] = tt

    blobs = BlobFile(package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin")
    ops = []
    try:
        for op in block.operations:
            if op.blocks:
                raise ModelFormatError(f"op {op.type} has nested blocks, which are not supported")
            outputs = [(o.name, TensorType.from_proto(o.type)) for o in op.outputs]
            args: dict[str, list[str | np.ndarray]] = {}
            for param, arg in op.inputs.items():
                vals: list[str | np.ndarray] = []
                for b in arg.arguments:
                    if b.WhichOneof("binding") == "name":
                        vals.append(b.name)
                    else:
                        vals.append(_value(b.value, blobs, blob_paths))
                args[param] = vals
            attrs = {
                k: _value(v, blobs, blob_paths) for k, v in op.attributes.items()
                if k != "name"
            }
            name = outputs[0][0] if outputs else op.type
            ops.append(Operation(op.type, name, args, outputs, attrs))
    except BaseException:
        blobs.close()
        raise
    if blob_paths - {WEIGHTS_PREFIX + "weights/weight.bin"}:
        blobs.close()
        raise ModelFormatError(f"{package}: consts in other blob files: {sorted(blob_paths)}")
    return MILProgram(fn.opset, inputs, states, list(block.outputs), ops, model.description,
                      blobs)


def _value(value: Any, blobs: BlobFile, blob_paths: set[str]) -> np.ndarray:
    tt = TensorType.from_proto(value.type)
    which = value.WhichOneof("value")
    if which == "immediateValue":
        return _immediate(value, tt)
    if which == "blobFileValue":
        blob_paths.add(value.blobFileValue.fileName)
        return blobs.read(value.blobFileValue.offset, tt)
    raise ModelFormatError(f"unsupported MIL value kind {which!r}")
