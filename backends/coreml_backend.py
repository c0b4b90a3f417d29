"""The Core ML backend: an exported ``.mlpackage`` run by Core ML through coremltools (macOS 15+).

The package (see ``converters/coreml``) holds the whole model and its paged KV pool as Core ML
states; this backend keeps one ``MLState`` and calls ``predict`` once per sequence of a batch,
one request at a time, passing the sequence's token ids, positions, slot mapping, block table
and length exactly as the engine computed them. Core ML decides where the program runs within
the allowed compute units: ``all`` (default), ``cpu_and_ne``, ``cpu_and_gpu`` or ``cpu_only``,
chosen with :class:`ondevice.settings.CoreMLOptions` or :meth:`CoreMLBackend.from_package`.

Built from a model directory (the engine's path), it exports the model once (float16, into
``coreml/`` in the ondevice home) with the pool geometry the engine asks for, then loads that.

Elsewhere :meth:`availability` says why it cannot run; exporting and ``verify-coreml`` work on
any OS.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..batch import BatchInput
from ..errors import BackendUnavailableError, OndeviceError, RequestError
from ..modeldir import ModelDir
from ..settings import CoreMLOptions, home_dir
from .base import Backend, Capabilities

COMPUTE_UNITS = {
    "all": "ALL", "cpu_and_ne": "CPU_AND_NE", "cpu_and_gpu": "CPU_AND_GPU", "cpu_only": "CPU_ONLY",
}
STATE_NAMES = ("key_cache", "value_cache")


def compute_units(name: str | None = None) -> str:
    """The compute-unit choice: ``name``, else the environment's default option, else all."""
    value = (name or CoreMLOptions.from_env().compute_units or "all").strip().lower()
    if value not in COMPUTE_UNITS:
        raise OndeviceError(
            f"unknown Core ML compute units {value!r} (choose {', '.join(COMPUTE_UNITS)})"
        )
    return value


def _macos_version() -> tuple[int, ...]:
    release = platform.mac_ver()[0]
    return tuple(int(p) for p in release.split(".") if p.isdigit()) if release else ()


class CoreMLBackend(Backend):
    """Runs an exported package with Core ML; float32 logits like every backend."""

    name = "coreml"
    options_class = CoreMLOptions
    # The KV states are float16; int8/int4 packages keep their palettized weights. A package
    # has one KV state for all layers and one block table: no window paging (its local layers
    # still read only their window).
    capabilities = Capabilities(packed_bits=frozenset({4, 8}), kv_itemsize=2,
                                window_paging=False)
    dtype_name = "float16"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if sys.platform != "darwin":
            return False, (
                f"Core ML runs only on macOS 15+; this is {platform.system()} "
                f"{platform.release()} (export and verify-coreml work here)"
            )
        version = _macos_version()
        if version and version < (15,):
            return False, (
                f"Core ML stateful models need macOS 15+; this is macOS "
                f"{'.'.join(map(str, version))}"
            )
        try:
            from ..converters.coreml import _ct

            ct = _ct.coremltools()
        except OndeviceError as err:
            return False, str(err)
        from coremltools.models import model as ct_model

        if getattr(ct_model, "_MLModelProxy", None) is None:
            return False, f"coremltools {ct.__version__} has no Core ML runtime library here"
        return True, f"Core ML ({compute_units()}) on macOS {platform.mac_ver()[0]}"

    def __init__(self, model_dir: ModelDir, *, num_blocks, block_size: int = 16,
                 options: CoreMLOptions | None = None, package: str | Path | None = None,
                 kv_layout=None):
        super().__init__(model_dir, num_blocks=num_blocks, block_size=block_size, options=options,
                         kv_layout=kv_layout)
        num_blocks = self.num_blocks  # one KV group (no window paging in a package)
        model = model_dir
        from ..converters.coreml import export_coreml, read_manifest

        if package is None:
            package = self._cached_export(model, num_blocks, block_size, export_coreml)
        self.package = Path(package)
        self.manifest = read_manifest(self.package)
        m = self.manifest
        if m["block_size"] != block_size or m["num_blocks"] < num_blocks:
            raise OndeviceError(
                f"{self.package} has {m['num_blocks']} blocks of {m['block_size']} tokens; "
                f"the engine asked for {num_blocks} of {block_size}"
            )
        self.max_blocks = int(m["max_blocks_per_sequence"])
        self.units = compute_units(self.options.compute_units)
        self.mlmodel, self.state = self._open()

    def _open(self) -> tuple[Any, Any]:
        """Load the package with Core ML: the model and a fresh (zeroed) state."""
        ct = self._ct()
        mlmodel = ct.models.MLModel(
            str(self.package), compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[self.units])
        )
        return mlmodel, mlmodel.make_state()

    @classmethod
    def from_package(cls, package: str | Path, *, model: str | Path | None = None,
                     compute_units: str | None = None) -> CoreMLBackend:
        """Load an exported package; ``model`` (the source directory, default the manifest's
        ``source_path``) provides the config the engine sizes requests with."""
        from ..converters.coreml import read_manifest

        m = read_manifest(package)
        md = ModelDir(model or m["source_path"])
        return cls(md, num_blocks=m["num_blocks"], block_size=m["block_size"],
                   package=package, options=CoreMLOptions(compute_units=compute_units))

    @staticmethod
    def _ct() -> Any:
        ok, why = CoreMLBackend.availability()
        if not ok:
            raise BackendUnavailableError(f"backend 'coreml' is unavailable: {why}")
        from ..converters.coreml import _ct

        return _ct.coremltools()

    @staticmethod
    def _cached_export(model: ModelDir, num_blocks: int, block_size: int, export) -> Path:
        c = model.config
        # The engine lets a sequence grow to min(context, pool); the package must take that
        # much (its attention spans max_context every step, so apps that want speed export
        # a shorter one themselves and use from_package).
        ctx = min(c.context_length, num_blocks * block_size)
        ctx -= ctx % block_size
        out = (home_dir() / "coreml" / f"{model.path.name}-f16-{num_blocks}x{block_size}-{ctx}"
               / "model.mlpackage")
        if not (out.parent / "ondevice-manifest.json").is_file():
            print(f"ondevice: exporting {model.path.name} to Core ML in {out.parent} "
                  "(first use only)", file=sys.stderr)
            export(model.path, out, quantize="f16", max_context=ctx, block_size=block_size,
                   num_blocks=num_blocks, force=True)
        return out

    # -- the paged interface ----------------------------------------------------------------
    def forward(self, batch: BatchInput) -> np.ndarray:
        rows = [int(r) for r in batch.logits_indices]
        out = np.empty((len(rows), self.config.vocab_size), dtype=np.float32)
        all_rows = self.manifest.get("logits") == "all"
        qsl = batch.query_start_loc
        for s in range(batch.num_seqs):
            start, end = int(qsl[s]), int(qsl[s + 1])
            if end == start:
                continue
            wanted = [i for i, r in enumerate(rows) if start <= r < end]
            if not all_rows and any(rows[i] != end - 1 for i in wanted):
                raise RequestError(
                    "this Core ML package returns the last position's logits only "
                    "(export it with logits='all' for every row)"
                )
            table = batch.block_tables[s]
            used = -(-int(batch.seq_lens[s]) // self.block_size)
            if used > self.max_blocks:
                raise RequestError(
                    f"sequence of {int(batch.seq_lens[s])} tokens exceeds the package's max "
                    f"context {self.manifest['max_context']}"
                )
            padded = np.zeros(self.max_blocks, dtype=np.int32)
            padded[:used] = table[:used]
            result = self.mlmodel.predict({
                "input_ids": batch.token_ids[start:end].astype(np.int32),
                "positions": batch.positions[start:end].astype(np.int32),
                "slot_mapping": batch.slot_mapping[start:end].astype(np.int32),
                "block_table": padded,
                "seq_len": batch.seq_lens[s : s + 1].astype(np.int32),
            }, state=self.state)
            logits = np.asarray(result["logits"], dtype=np.float32)
            for i in wanted:
                out[i] = logits[rows[i] - start] if all_rows else logits[-1]
        return out

    def _pool(self) -> list[np.ndarray]:
        # [layers, slots, kvh*hd] -> [layers, num_blocks, block_size, kvh, hd]
        c = self.config
        shape = (c.num_hidden_layers, self.manifest["num_blocks"], self.block_size,
                 c.num_key_value_heads, c.head_dim)
        return [np.asarray(self.state.read_state(n)).reshape(shape) for n in STATE_NAMES]

    def _store(self, pools: list[np.ndarray]) -> None:
        c = self.config
        shape = (c.num_hidden_layers, -1, c.num_key_value_heads * c.head_dim)
        for name, pool in zip(STATE_NAMES, pools, strict=True):
            self.state.write_state(name, pool.reshape(shape).astype(np.float16))

    def copy_blocks(self, pairs: list[tuple[int, int]], group: int = 0) -> None:
        if not pairs:
            return
        pools = self._pool()
        src, dst = np.array(pairs, dtype=np.int64).T
        for pool in pools:
            pool[:, dst] = pool[:, src]
        self._store(pools)

    def read_blocks(self, block_ids: list[int], group: int = 0) -> np.ndarray:
        ids = np.asarray(block_ids, dtype=np.int64)
        k, v = self._pool()
        return np.stack([k[:, ids], v[:, ids]], axis=1).astype(np.float32)

    def write_blocks(self, block_ids: list[int], data: np.ndarray, group: int = 0) -> None:
        ids = np.asarray(block_ids, dtype=np.int64)
        pools = self._pool()
        for i, pool in enumerate(pools):
            pool[:, ids] = data[:, i]
        self._store(pools)

    def close(self) -> None:
        self.state = None
        self.mlmodel = None


BACKEND = CoreMLBackend
