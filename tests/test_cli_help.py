"""The CLI as a new user meets it: -h everywhere, examples and choices in every help, logging
flags, notices, and error wording that names flags on the command line and keywords in the
API."""

from __future__ import annotations

import logging
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from ondevice.apps.cli import cli

CLI = [sys.executable, "-m", "ondevice"]


def _commands() -> list[str]:
    ctx = click.Context(cli)
    return cli.list_commands(ctx)


def test_every_command_has_dash_h_with_examples_and_choices():
    runner = CliRunner()
    top = runner.invoke(cli, ["-h"])
    assert top.exit_code == 0 and "Examples:" in top.output
    for name in _commands():
        r = runner.invoke(cli, [name, "-h"])
        assert r.exit_code == 0, (name, r.output)
        assert "--help" in r.output and "-h," in r.output, name
        tail = r.output.split("Examples:")[-1]
        examples = [line for line in tail.splitlines() if line.strip().startswith("ondevice")]
        assert "Examples:" in r.output and 1 <= len(examples) <= 3, (name, r.output)
        assert all(line.split()[1] == name for line in examples), name
        assert "--verbose" in r.output and "--log-level" in r.output, name
        command = cli.get_command(click.Context(cli), name)
        for param in command.params:
            if isinstance(param.type, click.Choice) and not param.hidden:
                shown = "|".join(param.type.choices)
                assert shown in r.output.replace("\n", "").replace(" ", ""), (name, param.name)


@pytest.mark.parametrize("args, level", [
    (["backends"], logging.WARNING),
    (["-v", "backends"], logging.INFO),
    (["backends", "-v"], logging.INFO),
    (["backends", "-vv"], logging.DEBUG),
    (["--log-level", "error", "backends", "-v"], logging.ERROR),
    (["backends", "-v", "--log-level", "critical"], logging.CRITICAL),
    (["--log-level", "DEBUG", "backends"], logging.DEBUG),
])
def test_verbose_and_log_level_configure_the_package_logger(args, level, capsys):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    logger = logging.getLogger("ondevice")
    assert logger.getEffectiveLevel() == level
    capsys.readouterr()
    logging.getLogger("ondevice.policy").info("an info record")
    logging.getLogger("ondevice.server").warning("a warning record")
    err = capsys.readouterr().err
    assert ("ondevice.policy: an info record" in err) == (level <= logging.INFO)
    assert ("warning: ondevice.server: a warning record" in err) == (level <= logging.WARNING)


def test_bad_log_level_is_one_line():
    p = subprocess.run(CLI + ["--log-level", "loud", "backends"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1 and "'loud' is not one of" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_policy_cloud_without_an_endpoint_says_so(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("ONDEVICE_CLOUD_URL", raising=False)
    p = subprocess.run(CLI + ["chat", "-m", str(tiny_model_dir), "-n", "3", "--policy", "cloud"],
                       input="hello", capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "--policy cloud: no cloud endpoint is configured" in p.stderr
    assert "--cloud-url" in p.stderr and "ONDEVICE_CLOUD_URL" in p.stderr


def test_sampling_errors_name_the_flag_on_the_command_line_and_the_keyword_in_the_api(
        tiny_model_dir):
    import ondevice
    from ondevice.errors import SamplingError

    for flag, value in (("--temperature", "-1"), ("--top-p", "0"), ("--min-p", "2"),
                        ("--max-tokens", "0"), ("--repetition-penalty", "0")):
        p = subprocess.run(CLI + ["generate", "-m", str(tiny_model_dir), "-p", "x", flag, value],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and f"Error: {flag} must be" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run(CLI + ["generate", "-m", str(tiny_model_dir), "-p", "x", "--kv-memory",
                              "lots"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "'--kv-memory': cannot read memory size 'lots'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    with ondevice.load(tiny_model_dir, "numpy", kv_memory="4MiB") as m:
        with pytest.raises(SamplingError, match=r"^top_p must be") as info:
            m.generate("x", top_p=0)
        assert "--" not in str(info.value)


def test_convert_existing_output_wording(tmp_path):
    from gguf_fixtures import write_gguf

    from ondevice.converters import OutputExistsError, convert

    src = write_gguf(tmp_path / "m.gguf")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OutputExistsError) as info:
        convert(src, out)
    assert "force=True" in str(info.value) and "--force" not in str(info.value)
    p = subprocess.run(CLI + ["convert", str(src), "-o", str(out)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and "pass --force to replace it" in p.stderr
    assert "force=True" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def _report(peers: list[dict]) -> dict:
    result = {"backend": "numpy", "quantize": "f32", "decode_tok_per_s": 20.0,
              "prefill_tok_per_s": 300.0, "ttft_s": 0.1, "peak_rss_bytes": 1 << 30,
              "kv_utilization": 0.9, "ceiling_tok_per_s": 22.0, "fraction_of_ceiling": 0.9,
              "ratios": {}, "concurrency": [{"requests": 1, "aggregate_tok_per_s": 20.0}]}
    return {"machine": {"cpu": "test cpu", "threads": 2},
            "memory_bandwidth": {"gb_per_s": 12.0},
            "settings": {"prompt_tokens": 256, "gen_tokens": 64},
            "peers": peers, "results": [result], "unavailable_backends": {}}


def test_bench_prints_the_ratio_block_only_with_peers():
    from ondevice.bench.run import add_ratios, format_report

    text = format_report(_report([]))
    assert "ratios" not in text and "vs llama" not in text
    report = _report([{"name": "llama.cpp", "quantize": "f32", "status": "ok",
                       "decode_tok_per_s": 100.0, "prefill_tok_per_s": 600.0, "ttft_s": 0.05,
                       "threads": 2}])
    add_ratios(report)
    text = format_report(report)
    assert "ratios: ours / peer" in text and "vs llama.cpp" in text and "0.20x" in text
