"""``ondevice bench --plot``: decode and prefill tok/s by backend and peer, and throughput
against concurrency, in one PNG (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

import os

from .common import BenchError


def plot_report(report: dict, out: str | os.PathLike) -> None:
    """Draw ``report`` (from :func:`ondevice.bench.run.run_bench`) into the PNG ``out``."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise BenchError("--plot needs matplotlib (pip install 'ondevice[plot]')") from None
    matplotlib.use("Agg")  # files only; never a window, works without a display
    import matplotlib.pyplot as plt

    labels, decode, prefill, colors = [], [], [], []
    for r in report["results"]:
        labels.append(f"{r['backend']}\n{r['quantize']}")
        decode.append(r["decode_tok_per_s"])
        prefill.append(r["prefill_tok_per_s"])
        colors.append("tab:blue")
    for p in report["peers"]:
        if p.get("status") == "ok":
            labels.append(f"{p['name']}\n{p['quantize']}")
            decode.append(p["decode_tok_per_s"])
            prefill.append(p["prefill_tok_per_s"])
            colors.append("tab:orange")

    fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(13, 5))
    xs = range(len(labels))
    width = 0.4
    ax_bar.bar([x - width / 2 for x in xs], decode, width, color=colors, label="decode")
    ax_bar.bar([x + width / 2 for x in xs], prefill, width, color=colors, alpha=0.45,
               hatch="//", label="prefill")
    for x, d in zip(xs, decode, strict=True):
        ax_bar.annotate(f"{d:.0f}", (x - width / 2, d), ha="center", va="bottom", fontsize=8)
    ax_bar.set_xticks(list(xs), labels, fontsize=8)
    ax_bar.set_ylabel("tokens / s")
    ax_bar.set_yscale("log")  # prefill and decode differ by an order of magnitude
    ax_bar.set_title("single stream (blue: ondevice, orange: peers)")
    ax_bar.legend(loc="upper left", fontsize=8)
    for r in report["results"]:
        pts = r["concurrency"]
        ax_curve.plot([c["requests"] for c in pts], [c["aggregate_tok_per_s"] for c in pts],
                      marker="o", label=f"{r['backend']}-{r['quantize']}")
    ax_curve.set_xscale("log", base=2)
    levels = sorted({c["requests"] for r in report["results"] for c in r["concurrency"]})
    ax_curve.set_xticks(levels, [str(n) for n in levels])
    ax_curve.minorticks_off()
    ax_curve.set_xlabel("concurrent requests")
    ax_curve.set_ylabel("aggregate generated tokens / s")
    ax_curve.set_title("throughput vs concurrency")
    ax_curve.grid(True, alpha=0.3)
    ax_curve.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(f"ondevice bench: {m['cpu']}, {m['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
