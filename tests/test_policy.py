"""The policy's pure parts: shipped device profiles x model sizes x request kinds, each expected
decision written out with the reason; model requirements from a directory, a Core ML manifest
and published architectures; device detection, cloud configuration, calibration and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import psutil
import pytest
from click.testing import CliRunner

from ondevice.apps.cli import cli
from ondevice.errors import PolicyConfigError
from ondevice.policy import (
    CloudConfig,
    DeviceProfile,
    ModelRequirements,
    Request,
    Secret,
    decide,
    shipped_profiles,
    synthetic,
)
from ondevice.policy.estimate import MEMORY_HEADROOM, usable_memory

CLOUD = CloudConfig("http://127.0.0.1:9/v1", ttft_seconds=0.6, tokens_per_second=60.0,
                    price_input_per_mtok=0.15, price_output_per_mtok=0.60)
PROFILES = {stem: DeviceProfile.load(path) for stem, path in shipped_profiles().items()}
SHORT = {"iphone": "iphone-15-pro", "m1": "macbook-air-m1-8gb", "m2pro": "macbook-pro-m2-pro-16gb",
         "m3max": "macbook-pro-m3-max-64gb", "m4pro": "mac-mini-m4-pro-48gb",
         "win": "windows-laptop-core-ultra-7-155h", "vm": "linux-vm-2core"}

# Request kinds. "chat": 256 prompt + 256 new tokens, prefer_local. "private": the same, must
# stay on the device. "fast": the same with a 20 tok/s decode target. "long": a 2000-token
# prompt that wants its first token within 1 s.
KINDS = {
    "chat": Request(256, 256),
    "private": Request(256, 256, private=True),
    "fast": Request(256, 256, min_tokens_per_s=20.0),
    "long": Request(2000, 256, ttft_target_s=1.0),
}

# Weights at 4.5 bits (q4, scales included) / 16 bits (f16); usable memory = available (or an
# app's limit) x 0.85. iPhone: 4 GiB app limit -> 3.65 GB. M1 8 GB -> 5.48 GB. M2 Pro 16 GB and
# the Windows laptop 16 GB -> 10.95 GB. M3 Max 64 GB -> 43.8 GB. M4 Pro 48 GB -> 32.9 GB.
# VM 4 GB -> 1.83 GB. NumPy holds float32 weights (4 bytes/param whatever the file holds).
# 135M: 0.08 GB q4, 0.27 GB f16, 0.54 GB f32.  1B (1.24B params): 0.70 / 2.47 / 4.94 GB.
# 8B (8.03B): 4.52 / 16.06 / 32.1 GB.
TABLE = [
    # --- iPhone 15 Pro: backends Core ML (no export of these models) and MLX (GPU) ---------
    ("iphone", "135m-q4", "chat", "local:mlx"),  # 0.36 GB needed of 3.65: fits, ~390 tok/s
    ("iphone", "135m-f16", "chat", "local:mlx"),  # 0.55 GB fits
    ("iphone", "1b-q4", "chat", "local:mlx"),  # 0.98 GB fits, ~47 tok/s
    ("iphone", "1b-f16", "chat", "local:mlx"),  # 2.76 GB fits within 3.65
    ("iphone", "1b-f16", "fast", "cloud"),  # 2.47 GB per token at 51.2 GB/s x 0.65: ~13 < 20
    ("iphone", "8b-q4", "chat", "cloud"),  # 4.85 GB > 3.65 GB usable: does not fit a phone
    ("iphone", "8b-q4", "private", "refused"),  # does not fit, and private may not leave
    ("iphone", "8b-f16", "chat", "cloud"),  # 16.4 GB: far too big
    ("iphone", "1b-q4", "long", "cloud"),  # 2000 tokens x 2.5 GFLOP at 0.4 x 2.15 TFLOPS: ~6 s
    ("iphone", "135m-q4", "long", "local:mlx"),  # 135M prefill: ~0.6 s, within the 1 s target
    # --- MacBook Air M1 8 GB: MLX on the GPU is fastest; NumPy would need f32 weights --------
    ("m1", "135m-q4", "chat", "local:mlx"),
    ("m1", "135m-f16", "chat", "local:mlx"),
    ("m1", "1b-q4", "chat", "local:mlx"),  # ~63 tok/s from 68 GB/s
    ("m1", "1b-f16", "chat", "local:mlx"),
    ("m1", "1b-f16", "fast", "cloud"),  # 2.47 GB/token at 68 GB/s x 0.65: ~18 tok/s < 20
    ("m1", "8b-q4", "chat", "local:mlx"),  # 4.85 GB fits in 5.48: tight but fits, ~10 tok/s
    ("m1", "8b-q4", "fast", "cloud"),  # ~10 tok/s < 20
    ("m1", "8b-q4", "private", "local:mlx"),  # private: slow is fine, it fits
    ("m1", "8b-f16", "chat", "cloud"),  # 16.4 GB > 5.48 GB
    ("m1", "8b-f16", "private", "refused"),  # neither fits nor may leave
    # --- MacBook Pro M2 Pro 16 GB: 200 GB/s --------------------------------------------------
    ("m2pro", "135m-q4", "chat", "local:mlx"),
    ("m2pro", "135m-f16", "chat", "local:mlx"),
    ("m2pro", "1b-q4", "chat", "local:mlx"),
    ("m2pro", "1b-f16", "chat", "local:mlx"),
    ("m2pro", "1b-f16", "fast", "local:mlx"),  # ~52 tok/s >= 20: no reason to leave
    ("m2pro", "8b-q4", "chat", "local:mlx"),  # ~28 tok/s
    ("m2pro", "8b-q4", "fast", "local:mlx"),  # 28 >= 20
    ("m2pro", "8b-f16", "chat", "cloud"),  # 16.4 GB > 10.95 GB usable of 16
    ("m2pro", "8b-f16", "private", "refused"),
    # --- MacBook Pro M3 Max 64 GB: 400 GB/s, everything fits ---------------------------------
    ("m3max", "135m-q4", "chat", "local:mlx"),
    ("m3max", "135m-f16", "chat", "local:mlx"),
    ("m3max", "1b-q4", "chat", "local:mlx"),
    ("m3max", "1b-f16", "chat", "local:mlx"),
    ("m3max", "8b-q4", "chat", "local:mlx"),  # ~57 tok/s
    ("m3max", "8b-f16", "chat", "local:mlx"),  # 16.4 GB of 43.8 fits, ~16 tok/s
    ("m3max", "8b-f16", "fast", "cloud"),  # ~16 tok/s < 20: the cloud's 60 is faster
    ("m3max", "1b-q4", "long", "local:mlx"),  # 16.4 TFLOPS: 2000-token prefill well under 1 s
    ("m3max", "8b-q4", "long", "cloud"),  # 2000 x 16 GFLOP at 0.4 x 16.4 TFLOPS: ~5 s > 1 s
    # --- Mac mini M4 Pro 48 GB: 273 GB/s -------------------------------------------------------
    ("m4pro", "135m-q4", "chat", "local:mlx"),
    ("m4pro", "135m-f16", "chat", "local:mlx"),
    ("m4pro", "1b-q4", "chat", "local:mlx"),
    ("m4pro", "1b-f16", "chat", "local:mlx"),
    ("m4pro", "8b-q4", "chat", "local:mlx"),  # ~39 tok/s
    ("m4pro", "8b-f16", "chat", "local:mlx"),  # 16.4 of 32.9 GB: fits
    ("m4pro", "8b-f16", "fast", "cloud"),  # ~11 tok/s < 20
    ("m4pro", "8b-f16", "private", "local:mlx"),  # slow but private and it fits
    # --- Windows laptop, Arc iGPU: wgpu (D3D12) and NumPy, no MLX or Core ML ------------------
    ("win", "135m-q4", "chat", "local:wgpu"),  # the iGPU beats the CPU at 120 GB/s x 0.4
    ("win", "135m-f16", "chat", "local:wgpu"),
    ("win", "1b-q4", "chat", "local:wgpu"),  # ~68 tok/s
    ("win", "1b-f16", "chat", "local:wgpu"),
    ("win", "1b-f16", "fast", "cloud"),  # ~19 tok/s < 20
    ("win", "8b-q4", "chat", "local:wgpu"),  # 4.85 GB fits in 10.95
    ("win", "8b-q4", "fast", "cloud"),  # ~11 tok/s
    ("win", "8b-f16", "chat", "cloud"),  # 16.4 GB > 10.95 GB
    # --- 2-core Linux VM, 4 GB, 25 GB/s, no GPU ----------------------------------------------
    ("vm", "135m-q4", "chat", "local:cpu"),  # packed q4 (0.1 GB): ~40 tok/s at 0.15 of 12 GB/s
    ("vm", "135m-f16", "chat", "local:numpy"),
    ("vm", "135m-q4", "long", "cloud"),  # 2000 x 0.3 GFLOP at 0.5 x 190 GFLOPS: > 1 s
    ("vm", "1b-q4", "chat", "local:cpu"),  # NumPy's f32 4.9 GB does not fit; cpu keeps q4
    ("vm", "1b-q4", "fast", "cloud"),  # packed q4 on 2 CPU cores: ~5 tok/s
    ("vm", "1b-f16", "chat", "cloud"),  # f16 2.5 GB (MLX) and f32 4.9 GB (NumPy) > 1.83 GB
    ("vm", "1b-f16", "private", "refused"),
    ("vm", "8b-q4", "chat", "cloud"),
    ("vm", "8b-f16", "chat", "cloud"),
]


def _where(d) -> str:
    return "cloud" if d.target == "cloud" else d.where


@pytest.mark.parametrize("device,model,kind,expected", TABLE,
                         ids=[f"{d}-{m}-{k}" for d, m, k, _ in TABLE])
def test_decision_table(device, model, kind, expected):
    size, quant = model.split("-")
    d = decide(PROFILES[SHORT[device]], synthetic(size, quant), KINDS[kind], CLOUD)
    assert _where(d) == expected, d.reasons
    assert d.reasons
    if kind == "private" or d.target == "refuse":
        assert d.fallback != "cloud"
    if d.target == "local" and kind != "private":
        assert d.fallback == "cloud"  # a local failure may still go to the cloud


def test_every_shipped_profile_and_size_is_in_the_table():
    covered = {(d, m) for d, m, k, _ in TABLE if k == "chat"}
    for device in SHORT:
        for model in ("135m-q4", "135m-f16", "1b-q4", "1b-f16", "8b-q4", "8b-f16"):
            assert (device, model) in covered, (device, model)
    assert set(SHORT.values()) == set(PROFILES)


def test_private_never_goes_to_cloud_in_any_mode():
    # only_cloud + private is refused outright, with the reason.
    for mode in ("prefer_local", "only_local", "prefer_cloud", "only_cloud"):
        for prof in PROFILES.values():
            for model in ("135m-q4", "8b-f16"):
                d = decide(prof, synthetic(*model.split("-")),
                           Request(256, 256, private=True, mode=mode), CLOUD)
                assert d.target != "cloud" and d.fallback != "cloud"
    d = decide(PROFILES[SHORT["m3max"]], synthetic("135m"), Request(10, 10, private=True,
                                                                     mode="only_cloud"), CLOUD)
    assert d.target == "refuse" and "private" in d.message()


def test_only_local_that_does_not_fit_is_refused_with_the_sizes():
    d = decide(PROFILES[SHORT["iphone"]], synthetic("8b", "q4"), Request(256, 256,
                                                                         mode="only_local"), CLOUD)
    assert d.target == "refuse"
    assert "4.85 GB" in d.message() and "only_local" in d.message()


def test_offline_means_local_even_when_preferring_the_cloud():
    prof = replace(PROFILES[SHORT["m1"]], online=False)
    # prefer_cloud but the endpoint is unreachable: the fastest local backend.
    d = decide(prof, synthetic("1b", "q4"), Request(256, 256, mode="prefer_cloud"), CLOUD)
    assert d.where == "local:mlx" and any("offline" in r for r in d.reasons)
    assert d.fallback is None  # no cloud fallback when offline
    # Offline and too big: nowhere to go.
    d = decide(prof, synthetic("8b", "f16"), Request(256, 256), CLOUD)
    assert d.target == "refuse" and "offline" in d.message()
    # The same request online goes to the cloud.
    d = decide(replace(prof, online=True), synthetic("8b", "f16"), Request(256, 256), CLOUD)
    assert d.target == "cloud"


def test_prefer_and_only_cloud():
    prof = PROFILES[SHORT["m3max"]]
    d = decide(prof, synthetic("135m"), Request(10, 10, mode="prefer_cloud"), CLOUD)
    # The cloud, with the fastest local backend as the fallback for a network failure.
    assert d.target == "cloud" and d.fallback == "local" and d.fallback_backend == "mlx"
    d = decide(prof, synthetic("135m"), Request(10, 10, mode="only_cloud"), CLOUD)
    assert d.target == "cloud" and d.fallback is None
    d = decide(prof, synthetic("135m"), Request(10, 10, mode="only_cloud"), None)
    assert d.target == "refuse" and "no cloud endpoint" in d.message()


def test_no_cloud_configured_keeps_a_slow_local_choice():
    # The M1 misses the 20 tok/s target with 8B q4, but without a cloud it still runs locally.
    d = decide(PROFILES[SHORT["m1"]], synthetic("8b", "q4"), KINDS["fast"], None)
    assert d.where == "local:mlx" and any("not an option" in r for r in d.reasons)


def test_cost_ceiling_keeps_requests_local():
    # 8B f16 does not fit the M1. The cloud costs 2000 x 0.15e-6 + 1000 x 0.6e-6 = $0.0009.
    prof = PROFILES[SHORT["m1"]]
    req = Request(2000, 1000, max_cost_usd=0.0005)
    d = decide(prof, synthetic("8b", "f16"), req, CLOUD)
    assert d.target == "refuse" and "ceiling" in d.message()
    d = decide(prof, synthetic("8b", "f16"), replace(req, max_cost_usd=0.001), CLOUD)
    assert d.target == "cloud" and d.cloud.cost_usd == pytest.approx(0.0009)


def test_battery_low_prefers_the_neural_engine_when_an_export_exists():
    iphone = replace(PROFILES[SHORT["iphone"]], battery_percent=15.0, charging=False)
    # With a Core ML export, the Neural Engine: least energy per token.
    d = decide(iphone, synthetic("1b", "q4", coreml_export=True), Request(256, 256), CLOUD)
    assert d.where == "local:coreml" and "Neural Engine" in d.reasons[0]
    # Without one, the cloud spares the battery.
    d = decide(iphone, synthetic("1b", "q4"), Request(256, 256), CLOUD)
    assert d.target == "cloud" and "battery" in d.reasons[0]
    # Private without an export: the least energy-hungry local backend (MLX on the GPU).
    d = decide(iphone, synthetic("1b", "q4"), Request(256, 256, private=True), CLOUD)
    assert d.where == "local:mlx"
    # Charging, or above the threshold: speed first again (MLX beats Core ML's estimate).
    for charged in (replace(iphone, charging=True), replace(iphone, battery_percent=80.0)):
        d = decide(charged, synthetic("1b", "q4", coreml_export=True), Request(256, 256), CLOUD)
        assert d.where == "local:mlx"
    # Low-power mode counts as constrained whatever the battery says.
    d = decide(replace(PROFILES[SHORT["m1"]], low_power_mode=True),
               synthetic("1b", "q4", coreml_export=True), Request(256, 256), CLOUD)
    assert d.where == "local:coreml"


def test_context_longer_than_the_model_goes_to_cloud():
    # SmolLM2-135M holds 8192 tokens: a 9000-token prompt cannot run locally anywhere.
    d = decide(PROFILES[SHORT["m3max"]], synthetic("135m"), Request(9000, 100), CLOUD)
    assert d.target == "cloud" and "context of 8192" in d.reasons[0]


def test_estimates_follow_the_published_figures():
    # Decode is memory bound: the same model on the M3 Max (400 GB/s) vs the M1 (68.25 GB/s).
    m = synthetic("8b", "q4")
    e3 = {e.backend: e for e in decide(PROFILES[SHORT["m3max"]], m, KINDS["chat"]).estimates}
    e1 = {e.backend: e for e in decide(PROFILES[SHORT["m1"]], m, KINDS["chat"]).estimates}
    assert e3["mlx"].decode_tps / e1["mlx"].decode_tps == pytest.approx(400 / 68.25)
    # Usable memory: an app limit caps a phone; headroom applies everywhere.
    assert usable_memory(PROFILES[SHORT["iphone"]]) == int((4 << 30) * MEMORY_HEADROOM)


# --- model requirements ----------------------------------------------------------------------

def test_synthetic_parameter_counts_match_the_published_models():
    assert synthetic("135m").params == pytest.approx(134.5e6, rel=0.01)  # SmolLM2-135M
    assert synthetic("1b").params == pytest.approx(1.236e9, rel=0.01)  # Llama 3.2 1B
    assert synthetic("8b").params == pytest.approx(8.03e9, rel=0.01)  # Llama 3.1 8B
    # Llama 3.1 8B KV at f16: 2 x 32 layers x 8 heads x 128 x 2 bytes = 128 KiB per token.
    assert synthetic("8b").kv_bytes_per_token == 131072


def test_requirements_from_a_model_directory(tiny_model_dir):
    req = ModelRequirements.from_model_dir(tiny_model_dir)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    files = list(tiny_model_dir.glob("*.safetensors"))
    assert req.weight_bytes == sum(f.stat().st_size for f in files)
    assert req.context_length == cfg["max_position_embeddings"]
    assert req.kv_bytes_per_token == 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * (
        cfg["hidden_size"] // cfg["num_attention_heads"]) * 2
    assert not req.coreml_export


def test_requirements_from_a_coreml_manifest(tmp_path, tiny_model_dir):
    manifest = {
        "model_id": "smollm2-135m-int4", "architecture": "llama",
        "config": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                   "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536,
                   "vocab_size": 49152, "context_length": 8192},
        "quantization": "int4", "weight_bytes": 80_000_000, "kv_bytes_per_token": 23040,
        "block_size": 16, "num_blocks": 128, "max_context": 2048,
    }
    (tmp_path / "ondevice-manifest.json").write_text(json.dumps(manifest))
    req = ModelRequirements.load(tmp_path)
    assert (req.name, req.quantization, req.weight_bytes) == ("smollm2-135m-int4", "int4",
                                                              80_000_000)
    assert req.kv_bytes_per_token == 23040 and req.context_length == 2048 and req.coreml_export
    # The exporter's own form: quantization as {"mode", "block_size"}, found from the package.
    manifest["quantization"] = {"mode": "int8", "block_size": 32}
    (tmp_path / "ondevice-manifest.json").write_text(json.dumps(manifest))
    req = ModelRequirements.load(tmp_path / "model.mlpackage")
    assert req.quantization == "int8" and req.kv_pool_tokens == 128 * 16
    # Core ML holds its whole KV state: 2048 tokens x 23040 B, however short the request.
    est = {e.backend: e for e in decide(PROFILES[SHORT["m1"]], req, Request(10, 10)).estimates}
    assert est["coreml"].memory_needed == 80_000_000 + 2048 * 23040 + (256 << 20)
    # A manifest next to a model directory marks that model as exported.
    model_copy = tmp_path / "model"
    model_copy.mkdir()
    for f in tiny_model_dir.iterdir():
        (model_copy / f.name).write_bytes(f.read_bytes())
    (model_copy / "ondevice-manifest.json").write_text(json.dumps(manifest))
    assert ModelRequirements.load(model_copy).coreml_export
    # A broken manifest is a one-line error naming the missing key.
    manifest = dict(manifest)
    del manifest["quantization"]
    (tmp_path / "ondevice-manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PolicyConfigError, match="quantization"):
        ModelRequirements.from_manifest(tmp_path)


def test_requirements_of_a_real_coreml_export(tmp_path, tiny_model_dir):
    coreml = pytest.importorskip("ondevice.converters.coreml")
    out = coreml.export_coreml(tiny_model_dir, tmp_path / "tiny.mlpackage", quantize="int8",
                               progress=False)
    req = ModelRequirements.load(out)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert req.coreml_export and req.quantization == "int8"
    assert req.params == ModelRequirements.from_model_dir(tiny_model_dir).params
    assert req.context_length <= cfg["max_position_embeddings"] and req.weight_bytes > 0


def test_unknown_model_spec_is_a_clear_error():
    with pytest.raises(PolicyConfigError, match="8b-q4"):
        ModelRequirements.load("/nonexistent/model")


# --- device profiles ---------------------------------------------------------------------------

def test_shipped_profiles_parse_with_their_figures():
    assert len(PROFILES) == 7
    m4 = PROFILES[SHORT["m4pro"]]
    assert (m4.memory_total, m4.memory_bandwidth, m4.neural_engine_ops) == (48 << 30, 273e9, 38e12)
    assert PROFILES[SHORT["iphone"]].app_memory_limit == 4 << 30
    assert "mlx" not in PROFILES[SHORT["win"]].backends
    assert PROFILES[SHORT["m4pro"]].battery_percent is None  # a desktop
    for prof in PROFILES.values():
        assert prof.memory_available < prof.memory_total and prof.memory_bandwidth > 0
    # Every figure cites a source in its file.
    for path in shipped_profiles().values():
        assert "Sources:" in path.read_text() or "Source" in path.read_text()


def test_profile_files_json_and_errors(tmp_path):
    p = tmp_path / "dev.json"
    p.write_text(json.dumps({"name": "x", "memory_total": "2GiB", "memory_bandwidth_gbs": 10,
                             "backends": ["numpy"]}))
    prof = DeviceProfile.load(p)
    assert prof.memory_total == 2 << 30 and prof.memory_bandwidth == 10e9
    p.write_text(json.dumps({"name": "x", "memory_total": "2GiB"}))
    with pytest.raises(PolicyConfigError, match="memory_bandwidth_gbs"):
        DeviceProfile.load(p)
    p.write_text(json.dumps({"name": "x", "memory_total": 1, "memory_bandwidth_gbs": 1,
                             "backends": ["cuda"]}))
    with pytest.raises(PolicyConfigError, match="cuda"):
        DeviceProfile.load(p)
    with pytest.raises(PolicyConfigError, match="not found"):
        DeviceProfile.load("no-such-device")


def test_detect_reads_this_machine():
    from ondevice.backends import available_backends

    prof = DeviceProfile.detect()
    assert prof.memory_total == psutil.virtual_memory().total
    assert 0 < prof.memory_available <= prof.memory_total
    assert prof.cpu_cores == psutil.cpu_count(logical=True)
    assert set(prof.backends) == {n for n, (ok, _) in available_backends().items() if ok}
    assert prof.memory_bandwidth > 0 and prof.online is None  # detection never touches the net
    battery = psutil.sensors_battery()
    assert (prof.battery_percent is None) == (battery is None)


def test_bandwidth_measurement_is_cached(monkeypatch):
    from ondevice.policy import calibrate

    first = calibrate.measured_bandwidth(refresh=True)
    assert calibrate.cache_path().is_file()

    def fail(*a, **k):
        raise AssertionError("measured again instead of using the cache")

    monkeypatch.setattr("numpy.ones", fail)
    assert calibrate.measured_bandwidth() == first


def test_calibration_is_cached_and_used(tiny_model_dir):
    from ondevice.policy import calibrate

    results = calibrate.calibrate(tiny_model_dir, ["numpy"], prompt_tokens=16, new_tokens=8)
    assert results["numpy"]["decode"] > 0 and results["numpy"]["measured_decode_tps"] > 0
    prof = DeviceProfile.detect()
    assert prof.efficiency["numpy"]["decode"] == results["numpy"]["decode"]
    est = {e.backend: e for e in decide(prof, ModelRequirements.from_model_dir(tiny_model_dir),
                                        Request(16, 8)).estimates}
    assert est["numpy"].calibrated
    # The calibrated estimate reproduces the measured decode speed at the calibration size.
    assert est["numpy"].decode_tps == pytest.approx(results["numpy"]["measured_decode_tps"],
                                                    rel=0.05)


# --- cloud configuration -----------------------------------------------------------------------

SENTINEL = "sk-test-SENTINEL-4f1c2b7e9a"


def test_cloud_config_key_from_env_or_file_never_shown(tmp_path, monkeypatch):
    f = tmp_path / "cloud.toml"
    f.write_text(f'[cloud]\nurl = "http://127.0.0.1:9"\nmodel = "m"\napi_key = "{SENTINEL}"\n')
    cfg = CloudConfig.load(f)
    assert cfg.api_key == Secret(SENTINEL) and cfg.base_url == "http://127.0.0.1:9/v1"
    for text in (repr(cfg), str(cfg), json.dumps(cfg.to_dict()), repr(cfg.api_key)):
        assert SENTINEL not in text
    monkeypatch.setenv("MY_KEY", "from-env")
    f.write_text('url = "http://127.0.0.1:9"\napi_key_env = "MY_KEY"\n')
    assert CloudConfig.load(f).api_key.reveal() == "from-env"
    # A config that does not parse: the error does not quote the file (it may hold the key).
    f.write_text(f'url = "http://127.0.0.1:9"\napi_key = "{SENTINEL}\n')
    with pytest.raises(PolicyConfigError) as err:
        CloudConfig.load(f)
    assert SENTINEL not in str(err.value)
    with pytest.raises(PolicyConfigError, match="unknown key"):
        CloudConfig.from_dict({"url": "http://x", "api_kee": "typo"})
    # Nothing configured: no cloud.
    assert CloudConfig.load() is None


# --- CLI -----------------------------------------------------------------------------------------

def test_cli_policy_explain_json_and_text(monkeypatch):
    monkeypatch.setenv("ONDEVICE_CLOUD_API_KEY", SENTINEL)
    runner = CliRunner()
    r = runner.invoke(cli, ["policy", "explain", "--profile", "iphone", "--model", "8b-q4",
                            "--cloud-url", "http://127.0.0.1:9", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["decision"]["target"] == "cloud"
    assert data["decision"]["estimates"]["mlx"]["fits"] is False
    assert data["cloud_config"]["api_key"] == "set"
    assert SENTINEL not in r.output
    r = runner.invoke(cli, ["policy", "explain", "--profile", "iphone", "--model", "8b-q4",
                            "--private"])
    assert r.exit_code == 0, r.output
    assert "decision: refused" in r.output and "private" in r.output
    r = runner.invoke(cli, ["policy", "explain", "--profile", "m1", "--model", "1b-q4",
                            "--battery", "10", "--cloud-url", "http://127.0.0.1:9"])
    assert "decision: cloud:http://127.0.0.1:9/v1" in r.output and "battery" in r.output


def test_cli_devices():
    runner = CliRunner()
    r = runner.invoke(cli, ["devices", "--profile", "m3-max", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["memory_bandwidth"] == 400e9 and data["chip"] == "M3 Max"
    r = runner.invoke(cli, ["devices", "--list"])
    assert set(r.output.split()) == set(PROFILES)
    r = runner.invoke(cli, ["devices", "--profile", "nope"])
    assert r.exit_code == 1 and "not found" in r.output
    r = runner.invoke(cli, ["devices"])
    assert r.exit_code == 0 and "bandwidth" in r.output


@pytest.mark.real_model
def test_requirements_of_the_default_model(real_model_dir):
    # SmolLM2-135M at float32: 134.5M parameters x 4 bytes in the safetensors file.
    req = ModelRequirements.from_model_dir(real_model_dir)
    assert req.quantization == "f32" and req.params == pytest.approx(134.5e6, rel=0.01)
    assert req.weight_bytes == pytest.approx(req.params * 4, rel=0.01)
    assert req.context_length == 8192
    # The same model as a published architecture: the same size and KV per token.
    assert req.params == synthetic("135m", "f32").params
    assert req.kv_bytes_per_token == synthetic("135m").kv_bytes_per_token


def test_devices_probes_the_cloud_only_when_asked():
    import socket

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    try:
        r = CliRunner().invoke(cli, ["devices", "--profile", "vm", "--cloud-url",
                                     f"http://127.0.0.1:{port}", "--json"])
        assert json.loads(r.output)["online"] is True
        conn, _ = srv.accept()  # the probe's connection really arrived
        conn.close()
    finally:
        srv.close()
    r = CliRunner().invoke(cli, ["devices", "--profile", "vm", "--cloud-url",
                                 f"http://127.0.0.1:{port}"])
    assert "unreachable (offline)" in r.output
    r = CliRunner().invoke(cli, ["devices", "--profile", "vm", "--json"])
    assert json.loads(r.output)["online"] is None


def test_secret_survives_copies_without_showing_itself():
    import copy
    import dataclasses
    import pickle

    cfg = CloudConfig("http://127.0.0.1:9", api_key=Secret(SENTINEL))
    assert copy.deepcopy(cfg).api_key.reveal() == SENTINEL
    assert SENTINEL not in str(dataclasses.asdict(cfg))
    with pytest.raises(TypeError):
        pickle.dumps(cfg)
