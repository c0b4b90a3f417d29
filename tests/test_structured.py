"""Structured output and tool calling (issue 19): JSON schema / regex / grammar constraints in
the engine, ``response_format``/``tools``/``logit_bias`` over HTTP with the official ``openai``
client, the API keywords, the CLI flags and the REPL's ``/json``.

The tiny random model checks mechanics (a random model writes garbage, so only a constraint
can make it write valid JSON); the real default model checks the acceptance cases: 20 varied
schemas streamed and not, greedy and sampled, 8 at a time beside unconstrained requests whose
outputs must equal their outputs alone, and a tool-calling round trip.
"""

from __future__ import annotations

import builtins
import concurrent.futures as cf
import json
import threading

import jsonschema
import openai
import pytest
from click.testing import CliRunner

import ondevice
from ondevice.apps.cli import cli
from ondevice.constraints import Constraint, ConstraintError
from ondevice.engine.engine import _plain_greedy
from ondevice.sampling import SamplingParams
from ondevice.server import ServerThread, create_app
from ondevice.server import tools as T

pytest.importorskip("llguidance")

SMALL = {  # bounded, so that even a random model finishes well within max_tokens
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 1, "maximum": 9},
        "tag": {"enum": ["red", "green", "blue"]},
        "xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
               "minItems": 1, "maxItems": 3},
    },
    "required": ["ok", "n", "tag", "xs"],
    "additionalProperties": False,
}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "enum": ["Paris", "Rome", "Tokyo"]},
            "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two small integers.",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 99},
            "b": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["a", "b"], "additionalProperties": False}}},
]
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def pool_restored(model) -> bool:
    engine = model.runtime.engine
    return model.runtime.loop.call(
        lambda: not engine.has_unfinished() and engine.kv.num_free_blocks == engine.kv.num_blocks)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m = ondevice.load(tiny_model_dir, "numpy", kv_memory="8MiB", quiet=True)
    yield m
    m.close()


@pytest.fixture(scope="module")
def client(model):
    with ServerThread(create_app(model, model_name="tiny")) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                            timeout=120)


def collect(model, prompt, **kw) -> tuple[str, str | None]:
    texts, finish = [], None
    for chunk in model.stream(prompt, **kw):
        texts.append(chunk.text)
        finish = chunk.finish_reason or finish
    return "".join(texts), finish


# --------------------------------------------------------------------------------------------
# Constraint data and the compiler


def test_constraint_forms():
    c = Constraint.from_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": SMALL, "strict": True}})
    assert c == Constraint.json_schema(SMALL) == Constraint.json_schema(json.dumps(SMALL))
    assert list(json.loads(c.spec)["properties"]) == ["ok", "n", "tag", "xs"]  # order kept
    assert Constraint.from_response_format({"type": "text"}) is None
    assert Constraint.from_response_format({"type": "json_object"}).kind == "json_object"
    for bad in ({"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema",
                "json_schema": {"schema": {}, "strict": "yes"}}, "json"):
        with pytest.raises(ConstraintError):
            Constraint.from_response_format(bad)
    with pytest.raises(ConstraintError, match="not valid JSON"):
        Constraint.json_schema("{")
    with pytest.raises(ConstraintError, match="empty"):
        Constraint.regex("")
    with pytest.raises(ondevice.SamplingError, match="logit_bias"):
        SamplingParams(logit_bias={"1": 101})
    assert SamplingParams(logit_bias={"7": 1, 3: -2}).logit_bias == ((3, -2.0), (7, 1.0))


def test_compile_cache_and_fast_path_exclusion(model):
    compiler = model.runtime.engine.constraints
    c = Constraint.json_schema({"type": "object", "properties": {"zz": {"type": "integer"}}})
    first = compiler.compile(c)
    hits = compiler.hits
    assert compiler.compile(Constraint.json_schema(json.loads(c.spec))) is first
    assert compiler.hits == hits + 1
    # The device-argmax shortcut reads only each row's argmax: never for constrained rows.
    assert _plain_greedy(SamplingParams(temperature=0))
    assert not _plain_greedy(SamplingParams(temperature=0, constraint=c))
    assert not _plain_greedy(SamplingParams(temperature=0, logit_bias={1: 5}))


def test_missing_llguidance_names_the_extra(monkeypatch, tiny_model_dir):
    real_import = builtins.__import__

    def no_llg(name, *args, **kwargs):
        if name.startswith("llguidance"):
            raise ImportError("no llguidance")
        return real_import(name, *args, **kwargs)

    m = ondevice.load(tiny_model_dir, "numpy", kv_memory="8MiB", quiet=True)
    try:
        monkeypatch.setattr(builtins, "__import__", no_llg)
        with pytest.raises(ondevice.OndeviceError, match=r"ondevice\[structured\]") as info:
            m.generate("hi", regex="[ab]+")
        assert "\n" not in str(info.value)
    finally:
        monkeypatch.undo()
        m.close()


# --------------------------------------------------------------------------------------------
# The engine through the API (tiny model)


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0, seed=5),
                                dict(temperature=0.8, top_p=0.9, seed=2, n=3)])
def test_json_schema_replies_validate(model, kw):
    replies = model.generate("hi", max_tokens=120, json_schema=SMALL, **kw)
    for text in replies if isinstance(replies, list) else [replies]:
        jsonschema.validate(json.loads(text), SMALL)


def test_n_samples_walk_their_own_matchers(model):
    replies = model.generate("hi", max_tokens=20, regex=r"(yes|no) [0-9]{3}", temperature=1.0,
                             seed=1, n=4)
    assert len(set(replies)) > 1
    for r in replies:
        assert r.split()[0] in ("yes", "no") and len(r.split()[1]) == 3


def test_regex_lark_gbnf_and_json_object(model):
    assert model.generate("x", max_tokens=10, temperature=0, regex="[A-Z]{4}").isupper()
    assert model.generate("x", max_tokens=10, temperature=0,
                          grammar='start: "yes" | "no"') in ("yes", "no")
    assert model.generate("x", max_tokens=10, temperature=1, seed=3,
                          grammar='root ::= "maybe" | "sure"') in ("maybe", "sure")
    text, finish = collect(model, "x", max_tokens=300, temperature=0,
                           response_format={"type": "json_object"})
    assert finish == "length" or isinstance(json.loads(text), dict)
    assert text.startswith("{")


def test_truncated_reply_says_length_and_stop_strings_still_stop(model):
    schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    text, finish = collect(model, "hi", max_tokens=6, temperature=0, json_schema=schema)
    assert finish == "length" and text.startswith('{"s": ')
    with pytest.raises(ValueError):
        json.loads(text)  # cut short: the caller can tell from finish_reason
    text, finish = collect(model, "hi", max_tokens=50, temperature=0, json_schema=SMALL,
                           stop=['"n"'])
    assert finish == "stop" and text == '{"ok": ' + text[len('{"ok": '):] and '"n"' not in text


def test_eos_only_where_the_matcher_accepts(model):
    """ignore_eos aside, a constrained reply ends by completing the constraint: even with EOS
    pushed up by +100 it is not cut short before the match is complete."""
    eos = sorted(model.tokenizer.eos_token_ids)
    text, finish = collect(model, "x", max_tokens=30, temperature=0, regex="[a-z]{5}",
                           logit_bias={t: 100 for t in eos})
    assert finish == "stop" and len(text) == 5


def test_logit_bias(model):
    plain = model.generate("hi", max_tokens=4, temperature=0, ignore_eos=True)
    ids = model.tokenizer.encode(plain)
    forced = model.generate("hi", max_tokens=4, temperature=0, ignore_eos=True,
                            logit_bias={5: 100})
    assert model.tokenizer.encode(forced) == [5] * 4
    banned = model.generate("hi", max_tokens=4, temperature=0, ignore_eos=True,
                            logit_bias={ids[0]: -100})
    assert model.tokenizer.encode(banned)[0] != ids[0]


def test_bad_input_is_one_line_ondevice_error(model):
    cases = [
        (dict(json_schema={"type": 7}), "invalid json schema"),
        (dict(json_schema={"type": "array", "uniqueItems": True}), "uniqueItems"),
        (dict(regex=r"[^\s\S]"), "cannot match anything"),
        (dict(regex="abc["), "invalid regex"),
        (dict(grammar="start: nothing_here"), "invalid grammar"),
        (dict(logit_bias={10**6: 1}), "outside the vocabulary"),
        (dict(regex="a", json_schema={}), "one constraint"),
    ]
    for kw, message in cases:
        with pytest.raises(ondevice.OndeviceError, match=message) as info:
            model.generate("hi", max_tokens=4, **kw)
        assert "\n" not in str(info.value)
    assert pool_restored(model)


def test_unconstrained_outputs_unchanged_beside_constrained(model):
    prompts = [f"Question {i}: what is {i} plus {i * 3}?" for i in range(4)]
    alone = [model.generate(p, max_tokens=24, temperature=0, ignore_eos=True) for p in prompts]
    together: dict[int, str] = {}
    valid: list[bool] = []

    def plain(i: int) -> None:
        together[i] = model.generate(prompts[i], max_tokens=24, temperature=0, ignore_eos=True)

    def constrained(i: int) -> None:
        text = model.generate(f"json {i}", max_tokens=120, temperature=1.0, seed=i,
                              json_schema=SMALL)
        jsonschema.validate(json.loads(text), SMALL)
        valid.append(True)

    threads = [threading.Thread(target=plain, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=constrained, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [together[i] for i in range(4)] == alone
    assert len(valid) == 8


def test_prefix_cache_reused_and_abort_frees_blocks(model):
    prompt = "A long shared prefix for the cache. " * 8
    first = model.generate(prompt, max_tokens=60, temperature=0, json_schema=SMALL)
    second = model.generate(prompt, max_tokens=60, temperature=0, json_schema=SMALL)
    assert first == second and model.timings.cached_prompt_tokens > 0
    stream = model.stream("hi", max_tokens=500, temperature=0,
                          json_schema={"type": "object", "properties": {"s": {"type": "string"}}})
    next(stream)
    stream.close()  # aborted mid-reply
    assert pool_restored(model)


def test_preempted_constrained_request_resumes_valid(tiny_model_dir):
    m = ondevice.load(tiny_model_dir, backend="numpy", kv_memory="256KiB", quiet=True)
    try:
        schema = {"type": "object", "properties": {
            "xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                   "minItems": 12, "maxItems": 12}}, "required": ["xs"],
            "additionalProperties": False}
        alone = m.generate("Once upon a time", max_tokens=120, temperature=1.0, seed=3,
                           json_schema=schema)
        before = m.stats()["preemptions"]

        def other(i: int) -> None:
            m.generate(f"Question {i}: what is {i} plus {i * 3}?", max_tokens=60,
                       temperature=1.0, ignore_eos=True)

        threads = [threading.Thread(target=other, args=(i,)) for i in range(15)]
        for t in threads:
            t.start()
        batched = m.generate("Once upon a time", max_tokens=120, temperature=1.0, seed=3,
                             json_schema=schema)
        for t in threads:
            t.join(120)
        assert m.stats()["preemptions"] > before  # the batch really was tight
        assert batched == alone
        jsonschema.validate(json.loads(batched), schema)
        assert pool_restored(m)
    finally:
        m.close()


# --------------------------------------------------------------------------------------------
# The server (tiny model, official client)


def test_server_response_format(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=120,
        temperature=0, response_format={"type": "json_schema", "json_schema": {
            "name": "small", "schema": SMALL, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SMALL)
    assert r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=120,
        temperature=0, stream=True, response_format={"type": "json_schema", "json_schema": {
            "name": "small", "schema": SMALL}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content
    r = client.completions.create(model="tiny", prompt="x", max_tokens=10, temperature=0,
                                  extra_body={"regex": "[0-9]{3}"})
    assert r.choices[0].text.isdigit() and len(r.choices[0].text) == 3


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
@pytest.mark.parametrize("parallel", [True, False])
def test_server_forced_tool_calls_validate_and_stream_the_same(client, choice, parallel):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "What is 2 + 3?"}],
              max_tokens=150, temperature=0, tools=TOOLS, tool_choice=choice,
              parallel_tool_calls=parallel)
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert msg.content is None and msg.tool_calls
    assert r.choices[0].finish_reason == ("tool_calls" if choice == "required" else "stop")
    for call in msg.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments),
                            TOOL_SCHEMAS[call.function.name])
    if isinstance(choice, dict):
        assert [c.function.name for c in msg.tool_calls] == ["add"]
    # Streamed: delta.tool_calls reassemble to the same calls.
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for d in chunk.choices[0].delta.tool_calls or ():
            c = calls.setdefault(d.index, {"name": "", "arguments": "", "id": None})
            c["id"] = d.id or c["id"]
            c["name"] += (d.function.name or "") if d.function else ""
            c["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == r.choices[0].finish_reason
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls]
    assert all(c["id"] for c in calls.values())


def test_server_tool_round_trip_and_auto(client):
    first = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}],
        max_tokens=100, temperature=0, tools=TOOLS, tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"},
    ]
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                            temperature=0, tools=TOOLS, tool_choice="none")
    assert second.choices[0].message.tool_calls is None
    assert isinstance(second.choices[0].message.content, str)
    auto = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                          temperature=0, tools=TOOLS)
    assert auto.choices[0].message.content is not None  # random text is no call


def test_tool_call_parsing_and_rendering():
    req = T.ToolRequest(tuple(T.Tool(t["function"]["name"], "", t["function"]["parameters"])
                              for t in TOOLS), "auto")
    calls = T.extract_calls('{"name": "add", "arguments": {"a": 1, "b": 2}}', req)
    assert calls and json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    calls = T.extract_calls('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
                            '</tool_call>\n<tool_call>{"name": "get_weather", "arguments": '
                            '{"city": "Rome", "unit": "celsius"}}</tool_call>', req)
    assert [c["function"]["name"] for c in calls] == ["add", "get_weather"]
    assert T.extract_calls('{"name": "rm_rf", "arguments": {}}', req) is None
    assert T.extract_calls("Paris is sunny.", req) is None
    # Streaming in auto mode: prose passes through as soon as it cannot be a call.
    s = T.ToolCallStream(req)
    assert s.feed("  ") == [] and s.feed("Hel") == [{"content": "  Hel"}]
    assert s.feed("lo") == [{"content": "lo"}]
    s = T.ToolCallStream(req)
    assert s.feed('{"name": "add", ') == [] and s.feed('"arguments": {"a": 1, "b": 2}}') == []
    deltas, reason = s.finish("stop")
    assert reason == "tool_calls" and deltas[0]["tool_calls"][0]["function"]["name"] == "add"
    # Fallback rendering for templates without tools.
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    out, extra = T.render(msgs, req, takes_tools=False)
    assert extra == {} and out[0]["role"] == "system" and '"name": "add"' in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": '{"name": "add", "arguments": {"a": 1, '
                                                      '"b": 2}}'}
    assert out[3] == {"role": "user", "content": "Result of add: 3"}
    out, extra = T.render(msgs, req, takes_tools=True)
    assert extra["tools"][1]["function"]["name"] == "add"
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}
    assert T.template_takes_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not T.template_takes_tools("{% for m in messages %}{{ m.content }}{% endfor %}")


def test_server_template_with_tools_gets_them(tiny_model_dir, tmp_path):
    """A chat template that reads ``tools`` is rendered with them (and with the assistant's
    tool_calls), instead of the fallback system prompt."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} "
        "{{ c.function.arguments | tojson }}{% endfor %}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    m = ondevice.load(d, "numpy", kv_memory="8MiB", quiet=True)
    seen: list[str] = []
    original = m.tokenizer.apply_chat_template

    def spy(messages, add_generation_prompt=True, **extra):
        text = original(messages, add_generation_prompt, **extra)
        seen.append(text)
        return text

    m.tokenizer.apply_chat_template = spy
    try:
        with ServerThread(create_app(m, model_name="t")) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            c.chat.completions.create(model="t", max_tokens=2, tools=TOOLS, messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                 "function": {"name": "add", "arguments": '{"a": 1}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "3"}])
        assert seen[-1].startswith("TOOLS:get_weather;add;")
        assert 'CALL add {"a": 1}' in seen[-1] and "<|im_start|>tool\n3" in seen[-1]
    finally:
        m.close()


@pytest.mark.parametrize("kw,param", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                  "schema": {"type": 7}}}),
     "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "not": {"required": ["a"]}}}}),
     "response_format"),
    (dict(response_format={"type": "yaml"}), "response_format"),
    (dict(extra_body={"regex": r"[^\s\S]"}), "response_format"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}],
          tool_choice="required"), "tools"),
    (dict(logit_bias={"999999": 5}), "logit_bias"),
    (dict(logit_bias={"1": 101}), "logit_bias"),
    (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(tools=TOOLS, tool_choice="required",
          response_format={"type": "json_object"}), "response_format"),
])
def test_server_bad_input_is_400_in_openai_shape(client, model, kw, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}], **kw)
    err = info.value.body
    assert info.value.status_code == 400 and err["param"] == param
    assert err["type"] == "invalid_request_error" and "\n" not in err["message"]
    assert pool_restored(model)


# --------------------------------------------------------------------------------------------
# CLI and REPL


def test_cli_generate_constraints(tiny_model_dir, tmp_path):
    def run(*args):
        return CliRunner().invoke(cli, ["generate", "-m", str(tiny_model_dir), "-p", "hi",
                                        "--temperature", "0", *args])

    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SMALL))
    r = run("-n", "120", "--json-schema", str(schema))
    assert r.exit_code == 0, r.output
    jsonschema.validate(json.loads(r.output), SMALL)
    r = run("-n", "10", "--regex", "[0-9]{4}")
    assert r.exit_code == 0 and r.output.strip().isdigit() and len(r.output.strip()) == 4
    grammar = tmp_path / "g.lark"
    grammar.write_text('start: "alpha" | "beta"\n')
    r = run("-n", "10", "--grammar", str(grammar))
    assert r.exit_code == 0 and r.output.strip() in ("alpha", "beta")
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "array", "uniqueItems": true}')
    for args, message in [(("--json-schema", str(bad)), "uniqueItems"),
                          (("--regex", r"[^\s\S]"), "cannot match anything"),
                          (("--json-schema", str(tmp_path / "missing.json")), "cannot read"),
                          (("--regex", "a", "--grammar", str(grammar)), "pass one")]:
        r = run("-n", "5", *args)
        assert r.exit_code == 1, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0]


def test_repl_json_turn(model, monkeypatch, capsys, tmp_path):
    from ondevice.apps import repl
    from ondevice.apps.repl import run_repl
    from ondevice.chat import ChatSession

    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SMALL))
    lines = iter([f"/json @{schema} give me json", "/json", "/quit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    # The REPL may read through a line editor; this test types through a plain reader.
    monkeypatch.setattr(repl, "make_reader", lambda: lambda: next(lines), raising=False)
    session = ChatSession(model, SamplingParams(max_tokens=120, temperature=0))
    run_repl(session)
    out = capsys.readouterr()
    reply = session.messages[1]["content"]
    jsonschema.validate(json.loads(reply), SMALL)
    assert session.params.constraint is None  # one turn only
    assert "usage: /json" in out.err


# --------------------------------------------------------------------------------------------
# The real default model (acceptance)

SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"enum": ["Paris", "London", "Rome"]},
                                      "country": {"type": "string", "maxLength": 30}},
     "required": ["city", "country"], "additionalProperties": False},
    {"type": "object", "properties": {"colors": {
        "type": "array", "items": {"enum": ["red", "green", "blue", "yellow"]},
        "minItems": 2, "maxItems": 4}}, "required": ["colors"], "additionalProperties": False},
    {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -50,
                                                      "maximum": 60},
                                      "unit": {"enum": ["C", "F"]}},
     "required": ["temperature", "unit"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.com$"}},
        "required": ["id", "email"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"type": "boolean"},
                                      "reason": {"type": "string", "maxLength": 60}},
     "required": ["answer"], "additionalProperties": False},
    {"type": "object", "properties": {"date": {"type": "string",
                                               "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
     "required": ["date"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                         "qty": {"type": "integer", "minimum": 1,
                                                 "maximum": 10}},
        "required": ["name", "qty"], "additionalProperties": False},
        "minItems": 1, "maxItems": 3}}, "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 50},
                                      "tags": {"type": "array", "items": {"type": "string",
                                                                          "maxLength": 15},
                                               "maxItems": 3},
                                      "draft": {"type": "boolean"}},
     "required": ["title", "draft"], "additionalProperties": False},
    {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative",
                                                             "neutral"]},
                                      "score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["sentiment", "score"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -100, "maximum": 100},
        "y": {"type": "integer", "minimum": -100, "maximum": 100}},
        "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"language": {"enum": ["python", "rust", "go"]},
                                      "version": {"type": "string",
                                                  "pattern": "^[0-9]\\.[0-9]{1,2}$"}},
     "required": ["language", "version"], "additionalProperties": False},
    {"type": "object", "properties": {"steps": {"type": "array", "items": {
        "type": "string", "maxLength": 40}, "minItems": 2, "maxItems": 3}},
     "required": ["steps"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "code": {"type": "integer", "enum": [200, 404, 500]}},
     "required": ["ok", "code"], "additionalProperties": False},
    {"type": "object", "properties": {"first": {"type": "string", "maxLength": 20},
                                      "last": {"type": "string", "maxLength": 20},
                                      "middle": {"type": "string", "maxLength": 20}},
     "required": ["first", "last"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "items": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "minItems": 2, "maxItems": 2}, "minItems": 2, "maxItems": 2}},
     "required": ["matrix"], "additionalProperties": False},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0,
                                                "maximum": 1000},
                                      "currency": {"type": "string", "pattern": "^[A-Z]{3}$"}},
     "required": ["price", "currency"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "event"},
                                      "when": {"enum": ["today", "tomorrow"]},
                                      "attendees": {"type": "integer", "minimum": 1,
                                                    "maximum": 50}},
     "required": ["kind", "when", "attendees"], "additionalProperties": False},
    {"type": "object", "properties": {"result": {"anyOf": [
        {"type": "integer", "minimum": 0, "maximum": 100},
        {"type": "string", "maxLength": 20}]}},
     "required": ["result"], "additionalProperties": False},
    {"type": "object", "properties": {"summary": {"type": "string", "maxLength": 80},
                                      "keywords": {"type": "array", "items": {
                                          "type": "string", "maxLength": 15},
                                          "minItems": 1, "maxItems": 3},
                                      "meta": {"type": "object", "properties": {
                                          "words": {"type": "integer", "minimum": 0,
                                                    "maximum": 500}},
                                          "additionalProperties": False}},
     "required": ["summary", "keywords"], "additionalProperties": False},
]
PROMPTS = ["Describe a person.", "Name a European capital.", "List some colors.",
           "What is the weather like?", "Make up a user account.", "Is the sky blue?",
           "When is the next holiday?", "Write a shopping list.", "Propose a blog post.",
           "How does 'I love this movie' sound?", "Give a point on a grid.",
           "Which programming language do you like?", "How do I boil an egg?",
           "Did the request succeed?", "Make up a full name.", "Write a 2x2 matrix.",
           "How much is a coffee?", "Plan a meeting.", "What is 6 times 7?",
           "Summarize: the cat sat on the mat."]


@pytest.fixture(scope="module")
def real_server(real_model_dir):
    m = ondevice.load(real_model_dir, quiet=True)
    with ServerThread(create_app(m, model_name="smol")) as srv:
        yield m, openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                               timeout=600)
    m.close()


@pytest.mark.real_model
def test_real_model_20_schemas_validate(real_server):
    """Every reply parses and validates, streamed or not, greedy or sampled, 8 requests at a
    time together with unconstrained ones that give what they give alone."""
    assert len(SCHEMAS) == 20 and len(PROMPTS) == 20
    for s in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(s)
    model, client = real_server
    plain_prompts = ["Tell me about Paris.", "Write a haiku about the sea.",
                     "What is 2 + 2?", "Name three fruits."]

    def plain(p: str) -> str:
        r = client.chat.completions.create(model="smol", messages=[{"role": "user",
                                                                     "content": p}],
                                           max_tokens=24, temperature=0)
        return r.choices[0].message.content

    alone = [plain(p) for p in plain_prompts]

    def constrained(i: int, stream: bool, sampled: bool) -> tuple[str, str]:
        kw = dict(model="smol", messages=[{"role": "user", "content": PROMPTS[i]}],
                  max_tokens=250, response_format={"type": "json_schema", "json_schema": {
                      "name": f"s{i}", "schema": SCHEMAS[i], "strict": True}})
        kw |= dict(temperature=0.8, seed=i) if sampled else dict(temperature=0)
        if not stream:
            r = client.chat.completions.create(**kw)
            return r.choices[0].message.content, r.choices[0].finish_reason
        text, finish = [], None
        for chunk in client.chat.completions.create(stream=True, **kw):
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(text), finish

    # Each schema greedy and sampled, one of them streamed: every combination 10 times.
    jobs = [(i, (i + k) % 2 == 1, k == 1) for i in range(20) for k in (0, 1)]
    with cf.ThreadPoolExecutor(8) as pool:
        futures = {pool.submit(constrained, *job): job for job in jobs}
        together = list(pool.map(plain, plain_prompts))  # while the constrained ones run
        results = {futures[f]: f.result() for f in cf.as_completed(futures)}
    assert together == alone
    for (i, stream, sampled), (text, finish) in sorted(results.items()):
        assert finish == "stop", (i, stream, sampled, text)
        jsonschema.validate(json.loads(text), SCHEMAS[i])


@pytest.mark.real_model
def test_real_model_tool_round_trip(real_server):
    _, client = real_server
    messages = [{"role": "user", "content": "What's the weather in Paris, in celsius?"}]
    kw = dict(model="smol", max_tokens=120, temperature=0, tools=TOOLS)
    r = client.chat.completions.create(messages=messages, tool_choice="required", **kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.tool_calls
    for call in msg.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments),
                            TOOL_SCHEMAS[call.function.name])
    streamed: dict[int, dict] = {}
    for chunk in client.chat.completions.create(messages=messages, tool_choice="required",
                                                stream=True, **kw):
        for d in (chunk.choices[0].delta.tool_calls or ()) if chunk.choices else ():
            c = streamed.setdefault(d.index, {"name": "", "arguments": ""})
            c["name"] += d.function.name or ""
            c["arguments"] += d.function.arguments or ""
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(streamed.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls]
    call = msg.tool_calls[0]
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": '
                                                             '"sunny"}'},
    ]
    r = client.chat.completions.create(messages=messages, **kw | {"max_tokens": 60})
    reply = r.choices[0].message
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.content or reply.tool_calls
