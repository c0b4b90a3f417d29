"""``ondevice verify-coreml``: check an exported Core ML package on any OS."""

from __future__ import annotations

import json

import click


@click.command("verify-coreml")
@click.argument("package", type=click.Path(file_okay=False))
@click.option("--model", "-m", default=None,
              help="Source model directory [default: the manifest's source_path].")
@click.option("--steps", type=click.IntRange(min=1), default=16, show_default=True,
              help="Greedy decode steps after the prefill.")
@click.option("--prompt-tokens", type=click.IntRange(min=2), default=21, show_default=True)
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=None,
              help="Fraction of greedy tokens that must agree [default: 1 for f16, "
                   "0.75 for int8, 0.5 for int4].")
@click.option("--max-error", type=float, default=None,
              help="Fail if the max abs logit error exceeds this.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def verify_coreml(package, model, steps, prompt_tokens, min_agreement, max_error,
                  as_json) -> None:
    """Evaluate PACKAGE's MIL program with NumPy and compare it with the NumPy backend over
    a paged run (chunked prefill, then greedy decode steps). Exit 1 on failure."""
    from ..bench.verify_coreml import verify_coreml as run

    report = run(package, model, steps=steps, prompt_tokens=prompt_tokens,
                 min_agreement=min_agreement, max_error=max_error)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        n = len(report.reference_tokens)
        agree = round(report.greedy_agreement * n)
        click.echo(f"package:            {report.package} ({report.quantization})")
        click.echo(f"reference:          {report.reference} (NumPy backend, float32)")
        click.echo(f"MIL ops:            {len(report.op_types)} types, all interpreted")
        click.echo(f"block table:        {report.block_table}")
        click.echo(f"steps:              {len(report.steps)} (2 prefill chunks, "
                   f"{len(report.steps) - 2} decode)")
        click.echo(f"max abs logit err:  {report.max_abs_logit_error:.4g}")
        click.echo(f"max abs KV err:     {report.max_abs_kv_error:.4g}")
        click.echo(f"greedy agreement:   {agree}/{n} tokens"
                   f"{' (identical)' if report.greedy_identical else ''}")
        click.echo(f"time:               {report.seconds:.1f} s")
        click.echo("PASS" if report.passed else f"FAIL: {report.failure}")
    if not report.passed:
        raise SystemExit(1)
