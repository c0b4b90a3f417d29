"""The real SmolLM2-135M-Instruct, converted from its GGUF at float32, against the golden file:
prompt ids exact, top-5 logits within 1e-3, 32 greedy tokens (eos ignored) identical."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ondevice
from ondevice.sampling import SamplingParams

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def model(real_model_dir):
    return ondevice.load(real_model_dir, backend="numpy")


def _prompt_ids(model, case):
    if "messages" in case:
        return model.tokenizer.encode_chat(case["messages"], add_generation_prompt=True)
    return model.tokenizer.encode(case["prompt"], add_special_tokens=False)


def test_golden_prompt_ids(model, golden_cases):
    for case in golden_cases:
        assert _prompt_ids(model, case) == case["prompt_ids"], case.get("prompt_text")


def test_golden_top5_logits(model, golden_cases):
    for case in golden_cases:
        logits = model.runtime.logits_for(case["prompt_ids"])[-1]
        assert logits.dtype == np.float32
        top5 = np.argsort(-logits, kind="stable")[:5].tolist()
        assert top5 == case["top5_ids"]
        err = np.abs(logits[case["top5_ids"]] - np.asarray(case["top5_logits"])).max()
        assert err < 1e-3, err


def test_golden_greedy_tokens(model, golden_cases):
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    for case in golden_cases:
        got = [c.token_id for c in model.stream(case["prompt_ids"], params)]
        assert got == case["greedy_ids"], case.get("prompt_text")
    st = model.stats()
    assert st["kv_blocks_free"] == st["kv_blocks_total"]


def test_cli_answers_paris_with_the_default_model(real_model_dir):
    # No --model: the default model, found through ONDEVICE_HOME where the fixture put it.
    env = dict(os.environ, ONDEVICE_HOME=str(real_model_dir.parents[1]))
    p = subprocess.run(
        [sys.executable, "-m", "ondevice", "generate", "--prompt",
         "What is the capital of France?", "--max-tokens", "16", "--temperature", "0"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout


def test_generate_json_with_the_default_model(real_model_dir):
    env = dict(os.environ, ONDEVICE_HOME=str(real_model_dir.parents[1]))
    p = subprocess.run(
        [sys.executable, "-m", "ondevice", "generate", "-p", "Name a color.", "-n", "8",
         "--temperature", "0", "--json"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["prompt_ids"][:2] == [1, 9690]  # <|im_start|>system
    # Greedy: eight tokens unless the model ended its reply first, and the text is theirs.
    assert data["finish_reason"] in ("length", "stop")
    assert len(data["generated_ids"]) == 8 if data["finish_reason"] == "length" else \
        1 <= len(data["generated_ids"]) <= 8
    assert data["text"].strip()
    assert data["timings"]["decode_tok_per_s"] >= 0
