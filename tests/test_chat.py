"""Multi-turn chat: history, system prompt, and dropping the oldest turns when context is full."""

import pytest

import ondevice
from ondevice.chat import ChatSession
from ondevice.errors import RequestError
from ondevice.sampling import SamplingParams


@pytest.fixture
def small_model(tiny_model_dir):
    # 6 blocks of 16 tokens: a context of 96 tokens, so a few turns overflow it.
    return ondevice.load(tiny_model_dir, backend="numpy", kv_memory=6 * 16 * 2 * 2 * 2 * 16 * 4,
                         block_size=16)


def test_history_and_system_prompt(small_model):
    s = ChatSession(small_model, SamplingParams(max_tokens=3, temperature=0), system="sys")
    "".join(c.text for c in s.send("hello"))
    assert [m["role"] for m in s.messages] == ["user", "assistant"]
    text = small_model.tokenizer.decode(s._render(s.messages))
    assert text.startswith("<|im_start|>system\nsys<|im_end|>")
    s.reset()
    assert s.messages == [] and s.system == "sys"


def test_oldest_turns_dropped_system_kept(small_model):
    assert small_model.runtime.context_limit == 96
    s = ChatSession(small_model, SamplingParams(max_tokens=4, temperature=0), system="be brief")
    dropped = 0
    for i in range(8):
        list(s.send(f"message number {i} with some words in it"))
        dropped += s.last.dropped_messages
        assert s.last.prompt_tokens + 4 <= 96
    assert dropped > 0
    assert s.messages[-2]["content"] == "message number 7 with some words in it"
    st = small_model.stats()
    assert st["kv_blocks_free"] == st["kv_blocks_total"]


def test_message_too_long_alone(small_model):
    s = ChatSession(small_model, SamplingParams(max_tokens=4))
    with pytest.raises(RequestError, match="too long"):
        list(s.send("word " * 200))
    assert s.messages == []


def test_stats_keys(small_model):
    s = ChatSession(small_model, SamplingParams(max_tokens=2, temperature=0))
    list(s.send("hi"))
    st = s.stats()
    assert st["kv_blocks_total"] == 6 and st["kv_blocks_free"] == 6
    assert st["last_generated_tokens"] == 2


def test_session_totals_and_time_to_first_token(small_model):
    s = ChatSession(small_model, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    list(s.send("hi"))
    first_prompt = s.last.prompt_tokens
    list(s.send("again"))
    st = s.stats()
    assert st["replies"] == 2 and s.totals.replies == 2
    assert st["total_prompt_tokens"] == first_prompt + s.last.prompt_tokens
    assert st["total_generated_tokens"] == 4
    assert 0 < s.last.ttft_seconds <= s.last.seconds and st["last_ttft_s"] >= 0
    s.reset()  # totals are the session's, not the conversation's
    assert s.stats()["replies"] == 2
