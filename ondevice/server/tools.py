"""Tool calling over the OpenAI chat API: parsing ``tools``/``tool_choice``, rendering tool
turns through the chat template, constraining forced calls, and turning replies into
``tool_calls`` (whole or streamed as ``delta.tool_calls``).

How a reply becomes tool calls depends on ``tool_choice``:

- a named function: the reply is constrained by that function's parameter schema, so it *is*
  the arguments object; it is returned as one call (streamed argument by argument).
- ``"required"``: the reply is constrained to ``{"name": ..., "arguments": {...}}`` with each
  function's name and parameter schema (a non-empty list of them when
  ``parallel_tool_calls``), so the arguments always parse and validate.
- ``"auto"``: the model is free; a reply that is only a call — ``{"name": ...,
  "arguments": ...}`` (or a list of them), or ``<tool_call>{...}</tool_call>`` blocks as the
  Hermes/Qwen templates ask for — naming a known function becomes ``tool_calls``, anything
  else stays text. While streaming, text that may still turn out to be a call is held back.
- ``"none"``: plain text.

Templates that take ``tools`` (they mention the variable) get them as transformers passes
them, with assistant ``tool_calls`` arguments as objects. For the others a fallback is
rendered: a system message lists the functions and asks for the JSON form above, assistant
calls become that JSON, and tool results become user messages ``Result of NAME: ...``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..constraints import Constraint
from .protocol import invalid

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_TOOL_CALL_TAG = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

FALLBACK_PROMPT = (
    "You can call these functions (name, description and JSON schema of the arguments):\n"
    "{functions}\n"
    "To call a function, reply with only a JSON object {{\"name\": <function name>, "
    "\"arguments\": <arguments object>}}, or a JSON list of such objects to call several. "
    "Otherwise reply normally."
)
"""The system text that lists the tools for templates that do not take ``tools``."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolRequest:
    """What a chat request asked for: its tools, ``tool_choice`` (``"auto"``, ``"none"``,
    ``"required"`` or ``"named"`` with ``name``) and ``parallel_tool_calls``."""

    tools: tuple[Tool, ...]
    choice: str
    name: str | None = None
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def constraint(self) -> Constraint | None:
        """The decoding constraint of a forced call (None for ``auto``/``none``)."""
        if not self.active or self.choice == "auto":
            return None
        if self.choice == "named":
            tool = next(t for t in self.tools if t.name == self.name)
            return Constraint.json_schema(tool.parameters)
        calls = [{"type": "object", "properties": {"name": {"const": t.name},
                                                   "arguments": t.parameters},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for t in self.tools]
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.parallel:
            return Constraint.json_schema({"type": "array", "items": one, "minItems": 1})
        return Constraint.json_schema(one)


def parse_tools(body: Mapping[str, Any]) -> ToolRequest | None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a chat body (400 when
    malformed, or when ``tool_choice`` names a function that is not in ``tools``)."""
    raw = body.get("tools")
    choice = body.get("tool_choice")
    if body.get("functions") or body.get("function_call"):
        raise invalid("functions", "'functions' and 'function_call' are deprecated; send "
                                   "'tools' and 'tool_choice'")
    if not raw:
        if choice not in (None, "none", "auto"):
            raise invalid("tool_choice", "'tool_choice' needs 'tools'")
        return None
    if not isinstance(raw, list):
        raise invalid("tools", "'tools' must be a list of tools")
    tools: list[Tool] = []
    for i, t in enumerate(raw):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise invalid("tools", f"tools[{i}] must be {{'type': 'function', 'function': "
                                   f"{{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise invalid("tools", f"tools[{i}].function.name must be 1-64 letters, digits, "
                                   f"'_', '.' or '-'")
        if any(x.name == name for x in tools):
            raise invalid("tools", f"tools[{i}]: the function name {name!r} is used twice")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise invalid("tools", f"tools[{i}].function.parameters must be a JSON schema "
                                   f"object")
        desc = fn.get("description") or ""
        if not isinstance(desc, str):
            raise invalid("tools", f"tools[{i}].function.description must be a string")
        tools.append(Tool(name, desc, params))

    parallel = body.get("parallel_tool_calls")
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", "'parallel_tool_calls' must be a boolean")
    if choice is None:
        choice = "auto"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise invalid("tool_choice", "'tool_choice' must be 'auto', 'none', 'required' or "
                                         "{'type': 'function', 'function': {'name': ...}}")
        return ToolRequest(tuple(tools), choice, None, parallel)
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" \
            or not isinstance(name, str):
        raise invalid("tool_choice", "'tool_choice' must be 'auto', 'none', 'required' or "
                                     "{'type': 'function', 'function': {'name': ...}}")
    if not any(t.name == name for t in tools):
        shown = name if len(name) <= 64 else name[:61] + "..."
        raise invalid("tool_choice", f"'tool_choice' names the function {shown!r}, which is "
                                     f"not in 'tools' ({', '.join(t.name for t in tools)})")
    return ToolRequest(tuple(tools), "named", name, parallel)


# --------------------------------------------------------------------------------------------
# Rendering


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template reads the ``tools`` variable (then it gets them)."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def _arguments_object(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # not JSON: the template gets the client's string


def render(messages: Sequence[dict[str, Any]], tools: ToolRequest | None,
           takes_tools: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages and extra template variables for ``encode_chat``."""
    has_tool_turns = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if not tools and not has_tool_turns:
        return list(messages), {}
    if takes_tools:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [
                    {**c, "function": {**c["function"],
                                       "arguments": _arguments_object(c["function"]["arguments"])}}
                    for c in m["tool_calls"]]
            out.append(m)
        extra = {"tools": [t.to_openai() for t in tools.tools]} if tools else {}
        return out, extra
    return _fallback(messages, tools), {}


def _fallback(messages: Sequence[dict[str, Any]], tools: ToolRequest | None) -> list[dict[str, Any]]:
    names: dict[str, str] = {}  # tool_call_id -> function name
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                names[c["id"]] = c["function"]["name"]
                calls.append({"name": c["function"]["name"],
                              "arguments": _arguments_object(c["function"]["arguments"])})
            text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            content = (m["content"] + "\n" + text) if m.get("content") else text
            out.append({"role": "assistant", "content": content})
        elif role == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id", ""), "the function")
            text = f"Result of {name}: {m['content']}"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + text  # several results: one user turn
            else:
                out.append({"role": "user", "content": text, "_tool": True})
        else:
            out.append({"role": role, "content": m["content"]})
    for m in out:
        m.pop("_tool", None)
    if tools and tools.active:
        listing = "\n".join(json.dumps({"name": t.name, "description": t.description,
                                        "parameters": t.parameters}, ensure_ascii=False)
                            for t in tools.tools)
        system = FALLBACK_PROMPT.format(functions=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


# --------------------------------------------------------------------------------------------
# Replies -> tool calls


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _as_calls(value: Any, known: set[str]) -> list[dict[str, Any]] | None:
    """``{"name", "arguments"|"parameters"}`` or a non-empty list of them, naming known
    functions, as OpenAI tool calls; None for anything else."""
    items = value if isinstance(value, list) else [value]
    if not items:
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in known:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            args = _arguments_object(args)
        calls.append({"id": _call_id(), "type": "function",
                      "function": {"name": item["name"],
                                   "arguments": json.dumps(args, ensure_ascii=False)}})
    return calls


def extract_calls(text: str, tools: ToolRequest) -> list[dict[str, Any]] | None:
    """The tool calls a whole reply makes (see the module docstring), or None."""
    known = {t.name for t in tools.tools}
    if tools.choice == "named":
        return [{"id": _call_id(), "type": "function",
                 "function": {"name": tools.name, "arguments": text}}]
    stripped = text.strip()
    if "<tool_call>" in stripped:
        calls: list[dict[str, Any]] = []
        for body in _TOOL_CALL_TAG.findall(stripped):
            try:
                found = _as_calls(json.loads(body), known)
            except ValueError:
                return None
            if found is None:
                return None
            calls.extend(found)
        return calls or None
    try:
        return _as_calls(json.loads(stripped), known)
    except ValueError:
        return None


def _maybe_call(text: str) -> bool:
    """Could this (partial) reply still turn out to be a tool call?"""
    s = text.lstrip()
    return not s or s[0] in "{[" or s.startswith("<tool_call>") or "<tool_call>".startswith(s)


@dataclass
class ToolCallStream:
    """Turns one choice's streamed text into chat deltas: ``{"content": ...}`` or
    ``{"tool_calls": [...]}``. ``finish`` returns the last deltas and the finish reason."""

    tools: ToolRequest
    held: list[str] = field(default_factory=list)
    passthrough: bool = False  # auto mode, once the text cannot be a call any more
    call_id: str = field(default_factory=_call_id)
    opened: bool = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        if self.tools.choice == "named":  # the text is the arguments: stream it as such
            deltas = []
            if not self.opened:
                self.opened = True
                deltas.append({"tool_calls": [{"index": 0, "id": self.call_id,
                                               "type": "function",
                                               "function": {"name": self.tools.name,
                                                            "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return deltas
        if self.passthrough:
            return [{"content": text}]
        self.held.append(text)
        if self.tools.choice == "auto" and not _maybe_call("".join(self.held)):
            self.passthrough = True
            out, self.held = "".join(self.held), []
            return [{"content": out}]
        return []

    def finish(self, reason: str) -> tuple[list[dict[str, Any]], str]:
        if self.tools.choice == "named":
            deltas = [] if self.opened else self.feed(" ")[:1]  # an empty reply: open the call
            return deltas, reason
        text, self.held = "".join(self.held), []
        if not text:
            return [], reason
        calls = extract_calls(text, self.tools) if reason == "stop" else None
        if calls is None:
            return [{"content": text}], reason
        return [{"tool_calls": [{"index": k, **c}]} for k, c in enumerate(calls)], "tool_calls"


def final_message(text: str, reason: str, tools: ToolRequest) -> tuple[dict[str, Any], str]:
    """The ``message`` of a non-streamed choice and its finish reason."""
    calls = None
    if tools.choice == "named" or reason == "stop":
        calls = extract_calls(text, tools)
    if not calls:
        return {"role": "assistant", "content": text}, reason
    return ({"role": "assistant", "content": None, "tool_calls": calls},
            reason if tools.choice == "named" else "tool_calls")


__all__ = ["FALLBACK_PROMPT", "Tool", "ToolCallStream", "ToolRequest", "extract_calls",
           "final_message", "parse_tools", "render", "template_takes_tools"]
