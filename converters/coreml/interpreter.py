"""A NumPy interpreter for the MIL operations the Core ML exporter emits.

It runs a saved package's program (see :mod:`.package`) on any OS, so an export can be checked
where Core ML itself cannot run. Numerics follow the program's types: every op computes in
float32 (integers stay integers) and its result is rounded to the op's declared output dtype,
so a float16 tensor holds exactly the float16 values the program asks for, the way a device
with wider accumulators computes. Core ML states are held between calls in a
:class:`InterpreterState`.

Only the operations listed in :data:`OPS` are known: anything else raises
:class:`UnsupportedMILOpError` naming it, rather than computing something plausible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelFormatError, OndeviceError
from .package import MILProgram, Operation, TensorType, load_program

F32 = np.float32


class UnsupportedMILOpError(OndeviceError):
    """The program uses a MIL operation the interpreter does not implement."""


class MILRuntimeError(OndeviceError):
    """The program failed on these inputs (bad index, shape mismatch, ...)."""


def _round(x: np.ndarray, tt: TensorType) -> np.ndarray:
    """Hold a value as its MIL type: floats as float32 arrays carrying float16-rounded values
    where the type is float16 (cheap to compute on), everything else in its own dtype."""
    if tt.dtype == "FLOAT16":
        return np.asarray(x).astype(np.float16).astype(F32)
    if tt.dtype in ("FLOAT32", "FLOAT64"):
        return np.asarray(x, dtype=F32)
    if tt.dtype == "STRING":
        return np.asarray(x, dtype=object)
    return np.asarray(x).astype(tt.numpy)


def _scalar(v: np.ndarray) -> Any:
    return v.item() if isinstance(v, np.ndarray) and v.size == 1 else v


def _axis(axis: int, rank: int) -> int:
    a = int(axis)
    if not -rank <= a < rank:
        raise MILRuntimeError(f"axis {a} out of range for rank {rank}")
    return a % rank


def _broadcast_scale(scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat a per-block ``scale`` (or offset) up to the data's ``shape``."""
    if scale.ndim != len(shape):
        raise MILRuntimeError(f"scale rank {scale.ndim} does not match data rank {len(shape)}")
    for axis, (n, s) in enumerate(zip(shape, scale.shape, strict=True)):
        if s == 0 or n % s:
            raise MILRuntimeError(f"scale dim {s} does not divide data dim {n} (axis {axis})")
        if n != s:
            scale = np.repeat(scale, n // s, axis=axis)
    return scale


# -- the operations ----------------------------------------------------------------------
# Each takes the op's arguments (numpy arrays; ``values`` of concat is a list) and returns
# the output (or None for ops without outputs).


def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False, **_):
    if int(batch_dims) != 0:
        raise MILRuntimeError("gather with batch_dims is not supported")
    a = _axis(axis, x.ndim)
    n = x.shape[a]
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise MILRuntimeError(f"gather index out of range [{-n}, {n}) on axis {a}")
    return np.take(x, np.where(idx < 0, idx + n, idx), axis=a)


def _gather_nd(x, indices, batch_dims=0, **_):
    if int(batch_dims) != 0:
        raise MILRuntimeError("gather_nd with batch_dims is not supported")
    idx = np.asarray(indices, dtype=np.int64)
    k = idx.shape[-1]
    bounds = np.array(x.shape[:k])
    if idx.size and ((idx < 0).any() or (idx >= bounds).any()):
        raise MILRuntimeError(f"gather_nd index out of range for shape {list(x.shape)}")
    return x[tuple(np.moveaxis(idx, -1, 0))]


def _scatter_nd(data, indices, updates, mode="add", inplace=False, **_):
    idx = np.asarray(indices, dtype=np.int64)
    k = idx.shape[-1]
    bounds = np.array(data.shape[:k])
    if idx.size and ((idx < 0).any() or (idx >= bounds).any()):
        raise MILRuntimeError(f"scatter_nd index out of range for shape {list(data.shape)}")
    out = data if inplace else data.copy()
    where = tuple(np.moveaxis(idx, -1, 0))
    mode = str(_scalar(mode))
    if mode == "update":
        out[where] = updates
    elif mode == "add":
        np.add.at(out, where, updates)
    else:
        raise UnsupportedMILOpError(f"scatter_nd mode {mode!r} is not implemented")
    return out


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None,
                    squeeze_mask=None, **_):
    rank = x.ndim
    stride = np.ones(rank, np.int64) if stride is None else stride
    begin_mask = np.zeros(rank, bool) if begin_mask is None else begin_mask
    end_mask = np.zeros(rank, bool) if end_mask is None else end_mask
    squeeze_mask = np.zeros(rank, bool) if squeeze_mask is None else squeeze_mask
    slices = []
    for a in range(rank):
        b = None if begin_mask[a] else int(begin[a])
        e = None if end_mask[a] else int(end[a])
        if squeeze_mask[a]:
            slices.append(int(begin[a]))
        else:
            slices.append(slice(b, e, int(stride[a])))
    return x[tuple(slices)]


def _reshape(x, shape, **_):
    shape = [int(s) for s in np.asarray(shape).reshape(-1)]
    # MIL: 0 copies the input's dimension, -1 is inferred.
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    try:
        return x.reshape(shape)
    except ValueError:
        raise MILRuntimeError(f"cannot reshape {list(x.shape)} to {shape}") from None


def _matmul(x, y, transpose_x=False, transpose_y=False, **_):
    if _scalar(transpose_x):
        x = np.swapaxes(x, -1, -2)
    if _scalar(transpose_y):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _linear(x, weight, bias=None, **_):
    y = x @ weight.T
    return y if bias is None else y + bias


def _softmax(x, axis=-1, **_):
    a = _axis(_scalar(axis), x.ndim)
    e = np.exp(x - x.max(axis=a, keepdims=True))
    return e / e.sum(axis=a, keepdims=True)


def _reduce_mean(x, axes=None, keep_dims=False, **_):
    axes = tuple(range(x.ndim)) if axes is None else tuple(
        _axis(a, x.ndim) for a in np.asarray(axes).reshape(-1))
    return np.mean(x, axis=axes, keepdims=bool(_scalar(keep_dims)), dtype=F32)


def _cast(x, dtype, **_):
    return x  # the rounding to the declared output type does the work


def _silu(x, **_):
    with np.errstate(over="ignore"):
        return x / (1 + np.exp(-x))


def _concat(values, axis, interleave=False, **_):
    if _scalar(interleave):
        raise UnsupportedMILOpError("concat with interleave=True is not implemented")
    return np.concatenate(values, axis=_axis(_scalar(axis), values[0].ndim))


def _constexpr_blockwise_shift_scale(data, scale, offset=None, **_):
    d = data.astype(F32)
    if offset is not None:
        d = d - _broadcast_scale(offset.astype(F32), data.shape)
    return d * _broadcast_scale(scale.astype(F32), data.shape)


def _expand_dims(x, axes, **_):
    out = x
    rank = x.ndim + len(np.asarray(axes).reshape(-1))
    for a in sorted(int(a) % rank for a in np.asarray(axes).reshape(-1)):
        out = np.expand_dims(out, a)
    return out


def _gelu(x, mode="EXACT", **_):
    mode = _scalar(mode)
    if mode != "TANH_APPROXIMATION":
        raise NotImplementedError(f"gelu mode {mode!r}")
    x32 = np.asarray(x, F32)
    inner = F32(math.sqrt(2 / math.pi)) * (x32 + F32(0.044715) * x32 * x32 * x32)
    return F32(0.5) * x32 * (F32(1) + np.tanh(inner))


OPS: dict[str, Callable[..., Any]] = {
    "add": lambda x, y, **_: x + y,
    "sub": lambda x, y, **_: x - y,
    "mul": lambda x, y, **_: x * y,
    "real_div": lambda x, y, **_: x / y,
    "less": lambda x, y, **_: x < y,
    "less_equal": lambda x, y, **_: x <= y,
    "greater": lambda x, y, **_: x > y,
    "greater_equal": lambda x, y, **_: x >= y,
    "equal": lambda x, y, **_: x == y,
    "select": lambda cond, a, b, **_: np.where(cond, a, b),
    "cos": lambda x, **_: np.cos(x),
    "sin": lambda x, **_: np.sin(x),
    "rsqrt": lambda x, epsilon=1e-12, **_: 1 / np.sqrt(x + F32(_scalar(epsilon))),
    "silu": _silu,
    "gelu": _gelu,
    "logical_and": lambda x, y, **_: np.logical_and(x, y),
    "softmax": _softmax,
    "reduce_mean": _reduce_mean,
    "cast": _cast,
    "linear": _linear,
    "matmul": _matmul,
    "reshape": _reshape,
    "transpose": lambda x, perm, **_: np.transpose(x, [int(p) for p in perm]),
    "expand_dims": _expand_dims,
    "slice_by_index": _slice_by_index,
    "concat": _concat,
    "shape": lambda x, **_: np.array(x.shape, dtype=np.int32),
    "fill_like": lambda ref_tensor, value=0, **_: np.full(ref_tensor.shape, _scalar(value)),
    "gather": _gather,
    "gather_nd": _gather_nd,
    "scatter_nd": _scatter_nd,
    "constexpr_blockwise_shift_scale": _constexpr_blockwise_shift_scale,
    # const, read_state, write_state and coreml_update_state are handled by the interpreter.
}
# Ops that only move values: their float results need no rounding (their float inputs hold
# values of their own type already, and MIL requires the output type to match).
MOVE_OPS = frozenset({
    "gather", "gather_nd", "scatter_nd", "reshape", "transpose", "expand_dims",
    "slice_by_index", "concat", "select",
})
STATE_OPS = ("const", "read_state", "write_state", "coreml_update_state")


class InterpreterState:
    """The values of a program's Core ML states (what ``MLModel.make_state()`` holds)."""

    def __init__(self, states: dict[str, TensorType]):
        self.types = states
        # Core ML zero-fills a new state; so does this.
        self.values = {
            name: np.zeros(tt.shape, dtype=F32 if tt.dtype.startswith("FLOAT") else tt.numpy)
            for name, tt in states.items()
        }

    def read(self, name: str) -> np.ndarray:
        return self.values[name]


class MILInterpreter:
    """Evaluates a saved package's ``main`` function with NumPy."""

    def __init__(self, program: MILProgram):
        self.program = program
        unknown = sorted({op.type for op in program.operations} - set(OPS) - set(STATE_OPS))
        if unknown:
            raise UnsupportedMILOpError(
                f"the NumPy MIL interpreter does not implement {', '.join(unknown)} "
                f"(used by {program.blobs.path.parents[3].name})"
            )
        # Consts (and constexpr dequantization, which only depends on consts) once, up front.
        self.consts: dict[str, np.ndarray] = {}
        for op in program.operations:
            if op.type == "const":
                self.consts[op.name] = _round(op.attributes["val"], op.outputs[0][1])
            elif op.type.startswith("constexpr_"):
                args = self._args(op, self.consts)
                self.consts[op.name] = _round(OPS[op.type](**args), op.outputs[0][1])
        self._ops = [
            op for op in program.operations
            if op.type != "const" and not op.type.startswith("constexpr_")
        ]
        # Liveness: after op i, drop the values nothing later reads (a step of a 30-layer
        # model would otherwise hold every layer's copy of the KV state at once).
        last: dict[str, int] = {}
        for i, op in enumerate(self._ops):
            for bindings in op.inputs.values():
                for b in bindings:
                    if isinstance(b, str) and b not in self.consts:
                        last[b] = i
        keep = set(program.outputs) | set(program.states)
        self._dead: list[list[str]] = [[] for _ in self._ops]
        for name, i in last.items():
            if name not in keep:
                self._dead[i].append(name)
        # A scatter_nd whose data is read by nothing later (and is not a program input) may
        # update that array in place instead of copying it; with the state pattern the
        # exporter emits (read_state -> scatter_nd -> write_state) that saves one copy of the
        # whole KV pool per layer. The scatter's own data must not be the state's current
        # buffer unless the very next state op writes the scatter's result back.
        self._inplace: set[int] = set()
        for i, op in enumerate(self._ops):
            data = op.inputs.get("data", [None])[0] if op.type == "scatter_nd" else None
            if isinstance(data, str) and last.get(data) == i and data not in program.inputs:
                nxt = next((o for o in self._ops[i + 1:] if o.type in STATE_OPS), None)
                if nxt is None or (
                    nxt.type == "write_state" and nxt.inputs["data"][0] == op.name
                ):
                    self._inplace.add(i)

    @classmethod
    def open(cls, package: str | Path) -> MILInterpreter:
        return cls(load_program(package))

    def close(self) -> None:
        self.program.close()

    def make_state(self) -> InterpreterState:
        return InterpreterState(self.program.states)

    def _args(self, op: Operation, env: dict[str, Any]) -> dict[str, Any]:
        args = {}
        for param, bindings in op.inputs.items():
            vals = []
            for b in bindings:
                if isinstance(b, str):
                    if b not in env:
                        raise ModelFormatError(f"op {op.name} ({op.type}) reads undefined {b!r}")
                    vals.append(env[b])
                else:
                    vals.append(b)
            args[param] = vals if op.type == "concat" and param == "values" else vals[0]
        return args

    def predict(self, inputs: dict[str, np.ndarray], state: InterpreterState) -> dict:
        """Run ``main`` on ``inputs``, updating ``state`` in place; returns the outputs."""
        env: dict[str, Any] = dict(self.consts)
        for name, tt in self.program.inputs.items():
            if name not in inputs:
                raise MILRuntimeError(f"missing input {name!r}")
            value = np.asarray(inputs[name])
            if value.ndim != len(tt.shape) or any(
                d is not None and d != n for d, n in zip(tt.shape, value.shape, strict=True)
            ):
                raise MILRuntimeError(
                    f"input {name!r} has shape {list(value.shape)}, expected {list(tt.shape)}"
                )
            env[name] = _round(value, tt)
        for name in self.program.states:
            env[name] = name  # a state var is a handle; read_state/write_state use its name
        for i, op in enumerate(self._ops):
            if op.type == "read_state":
                # Not a copy: writes replace the state's array, they never modify it, except
                # an in-place scatter, which is only allowed when its result is written back.
                env[op.name] = state.values[op.inputs["input"][0]]
                for name in self._dead[i]:
                    env.pop(name, None)
                continue
            if op.type in ("write_state", "coreml_update_state"):
                target = op.inputs["input" if op.type == "write_state" else "state"][0]
                src = op.inputs["data" if op.type == "write_state" else "value"][0]
                value = env[src] if isinstance(src, str) else src
                # Values of float16 ops are already held rounded (see _round).
                state.values[target] = (
                    value if isinstance(value, np.ndarray) and value.dtype == F32
                    and state.types[target].dtype == "FLOAT16"
                    else _round(value, state.types[target])
                )
                if op.outputs:
                    env[op.name] = state.values[target]
                for name in self._dead[i]:
                    env.pop(name, None)
                continue
            args = self._args(op, env)
            if i in self._inplace:
                args["inplace"] = True
            try:
                with np.errstate(over="ignore", under="ignore"):
                    out = OPS[op.type](**args)
            except TypeError as err:
                raise MILRuntimeError(f"op {op.name} ({op.type}): {err}") from None
            name, tt = op.outputs[0]
            if not (op.type in MOVE_OPS and isinstance(out, np.ndarray) and out.dtype == F32
                    and tt.dtype in ("FLOAT16", "FLOAT32")):
                out = _round(out, tt)
            if len(tt.shape) != out.ndim or any(
                d is not None and d != n for d, n in zip(tt.shape, out.shape, strict=True)
            ):
                raise MILRuntimeError(
                    f"op {op.name} ({op.type}) produced {list(out.shape)}, "
                    f"the program declares {list(tt.shape)}"
                )
            env[name] = out
            for dead in self._dead[i]:
                env.pop(dead, None)
        return {
            name: env[name].astype(
                np.float32 if isinstance(env[name], np.ndarray) and env[name].dtype == F32
                else env[name].dtype)
            for name in self.program.outputs
        }
