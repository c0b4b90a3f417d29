"""WGSL source: the kernels of ``ondevice.shaders`` and the code generated around them.

One kernel per ``.wgsl`` file, specialized by ``override`` constants (workgroup sizes,
quantization bits and group size; given at pipeline creation) and by a few ``$NAME`` template
substitutions where WGSL needs compile-time values (element types, private array sizes, and the
declarations of a KV pool split over several storage bindings).
"""

from __future__ import annotations

from importlib import resources
from string import Template
from typing import Any

_sources: dict[str, str] = {}


def shader_source(name: str) -> str:
    """The text of ``shaders/<name>.wgsl`` (package data of ``ondevice.shaders``)."""
    if name not in _sources:
        _sources[name] = resources.files("ondevice.shaders").joinpath(f"{name}.wgsl").read_text()
    return _sources[name]


def render(name: str, subst: dict[str, Any] | None = None) -> str:
    """Kernel ``name`` with its ``$NAME`` placeholders filled from ``subst``."""
    return Template(shader_source(name)).substitute({k: str(v) for k, v in (subst or {}).items()})


def element_subst(f16: bool, wtype: str, vec: int = 1) -> dict[str, str]:
    """Template values for a kernel reading elements of ``wtype`` ("f32" or "f16") in vectors
    of ``vec`` (1 or 4); ``f16``: the device has shader-f16 enabled."""
    enable = "enable f16;" if f16 else ""
    if vec == 4:
        return {"ENABLE": enable, "WT": wtype, "KT": wtype, "WV": f"vec4<{wtype}>",
                "XV": "vec4<f32>", "DOT": "dot"}
    return {"ENABLE": enable, "WT": wtype, "KT": wtype, "WV": wtype, "XV": "f32",
            "DOT": "mul1"}


def kv_pool_code(parts: int, kv_type: str, first_binding: int, write: bool) -> str:
    """WGSL of a KV pool in ``parts`` storage bindings: K parts then V parts from
    ``first_binding``, and ``kload``/``vload(part, i) -> f32`` (reads) or
    ``kstore``/``vstore(part, i, x)`` (writes), which pick the part with a switch."""
    access = "read_write" if write else "read"
    lines = [f"@group(0) @binding({first_binding + kv * parts + i}) var<storage, {access}> "
             f"{name}_pool{i}: array<{kv_type}>;"
             for kv, name in enumerate("kv") for i in range(parts)]
    for name in "kv":
        if write:
            body = [f"{name}_pool{i}[i] = x;" for i in range(parts)]
            head, tail = f"fn {name}store(part: u32, i: u32, x: {kv_type}) {{", "}"
        else:
            body = [f"r = f32({name}_pool{i}[i]);" for i in range(parts)]
            head, tail = f"fn {name}load(part: u32, i: u32) -> f32 {{ var r: f32;", "return r; }"
        if parts == 1:
            lines.append(f"{head} {body[0]} {tail}")
        else:
            cases = " ".join(f"case {i}u: {{ {b} }}" for i, b in enumerate(body[:-1]))
            lines.append(f"{head} switch part {{ {cases} default: {{ {body[-1]} }} }} {tail}")
    return "\n".join(lines)


# Bindings that the KV kernels take before the pool parts (kv_write.wgsl: params, k, v, slots;
# paged_attention.wgsl: params, q, block tables, seq lens, query starts, positions, out).
KV_WRITE_FIRST_POOL_BINDING = 4
ATTENTION_FIRST_POOL_BINDING = 7


def max_kv_parts(max_storage_buffers: int) -> int:
    """Parts a layer's K (and V) pool may have: paged attention binds 6 other storage buffers,
    then every K part and every V part."""
    return (max_storage_buffers - 6) // 2
