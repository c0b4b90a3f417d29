"""Embedding ondevice in an app: streaming callbacks and cancellation.

An app's UI thread must never block on generation. :class:`Assistant` loads a model once and
answers each :meth:`Assistant.ask` on a worker thread, calling ``on_text`` with each new piece
of text and ``on_done`` once with how it ended; :meth:`Reply.cancel` stops a reply at the next
token and frees its KV blocks (the engine aborts the request when the stream is closed).
Several replies may run at once: the engine batches them.

On a Mac, ``backend="mlx"`` runs on the GPU; ``backend="coreml"`` runs the model as an
exported Core ML package (macOS 15+). Run it::

    python -m ondevice.apps.mac.embed_example "Write a haiku about autumn" --cancel-after 8
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ondevice
from ondevice.errors import OndeviceError

TextCallback = Callable[[str], None]
DoneCallback = Callable[["Reply"], None]


@dataclass
class Reply:
    """One answer in progress: its text so far, and how it ended once ``done`` is set."""

    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None
    seconds_to_first_token: float | None = None
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Stop generating at the next token (safe from any thread, any number of times)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the reply has finished (True) or ``timeout`` passed (False)."""
        return self.done.wait(timeout)


class Assistant:
    """A loaded model plus a system prompt, answering on background threads."""

    def __init__(self, model: str | None = None, *, backend: str = "auto",
                 system: str | None = None, **load_options: Any):
        self.model = ondevice.load(model, backend=backend, quiet=True, **load_options)
        self.system = system

    def ask(self, prompt: str | Sequence[dict[str, str]], *, on_text: TextCallback | None = None,
            on_done: DoneCallback | None = None, max_tokens: int = 256,
            temperature: float = 0.7, seed: int | None = None, **sampling: Any) -> Reply:
        """Start answering ``prompt`` (a user message, or a whole list of chat messages) and
        return at once. Callbacks run on the worker thread: an app hops to its UI thread in
        them (``DispatchQueue.main.async`` in Swift, ``loop.call_soon_threadsafe`` in asyncio).
        Further keywords are :class:`ondevice.SamplingParams` fields (``top_p``, ``stop``...).
        """
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = list(prompt)
        if self.system:
            messages = [{"role": "system", "content": self.system}, *messages]
        reply = Reply()
        worker = threading.Thread(
            target=self._run, name="ondevice-reply", daemon=True,
            args=(reply, messages, on_text, on_done,
                  dict(max_tokens=max_tokens, temperature=temperature, seed=seed, **sampling)),
        )
        worker.start()
        return reply

    def _run(self, reply: Reply, messages, on_text, on_done, sampling) -> None:
        start = time.perf_counter()
        stream = self.model.stream(messages, **sampling)
        try:
            for chunk in stream:
                if reply.cancelled:
                    reply.finish_reason = "cancelled"
                    break
                if reply.seconds_to_first_token is None:
                    reply.seconds_to_first_token = time.perf_counter() - start
                reply.tokens += chunk.token_id is not None
                if chunk.text:
                    reply.text += chunk.text
                    if on_text is not None:
                        on_text(chunk.text)
                if chunk.finish_reason:
                    reply.finish_reason = chunk.finish_reason
            if reply.finish_reason is None:  # cancelled before the first chunk arrived
                reply.finish_reason = "cancelled" if reply.cancelled else "stop"
        except OndeviceError as err:  # a request the model cannot serve: tell the app
            reply.finish_reason, reply.error = "error", str(err)
        finally:
            stream.close()  # aborts the request in the engine if it is still running
            reply.done.set()
            if on_done is not None:
                on_done(reply)

    def stats(self) -> dict:
        return self.model.stats()

    def close(self) -> None:
        self.model.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help="model directory or .gguf [default model]")
    p.add_argument("--backend", default="auto")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--cancel-after", type=int, default=None,
                   help="cancel from the callback after this many text pieces")
    args = p.parse_args(argv)
    try:
        assistant = Assistant(args.model, backend=args.backend)
    except OndeviceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    pieces = 0
    reply: Reply | None = None

    def on_text(text: str) -> None:
        nonlocal pieces
        pieces += 1
        print(text, end="", flush=True)
        if args.cancel_after is not None and pieces >= args.cancel_after and reply:
            reply.cancel()

    reply = assistant.ask(args.prompt, on_text=on_text, max_tokens=args.max_tokens,
                          temperature=args.temperature)
    reply.wait()
    print(f"\n[{reply.finish_reason}: {reply.tokens} tokens, first after "
          f"{reply.seconds_to_first_token or 0:.2f} s]", file=sys.stderr)
    assistant.close()
    return 0 if reply.finish_reason != "error" else 1


if __name__ == "__main__":
    sys.exit(main())
