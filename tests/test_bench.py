"""``ondevice bench`` and ``ondevice eval`` on a tiny random model: the report's schema, sane
figures, ratios computed from the measured values, the PNG, and the drift verdicts."""

import importlib.util
import json
import math
import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from tiny import random_weights, tiny_config, write_model

from ondevice.apps.cli import cli
from ondevice.bench.common import model_variant, stored_format, weight_bytes_per_token
from ondevice.bench.evaluate import drift, greedy_agreement
from ondevice.weights import SafetensorsFile

FAST_BENCH = ["--prompt-tokens", "24", "--gen-tokens", "6", "--repeats", "1",
              "--concurrency", "1,3", "--bandwidth-mib", "8", "--no-progress"]
FAST_EVAL = ["--max-tokens", "96", "--greedy-tokens", "6", "--no-progress"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def png_pixels(path) -> tuple[int, int]:
    """(width, height) of a PNG after checking its signature, chunk CRCs and that the image
    data inflates to the size its header promises."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
        if kind == b"IEND":
            break
    width, height, depth, color = header[:4]
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + width * channels * depth // 8)
    return width, height


@pytest.fixture(scope="module")
def bench_report(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    r = run("bench", "--model", tiny_model_dir, "--backend", "numpy", "--quantize", "f32,q4",
            *FAST_BENCH, "--peers", "--json", out / "bench.json", "--plot", out / "bench.png")
    assert r.exit_code == 0, r.output
    return json.loads((out / "bench.json").read_text()), out / "bench.png", r.output


def test_bench_report_schema_and_sane_figures(bench_report, tiny_model_dir):
    report, _, printed = bench_report
    assert report["schema"] == "ondevice.bench" and report["schema_version"] == 1
    for key in ("model", "machine", "settings", "memory_bandwidth", "results",
                "unavailable_backends", "peers"):
        assert key in report
    assert report["settings"]["concurrency"] == [1, 3]
    bw = report["memory_bandwidth"]
    assert positive(bw["gb_per_s"]) and bw["gb_per_s"] == max(bw["sum_gb_per_s"],
                                                               bw["gemv_gb_per_s"])
    assert [(r["backend"], r["quantize"]) for r in report["results"]] == [
        ("numpy", "f32"), ("numpy", "q4")]
    for r in report["results"]:
        for key in ("decode_tok_per_s", "prefill_tok_per_s", "ttft_s", "peak_rss_bytes",
                    "kv_utilization", "weight_bytes_per_token", "ceiling_tok_per_s",
                    "fraction_of_ceiling", "kv_pool_bytes"):
            assert positive(r[key]), (key, r[key])
        assert r["kv_utilization"] <= 1
        assert r["ceiling_tok_per_s"] == pytest.approx(
            bw["gb_per_s"] * 1e9 / r["weight_bytes_per_token"])
        assert r["fraction_of_ceiling"] == pytest.approx(
            r["decode_tok_per_s"] / r["ceiling_tok_per_s"])
        assert r["prefill_tok_per_s"] == pytest.approx(24 / r["ttft_s"])
        assert [c["requests"] for c in r["concurrency"]] == [1, 3]
        for c in r["concurrency"]:
            assert c["generated"] == 6 * c["requests"]
            assert positive(c["aggregate_tok_per_s"]) and 0 < c["kv_utilization"] <= 1
            assert c["aggregate_tok_per_s"] == pytest.approx(c["generated"] / c["seconds"])
        assert all(run["generated"] == 6 for run in r["runs"])
    assert "numpy-f32" in printed and "numpy-q4" in printed


def test_llama_cpp_peer_runs_in_a_child_without_our_thread_settings(tmp_path):
    """The cpu backend's libgomp settings would slow llama.cpp's OpenMP threads down (40
    against 125 tok/s here): the peer runs in a child process whose environment lacks the
    ones this process set, and its answer (a failure: no such file, or llama-cpp-python is
    not installed) comes back whole."""
    from ondevice.backends import cpu_kernels
    from ondevice.bench import peers

    for name in cpu_kernels.THREAD_ENV_SET:
        assert name in peers.os.environ and name not in peers.peer_env()
    bogus = tmp_path / "missing.gguf"
    out = peers.run_llama_cpp(bogus, [1, 2, 3], 2, 1, 1)
    assert out["name"] == "llama.cpp" and out["status"] in ("failed", "not installed")
    assert out["reason"] and "omp_env" in out  # from the child
    for name in cpu_kernels.THREAD_ENV_SET:
        assert out["omp_env"][name] is None


def test_bench_peers_and_ratios_from_measured_values(bench_report):
    report, _, printed = bench_report
    peers = {(p["name"], p.get("quantize")): p for p in report["peers"]}
    llama = next(p for p in report["peers"] if p["name"] == "llama.cpp")
    # The tiny model has no GGUF; without llama-cpp-python it is "not installed".
    assert llama["status"] in ("not installed", "not run") and llama["reason"]
    mlx_lm_installed = importlib.util.find_spec("mlx_lm") is not None
    for q in ("f32", "q4"):
        p = peers[("mlx-lm", q)]
        assert p["status"] == ("ok" if mlx_lm_installed else "not installed"), p
    ran = [p for p in report["peers"] if p["status"] == "ok"]
    for r in report["results"]:
        expected = {p["name"] for p in ran if p.get("same_weights_as") in (None, r["quantize"])}
        assert set(r["ratios"]) == expected
        for name, ratio in r["ratios"].items():
            p = next(p for p in ran if p["name"] == name
                     and p.get("same_weights_as") in (None, r["quantize"]))
            assert positive(p["decode_tok_per_s"]) and positive(p["prefill_tok_per_s"])
            assert ratio["decode"] == pytest.approx(r["decode_tok_per_s"] / p["decode_tok_per_s"])
            assert ratio["prefill"] == pytest.approx(
                r["prefill_tok_per_s"] / p["prefill_tok_per_s"])
    if mlx_lm_installed:
        assert "vs mlx-lm" in printed
        for p in ran:
            assert positive(p["reported_decode_tok_per_s"]) and p["runs"][0]["generated"] == 6


def test_bench_plot_is_a_png(bench_report):
    _, png, _ = bench_report
    width, height = png_pixels(png)
    assert width > 300 and height > 200
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.01  # something was drawn


def test_bytes_per_token_counts_what_a_step_reads(tiny_model_dir):
    # Tied embeddings: the output head reads the whole table, so every stored byte counts.
    st = SafetensorsFile(tiny_model_dir / "model.safetensors")
    stored = sum(st.get(n).nbytes for n in st.keys())
    st.close()
    assert weight_bytes_per_token(tiny_model_dir) == stored
    assert stored_format(tiny_model_dir) == "f32"
    q4 = model_variant(tiny_model_dir, "q4", group_size=32)
    assert stored_format(q4) == "q4" and model_variant(tiny_model_dir, "q4", group_size=32) == q4
    assert weight_bytes_per_token(q4) < stored / 4


def test_bench_errors_are_one_line(tiny_model_dir):
    r = run("bench", "--model", tiny_model_dir, "--backend", "nosuch", "--no-progress")
    assert r.exit_code == 1 and "unknown backend 'nosuch'" in r.output
    r = run("bench", "--model", tiny_model_dir, "--quantize", "q3", "--no-progress")
    assert r.exit_code == 1 and "unknown quantization 'q3'" in r.output
    r = run("bench", "--model", tiny_model_dir, "--concurrency", "1,x", "--no-progress")
    assert r.exit_code == 1 and "--concurrency" in r.output


def test_bench_speculative_side_by_side(tiny_model_dir, tmp_path):
    """--speculative: each configuration also runs with speculation, every run next to one
    without it; the report holds the ratios and the acceptance counters, the table a line."""
    out = tmp_path / "bench.json"
    r = run("bench", "--model", tiny_model_dir, "--backend", "numpy", "--quantize", "f32",
            *FAST_BENCH, "--speculative", "draft", "--draft-model", tiny_model_dir,
            "--num-speculative-tokens", "3", "--json", out)
    assert r.exit_code == 0, r.output
    (res,) = json.loads(out.read_text())["results"]
    sp = res["speculative"]
    assert sp["method"] == "draft" and sp["num_tokens"] == 3
    assert positive(sp["decode_ratio"]) and len(sp["runs"]) == 1
    run0 = sp["runs"][0]
    assert run0["ratio"] == pytest.approx(run0["on_decode_tok_per_s"]
                                          / run0["off_decode_tok_per_s"])
    assert [c["requests"] for c in sp["concurrency"]] == [1, 3]
    assert all(positive(c["ratio"]) for c in sp["concurrency"])
    assert sp["spec_accepted_tokens"] <= sp["spec_proposed_tokens"]
    assert "speculative decoding (draft, k <= 3)" in r.output
    r = run("bench", "--model", tiny_model_dir, "--speculative", "prompt_lookup",
            "--num-speculative-tokens", "0", "--no-progress")
    assert r.exit_code == 1 and "num_speculative_tokens must be" in r.output
    r = run("bench", "--model", tiny_model_dir, "--draft-model", tiny_model_dir,
            "--no-progress")
    assert r.exit_code != 0 and "need --speculative" in r.output


# -- eval --------------------------------------------------------------------------------------
def eval_json(tmp_path, *args):
    out = tmp_path / "eval.json"
    r = run("eval", *args, *FAST_EVAL, "--json", out)
    report = json.loads(out.read_text()) if out.exists() else None
    return r, report


def test_eval_numpy_against_itself_is_exact(tiny_model_dir, tmp_path):
    r, report = eval_json(tmp_path, "--model", tiny_model_dir, "--backend", "numpy")
    assert r.exit_code == 0, r.output
    assert report["schema"] == "ondevice.eval" and report["verdict"] == "pass"
    assert report["reference"] == {**report["reference"], "backend": "numpy", "quantize": "f32"}
    assert report["text"]["source"] == "builtin" and report["text"]["tokens"] == 96
    (row,) = report["candidates"]
    assert row["kl"] == {"mean": 0.0, "p99": 0.0, "max": 0.0}
    assert row["top1_agreement"] == 1.0 and row["greedy"]["agreement"] == 1.0
    assert row["greedy"]["identical"] == row["greedy"]["prompts"] == report["greedy_prompts"]
    assert row["perplexity"] == row["reference_perplexity"] and row["perplexity_ratio"] == 1.0
    assert positive(row["perplexity"]) and row["positions"] == 95
    assert "PASS" in r.output


def test_eval_q4_drifts_a_little(tiny_model_dir, tmp_path):
    r, report = eval_json(tmp_path, "--model", tiny_model_dir, "--backend", "numpy",
                          "--quantize", "q8", "--candidate", "numpy-q4", "--group-size", "32", "--kl-threshold", "1",
                          "--top1-threshold", "0.3", "--ppl-threshold", "1.5")
    assert r.exit_code == 0, r.output
    q8, q4 = report["candidates"]
    assert (q8["quantize"], q4["quantize"]) == ("q8", "q4")
    assert 0 < q8["kl"]["mean"] < q4["kl"]["mean"] < 0.5
    assert q4["kl"]["mean"] <= q4["kl"]["p99"] <= q4["kl"]["max"]
    assert q4["top1_agreement"] < 1 and q4["perplexity_ratio"] != 1


def test_eval_corrupted_weight_fails(tiny_model_dir, tmp_path):
    config = tiny_config()
    weights = random_weights(config)  # the tiny model's own weights (seed 0) ...
    name = "model.layers.1.mlp.down_proj.weight"
    rng = np.random.default_rng(1)
    # ... with one matrix scaled and noised, as a broken conversion might leave it.
    weights[name] = (weights[name] * 4 + rng.normal(0, 0.5, weights[name].shape)).astype(np.float32)
    bad = write_model(tmp_path / "corrupt", config, weights)
    r, report = eval_json(tmp_path, "--model", bad, "--reference-model", tiny_model_dir,
                          "--backend", "numpy")
    assert r.exit_code == 1
    assert "eval: FAIL (numpy-f32" in r.output
    assert report["verdict"] == "fail"
    (row,) = report["candidates"]
    assert row["verdict"] == "fail" and any("mean KL" in f for f in row["failures"])
    assert row["kl"]["mean"] > 0.1


@pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="mlx is not installed")
def test_eval_mlx_f32_matches_the_reference(tiny_model_dir, tmp_path):
    r, report = eval_json(tmp_path, "--model", tiny_model_dir, "--backend", "mlx")
    assert r.exit_code == 0, r.output
    (row,) = report["candidates"]
    assert row["backend"] == "mlx" and row["kl"]["max"] < 1e-6
    assert row["greedy"]["agreement"] == 1.0


def test_eval_text_file_and_errors(tiny_model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The capital of France is Paris. " * 10)
    r, report = eval_json(tmp_path, "--model", tiny_model_dir, "--backend", "numpy",
                          "--text", text)
    assert r.exit_code == 0, r.output
    assert report["text"]["source"] == str(text) and report["text"]["tokens"] < 96
    r = run("eval", "--model", tiny_model_dir, "--backend", "numpy", "--against", "numpy")
    assert r.exit_code == 1 and "BACKEND-QUANT" in r.output
    r = run("eval", "--model", tiny_model_dir, "--backend", "nosuch")
    assert r.exit_code == 1 and "unknown backend 'nosuch'" in r.output
    r = run("eval", "--model", tiny_model_dir, "--backend", "numpy", "--text", tmp_path / "no")
    assert r.exit_code == 1 and "cannot read --text" in r.output


def test_drift_figures_by_hand():
    ref = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]], np.float32))
    cand = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.8, 0.1]], np.float32))
    d = drift(ref, cand, np.array([0, 1]))
    kl0 = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    assert d["kl"]["mean"] == pytest.approx(kl0 / 2, rel=1e-6)
    assert d["kl"]["max"] == pytest.approx(kl0, rel=1e-6)
    assert d["top1_agreement"] == 0.5
    assert d["reference_perplexity"] == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.8)) / 2))
    assert d["perplexity"] == pytest.approx(math.exp(-(math.log(0.25) + math.log(0.8)) / 2))
    g = greedy_agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [5, 6]])
    assert g["agreement"] == pytest.approx((0.5 + 1) / 2) and g["identical"] == 1


def test_eval_coreml_export_through_its_interpreter(tiny_model_dir, tmp_path):
    # Core ML runs only on macOS; on any OS the exported package is evaluated by the NumPy
    # MIL interpreter of the Core ML converter, which is what this candidate measures.
    pytest.importorskip("coremltools")
    pytest.importorskip("ondevice.converters.coreml.interpreter")
    r, report = eval_json(tmp_path, "--model", tiny_model_dir, "--candidate", "coreml-f16")
    assert r.exit_code == 0, r.output
    (row,) = report["candidates"]
    assert (row["backend"], row["storage"]) == ("coreml", "f16")
    # float16 weights and KV: close to the float32 reference, but not bit-identical.
    assert 0 < row["kl"]["mean"] < 1e-3 and row["top1_agreement"] > 0.9
    r = run("eval", "--model", tiny_model_dir, "--candidate", "coreml-f32", *FAST_EVAL)
    assert r.exit_code == 1 and "Core ML exports f16, q8 (int8) or q4 (int4)" in r.output
