"""``ondevice bench`` and ``ondevice eval``: parse options, call :mod:`ondevice.bench`."""

from __future__ import annotations

import json

import click

from ..backends import KNOWN as KNOWN_BACKENDS
from ..bench.common import BenchError, parse_list, parse_quantize


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in parse_list(text))
    except ValueError:
        raise BenchError(f"--concurrency {text!r}: give request counts like 1,4,16") from None


def _write_json(report: dict, out: str) -> None:
    text = json.dumps(report, indent=2) + "\n"
    if out == "-":
        click.echo(text, nl=False)
        return
    try:
        with open(out, "w") as f:
            f.write(text)
    except OSError as err:
        raise BenchError(f"cannot write {out}: {err.strerror or err}") from None


@click.command("bench")
@click.option("--model", "-m", default=None,
              help="Model name (`ondevice list`; pulled on first use), directory or .gguf "
                   "file [default: SmolLM2-135M-Instruct].")
@click.option("--backend", "-b", "backends", multiple=True,
              help="Backend(s) to measure, repeatable or comma-separated, among "
                   f"{', '.join(KNOWN_BACKENDS)} [default: every available one].")
@click.option("--quantize", "-q", "quantize", multiple=True,
              help="Storage formats among f32,f16,q8,q4 [default: f32,q4].")
@click.option("--concurrency", default="1,4,16", show_default=True,
              help="Concurrent request counts for the throughput curve.")
@click.option("--prompt-tokens", type=int, default=256, show_default=True)
@click.option("--gen-tokens", type=int, default=64, show_default=True)
@click.option("--repeats", type=int, default=2, show_default=True,
              help="Single-stream runs per configuration (the best counts).")
@click.option("--peers", is_flag=True,
              help="Also run llama.cpp (llama-cpp-python, same GGUF, same threads) and mlx-lm "
                   "(same weights) and print our/their ratios.")
@click.option("--threads", type=int, default=None,
              help="Threads for llama.cpp [default: the cores this process may use].")
@click.option("--group-size", type=int, default=64, show_default=True,
              help="Group size of q8/q4 conversions.")
@click.option("--kv-memory", default=None, help="KV cache budget per backend, e.g. 256MiB.")
@click.option("--bandwidth-mib", type=int, default=256, show_default=True,
              help="Buffer of the memory-bandwidth measurement.")
@click.option("--speculative", type=click.Choice(["prompt_lookup", "draft"]), default=None,
              help="Also measure with speculative decoding, each run next to one without it.")
@click.option("--num-speculative-tokens", type=int, default=None,
              help="Tokens proposed per step at most (1..16) [4].")
@click.option("--draft-model", default=None,
              help="Draft model directory or .gguf file for --speculative draft.")
@click.option("--json", "json_out", default=None, metavar="OUT",
              help="Write the full report as JSON to OUT ('-': stdout).")
@click.option("--plot", "plot_out", default=None, metavar="OUT.png",
              help="Draw tok/s by backend/peer and throughput vs concurrency into a PNG.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
def bench(model, backends, quantize, concurrency, prompt_tokens, gen_tokens, repeats, peers,
          threads, group_size, kv_memory, bandwidth_mib, speculative, num_speculative_tokens,
          draft_model, json_out, plot_out, no_progress):
    """Decode/prefill tok/s, TTFT, peak memory, KV utilization and throughput vs concurrency
    per backend and quantization; with --peers, ratios to llama.cpp and mlx-lm; with
    --speculative, ratios of speculative decoding on / off."""
    from ..bench import BenchSettings, format_report, run_bench
    from .cli import speculative_config

    settings = BenchSettings(
        model=model, backends=tuple(parse_list(backends)),
        quantize=tuple(parse_quantize(quantize) or ("f32", "q4")),
        concurrency=_ints(concurrency), prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
        repeats=repeats, peers=peers, threads=threads, group_size=group_size,
        kv_memory=kv_memory, bandwidth_mib=bandwidth_mib,
        speculative=speculative_config(speculative, num_speculative_tokens, draft_model),
    )
    if plot_out is not None:
        # Fail before minutes of measuring, not after.
        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError:
            raise BenchError("--plot needs matplotlib (pip install 'ondevice[plot]')") from None
    report = run_bench(settings, progress=not no_progress)
    if json_out != "-":
        click.echo(format_report(report))
    if json_out is not None:
        _write_json(report, json_out)
    if plot_out is not None:
        from ..bench.plot import plot_report

        plot_report(report, plot_out)
        click.echo(f"plot written to {plot_out}", err=True)


@click.command("eval")
@click.option("--model", "-m", default=None,
              help="Model name (`ondevice list`; pulled on first use), directory or .gguf "
                   "file [default: SmolLM2-135M-Instruct].")
@click.option("--backend", "-b", "backends", multiple=True,
              help="Candidate backend(s), repeatable or comma-separated, among "
                   f"{', '.join(KNOWN_BACKENDS)}.")
@click.option("--quantize", "-q", "quantize", multiple=True,
              help="Candidate storage formats among f32,f16,q8,q4 [default: f32].")
@click.option("--candidate", "candidates", multiple=True, metavar="BACKEND-QUANT",
              help="More candidates as BACKEND-QUANT, e.g. mlx-q4 (repeatable).")
@click.option("--against", default="numpy-f32", show_default=True,
              help="Reference as BACKEND-QUANT.")
@click.option("--reference-model", default=None,
              help="Reference model directory or .gguf [default: --model].")
@click.option("--text", "text_file", default=None, type=click.Path(dir_okay=False),
              help="Score this UTF-8 text file.")
@click.option("--dataset", default=None, type=click.Choice(["builtin"]),
              help="The shipped public-domain text [the default without --text].")
@click.option("--max-tokens", type=int, default=512, show_default=True,
              help="Tokens of the text scored.")
@click.option("--greedy-tokens", type=int, default=32, show_default=True,
              help="Tokens of each greedy continuation compared.")
@click.option("--group-size", type=int, default=64, show_default=True)
@click.option("--kl-threshold", type=float, default=0.1, show_default=True,
              help="Largest mean KL divergence (nats) that passes.")
@click.option("--p99-kl-threshold", type=float, default=None,
              help="Largest 99th-percentile KL that passes [unchecked].")
@click.option("--top1-threshold", type=float, default=0.85, show_default=True,
              help="Smallest top-1 agreement that passes.")
@click.option("--ppl-threshold", type=float, default=1.1, show_default=True,
              help="Largest candidate/reference perplexity ratio that passes.")
@click.option("--greedy-threshold", type=float, default=None,
              help="Smallest greedy-continuation agreement that passes [unchecked].")
@click.option("--json", "json_out", default=None, metavar="OUT",
              help="Write the full report as JSON to OUT ('-': stdout).")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.pass_context
def eval_command(ctx, model, backends, quantize, candidates, against, reference_model, text_file, dataset,
                 max_tokens, greedy_tokens, group_size, kl_threshold, p99_kl_threshold,
                 top1_threshold, ppl_threshold, greedy_threshold, json_out, no_progress):
    """Perplexity, KL divergence, top-1 and greedy agreement of backends/quantizations
    against a reference; exits with 1 when a candidate fails the thresholds."""
    from ..bench import Thresholds, format_eval, run_eval

    if text_file is not None and dataset is not None:
        raise BenchError("give --text FILE or --dataset builtin, not both")
    thresholds = Thresholds(max_mean_kl=kl_threshold, max_p99_kl=p99_kl_threshold,
                            min_top1=top1_threshold, max_ppl_ratio=ppl_threshold,
                            min_greedy=greedy_threshold)
    report = run_eval(model, list(backends), list(quantize), candidates=list(candidates),
                      against=against,
                      reference_model=reference_model, text_file=text_file, dataset=dataset,
                      max_tokens=max_tokens, greedy_tokens=greedy_tokens,
                      group_size=group_size, thresholds=thresholds,
                      progress=not no_progress)
    if json_out != "-":
        click.echo(format_eval(report))
    if json_out is not None:
        _write_json(report, json_out)
    if report["verdict"] != "pass":
        failed = [f"{r['backend']}-{r['quantize']}" for r in report["candidates"]
                  if r["verdict"] != "pass"]
        click.echo(f"eval: FAIL ({', '.join(failed)} beyond the thresholds)", err=True)
        ctx.exit(1)
