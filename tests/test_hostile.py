"""Hostile input, round two (issue 16): claimed sizes, templates, bad config values, one-line
errors instead of tracebacks, and the cloud API key.

Each case is bad input a user or a model file can bring; each must end in one line (exit code
1 from the CLI, an ``OndeviceError`` from the API) within bounded time and memory.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import socket
import subprocess
import sys
import threading
import time
import traceback
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny import CHATML, tiny_config, tiny_tokenizer_json, write_model

import ondevice
from ondevice.apps.cli import cli
from ondevice.config import MAX_LAYERS, ModelConfig
from ondevice.errors import (
    CloudError,
    ModelFormatError,
    OndeviceError,
    RequestError,
    TokenizerError,
)

CLI = [sys.executable, "-m", "ondevice"]


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def assert_one_line(result, *needles: str) -> None:
    """A CliRunner result that exited 1 with one line on stderr and no traceback."""
    assert isinstance(result.exception, SystemExit), (result.exception, result.output)
    assert result.exit_code == 1, result.output
    # A progress bar redrawn with carriage returns (convert) is not an error line.
    lines = [line.rsplit("\r", 1)[-1] for line in result.stderr.split("\n")]
    err = "\n".join(line for line in lines if line.strip())
    assert "Traceback" not in result.output and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def model_with(tmp_path: Path, name: str = "m", weights_from: dict | None = None,
               **config) -> Path:
    """The tiny model with ``config`` keys replaced in config.json only (weights unchanged)."""
    path = write_model(tmp_path / name, tiny_config(**(weights_from or {})))
    data = json.loads((path / "config.json").read_text())
    data.update(config)
    (path / "config.json").write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------------------------------
# 1. Claimed sizes the file cannot back


def test_claimed_layer_count_rejected_before_anything_proportional(tmp_path):
    path = model_with(tmp_path, num_hidden_layers=1 << 24)
    tracemalloc.start()
    try:
        with pytest.raises(ModelFormatError, match="num_hidden_layers") as err:
            ondevice.load(path, "numpy", quiet=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "\n" not in str(err.value)
    assert peak < 16 << 20, f"peak {peak >> 20} MiB"  # was: ~150 MB/s without end


def test_claimed_layer_count_from_gguf_block_count(tmp_path):
    from gguf_fixtures import write_gguf

    src = write_gguf(tmp_path / "m.gguf", metadata={"llama.block_count": 1 << 24})
    tracemalloc.start()
    try:
        r = run("convert", src, "-o", tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_one_line(r, "num_hidden_layers")
    assert peak < 32 << 20, f"peak {peak >> 20} MiB"
    assert not (tmp_path / "out").exists()


def test_claimed_layer_count_peak_rss_of_the_cli(tmp_path):
    """The whole process (the issue measured RSS): the CLI on a 2**24-layer config."""
    path = model_with(tmp_path, num_hidden_layers=1 << 24)
    # VmHWM (peak_rss_bytes), not ru_maxrss: the latter inherits a large parent's peak.
    code = ("import sys\nfrom ondevice.apps.cli import main\nfrom ondevice.memory import "
            f"peak_rss_bytes\nsys.argv = ['ondevice', 'info', {str(path)!r}]\ntry:\n    main()\n"
            "except SystemExit as e:\n    print(e.code, peak_rss_bytes() // 1024)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    exit_code, peak_kib = p.stdout.split()
    assert exit_code == "1" and "implausibly large" in p.stderr and "Traceback" not in p.stderr
    assert int(peak_kib) < 400 << 10, f"peak RSS {int(peak_kib) >> 10} MiB"


# ---------------------------------------------------------------------------------------------
# 2. RoPE tables sized by the claimed context


@pytest.mark.parametrize("backend", ["numpy", "cpu", "mlx", "wgpu"])
def test_rope_tables_do_not_follow_a_claimed_context(tmp_path, backend):
    """max_position_embeddings = 2**24 with a 16 MiB KV pool: cos/sin over every claimed
    position would be 2**24 x head_dim floats per table (1 GiB here); the backends compute
    them per step (numpy, cpu, mlx) or over the pool's reach (wgpu)."""
    import psutil

    from ondevice.backends import available_backends

    if not available_backends()[backend][0]:
        pytest.skip(f"{backend} is not available here (tests/test_backends.py requires it in CI)")
    path = model_with(tmp_path, max_position_embeddings=1 << 24)
    options = {"mlx": {"device": "cpu", "dtype": "float32"}, "wgpu": {"dtype": "float32"}}
    rss = psutil.Process().memory_info().rss
    tracemalloc.start()
    try:
        m = ondevice.load(path, backend, kv_memory="16MiB", options=options.get(backend))
        with m:
            text = m.generate("hello", max_tokens=4, temperature=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = psutil.Process().memory_info().rss - rss
    assert isinstance(text, str)
    assert peak < 96 << 20, f"traced peak {peak >> 20} MiB"
    assert grown < 512 << 20, f"RSS grew {grown >> 20} MiB"


def test_layer_count_ceiling_and_tensors_present():
    from ondevice.models.llama import check_layer_count, weight_specs

    with pytest.raises(ModelFormatError, match=f"at most {MAX_LAYERS}"):
        ModelConfig.from_dict(tiny_config(num_hidden_layers=MAX_LAYERS + 1))
    two = ModelConfig.from_dict(tiny_config())
    names = list(weight_specs(two))
    check_layer_count(two, names)
    five = ModelConfig.from_dict(tiny_config(num_hidden_layers=5))
    with pytest.raises(ModelFormatError, match="claims 5 layers but the weights hold layers 2"):
        check_layer_count(five, names, "m")
    one = ModelConfig.from_dict(tiny_config(num_hidden_layers=1))
    with pytest.raises(ModelFormatError, match="claims 1 layers"):
        check_layer_count(one, names)
    # A gap (layer 0 missing) is no full set either.
    with pytest.raises(ModelFormatError):
        check_layer_count(two, [n for n in names if not n.startswith("model.layers.0.")]
                          + ["model.layers.2.x"])


# ---------------------------------------------------------------------------------------------
# 4. Chat templates: bounded in time, loop iterations and output


def _tok(template: str):
    from tokenizers import Tokenizer as HFTokenizer

    from ondevice.tokenizer import Tokenizer

    return Tokenizer(HFTokenizer.from_str(tiny_tokenizer_json()), chat_template=template)


MSG = [{"role": "user", "content": "hi"}]
HOSTILE_TEMPLATES = {
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}"
                          "{% endfor %}{% endfor %}",
    "string times 10**8": "{{ 'a' * 10**8 }}",
    "list times": "{{ ([1] * 1000) * 100000 }}",
    "5000 nested ifs": "{% if true %}" * 5000 + "x" + "{% endif %}" * 5000,
    "30 nested fors": "{% for i in range(2) %}" * 30 + "x" + "{% endfor %}" * 30,
    "big integer power": "{{ 10 ** 100000000 }}",
    "doubling with ~": "{% set ns = namespace(s='a') %}{% for i in range(64) %}"
                       "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "doubling with +": "{% set ns = namespace(s='a') %}{% for i in range(64) %}"
                       "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "center filter": "{{ 'a'|center(10**10) }}",
    "ljust method": "{{ 'a'.ljust(10**10) }}",
    "percent width": "{{ '%0999999999d' % 1 }}",
    "format width": "{{ '{:>999999999}'.format(1) }}",
    "format filter": "{{ '%0999999999d'|format(1) }}",
    "replace growth": "{{ ('a' * 100000)|replace('a', 'b' * 100000) }}",
    "join growth": "{{ (range(100000)|list)|join('x' * 30000000) }}",
    "tojson indent": "{{ messages|tojson(indent=10**10) }}",
    "endless macro": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "output size": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
}


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES.values(), ids=HOSTILE_TEMPLATES.keys())
def test_hostile_templates_end_in_one_line(template):
    from ondevice.tokenizer import RENDER_TIME_LIMIT

    t0 = time.monotonic()
    with pytest.raises(TokenizerError) as err:
        _tok(template).apply_chat_template(MSG)
    assert time.monotonic() - t0 < RENDER_TIME_LIMIT + 2
    assert "\n" not in str(err.value) and str(err.value).startswith(("chat template",
                                                                     "invalid chat template"))


def test_template_time_limit(monkeypatch):
    import ondevice.tokenizer as tk

    monkeypatch.setattr(tk, "RENDER_TIME_LIMIT", 0.3)
    # Under the iteration cap, but seconds of work.
    slow = ("{% for i in range(90000) %}{% for j in range(10) %}{{ (i|string)|length }}"
            "{% endfor %}{% endfor %}")
    t0 = time.monotonic()
    with pytest.raises(TokenizerError, match="longer than 0.3 s"):
        _tok(slow).apply_chat_template(MSG)
    assert time.monotonic() - t0 < 2


def test_bounded_sandbox_still_renders_real_templates():
    tok = _tok(CHATML)
    assert tok.apply_chat_template(MSG) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    loop = ("{% for m in messages %}{{ loop.index }}/{{ loop.length }}:{{ m['content'] ~ '!' }}"
            "{% if loop.last %}.{% endif %}{% endfor %}{{ 'ab' * 3 }}{{ '%03d' % 7 }}"
            "{{ '{:>4}'.format('x') }}{{ 2 ** 10 }}{{ messages|tojson(indent=2)|length > 0 }}")
    assert _tok(loop).apply_chat_template(MSG * 2) == "1/2:hi!2/2:hi!.ababab007   x1024True"


def test_hanging_template_does_not_hang_or_abort_the_cli(tmp_path):
    """`{{ 'a' * 10**8 }}` used to abort the process (SIGABRT in the tokenizer) and nested
    loops to hang `generate`: now both are one line and exit code 1."""
    for template in (HOSTILE_TEMPLATES["string times 10**8"],
                     HOSTILE_TEMPLATES["nested range loops"]):
        path = write_model(tmp_path / "m", tiny_config())
        (path / "chat_template.jinja").write_text(template)
        p = subprocess.run(CLI + ["generate", "-m", str(path), "-p", "hi", "-n", "2"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "chat template" in p.stderr


def test_template_budget_is_per_thread():
    """One compiled template rendering on several threads (the server) at once."""
    tok = _tok(CHATML)
    slow = _tok(HOSTILE_TEMPLATES["nested range loops"])
    results: list[object] = []

    def render(t):
        try:
            results.append(t.apply_chat_template(MSG))
        except TokenizerError as err:
            results.append(err)

    threads = [threading.Thread(target=render, args=(t,)) for t in (slow, tok, tok, tok)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(isinstance(r, TokenizerError) for r in results) == 1
    assert sum(isinstance(r, str) for r in results) == 3


# ---------------------------------------------------------------------------------------------
# 5. One line where the README promises one line

BAD_CONFIGS = {
    "rope_scaling string": ({"rope_scaling": "linear"}, "rope_scaling must be an object"),
    "rope_scaling list": ({"rope_scaling": [1, 2]}, "rope_scaling must be an object"),
    "quantization string": ({"quantization": "q4"}, "quantization must be an object"),
    "sliding_window string": ({"sliding_window": "big"}, "sliding_window must be a positive"),
    "llama3 without factor": ({"rope_scaling": {"rope_type": "llama3"}}, "no 'factor'"),
    "linear factor 'two'": ({"rope_scaling": {"type": "linear", "factor": "two"}},
                            "rope_scaling.factor must be a positive number"),
    "quantization bits string": ({"quantization": {"bits": "4", "group_size": 64}}, "bits"),
    "num_hidden_layers float": ({"num_hidden_layers": 2.5}, "num_hidden_layers must be"),
}


@pytest.mark.parametrize("config, message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_types_are_one_line(tmp_path, config, message):
    path = model_with(tmp_path, **config)
    with pytest.raises(OndeviceError, match=message):
        ModelConfig.from_file(path / "config.json")
    assert_one_line(run("info", path), message)
    assert_one_line(run("generate", "-m", path, "-p", "hi", "-n", "1"), message)


def test_deeply_nested_config_json(tmp_path):
    path = write_model(tmp_path / "m", tiny_config())
    (path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelFormatError, match="nested too deeply"):
        ModelConfig.from_file(path / "config.json")
    assert_one_line(run("info", path), "nested too deeply")


def test_deeply_nested_safetensors_header_cli(tmp_path):
    path = write_model(tmp_path / "m", tiny_config())
    header = ("[" * 100_000 + "]" * 100_000).encode()
    (path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert_one_line(run("generate", "-m", path, "-p", "hi", "-n", "1"))


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    m = ondevice.load(tiny_model_dir, "numpy", kv_memory="4MiB", quiet=True)
    yield m
    m.close()


def _rewrite_cache(src: Path, dst: Path, **replace) -> Path:
    """A copy of prompt cache ``src`` with tensors replaced (same metadata)."""
    from ondevice.weights import SafetensorsFile, SafetensorsWriter

    with SafetensorsFile(src) as f:
        tensors = {name: np.array(f.get(name)) for name in f.keys()}
        meta = dict(f.metadata)
    tensors.update(replace)
    w = SafetensorsWriter(dst, [(k, v.dtype, v.shape) for k, v in tensors.items()], meta)
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    return dst


@pytest.fixture(scope="module")
def saved_cache(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("pc") / "cache.safetensors"
    tiny_model.save_prompt_cache(path, "The capital of France is Paris. " * 4)
    return path


def test_prompt_cache_with_bad_token_ids(tiny_model, saved_cache, tmp_path, tiny_model_dir):
    from ondevice.weights import SafetensorsFile

    with SafetensorsFile(saved_cache) as f:
        ids = np.array(f.get("token_ids"))
    cases = {
        "2d.safetensors": ids.reshape(1, -1),
        "nan.safetensors": np.where(np.arange(ids.size) == 3, np.nan, ids).astype(np.float32),
    }
    for name, token_ids in cases.items():
        bad = _rewrite_cache(saved_cache, tmp_path / name, token_ids=token_ids)
        with pytest.raises(ModelFormatError, match="token_ids must be a 1-D integer array"):
            tiny_model.load_prompt_cache(bad)
        r = run("chat", "-m", tiny_model_dir, "-b", "numpy", "--kv-memory", "4MiB", "-n", "2",
                "--prompt-cache", bad, input="hello")
        assert_one_line(r, "token_ids")


@pytest.mark.parametrize("size, message", [
    ("nanMiB", "finite"), ("infGiB", "finite"), ("1e400", "finite"), ("-5MiB", "positive"),
    ("2PiB", "cannot read"), ("4096TiB", "beyond any machine"),
])
def test_kv_memory_values(tiny_model_dir, size, message):
    with pytest.raises(RequestError, match=message):
        ondevice.load(tiny_model_dir, "numpy", kv_memory=size, quiet=True)
    assert_one_line(run("generate", "-m", tiny_model_dir, "-p", "hi", "--kv-memory", size),
                    message)


def test_kv_memory_more_than_the_machine_has(tiny_model_dir):
    from ondevice.memory import available_memory_bytes

    size = "100GiB" if available_memory_bytes() < 100 << 30 else "1000TiB"
    with pytest.raises(RequestError, match="more than the"):
        ondevice.load(tiny_model_dir, "numpy", kv_memory=size, quiet=True)
    assert_one_line(run("generate", "-m", tiny_model_dir, "-p", "hi", "--kv-memory", size),
                    "memory available")


@pytest.mark.parametrize("port", ["-1", "70000", "http"])
def test_serve_port_out_of_range(port, monkeypatch):
    import ondevice.server as server

    monkeypatch.setattr(server, "serve", lambda *a, **k: pytest.fail("the server started"))
    assert_one_line(run("serve", "--port", port), "--port")


def test_devices_profile_that_is_no_profile(tmp_path, tiny_model_dir):
    cases = {
        "binary.toml": None,  # bytes below
        "deep.json": "[" * 100_000 + "]" * 100_000,
        "config.json": (tiny_model_dir / "config.json").read_text(),
        "text.toml": "hello there",
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is None:
            path.write_bytes(b"\x80\xff\x00GGUF" * 10)
        else:
            path.write_text(text)
        assert_one_line(run("devices", "--profile", path), "device profile")


@pytest.mark.parametrize("out", ["/proc/ondevice-out", "/sys/ondevice-out",
                                 "/proc/self/ondevice-out"])
def test_convert_output_under_proc_or_sys(tmp_path, out):
    from gguf_fixtures import write_gguf

    src = write_gguf(tmp_path / "m.gguf")
    assert_one_line(run("convert", src, "-o", out))


def test_convert_onto_a_full_disk(tmp_path, monkeypatch):
    from gguf_fixtures import write_gguf

    import ondevice.weights as weights

    def full(self, name, array):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(weights.SafetensorsWriter, "write", full)
    src = write_gguf(tmp_path / "m.gguf")
    assert_one_line(run("convert", src, "-o", tmp_path / "out"), "No space left on device")
    assert not (tmp_path / "out").exists()


def test_prompt_cache_in_a_missing_directory(tiny_model, tiny_model_dir, tmp_path):
    target = tmp_path / "no" / "such" / "dir" / "cache.safetensors"
    with pytest.raises(RequestError, match="cannot write the prompt cache"):
        tiny_model.save_prompt_cache(target, "The capital of France is Paris. " * 4)
    r = run("chat", "-m", tiny_model_dir, "-b", "numpy", "--kv-memory", "4MiB", "-n", "2",
            "--system", "You are a very helpful and concise assistant for all questions.",
            "--prompt-cache", target, input="hello")
    assert_one_line(r, "cannot write the prompt cache", "No such file or directory")


def test_prompt_cache_onto_a_full_disk(tiny_model, tmp_path, monkeypatch):
    import ondevice.weights as weights

    def full(self, name, array):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights.SafetensorsWriter, "write", full)
    with pytest.raises(RequestError, match="No space left on device"):
        tiny_model.save_prompt_cache(tmp_path / "c.safetensors", "The capital of France. " * 4)
    assert not list(tmp_path.iterdir())  # the partial file is gone


def test_binary_stdin_to_chat(tiny_model_dir):
    r = CliRunner().invoke(cli, ["chat", "-m", str(tiny_model_dir), "-n", "2"],
                           input=b"\xff\xfe\x00\x80 binary \xc3")
    assert_one_line(r, "stdin is not UTF-8 text")
    # The API: text with lone surrogates (undecodable bytes read as text) is one clear error.
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        _tok(CHATML).encode("abc\udcff")


# ---------------------------------------------------------------------------------------------
# 6. Bad values accepted at config read, poisoned prompt caches

BAD_VALUES = {
    "linear factor 0": ({"rope_scaling": {"type": "linear", "factor": 0}}, "factor"),
    "linear factor NaN": ({"rope_scaling": {"type": "linear", "factor": math.nan}}, "factor"),
    "llama3 factor inf": ({"rope_scaling": {"rope_type": "llama3", "factor": math.inf,
                                            "low_freq_factor": 1, "high_freq_factor": 4,
                                            "original_max_position_embeddings": 8192}}, "factor"),
    "llama3 high == low": ({"rope_scaling": {"rope_type": "llama3", "factor": 8,
                                             "low_freq_factor": 1, "high_freq_factor": 1,
                                             "original_max_position_embeddings": 8192}},
                           "high_freq_factor"),
    "sliding_window -5": ({"sliding_window": -5}, "sliding_window"),
    "rms_norm_eps true": ({"rms_norm_eps": True}, "rms_norm_eps"),
    "rope_theta NaN": ({"rope_theta": math.nan}, "rope_theta"),
    "tie_word_embeddings 'yes'": ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    "attention_bias 1": ({"attention_bias": 1}, "attention_bias"),
    "eos_token_id 'eos'": ({"eos_token_id": "eos"}, "eos_token_id"),
    "eos_token_id [2, true]": ({"eos_token_id": [2, True]}, "eos_token_id"),
    "bos_token_id -1": ({"bos_token_id": -1}, "bos_token_id"),
    "hidden_size true": ({"hidden_size": True}, "hidden_size"),
}


@pytest.mark.parametrize("config, field", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_config_values_rejected_at_read(tmp_path, config, field):
    with pytest.raises(OndeviceError, match=field) as err:
        ModelConfig.from_dict(tiny_config(**config))
    assert "\n" not in str(err.value)
    path = model_with(tmp_path, **config)
    assert_one_line(run("generate", "-m", path, "-p", "hi", "-n", "1"), field)


def test_good_config_values_still_load():
    cfg = ModelConfig.from_dict(tiny_config(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        sliding_window=4096, eos_token_id=[2, 0], quantization={"group_size": 32, "bits": 4,
                                                                "model.embed_tokens": {"bits": 8}}))
    assert cfg.context_length == 1024 and cfg.eos_token_id == [2, 0]
    ModelConfig.from_dict(tiny_config(rope_scaling={"type": "linear", "factor": 2}))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_prompt_cache_with_non_finite_kv_is_refused(tiny_model, saved_cache, tmp_path, value):
    from ondevice.weights import SafetensorsFile

    with SafetensorsFile(saved_cache) as f:
        kv = np.array(f.get("kv"))
    kv.reshape(-1)[kv.size // 2] = value
    bad = _rewrite_cache(saved_cache, tmp_path / "bad.safetensors", kv=kv)
    before = tiny_model.stats()
    with pytest.raises(ModelFormatError, match="NaN or infinite"):
        tiny_model.load_prompt_cache(bad)
    after = tiny_model.stats()
    assert after["kv_blocks_used"] == before["kv_blocks_used"] == 0
    # Nothing poisoned entered the cache: generation still works.
    assert isinstance(tiny_model.generate("The capital of France is", max_tokens=3,
                                          temperature=0), str)


# ---------------------------------------------------------------------------------------------
# 7. The cloud API key never leaks; 11. a cloud fallback is never silent

KEY = "sk-hostile-SENTINEL-7f3a9c2e41d8b6"


class RawHTTP:
    """An endpoint on 127.0.0.1 written with raw sockets, so that it can send any status line
    (frameworks do not let a reason phrase carry a bearer token)."""

    def __init__(self, status_line: str, body: bytes = b"", content_type: str = "application/json"):
        self.response = (f"{status_line}\r\nContent-Type: {content_type}\r\n"
                         f"X-Echo: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n").encode() + body
        self.requests = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break  # a reachability probe: connect, then close
                        data += chunk
                    if data:
                        self.requests += 1
                        conn.sendall(self.response)
                except OSError:
                    pass

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


@pytest.fixture
def leaky_endpoint():
    # The key in the reason phrase, in a header, and in the body's message at character 188,
    # where cutting to 200 characters before scrubbing would keep part of it.
    message = "x" * 188 + KEY + " (Bearer " + KEY + ")"
    srv = RawHTTP(f"HTTP/1.1 401 Bearer {KEY}",
                  json.dumps({"error": {"message": message}}).encode())
    yield srv
    srv.close()


def _http_logs_at_debug(caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "httpcore.http11", "httpcore.connection"):
        caplog.set_level(logging.DEBUG, logger=name)


def test_cloud_key_absent_from_error_repr_traceback_and_logs(leaky_endpoint, caplog):
    from ondevice.policy import CloudClient, CloudConfig, Secret

    _http_logs_at_debug(caplog)
    client = CloudClient(CloudConfig(leaky_endpoint.url, api_key=Secret(KEY), retries=0))
    with pytest.raises(CloudError, match="401") as err:
        list(client.stream_chat(MSG, max_tokens=4))
    client.close()
    seen = [str(err.value), repr(err.value),
            "".join(traceback.format_exception(err.type, err.value, err.tb)), caplog.text]
    assert leaky_endpoint.requests == 1 and any("HTTP Request" in r.getMessage()
                                                for r in caplog.records)
    for text in seen:
        assert KEY not in text
        assert KEY[:12] not in text  # no half of it either
    assert len(str(err.value)) < 400


def test_cloud_key_scrubbed_before_truncating():
    from ondevice.policy.cloud import scrub

    text = "y" * 190 + KEY
    assert KEY[:8] not in scrub(text, (KEY,))[:200]
    assert scrub(f"Authorization: Bearer {'z' * 30}") == "Authorization: Bearer ***"


def test_cloud_reason_phrase_without_a_body(caplog):
    from ondevice.policy import CloudClient, CloudConfig, Secret

    _http_logs_at_debug(caplog)
    srv = RawHTTP(f"HTTP/1.1 403 token {KEY} rejected", b"<html>nope</html>", "text/html")
    try:
        client = CloudClient(CloudConfig(srv.url, api_key=Secret(KEY), retries=0))
        with pytest.raises(CloudError, match="403") as err:
            list(client.stream_chat(MSG, max_tokens=4))
        client.close()
    finally:
        srv.close()
    assert KEY not in str(err.value) and "token *** rejected" in str(err.value)
    assert KEY not in caplog.text


def test_chat_policy_cloud_says_when_it_falls_back(tiny_model_dir, leaky_endpoint, monkeypatch):
    monkeypatch.setenv("ONDEVICE_CLOUD_API_KEY", KEY)
    r = CliRunner().invoke(cli, ["chat", "-m", str(tiny_model_dir), "-b", "numpy",
                                 "--kv-memory", "4MiB", "--policy", "cloud", "--cloud-url",
                                 leaky_endpoint.url, "--temperature", "0", "-n", "4"],
                           input="Hello world!\n")
    assert r.exit_code == 0, r.output
    assert leaky_endpoint.requests >= 1  # it did try the cloud
    notice = [line for line in r.stderr.splitlines() if "falling back" in line]
    assert len(notice) == 1, r.stderr
    assert "401" in notice[0] and "falling back to local:numpy" in notice[0]
    assert "API key" in notice[0]
    assert KEY not in r.output and KEY not in r.stderr
    assert r.stdout.strip()  # and the reply came from the device


def test_deeply_nested_tokenizer_config(tmp_path):
    from ondevice.tokenizer import Tokenizer

    path = write_model(tmp_path / "m", tiny_config())
    (path / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TokenizerError, match="nested too deeply"):
        Tokenizer.from_dir(path)


def test_out_of_memory_is_one_line(tiny_model_dir, monkeypatch):
    import ondevice.apps.cli as cli_module

    def too_big(*args, **kwargs):
        raise MemoryError("Unable to allocate 3.00 GiB for an array with shape (16777216, 48)")

    monkeypatch.setattr(cli_module, "_load", too_big)
    assert_one_line(run("generate", "-m", tiny_model_dir, "-p", "hi"),
                    "out of memory: Unable to allocate 3.00 GiB")
