"""Gemma 3: the real 270M model (its Q4_K_M GGUF dequantized to float32) against the golden
file on every float32 backend (numpy, cpu, mlx on its CPU device, wgpu), its GGUF import (config, norms, tokenizer), and config checks.

Golden: prompt ids exact (BOS added), 32 greedy tokens (eos ignored) identical, top-5 logits of
the prompt's last position within 1e-3. One prompt (822 tokens) runs past the 512-token window
of the local layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny import tiny_gemma_config

import ondevice
from ondevice.backends import available_backends
from ondevice.config import ModelConfig
from ondevice.engine.engine import score_tokens
from ondevice.errors import ModelFormatError, UnsupportedModelError
from ondevice.sampling import SamplingParams

GOLDEN = Path(__file__).resolve().parent / "data" / "gemma3_270m_greedy.json"
FLOAT32 = {
    "numpy": None,
    "cpu": None,
    "mlx": lambda: ondevice.MlxOptions(device="cpu", dtype="float32"),
    "wgpu": lambda: ondevice.WgpuOptions(dtype="float32"),
}
AVAILABLE = {name for name, (ok, _) in available_backends().items() if ok}


@pytest.fixture(scope="session")
def golden() -> list[dict]:
    return json.loads(GOLDEN.read_text())["cases"]


@pytest.fixture(scope="module", params=list(FLOAT32))
def gemma(request, gemma_f32_dir):
    name = request.param
    if name not in AVAILABLE:
        pytest.skip(f"backend {name} is not available here")
    options = FLOAT32[name]() if FLOAT32[name] else None
    model = ondevice.load(gemma_f32_dir, backend=name, options=options)
    yield model
    model.close()


def test_golden_prompt_ids_greedy_and_top5(gemma, golden):
    rt = gemma.runtime
    for case in golden:
        assert gemma.tokenizer.encode(case["prompt"], add_special_tokens=True) == case["prompt_ids"]
        # register: the prompt's full blocks stay in the prefix cache, so the greedy run
        # below prefills only the last partial block again.
        logits = rt.loop.call(lambda c=case: score_tokens(rt.engine, c["prompt_ids"],
                                                          logits_for="last", register=True))[-1]
        assert logits.dtype == np.float32
        assert np.argsort(-logits, kind="stable")[:5].tolist() == case["top5_ids"]
        err = np.abs(logits[case["top5_ids"]] - np.asarray(case["top5_logits"])).max()
        assert err < 1e-3, (len(case["prompt_ids"]), err)
        params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
        got = [c.token_id for c in gemma.stream(case["prompt_ids"], params)]
        assert got == case["greedy_ids"], len(case["prompt_ids"])


def test_gguf_import_config_norms_and_tokenizer(gemma_f32_dir, gemma_gguf):
    cfg = json.loads((gemma_f32_dir / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["sliding_window"] == 512
    assert cfg["layer_types"].count("full_attention") == 3 and len(cfg["layer_types"]) == 18
    assert cfg["query_pre_attn_scalar"] == 256 and cfg["rope_local_base_freq"] == 10000.0
    assert "hidden_act" not in cfg and cfg["hidden_activation"] == "gelu_pytorch_tanh"
    # llama.cpp stores 1 + w; the directory holds Hugging Face's w (centred near 0, not 1).
    from safetensors import safe_open

    with safe_open(gemma_f32_dir / "model.safetensors", "np") as f:
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
    from gguf import GGUFReader

    raw = next(t for t in GGUFReader(gemma_gguf).tensors if t.name == "blk.0.attn_norm.weight")
    np.testing.assert_array_equal(norm + np.float32(1), np.asarray(raw.data, np.float32))
    tok = json.loads((gemma_f32_dir / "tokenizer_config.json").read_text())
    assert tok["add_bos_token"] is True and tok["bos_token"] == "<bos>"
    assert "chat_template" not in tok  # the base model has none


# -- config checks (one-line errors) ------------------------------------------------------------
@pytest.mark.parametrize("overrides, error, words", [
    ({"sliding_window": 0}, ModelFormatError, "sliding_window must be a positive integer"),
    ({"sliding_window": 4096}, ModelFormatError, "larger than the context"),
    ({"layer_types": ["sliding_attention"] * 2}, ModelFormatError, "one attention type per layer"),
    ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
     ModelFormatError, "unknown layer type 'chunked_attention'"),
    ({"layer_types": "full_attention"}, ModelFormatError, "one attention type per layer"),
    ({"query_pre_attn_scalar": -1}, ModelFormatError, "query_pre_attn_scalar"),
    ({"attn_logit_softcapping": 50.0}, UnsupportedModelError, "soft-capping"),
    ({"rope_parameters": {"full_attention": 3}}, ModelFormatError, "rope_parameters"),
])
def test_bad_gemma_configs_are_one_line_errors(overrides, error, words):
    with pytest.raises(error) as exc:
        ModelConfig.from_dict(tiny_gemma_config(**overrides))
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_gemma_config_defaults():
    cfg = dict(tiny_gemma_config(num_hidden_layers=12))
    del cfg["layer_types"]  # older configs: every sixth layer is global
    c = ModelConfig.from_dict(cfg)
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5, 11]
    assert c.context_length == 1024  # the window does not cap Gemma's context


# -- chat on a base model -----------------------------------------------------------------------
def test_chat_on_a_base_model_says_so_and_completes_raw_text(tmp_path):
    """No chat template (like the base Gemma 3 270M): `ondevice chat` says it is a base model
    and continues the raw text, exactly what a raw `generate` of the same text gives."""
    import subprocess
    import sys

    from tiny import write_model

    src = write_model(tmp_path / "base", tiny_gemma_config())
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    cli = [sys.executable, "-m", "ondevice"]
    common = ["-m", str(src), "--backend", "numpy", "-n", "6", "--temperature", "0"]
    chat = subprocess.run([*cli, "chat", *common], input="Once upon a time", text=True,
                          capture_output=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert "is a base model" in chat.stderr and "raw text" in chat.stderr
    raw = subprocess.run([*cli, "generate", *common, "--raw", "-p", "Once upon a time"],
                         text=True, capture_output=True, timeout=300)
    assert raw.returncode == 0, raw.stderr
    assert chat.stdout.strip() == raw.stdout.strip()


# -- window paging through the runtime and prompt caches ----------------------------------------

def test_runtime_splits_the_kv_budget_and_window_paging_reaches_further(tmp_path):
    """A fixed KV budget: with window paging the local layers' group gets what max_num_seqs
    sequences need for their window and one step's chunk, the global group the rest, so the
    longest context is far longer than when every layer keeps every block."""
    from tiny import write_model

    from ondevice.kv.layout import split_kv_budget

    path = write_model(tmp_path / "g", tiny_gemma_config(sliding_window=10,
                                                         max_position_embeddings=4096))
    layer_block = 2 * 1 * 32 * 4 * 4  # K and V, 1 KV head of 32 dims, float32, 4 tokens
    budget = 3 * 100 * layer_block  # 100 blocks per layer if every layer keeps every block
    kw = dict(backend="numpy", kv_memory=budget, block_size=4, max_num_seqs=2,
              max_num_batched_tokens=8, quiet=True)
    paged = ondevice.load(path, **kw)
    kept = ondevice.load(path, engine=ondevice.EngineConfig(window_paging=False), **kw)
    try:
        rt = paged.runtime
        layout = rt.backend.kv_layout
        # 2 x (ceil(10 / 4) + 2) + 8 / 4 = 12 local blocks; 300 - 2 * 12 = 276 global ones.
        assert rt.backend.group_blocks == (276, 12) == split_kv_budget(
            budget, layout, layer_block, 4, max_num_seqs=2, chunk=8)
        assert kept.runtime.backend.group_blocks == (100,)
        assert rt.context_limit == 276 * 4 and kept.runtime.context_limit == 100 * 4
        stats = paged.stats()
        assert stats["kv_bytes_total"] == 276 * layer_block + 12 * 2 * layer_block <= budget
        assert (stats["kv_group0_window"], stats["kv_group1_window"]) == (0, 10)
        # The long context really runs: 900 tokens in a pool whose local group holds 48.
        prompt = [int(t) for t in np.random.default_rng(0).integers(3, 300, 900)]
        chunks = list(paged.stream(prompt, max_tokens=4, temperature=0, ignore_eos=True))
        assert sum(c.token_id is not None for c in chunks) == 4
        with pytest.raises(ondevice.RequestError, match="limit"):
            kept.generate(prompt, max_tokens=4, temperature=0)
    finally:
        paged.close()
        kept.close()


def test_prompt_cache_with_window_paging(tmp_path):
    """A saved prefix holds every block of the global layers and the last window's blocks of
    the local ones; loaded into a fresh engine, a longer prompt hits it and decodes the same
    tokens as without the cache."""
    from test_engine import run_all
    from tiny import write_model

    from ondevice.backends.numpy_backend import NumpyBackend
    from ondevice.engine import Engine
    from ondevice.engine.prompt_cache import load_prompt_cache, save_prompt_cache
    from ondevice.modeldir import ModelDir
    from ondevice.weights import SafetensorsFile

    md = ModelDir(write_model(tmp_path / "g", tiny_gemma_config(sliding_window=10)))

    def engine(caching=True):
        return Engine(NumpyBackend(md, num_blocks=(64, 12), block_size=4), md.tokenizer,
                      context_length=md.config.context_length, max_num_batched_tokens=16,
                      enable_prefix_caching=caching, model_id="tiny")

    rng = np.random.default_rng(7)
    system = rng.integers(3, md.config.vocab_size, 42).tolist()
    question = system + rng.integers(3, md.config.vocab_size, 9).tolist()
    path = tmp_path / "system.safetensors"
    a = engine()
    assert save_prompt_cache(a, system, path) == 40
    with SafetensorsFile(path) as f:
        # 10 blocks of the global layer; the token after the prefix (40) reads 31..40:
        # local blocks 7, 8, 9 of the two local layers.
        assert list(f.shape("kv")) == [1, 2, 10, 4, 1, 32]
        assert list(f.shape("kv.1")) == [2, 2, 3, 4, 1, 32]
    b = engine()
    assert load_prompt_cache(b, path) == 40
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    [with_cache] = run_all(b, [(question, params)])
    assert b.stats()["prefix_cache_hits"] == 40
    [without] = run_all(engine(caching=False), [(question, params)])
    assert with_cache == without
    from ondevice.kv.layout import KVLayout

    single = Engine(NumpyBackend(md, num_blocks=64, block_size=4, kv_layout=KVLayout.single(3)),
                    md.tokenizer, context_length=md.config.context_length, model_id="tiny")
    with pytest.raises(ondevice.RequestError, match="KV group"):
        load_prompt_cache(single, path)


# -- chat on an instruction-tuned checkpoint ----------------------------------------------------
# The turn format of Gemma 3's instruction-tuned checkpoints (their tokenizer_config / GGUF
# ``tokenizer.chat_template``): an optional system message folded into the first user turn,
# roles that must alternate, "assistant" written as "model", content as text or typed parts.
GEMMA_IT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
  {%- if messages[0]['content'] is string -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
  {%- else -%}
    {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
  {%- endif -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set first_user_prefix = '' -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {%- endif -%}
  {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
  {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
  {%- if message['content'] is string -%}
    {{ message['content'] | trim }}
  {%- else -%}
    {%- for item in message['content'] -%}
      {%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"""


def test_instruct_gemma_chat_template_turns_and_end_of_turn(gemma_f32_dir, tmp_path):
    """The real Gemma 3 vocabulary with the instruction-tuned turn format: the rendered
    conversation, one BOS, <start_of_turn>/<end_of_turn> as single special ids, <end_of_turn>
    ending generation, and a template error as a one-line TokenizerError. The same directory
    is then chatted with (not treated as a base model)."""
    import shutil

    from ondevice.errors import TokenizerError
    from ondevice.tokenizer import Tokenizer

    it = tmp_path / "gemma-it"
    shutil.copytree(gemma_f32_dir, it)
    cfg_path = it / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = GEMMA_IT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(it)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi "},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Name a colour."}]
    text = tok.apply_chat_template(messages)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                    "<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n")
    ids = tok.encode_chat(messages)
    start, end = tok.token_to_id("<start_of_turn>"), tok.token_to_id("<end_of_turn>")
    assert ids[0] == tok.token_to_id("<bos>") and ids.count(ids[0]) == 1
    assert ids.count(start) == 4 and ids.count(end) == 3
    assert end in tok.eos_token_ids  # the turn's end stops generation
    with pytest.raises(TokenizerError) as exc:
        tok.apply_chat_template([{"role": "assistant", "content": "first"}])
    assert "alternate" in str(exc.value) and "\n" not in str(exc.value)

    import subprocess
    import sys

    chat = subprocess.run([sys.executable, "-m", "ondevice", "chat", "-m", str(it), "--backend",
                           "numpy", "-n", "4", "--temperature", "0"], input="Hi", text=True,
                          capture_output=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert "base model" not in chat.stderr and chat.stdout.strip()
