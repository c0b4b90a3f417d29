"""Tests for ondevice.tokenizer with tiny tokenizers trained in memory by `tokenizers`."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ondevice.errors import TokenizerError
from ondevice.tokenizer import IncrementalDetokenizer, Tokenizer

CORPUS = [
    "héllo wörld 日本語 🙂",
    "hello world, the quick brown fox jumps over the lazy dog.",
    "The end is near! Stop here. Ünïcödé text, and more text.",
    "日本語のテキストです。 🙂 smile",
] * 4

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Text with characters the training corpus never saw, so byte-level BPE splits them into
# several byte tokens (and single tokens decode to partial UTF-8).
STREAM_TEXTS = [
    "héllo wörld 日本語 🙂",
    "Emoji 🎉🚀👍🏽 and flags 🇯🇵 mixed with 漢字かな交じり文 and Ελληνικά.",
    "  leading spaces,\ttabs\nand newlines 🎈\n\n",
    "👨‍👩‍👧‍👦 family, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math, € £ ¥",
]


@functools.cache
def byte_level_backend() -> HFTokenizer:
    """A GPT-2 style byte-level BPE with ChatML special tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@functools.cache
def metaspace_backend() -> HFTokenizer:
    """A SentencePiece-style BPE: '▁' marks word starts and single tokens lose their space."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator([t for t in CORPUS if t.isascii()], trainer)
    return tok


@functools.cache
def byte_fallback_backend() -> HFTokenizer:
    """A Llama-style tokenizer: Metaspace pieces, <0xXX> byte fallback, Strip decoder."""
    base = json.loads(metaspace_backend().to_str())
    vocab = base["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    base["model"]["byte_fallback"] = True
    base["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return HFTokenizer.from_str(json.dumps(base))


def write_model_dir(
    root: Path,
    backend: HFTokenizer | None = None,
    config: dict | None = None,
    generation: dict | None = None,
    jinja: str | None = None,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (backend or byte_level_backend()).save(str(root / "tokenizer.json"))
    if config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if generation is not None:
        (root / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    if jinja is not None:
        (root / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    return root


DEFAULT_CONFIG = {
    "chat_template": CHATML,
    "bos_token": None,
    "eos_token": {"content": "<|endoftext|>", "lstrip": False, "__type": "AddedToken"},
    "add_bos_token": False,
}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model_dir(
        tmp_path / "model", config=DEFAULT_CONFIG, generation={"eos_token_id": 0}
    )


@pytest.fixture
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


def make_tokenizer(template: str, **config: object) -> Tokenizer:
    return Tokenizer(byte_level_backend(), chat_template=template, **config)  # type: ignore[arg-type]


MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "héllo 🙂"},
]


# ------------------------------------------------------------------------------- loading


def test_from_dir_reads_config(tok: Tokenizer) -> None:
    backend = byte_level_backend()
    assert tok.vocab_size == backend.get_vocab_size(with_added_tokens=True) == 300
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_id == 0
    # generation_config's 0, the configured eos 0, and the end-of-turn marker <|im_end|>.
    assert tok.eos_token_ids == frozenset({0, 2})
    assert tok.chat_template == CHATML


def test_eos_ids_from_generation_config_list_and_string_tokens(tmp_path: Path) -> None:
    root = write_model_dir(
        tmp_path,
        config={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
        generation={"eos_token_id": [0, 2]},
    )
    t = Tokenizer.from_dir(root)
    assert t.bos_token == "<|im_start|>" and t.bos_token_id == 1
    assert t.eos_token_ids == frozenset({0, 2})
    assert t.chat_template is None


def test_endoftext_is_not_eos_unless_configured(tmp_path: Path) -> None:
    t = Tokenizer.from_dir(write_model_dir(tmp_path))  # only tokenizer.json
    assert t.eos_token_ids == frozenset({2})  # <|im_end|> only
    assert t.eos_token is None


def test_end_of_turn_marker_must_be_an_added_token(tmp_path: Path) -> None:
    t = Tokenizer.from_dir(write_model_dir(tmp_path, backend=metaspace_backend()))
    assert t.eos_token_ids == frozenset()


def test_chat_template_jinja_takes_precedence(tmp_path: Path) -> None:
    root = write_model_dir(
        tmp_path, config=DEFAULT_CONFIG, jinja="JINJA FILE {{ messages|length }}"
    )
    t = Tokenizer.from_dir(root)
    assert t.apply_chat_template(MESSAGES) == "JINJA FILE 2"


def test_chat_template_list_form_uses_default(tmp_path: Path) -> None:
    config = {
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT"},
        ]
    }
    t = Tokenizer.from_dir(write_model_dir(tmp_path, config=config))
    assert t.apply_chat_template(MESSAGES) == "DEFAULT"


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json") as info:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "content",
    ['{"version": "1.0", "model": ', "not json at all", '{"model": {"type": "Nope"}}', ""],
)
def test_corrupt_tokenizer_json(tmp_path: Path, content: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError, match="tokenizer.json") as info:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("tokenizer_config.json", "{broken"),
        ("tokenizer_config.json", "[1, 2]"),
        ("tokenizer_config.json", '{"eos_token": 5}'),
        ("tokenizer_config.json", '{"chat_template": 5}'),
        ("generation_config.json", "{nope"),
        ("generation_config.json", '{"eos_token_id": "x"}'),
    ],
)
def test_corrupt_optional_files(tmp_path: Path, name: str, content: str) -> None:
    write_model_dir(tmp_path)
    (tmp_path / name).write_text(content)
    with pytest.raises(TokenizerError, match=name):
        Tokenizer.from_dir(tmp_path)


# ------------------------------------------------------------------------------- encode/decode


@pytest.mark.parametrize("text", [*STREAM_TEXTS, "", "plain ascii"])
def test_encode_decode_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_in_text(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>"


def test_add_bos_token(tmp_path: Path) -> None:
    root = write_model_dir(tmp_path, config={"bos_token": "<|endoftext|>", "add_bos_token": True})
    t = Tokenizer.from_dir(root)
    assert t.encode("hi", add_special_tokens=True)[0] == 0
    assert t.encode("hi")[0] != 0


def test_encode_rejects_non_string(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError):
        tok.encode(["not", "text"])  # type: ignore[arg-type]
    with pytest.raises(TokenizerError):
        tok.decode([-1])


# ------------------------------------------------------------------------------- chat template


def test_chat_template_rendering(tok: Tokenizer) -> None:
    expected = (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhéllo 🙂<|im_end|>\n"
    )
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == expected
    assert tok.apply_chat_template(MESSAGES) == expected + "<|im_start|>assistant\n"


def test_encode_chat(tok: Tokenizer) -> None:
    ids = tok.encode_chat(MESSAGES)
    assert ids == tok.encode(tok.apply_chat_template(MESSAGES))
    assert ids[0] == 1  # <|im_start|> recognized as one special token
    assert ids.count(2) == 2
    assert tok.decode(ids) == tok.apply_chat_template(MESSAGES)


def test_template_trims_blocks_and_sees_variables() -> None:
    template = (
        "{{ bos_token }}\n"
        "{% for m in messages %}\n"
        "    {% if loop.first %}\n"
        "[{{ m.role }}] {{ m.content }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{{ tools | tojson }}|{{ eos_token }}|{{ pad_token }}"
    )
    t = make_tokenizer(
        template,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        extra_special_tokens={"pad_token": "<pad>"},
    )
    out = t.apply_chat_template(MESSAGES, tools=[{"name": "wetter", "desc": "Größe <b> & 'x'"}])
    assert out == (
        '<|im_start|>\n[system] You are helpful.\n[{"name": "wetter", "desc": "Größe <b> & \'x\'"}]'
        "|<|im_end|>|<pad>"
    )


def test_tojson_indent_and_unset_tokens() -> None:
    t = make_tokenizer("{{ bos_token }}|{{ data | tojson(indent=2) }}")
    assert t.apply_chat_template(MESSAGES, data={"a": [1]}) == '|{\n  "a": [\n    1\n  ]\n}'


def test_strftime_now_and_loopcontrols() -> None:
    t = make_tokenizer(
        "{{ strftime_now('%Y') }}{% for m in messages %}{% if loop.index > 1 %}{% break %}"
        "{% endif %}{{ m.role }}{% endfor %}"
    )
    out = t.apply_chat_template(MESSAGES)
    assert out[:4].isdigit() and out[4:] == "system"


def test_generation_tag_is_transparent() -> None:
    t = make_tokenizer("{% generation %}A{{ messages|length }}{% endgeneration %}B")
    assert t.apply_chat_template(MESSAGES) == "A2B"


def test_raise_exception_in_template() -> None:
    t = make_tokenizer(
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    )
    with pytest.raises(TokenizerError, match="^Conversation roles must alternate user/assistant$"):
        t.apply_chat_template(MESSAGES)
    assert t.apply_chat_template(MESSAGES[1:]) == ""


def test_no_chat_template(tmp_path: Path) -> None:
    t = Tokenizer.from_dir(write_model_dir(tmp_path))
    with pytest.raises(TokenizerError, match="no chat template"):
        t.apply_chat_template(MESSAGES)
    with pytest.raises(TokenizerError, match="no chat template"):
        t.encode_chat(MESSAGES)


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m.content }}",  # unclosed for
        "{{ messages[0] }",
        "{% if %}x{% endif %}",
        "{% unknowntag %}",
    ],
)
def test_invalid_template_syntax(template: str) -> None:
    t = make_tokenizer(template)
    with pytest.raises(TokenizerError, match="invalid chat template") as info:
        t.apply_chat_template(MESSAGES)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages[0].nothing.deeper }}",  # UndefinedError
        "{{ 1 + 'a' }}",  # TypeError inside the template
        "{{ 1 // 0 }}",
    ],
)
def test_template_runtime_errors(template: str) -> None:
    with pytest.raises(TokenizerError, match="chat template failed"):
        make_tokenizer(template).apply_chat_template(MESSAGES)


SANDBOX_ESCAPES = [
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ self.__init__.__globals__ }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ ''.__class__ }}",
    "{{ joiner.__init__.__globals__['__builtins__']['open']('/etc/passwd').read() }}",
    "{{ lipsum.__globals__['os'].system('id') }}",
    "{{ raise_exception.__globals__ }}",
    "{{ namespace.__init__.__globals__.os.environ }}",
    "{% set x = messages.append({'role': 'x', 'content': 'y'}) %}{{ messages|length }}",
    "{{ messages[0].update({'role': 'hacked'}) }}",
    "{{ '{0.__class__}'.format(messages) }}",
]


@pytest.mark.parametrize("template", SANDBOX_ESCAPES)
def test_sandbox_escapes_raise(template: str) -> None:
    messages = [dict(m) for m in MESSAGES]
    with pytest.raises(TokenizerError) as info:
        make_tokenizer(template).apply_chat_template(messages)
    assert "\n" not in str(info.value)
    assert messages == MESSAGES  # nothing was mutated


def test_sandbox_escape_has_no_side_effect(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payloads = [
        f"{{{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}}}",
        f"{{{{ lipsum.__globals__['os'].system('touch {marker}') }}}}",
        "{{ ''.__class__.__mro__[1].__subclasses__()[0]"
        f".__init__.__globals__['sys'].modules['os'].system('touch {marker}') }}}}",
    ]
    for payload in payloads:
        with pytest.raises(TokenizerError):
            make_tokenizer(payload).apply_chat_template(MESSAGES)
    assert not marker.exists()


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [{"role": "user"}],
        [{"content": "hi"}],
        [{"role": "user", "content": None}],
        [{"role": 1, "content": "hi"}],
        ["user: hi"],
        {"role": "user", "content": "hi"},
    ],
)
def test_invalid_messages(tok: Tokenizer, messages: object) -> None:
    with pytest.raises(TokenizerError, match="messages"):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]


def test_template_compiled_once(tok: Tokenizer) -> None:
    tok.apply_chat_template(MESSAGES)
    compiled = tok._compiled
    tok.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert tok._compiled is compiled is not None


# ------------------------------------------------------------------------------- streaming


def stream(det: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [det.add(i) for i in ids]


def byte_level_tokenizer() -> Tokenizer:
    return Tokenizer(byte_level_backend(), eos_token="<|im_end|>")


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_deltas_concatenate_to_decode(text: str) -> None:
    t = byte_level_tokenizer()
    ids = t.encode(text)
    # The test only means something if some single tokens are partial UTF-8.
    if text != STREAM_TEXTS[0]:  # the first one is made of characters seen in training
        assert any("\ufffd" in t.decode([i]) for i in ids)
    det = IncrementalDetokenizer(t)
    deltas = stream(det, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert det.flush() == ""
    assert "".join(deltas) == det.text == t.decode(ids) == text


def test_stream_splits_multibyte_characters() -> None:
    t = byte_level_tokenizer()
    ids = t.encode("🎉")
    assert len(ids) > 1  # 4 bytes over several tokens
    det = IncrementalDetokenizer(t)
    deltas = stream(det, ids)
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🎉"


@pytest.mark.parametrize("backend", [metaspace_backend, byte_fallback_backend])
def test_stream_keeps_sentencepiece_spaces(backend: object) -> None:
    t = Tokenizer(backend())  # type: ignore[operator]
    prompt = t.encode("the quick brown")
    for text in ["fox jumps over the lazy dog.", "hello 日本 🙂 world"]:
        ids = t.encode(text)
        det = IncrementalDetokenizer(t, prompt_ids=prompt)
        deltas = stream(det, ids)
        flushed = det.flush()
        assert all("\ufffd" not in d for d in deltas)
        # The output continues the prompt, so its first word keeps its leading space.
        expected = t.decode(prompt + ids)[len(t.decode(prompt)) :]
        assert expected.startswith(" ")
        assert "".join(deltas) + flushed == expected


def test_stream_byte_fallback_cjk() -> None:
    t = Tokenizer(byte_fallback_backend())
    ids = t.encode("fox 日本 🙂")
    assert any(t.id_to_token(i).startswith("<0x") for i in ids)
    det = IncrementalDetokenizer(t)
    deltas = stream(det, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == t.decode(ids) == "fox 日本 🙂"


def test_stream_with_prompt_context() -> None:
    t = byte_level_tokenizer()
    prompt = t.encode("<|im_start|>user\nhi 🙂<|im_end|>\n<|im_start|>assistant\n")
    ids = t.encode("héllo 🎉 wörld")
    det = IncrementalDetokenizer(t, prompt_ids=prompt)
    assert "".join(stream(det, ids)) + det.flush() == "héllo 🎉 wörld"


def test_stream_skip_special_tokens() -> None:
    t = byte_level_tokenizer()
    ids = t.encode("hello<|im_end|> wörld")
    det = IncrementalDetokenizer(t, skip_special_tokens=True)
    assert "".join(stream(det, ids)) + det.flush() == "hello wörld"
    det = IncrementalDetokenizer(t)
    assert "".join(stream(det, ids)) + det.flush() == "hello<|im_end|> wörld"


def test_flush_emits_incomplete_tail() -> None:
    t = byte_level_tokenizer()
    ids = t.encode("ok 🎉")
    det = IncrementalDetokenizer(t)
    deltas = stream(det, ids[:-1])  # generation cut in the middle of the emoji
    assert "".join(deltas).rstrip() == "ok"  # the space may share a token with the emoji
    tail = det.flush()
    assert tail.endswith("\ufffd")
    assert det.text == t.decode(ids[:-1])


def test_stop_string_spanning_tokens() -> None:
    t = byte_level_tokenizer()
    text = "The end is near! Stop here. More text that must not appear."
    ids = t.encode(text)
    stop = "ar! Stop h"
    det = IncrementalDetokenizer(t, stop=(stop,))
    deltas = []
    spans = 0
    for i in ids:
        deltas.append(det.add(i))
        if det.stopped:
            break
        spans += 1
    assert det.stopped and det.stop_reason == stop
    assert "".join(deltas) == det.text == "The end is ne"
    assert stop not in det.text
    # The stop string needed several tokens, and the tokens after it are ignored.
    assert t.decode(ids[spans : spans + 1]) not in ("", stop)
    assert det.add(ids[-1]) == "" and det.flush() == ""
    assert det.text == "The end is ne"


def test_stop_string_prefix_is_held_then_released() -> None:
    t = byte_level_tokenizer()
    det = IncrementalDetokenizer(t, stop=("STOP",))
    out = "".join(stream(det, t.encode("one ST")))
    assert out == "one "  # "ST" could start STOP
    out += "".join(stream(det, t.encode("ART two S")))
    assert out == "one START two "
    assert not det.stopped
    assert det.flush() == "S"
    assert det.text == "one START two S"


def test_stop_earliest_of_several() -> None:
    t = byte_level_tokenizer()
    det = IncrementalDetokenizer(t, stop=("lazy", "fox"))
    out = "".join(stream(det, t.encode("the quick brown fox jumps over the lazy dog")))
    assert out == "the quick brown " and det.stop_reason == "fox"


def test_stop_with_multibyte_text() -> None:
    t = byte_level_tokenizer()
    det = IncrementalDetokenizer(t, stop=("🎉",))
    out = "".join(stream(det, t.encode("日本語 wörld 🎉 after")))
    assert out == "日本語 wörld " and det.stopped


STREAM_ALPHABET = st.sampled_from(list("ab é日本🙂🎉\n.!") + ["the ", "wörld", "STOP"])


@settings(max_examples=150, deadline=None)
@given(
    st.lists(STREAM_ALPHABET, min_size=0, max_size=25).map("".join),
    st.lists(st.sampled_from(list("ab é日🙂.")), min_size=1, max_size=4).map("".join),
)
def test_stream_property(text: str, stop: str) -> None:
    t = byte_level_tokenizer()
    ids = t.encode(text)
    det = IncrementalDetokenizer(t, stop=(stop,))
    deltas = stream(det, ids)
    final = det.flush()
    assert all("\ufffd" not in d for d in deltas)
    emitted = "".join(deltas) + final
    assert emitted == det.text
    if stop in text:
        assert det.stopped and emitted == text[: text.index(stop)]
    else:
        assert not det.stopped and emitted == text
