"""The CLI through click's runner and as a real subprocess (pipes; the terminal REPL is in
test_repl.py)."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ondevice.apps.cli import cli

CLI = [sys.executable, "-m", "ondevice"]


def run(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


def test_backends_lists_numpy():
    r = run("backends")
    assert r.exit_code == 0
    assert "numpy" in r.output and "available" in r.output


def test_info(tiny_model_dir):
    r = run("info", str(tiny_model_dir), "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["layers"] == 2 and data["architecture"] == "llama"


def test_generate_json(tiny_model_dir):
    r = run("generate", "-m", str(tiny_model_dir), "-p", "hi", "-n", "5", "--temperature", "0",
            "--json", "--ignore-eos")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert len(data["generated_ids"]) == 5 and data["finish_reason"] == "length"
    assert data["prompt_ids"][0] == 1  # <|im_start|> from the chat template
    assert data["timings"]["generated_tokens"] == 5


def test_generate_raw_differs_from_chat(tiny_model_dir):
    args = ["generate", "-m", str(tiny_model_dir), "-p", "hi", "-n", "3", "--temperature", "0",
            "--json"]
    raw = json.loads(run(*args, "--raw").output)
    chat = json.loads(run(*args).output)
    assert raw["prompt_ids"] != chat["prompt_ids"]


def test_chat_reads_stdin_when_not_a_tty(tiny_model_dir):
    r = run("chat", "-m", str(tiny_model_dir), "-n", "4", "--temperature", "0",
            input="Hello there\n")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "-m", "/nonexistent", "-p", "x"], "not found"),
        (["generate", "-p", "x", "--temperature", "-1", "-m", "{tiny}"], "temperature"),
        (["generate", "-p", "x", "--backend", "nope", "-m", "{tiny}"], "'nope' is not one of"),
        (["info", "{broken}"], "not valid JSON"),
    ],
)
def test_errors_are_one_line_exit_1(tiny_model_dir, tmp_path, args, message):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{oops")
    args = [a.format(tiny=tiny_model_dir, broken=broken) for a in args]
    p = subprocess.run(CLI + args, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert message in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_subprocess_generate_and_piped_chat(tiny_model_dir):
    p = subprocess.run(CLI + ["generate", "-m", str(tiny_model_dir), "-p", "hi", "-n", "3",
                              "--seed", "1", "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["generated_ids"]) <= 3
    p = subprocess.run(CLI + ["chat", "-m", str(tiny_model_dir), "-n", "3"], input="hello",
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_convert_cli_errors_and_force(tmp_path):
    from gguf_fixtures import write_gguf

    src = write_gguf(tmp_path / "m.gguf")
    out = tmp_path / "out"
    r = subprocess.run(CLI + ["convert", str(src), "-o", str(out), "-q", "q8", "--group-size", "32"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").is_file()
    r = subprocess.run(CLI + ["convert", str(src), "-o", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "--force" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(CLI + ["convert", str(src), "-o", str(out), "--force"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # The converted model runs.
    r = run("generate", "-m", str(out), "-p", "hi", "-n", "2", "--json")
    assert r.exit_code == 0, r.output
    # A truncated GGUF: one line, exit 1.
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(src.read_bytes()[:200])
    r = subprocess.run(CLI + ["convert", str(bad), "-o", str(tmp_path / "o2")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(bad) in r.stderr
    assert not (tmp_path / "o2").exists()


def test_model_gguf_path_is_converted_once(tmp_path, monkeypatch):
    from gguf_fixtures import write_gguf

    src = write_gguf(tmp_path / "m.gguf")
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    for _ in range(2):
        r = run("generate", "-m", str(src), "-p", "hi", "-n", "2", "--json")
        assert r.exit_code == 0, r.output
    from ondevice.store import Store  # imported once, as one store entry

    assert [e.name for e in Store(tmp_path / "home" / "store").entries()] == ["m:gguf"]


def test_chat_prompt_cache_saved_then_loaded(tiny_model_dir, tmp_path):
    cache = tmp_path / "sys.safetensors"
    args = CLI + ["chat", "-m", str(tiny_model_dir), "-n", "6", "--temperature", "0",
                  "--system", "You are a very helpful and concise assistant for all questions.",
                  "--prompt-cache", str(cache)]
    first = subprocess.run(args, input="Hello", capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "saved" in first.stderr and cache.is_file()
    second = subprocess.run(args, input="Hello", capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "loaded" in second.stderr
    assert second.stdout == first.stdout
