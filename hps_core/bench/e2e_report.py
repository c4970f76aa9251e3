"""Tables and the plot of the end-to-end benchmark (``hps_core.bench.e2e``)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def alpha_name(alpha: float) -> str:
    return "uniform" if alpha == 0 else f"zipf {alpha:g}"


def _pick(rows: list[dict], **match) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _lat(r: dict, prefix: str = "") -> str:
    return f"{r[prefix + 'p50_ms']:.2f} / {r[prefix + 'p99_ms']:.2f}"


def print_tables(console: Console, payload: dict) -> None:
    """The main table (per alpha and batch), the GPU ceiling and the Triton tables."""
    rows, s, dev = payload["results"], payload["settings"], payload["device"]
    t = Table(
        title=f"end to end ({dev}): lookup of 26 tables + dense model ({payload.get('dense')}), "
        f"{payload['rows']:,} rows. Baseline A and ours on the same requests, calls paired; "
        "x = ours samples/s over A's (end to end / embeddings only)"
    )
    cols = ["keys", "batch", "L1", "A samples/s", "A p50/p99 ms", "ours samples/s"]
    cols += ["ours p50/p99 ms", "x", "L1 hit", "cold x", "cold L1 hit"]
    for c in cols:
        t.add_column(c, justify="right")
    for alpha in s["alphas"]:
        for batch in s["batches"]:
            for f in s["fractions"]:
                cell = {"alpha": alpha, "batch": batch, "cache_fraction": f}
                a = _pick(rows, mode="baseline_a", phase="warm", **cell)
                w = _pick(rows, mode=f"ours_{dev}", phase="warm", **cell)
                c = _pick(rows, mode=f"ours_{dev}", phase="cold", **cell)
                if a is None or w is None or c is None:
                    continue
                t.add_row(
                    alpha_name(alpha),
                    f"{batch:,}",
                    f"{f:.0%}",
                    f"{a['samples_s']:,.0f}",
                    _lat(a),
                    f"{w['samples_s']:,.0f}",
                    _lat(w),
                    f"{w['speedup_vs_a']:.2f} / {w['emb_speedup_vs_a']:.2f}",
                    f"{w['l1_hit_rate']:.1%}",
                    f"{c['speedup_vs_a']:.2f}",
                    f"{c['l1_hit_rate']:.1%}",
                )
    console.print(t)
    if payload.get("gpu_ceiling"):
        g = payload["gpu_ceiling"]
        t = Table(title="GPU, embeddings only, every key in L1: ours vs baseline B (dense gather)")
        for c in (
            "batch", "ours samples/s", "B samples/s", "ours / B", "on device: ours",
            "gather", "ours / B", "L1 hit",
        ):  # fmt: skip
            t.add_column(c, justify="right")
        for batch in s["batches"]:
            o = _pick(g, mode="ours_gpu", batch=batch)
            b = _pick(g, mode="baseline_b", batch=batch)
            d = _pick(g, mode="device_resident", batch=batch)
            if o is None or b is None or d is None:
                continue
            t.add_row(
                f"{batch:,}",
                f"{o['emb_samples_s']:,.0f}",
                f"{b['emb_samples_s']:,.0f}",
                f"{o['vs_b']:.2f}",
                f"{d['ours_samples_s']:,.0f}",
                f"{d['gather_samples_s']:,.0f}",
                f"{d['vs_b']:.2f}",
                f"{d['l1_hit_rate']:.1%}",
            )
        console.print(t)
    if payload.get("skipped_cells"):
        console.print(f"out of time (--max-seconds), not measured: {payload['skipped_cells']}")
    tr = payload.get("triton", {})
    if tr.get("skipped"):
        console.print(f"Triton variant skipped: {tr['skipped']}")
    elif tr.get("rows"):
        t = Table(title="Triton: dlrm ensemble via perf_analyzer (gRPC, concurrency 2), zipf 1.05")
        for c in ("batch", "samples/s", "p50 ms", "p99 ms", "in process samples/s", "ratio"):
            t.add_column(c, justify="right")
        for r in tr["rows"]:
            if "error" in r:
                t.add_row(f"{r['batch']:,}", "perf_analyzer failed", "-", "-", "-", "-")
                continue
            ref = r["in_process_samples_s"]
            t.add_row(
                f"{r['batch']:,}",
                f"{r['samples_s']:,.0f}",
                f"{r['p50_us'] / 1e3:.2f}",
                f"{r['p99_us'] / 1e3:.2f}",
                f"{ref:,.0f}" if ref else "-",
                f"{r['triton_over_in_process']:.2f}" if ref else "-",
            )
        console.print(t)


def plot(payload: dict, path: Path) -> None:
    """Samples/s against batch size per key distribution, and the speedups over baseline A."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, s, dev = payload["results"], payload["settings"], payload["device"]
    alphas = s["alphas"]
    fig, axes = plt.subplots(1, len(alphas) + 1, figsize=(4.2 * (len(alphas) + 1), 4))
    for ax, alpha in zip(axes, alphas, strict=False):
        sel = [r for r in rows if r["alpha"] == alpha]
        f = max(s["fractions"])  # the baseline calls paired with the largest L1
        base = [
            r
            for r in sel
            if r["mode"] == "baseline_a" and r["phase"] == "warm" and r["cache_fraction"] == f
        ]
        ax.plot([r["batch"] for r in base], [r["samples_s"] for r in base], "k.--", label="A")
        for f in s["fractions"]:
            for phase, style in (("warm", "o-"), ("cold", "x:")):
                rs = [
                    r
                    for r in sel
                    if r["mode"] == f"ours_{dev}"
                    and r["cache_fraction"] == f
                    and r["phase"] == phase
                ]
                ax.plot(
                    [r["batch"] for r in rs],
                    [r["samples_s"] for r in rs],
                    style,
                    label=f"ours L1 {f:.0%} {phase}",
                )
        ax.set_title(f"end to end, {alpha_name(alpha)}")
        if sel:  # a run out of --max-seconds may have no cell of this alpha
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
        ax.set_xlabel("batch (samples per request)")
        ax.set_ylabel("samples/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[-1]
    f = max(s["fractions"])
    for alpha in alphas:
        rs = [
            r
            for r in rows
            if r["mode"] == f"ours_{dev}"
            and r["alpha"] == alpha
            and r["cache_fraction"] == f
            and r["phase"] == "warm"
        ]
        b = [r["batch"] for r in rs]
        ax.plot(b, [r["speedup_vs_a"] for r in rs], "o-", label=f"e2e {alpha_name(alpha)}")
        ax.plot(b, [r["emb_speedup_vs_a"] for r in rs], "x--", label=f"emb {alpha_name(alpha)}")
    for r in payload.get("gpu_ceiling") or []:
        if r["mode"] == "ours_gpu":
            ax.plot(r["batch"], r["vs_b"], "rs")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("ours (warm) / baseline A" + (" ; red: all-hit / B" if dev == "gpu" else ""))
    ax.set_title(f"speedup, L1 {f:.0%}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
