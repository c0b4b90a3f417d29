"""``ondevice devices`` and ``ondevice policy explain``: what this (or a simulated) device can
run, and where a request would go and why. Parsing and printing only; the policy decides."""

from __future__ import annotations

import json

import click

from ..settings import described

MODE_CHOICE = click.Choice(["prefer_local", "only_local", "prefer_cloud", "only_cloud"])


def _profile(path, cloud=None):
    from dataclasses import replace

    from ..policy import DeviceProfile, reachable

    if path:
        prof = _load_profile(DeviceProfile, path)
        return replace(prof, online=reachable(cloud)) if cloud is not None else prof
    return DeviceProfile.detect(cloud=cloud)


def _load_profile(cls, path):
    """``DeviceProfile.load``, with a file that is no profile at all (binary, or nested past
    what the parser recurses into) reported as such, in one line."""
    from ..errors import PolicyConfigError

    try:
        return cls.load(path)
    except UnicodeDecodeError:
        raise PolicyConfigError(f"device profile {path}: not a text file (binary data)") from None
    except RecursionError:
        raise PolicyConfigError(f"device profile {path}: nested too deeply to read") from None


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


@click.command()
@click.option("--profile", "profile_path", default=None,
              help="A device profile (.toml/.json) or a shipped profile name, instead of this "
                   "machine.")
@click.option("--calibrate", is_flag=True,
              help="Measure each local backend on this machine with a short run and cache it.")
@click.option("--model", "-m", default=None, help="Model for --calibrate [default model].")
@click.option("--list", "list_profiles", is_flag=True, help="List the shipped device profiles.")
@click.option("--cloud-url", default=None,
              help="Also check that this cloud endpoint is reachable (a TCP connect).")
@click.option("--json", "as_json", is_flag=True)
def devices(profile_path, calibrate, model, list_profiles, cloud_url, as_json) -> None:
    """Describe this device (or a profile): memory, bandwidth, GPUs, backends, battery."""
    from ..policy import shipped_profiles

    if list_profiles:
        names = {stem: str(path) for stem, path in shipped_profiles().items()}
        if as_json:
            click.echo(json.dumps(names, indent=2))
        else:
            for stem in names:
                click.echo(stem)
        return
    calibration = None
    if calibrate:
        if profile_path:
            raise click.UsageError("--calibrate measures this machine; drop --profile")
        from ..policy.calibrate import calibrate as run_calibration

        click.echo("calibrating (a short generation on each backend)...", err=True)
        calibration = run_calibration(model)
    from ..policy import CloudConfig

    cloud = CloudConfig.load(url=cloud_url) if cloud_url else None
    prof = _profile(profile_path, cloud)
    if as_json:
        data = prof.to_dict()
        if calibration is not None:
            data["calibration"] = calibration
        click.echo(json.dumps(_clean(data), indent=2, allow_nan=False))
        return
    rows = [
        ("device", prof.name), ("os / arch", f"{prof.os} / {prof.arch}"),
        ("cpu", f"{prof.cpu} ({prof.cpu_cores} cores, ~{prof.cpu_flops / 1e9:.0f} GFLOP/s)"),
        ("apple chip", prof.chip or "-"),
        ("memory", f"{_gb(prof.memory_total)} total, {_gb(prof.memory_available)} available"
         + (f", app limit {_gb(prof.app_memory_limit)}" if prof.app_memory_limit else "")),
        ("bandwidth", f"{prof.memory_bandwidth / 1e9:.1f} GB/s"
         + (" (measured)" if prof.bandwidth_measured else "")),
        ("gpu", ", ".join(f"{g.name} [{g.kind}, {g.api}]" for g in prof.gpus) or "-"),
        ("gpu compute", f"{prof.gpu_flops / 1e12:.1f} TFLOP/s" if prof.gpu_flops else "-"),
        ("metal", "yes" if prof.metal else "no"),
        ("neural engine", f"{prof.neural_engine_ops / 1e12:.1f} TOPS"
         if prof.neural_engine_ops else "no"),
        ("battery", "no battery" if prof.battery_percent is None else
         f"{prof.battery_percent:.0f}% ({'charging' if prof.charging else 'on battery'})"),
        ("power", ("low-power mode" if prof.low_power_mode else "normal")
         + (f", thermal {prof.thermal_state}" if prof.thermal_state else "")),
        ("backends", ", ".join(prof.backends) or "-"),
    ]
    if cloud is not None:
        rows.append(("cloud", f"{cloud.base_url} "
                     + ("reachable" if prof.online else "unreachable (offline)")))
    for name, note in prof.backend_notes.items():
        if name not in prof.backends:
            rows.append((f"  no {name}", note))
    for name, eff in prof.efficiency.items():
        rows.append((f"  calibrated {name}", ", ".join(f"{k} {v:.3f}" for k, v in eff.items())))
    for key, value in rows:
        click.echo(f"{key:>16}: {value}")
    if calibration:
        for name, res in calibration.items():
            click.echo(f"{'measured ' + name:>16}: decode {res['measured_decode_tps']} tok/s, "
                       f"prefill {res['measured_prefill_tps']} tok/s")


@click.group()
def policy() -> None:
    """Where requests run: local (which backend) or cloud."""


@policy.command()
@click.option("--model", "-m", default=None,
              help="Model directory, Core ML manifest, or a size such as 8b-q4, 1b-f16, 135m-q4 "
                   "[default model].")
@click.option("--profile", "profile_path", default=None,
              help="Device profile file or shipped name [this machine].")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--private", is_flag=True, help="The request must not leave the device.")
@click.option("--mode", type=MODE_CHOICE, default="prefer_local", show_default=True)
@click.option("--ttft", "ttft_target", type=float, default=None,
              help="Target time to first token, seconds.")
@click.option("--min-tps", type=float, default=None, help="Target decode tokens per second.")
@click.option("--max-cost", type=float, default=None, help="Cost ceiling in US dollars.")
@click.option("--cloud-url", default=None, help="Cloud endpoint [cloud config / env].")
@click.option("--cloud-config", default=None, type=click.Path(dir_okay=False),
              help="Cloud config file (TOML/JSON).")
@click.option("--offline", is_flag=True, help="Treat the cloud endpoint as unreachable.")
@click.option("--probe", is_flag=True,
              help="Check the cloud endpoint's reachability now (a TCP connect).")
@click.option("--battery", type=float, default=None, help="Simulate this battery percent, "
              "not charging.")
@click.option("--json", "as_json", is_flag=True)
def explain(model, profile_path, prompt_tokens, max_tokens, private, mode, ttft_target, min_tps,
            max_cost, cloud_url, cloud_config, offline, probe, battery, as_json) -> None:
    """Print where a request would run, the estimates per backend and the reasons."""
    from dataclasses import replace

    from ..policy import CloudConfig, ModelRequirements, Request, decide, reachable

    prof = _profile(profile_path)
    req_model = ModelRequirements.load(model)
    cloud = CloudConfig.load(cloud_config, url=cloud_url)
    request = Request(prompt_tokens, max_tokens, private=private, ttft_target_s=ttft_target,
                      min_tokens_per_s=min_tps, max_cost_usd=max_cost, mode=mode)
    online = None
    if offline:
        online = False
    elif probe and cloud is not None and request.cloud_permitted:
        online = reachable(cloud)
    if battery is not None:
        prof = replace(prof, battery_percent=battery, charging=False)
    prof = replace(prof, online=online)
    d = decide(prof, req_model, request, cloud)
    if as_json:
        click.echo(json.dumps(_clean({
            "decision": d.to_dict(), "device": prof.name, "model": req_model.name,
            "request": {k: getattr(request, k) for k in request.__dataclass_fields__},
            "cloud_config": cloud.to_dict() if cloud else None,
        }), indent=2, allow_nan=False))
        return
    click.echo(f"device:   {prof.name}")
    click.echo(f"model:    {req_model.name} ({req_model.params / 1e9:.2f}B params, "
               f"{req_model.quantization}, weights {_gb(req_model.weight_bytes)}"
               + (", Core ML export" if req_model.coreml_export else "") + ")")
    click.echo(f"request:  {prompt_tokens} prompt + {max_tokens} new tokens, mode {mode}"
               + (", private" if private else ""))
    click.echo(f"decision: {d.where}"
               + (f" (fallback: {d.fallback}"
                  + (f" {d.fallback_backend}" if d.fallback_backend else "") + ")"
                  if d.fallback else " (no fallback)"))
    click.echo("reasons:")
    for r in d.reasons:
        click.echo(f"  - {r}")
    click.echo("estimates:")
    click.echo(f"  {'backend':8} {'proc':5} {'fits':5} {'memory':>17} {'decode':>11} "
               f"{'TTFT':>9} {'total':>9}  note")
    for e in d.estimates:
        if not e.processor or not e.memory_needed:  # not on this device, or no export
            click.echo(f"  {e.backend:8} {e.processor or '-':5} {'-':5} {'':>17} {'':>11} "
                       f"{'':>9} {'':>9}  {e.why}")
            continue
        mem = f"{e.memory_needed / 1e9:.2f}/{e.memory_usable / 1e9:.2f} GB"
        click.echo(f"  {e.backend:8} {e.processor:5} {'yes' if e.fits else 'no':5} {mem:>17} "
                   f"{e.decode_tps:>7.1f} t/s {e.ttft_s:>7.2f} s {e.total_s:>7.1f} s  "
                   + ("calibrated " if e.calibrated else "") + e.why)
    if d.cloud:
        c = d.cloud
        click.echo(f"  {'cloud':8} {'-':5} {'-':5} {'':>17} {c.decode_tps:>7.1f} t/s "
                   f"{c.ttft_s:>7.2f} s {c.total_s:>7.1f} s  ${c.cost_usd:.4f} at {c.endpoint}")
    else:
        click.echo(f"  cloud: not configured (--cloud-url, cloud.toml or {described('CLOUD_URL')})")


def _clean(value):
    """Strict JSON: infinite estimates (a backend that cannot run) become null."""
    if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value
