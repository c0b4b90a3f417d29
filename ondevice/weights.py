"""Safe safetensors I/O: validated headers, memory-mapped reads, streaming writes.

Reading never trusts the file: the header length, every dtype, shape and byte range is checked
against the file's real size before anything is mapped, so a hostile header cannot make us
allocate what it claims. No pickle anywhere.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelFormatError

# safetensors dtype name -> (numpy dtype used to read the bytes, item size)
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # read as raw bits, widened to float32 by get()
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
NUMPY_TO_ST = {
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("float64"): "F64",
    np.dtype("uint32"): "U32",
    np.dtype("int32"): "I32",
    np.dtype("int64"): "I64",
    np.dtype("uint8"): "U8",
    np.dtype("int8"): "I8",
}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """A validated, memory-mapped safetensors file. ``get`` returns read-only views."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as err:
            raise ModelFormatError(f"{self.path}: cannot open ({err.strerror})") from None
        try:
            size = os.fstat(self._fh.fileno()).st_size
            self.header, self.metadata, self._data_start = _read_header(self._fh, size, self.path)
            self._mmap = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except Exception:
            self._fh.close()
            raise

    def keys(self) -> list[str]:
        return list(self.header)

    def __contains__(self, name: str) -> bool:
        return name in self.header

    def dtype(self, name: str) -> str:
        return self.header[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str, raw: bool = False) -> np.ndarray:
        """The tensor as a NumPy array (a zero-copy view unless BF16 must be widened)."""
        info = self.header[name]
        begin, end = info["data_offsets"]
        dt = DTYPES[info["dtype"]]
        arr = np.frombuffer(
            self._mmap, dtype=dt, count=(end - begin) // dt.itemsize,
            offset=self._data_start + begin,
        ).reshape(info["shape"])
        if info["dtype"] == "BF16" and not raw:
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr

    def release_pages(self) -> None:
        """Drop the file pages read so far from this process's resident set (they stay in the
        page cache); a streaming reader calls this after each tensor to bound its peak RSS."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        try:
            self._mmap.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # not supported here, or already closed: harmless
            pass

    def close(self) -> None:
        """Close the file; the map too unless arrays handed out still view it."""
        self._fh.close()
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # live views keep the map (and their data) valid
                pass

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_header(fh, size: int, path: Path) -> tuple[dict, dict[str, str], int]:
    if size < 8:
        raise ModelFormatError(f"{path}: truncated safetensors file ({size} bytes)")
    n = int.from_bytes(fh.read(8), "little")
    if n > min(MAX_HEADER, size - 8):
        raise ModelFormatError(
            f"{path}: safetensors header claims {n} bytes but the file has {size - 8} after the "
            "length field (truncated or corrupt)"
        )
    try:
        header = json.loads(fh.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFormatError(f"{path}: safetensors header is not valid JSON ({err})") from None
    except RecursionError:
        raise ModelFormatError(f"{path}: safetensors header is nested too deeply") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ModelFormatError(f"{path}: __metadata__ is not an object")
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise ModelFormatError(f"{where}: entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            raise ModelFormatError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ModelFormatError(f"{where}: bad shape {shape!r}")
        if (
            not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise ModelFormatError(f"{where}: bad data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise ModelFormatError(
                f"{where}: data_offsets [{begin}, {end}] lie outside the {data_size} data bytes "
                "(truncated or corrupt file)"
            )
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if nbytes != end - begin:
            raise ModelFormatError(
                f"{where}: shape {shape} of {dtype} needs {nbytes} bytes but its data_offsets "
                f"span {end - begin}"
            )
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise ModelFormatError(f"{path}: tensors {a!r} and {b!r} overlap")
    return header, {str(k): str(v) for k, v in metadata.items()}, 8 + n


class WeightFiles:
    """All tensors of a model directory: one ``model.safetensors`` or shards plus an index."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        self.files: list[SafetensorsFile] = []
        self._where: dict[str, SafetensorsFile] = {}
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError,
                    RecursionError) as err:
                raise ModelFormatError(f"{index}: invalid index ({err or 'nested too deeply'})"
                                       ) from None
            for fname in names:
                if Path(fname).name != fname:
                    raise ModelFormatError(f"{index}: shard name {fname!r} is not a plain file name")
            paths = [model_dir / n for n in names]
        else:
            paths = sorted(model_dir.glob("*.safetensors"))
            if not paths:
                raise ModelFormatError(f"{model_dir}: no model.safetensors found")
        for p in paths:
            f = SafetensorsFile(p)
            self.files.append(f)
            for name in f.keys():
                if name in self._where:
                    raise ModelFormatError(f"{model_dir}: tensor {name!r} appears in two files")
                self._where[name] = f

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> str:
        return self._where[name].dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)

    def release_pages(self) -> None:
        for f in self.files:
            f.release_pages()

    def close(self) -> None:
        for f in self.files:
            f.close()


class SafetensorsWriter:
    """Streams tensors into a safetensors file whose header is known up front.

    ``specs`` lists (name, numpy dtype, shape) in the order the tensors will be written, so
    a converter never holds more than one tensor in memory. The file appears atomically.
    """

    def __init__(
        self, path: str | Path, specs: list[tuple[str, Any, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "np"})}
        self._expected: list[tuple[str, np.dtype, tuple[int, ...]]] = []
        offset = 0
        for name, dtype, shape in specs:
            dt = np.dtype(dtype)
            nbytes = math.prod(shape) * dt.itemsize
            header[name] = {
                "dtype": NUMPY_TO_ST[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes],
            }
            self._expected.append((name, dt, tuple(shape)))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self._tmp, "wb")
        self._fh.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        exp_name, dt, shape = self._expected[self._next]
        if name != exp_name or array.dtype != dt or tuple(array.shape) != shape:
            raise ValueError(
                f"expected {exp_name} {dt} {shape}, got {name} {array.dtype} {tuple(array.shape)}"
            )
        # A byte view, not tobytes(): no second copy of a large tensor in memory.
        self._fh.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self._expected):
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"only {self._next} of {len(self._expected)} tensors were written")
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)
