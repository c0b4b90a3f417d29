"""A loaded model: backend, paged KV pool and the engine that serves it."""

from __future__ import annotations

import hashlib

import numpy as np

from .backends import backend_class, resolve
from .engine import Engine, EngineLoop, SyncEngine
from .engine.engine import score_tokens
from .errors import RequestError
from .kv.layout import split_kv_budget
from .memory import available_memory_bytes
from .modeldir import ModelDir
from .settings import BackendOptions, EngineConfig, backend_options, parse_size  # noqa: F401

DEFAULT_KV_MEMORY = 256 << 20


def model_id(model_dir: ModelDir) -> str:
    """A stable id of the weights: config, tensor headers and samples of the data, hashed.
    It keys the prefix cache, so a saved prompt cache never loads into another model."""
    h = hashlib.sha256((model_dir.path / "config.json").read_bytes())
    for f in model_dir.weights.files:
        size = f.path.stat().st_size
        with open(f.path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(header_len, 100 << 20)))
            for i in range(16):
                fh.seek(size * i // 16)
                h.update(fh.read(4096))
    return h.hexdigest()[:32]


class Runtime:
    """Model + backend + KV pool + engine. Thread-safe through the engine loop."""

    def __init__(
        self, model_dir: ModelDir, backend: str = "auto", *, engine: EngineConfig | None = None,
        options: BackendOptions | dict | None = None,
    ):
        engine = engine or EngineConfig()
        self.engine_config = engine
        self.model_dir = model_dir
        self.config = model_dir.config
        self.backend_name = resolve(backend)
        cls = backend_class(self.backend_name)
        self.options = backend_options(self.backend_name, options)
        block_size, kv_memory = engine.block_size, engine.kv_memory
        per_block = cls.kv_bytes_per_token(self.config, self.options) * block_size
        layout = cls.default_kv_layout(self.config, engine.window_paging)
        layer_block = per_block // self.config.num_hidden_layers
        chunk = engine.max_num_batched_tokens + (
            engine.speculative.num_tokens if engine.speculative else 0)

        def split(nbytes: int) -> tuple[int, ...]:
            return split_kv_budget(nbytes, layout, layer_block, block_size,
                                   max_num_seqs=engine.max_num_seqs, chunk=chunk)

        if kv_memory is None:
            # One full context (at least DEFAULT_KV_MEMORY), within a quarter of free memory;
            # with window paging, what one full context needs in group 0 beside the windows.
            full = self.config.context_length * per_block // block_size
            if layout.num_groups > 1:
                full_blocks = -(-self.config.context_length // block_size)
                full = full_blocks * len(layout.layers(0)) * layer_block + sum(
                    n * len(layout.layers(g)) * layer_block
                    for g, n in enumerate(split(full)) if g)
            budget = max(DEFAULT_KV_MEMORY, full)
            budget = min(budget, available_memory_bytes() // 4)
        else:
            budget = parse_size(kv_memory)
            free = available_memory_bytes()
            if budget > free:
                raise RequestError(f"KV memory of {budget >> 20} MiB is more than the "
                                   f"{free >> 20} MiB of memory available")
        group_blocks = split(budget)
        cap = cls.max_kv_blocks(self.config, block_size, self.options)
        if kv_memory is None and cap is not None:
            # e.g. wgpu: one layer's K within one binding (per group: same per-layer blocks)
            group_blocks = tuple(min(n, cap) for n in group_blocks)
        if min(group_blocks) < 1:
            raise RequestError(f"KV memory {budget} bytes is less than one block ({per_block} bytes)")
        num_blocks = group_blocks[0]
        self.model_id = model_id(model_dir)
        self.backend = cls(model_dir, num_blocks=group_blocks, block_size=block_size,
                           options=self.options, kv_layout=layout)
        # The backend holds its own copy of the weights now: unmap the files so that their
        # pages stop counting against this process.
        model_dir.close()
        self.draft_backend = None
        spec = engine.speculative
        if spec is not None and spec.method == "draft":
            self.draft_backend = self._load_draft(spec.draft_model, spec.draft_backend,
                                                  num_blocks, block_size)
        self.engine = Engine(
            self.backend, self.tokenizer, context_length=self.config.context_length,
            max_num_batched_tokens=engine.max_num_batched_tokens, max_num_seqs=engine.max_num_seqs,
            enable_prefix_caching=engine.enable_prefix_caching, model_id=self.model_id,
            speculative=spec, draft_backend=self.draft_backend,
        )
        self.loop = EngineLoop(self.engine)
        self.sync = SyncEngine(self.loop)

    def _load_draft(self, path: str, backend: str | None, num_blocks: int, block_size: int):
        """The draft model on its own backend (default: the target's) and its own KV pool of
        as many blocks as the target's, after checking that it speaks the same tokens."""
        from pathlib import Path

        if not Path(path).is_dir():
            raise RequestError(f"draft model {path!r} is not a model directory")
        draft_dir = ModelDir(Path(path))
        target_vocab = self.tokenizer.backend.get_vocab()
        if (draft_dir.config.vocab_size != self.config.vocab_size
                or draft_dir.tokenizer.backend.get_vocab() != target_vocab):
            raise RequestError(f"draft model {path} has another tokenizer or vocabulary than the "
                               f"target ({draft_dir.config.vocab_size} vs {self.config.vocab_size}"
                               f" tokens); speculative decoding needs the same one")
        name = resolve(backend or self.backend_name)
        cls = backend_class(name)
        options = self.options if name == self.backend_name else backend_options(name, None)
        cap = cls.max_kv_blocks(draft_dir.config, block_size, options)
        draft = cls(draft_dir, num_blocks=min(num_blocks, cap) if cap else num_blocks,
                    block_size=block_size, options=options)
        draft_dir.close()
        return draft

    @property
    def tokenizer(self):
        return self.model_dir.tokenizer

    @property
    def context_limit(self) -> int:
        return self.engine.context_limit

    @property
    def block_size(self) -> int:
        return self.engine.block_size

    def stats(self) -> dict:
        return self.loop.stats()

    def logits_for(self, token_ids: list[int]) -> np.ndarray:
        """Next-token logits after every position of ``token_ids`` (float32 ``[n, vocab]``)."""
        ids = [int(t) for t in token_ids]
        return self.loop.call(lambda: score_tokens(self.engine, ids))

    def close(self) -> None:
        self.loop.shutdown()
