"""Results: rows with a stable schema (COLUMNS), written as CSV + markdown + PNG plots, and the
short summary table printed last.

    python -m benchmarks.report RESULTS.csv [OUT_DIR]    re-render markdown + plots from a CSV
    python -m benchmarks.report --summary RESULTS.csv    print the short summary table
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections import defaultdict

# The CSV schema: one row per (op, provider, mode, shape, dtype, metric). Skipped providers get
# metric "skipped" and the reason in "note"; a provider that raised gets metric "error" and the
# message. Environment columns repeat on every row.
KEY_COLUMNS = ["op", "provider", "mode", "shape", "dtype"]
VALUE_COLUMNS = ["metric", "unit", "p50", "p20", "p80", "note"]
ENV_COLUMNS = ["device", "torch", "triton", "smart_kernels", "python", "git_commit", "timestamp"]
COLUMNS = KEY_COLUMNS + VALUE_COLUMNS + ENV_COLUMNS


def row(key: dict, metric: str, unit: str, p50: float, p20=None, p80=None) -> dict:
    fmt = lambda v: "" if v is None else f"{v:.6g}"  # noqa: E731
    return {**key, "metric": metric, "unit": unit, "p50": fmt(p50), "p20": fmt(p20),
            "p80": fmt(p80), "note": ""}  # fmt: skip


def skip_row(key: dict, reason: str) -> dict:
    return {**key, "metric": "skipped", "unit": "", "p50": "", "p20": "", "p80": "",
            "note": reason}  # fmt: skip


def error_row(key: dict, message: str) -> dict:
    return {**skip_row(key, message), "metric": "error"}


def _times(rows: list[dict]) -> dict[tuple, float]:
    return {tuple(r[k] for k in KEY_COLUMNS): float(r["p50"]) for r in rows
            if r["metric"] == "time"}  # fmt: skip


def speedups(rows: list[dict]) -> list[dict]:
    """Time ratios within this run: speedup_vs_compile and speedup_vs_eager for every op, and
    for the end-to-end step speedup_vs_smart_pytorch and speedup_vs_floor (< 1: slower than
    the model passes the method needs)."""
    times = _times(rows)
    out = []
    for (op, provider, mode, shape, dtype), ms in times.items():
        for base in ("compile", "eager", "smart-pytorch", "floor"):
            ref = times.get((op, base, mode, shape, dtype))
            if ref is not None:
                key = dict(zip(KEY_COLUMNS, (op, provider, mode, shape, dtype), strict=True))
                out.append(row(key, f"speedup_vs_{base.replace('-', '_')}", "x", ref / ms))
    return out


def _pivot(rows: list[dict]) -> dict[tuple, dict[str, str]]:
    table: dict[tuple, dict[str, str]] = defaultdict(dict)
    for r in rows:
        k = tuple(r[c] for c in KEY_COLUMNS)
        table[k][r["metric"]] = r["note"] if r["metric"] in ("skipped", "error") else r["p50"]
    return table


def _num(s: str | None, digits: int) -> str:
    return "" if not s else f"{float(s):.{digits}f}"


def copy_bandwidth_of(rows: list[dict]) -> float:
    """The copy bandwidth a run measured, recovered from its bandwidth and % rows (0 if none)."""
    bw = {tuple(r[k] for k in KEY_COLUMNS): float(r["p50"]) for r in rows
          if r["metric"] == "bandwidth"}  # fmt: skip
    return next((bw[k] * 100 / float(r["p50"]) for r in rows
                 if r["metric"] == "pct_copy_bw" and float(r["p50"]) > 0
                 and (k := tuple(r[c] for c in KEY_COLUMNS)) in bw), 0.0)  # fmt: skip


def markdown(rows: list[dict], copy_bw: float) -> str:
    env = rows[0] if rows else {}
    runs: dict[str, list[dict]] = {}  # one harness run = one start timestamp
    for r in rows:
        runs.setdefault(r.get("timestamp", ""), []).append(r)
    header = [
        f"torch {run[0].get('torch', '')}, triton {run[0].get('triton', '') or '-'}, commit "
        f"{run[0].get('git_commit', '') or '-'}, {stamp}; copy bandwidth "
        f"{copy_bw if len(runs) == 1 else copy_bandwidth_of(run):.0f} GB/s measured in the same "
        f"run (ops: {', '.join(dict.fromkeys(r['op'] for r in run))})."
        for stamp, run in runs.items()
    ]
    lines = [
        f"# smart_kernels benchmarks: {env.get('device', '')}",
        "",
        *(f"* {h}" if len(header) > 1 else h for h in header),
        "",
        "Times are medians (ms); GB/s uses each op's minimal byte count; x = speedup over "
        "torch.compile / eager within the same run.",
        "",
        "| op | shape | dtype | mode | provider | ms | GB/s | % copy BW | peak MiB | x compile "
        "| x eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (op, provider, mode, shape, dtype), m in _pivot(rows).items():
        for status in ("skipped", "error"):
            if status in m:
                lines.append(f"| {op} | {shape} | {dtype} | {mode} | {provider} | {status}: "
                             f"{m[status]} | | | | | |")  # fmt: skip
        if "skipped" in m or "error" in m:
            continue
        lines.append(
            f"| {op} | {shape} | {dtype} | {mode} | {provider} | {_num(m.get('time'), 4)} | "
            f"{_num(m.get('bandwidth'), 0)} | {_num(m.get('pct_copy_bw'), 0)} | "
            f"{_num(m.get('peak_extra_mem'), 1)} | {_num(m.get('speedup_vs_compile'), 2)} | "
            f"{_num(m.get('speedup_vs_eager'), 2)} |"
        )
    step = step_table(rows)
    if step:
        lines += [
            "",
            "## End-to-end step (smart_step)",
            "",
            "One training step per provider (same model, batch, AdamW). x smart-pytorch = "
            "smart-pytorch's ms / this ms (> 1: faster); / floor = this ms / the floor's ms "
            "(the model passes ours-paper needs; 1.15 = 15% above it).",
            "",
            "| case | dtype | provider | ms | peak MiB | x smart-pytorch | / floor |",
            "|---|---|---|---|---|---|---|",
            *(f"| {' | '.join(cells)} |" for cells in step),
        ]
    return "\n".join(lines) + "\n"


def step_table(rows: list[dict]) -> list[tuple[str, ...]]:
    """The end-to-end step rows (ops with a smart-pytorch or floor baseline): case, dtype,
    provider, ms, peak MiB, speedup over smart-pytorch, and ms over the floor's ms."""
    out = []
    for (op, provider, _mode, shape, dtype), m in _pivot(rows).items():
        if "time" not in m or not ({"speedup_vs_smart_pytorch", "speedup_vs_floor"} & set(m)):
            continue
        floor = m.get("speedup_vs_floor")
        out.append((f"{op} {shape}", dtype, provider, _num(m["time"], 2),
                    _num(m.get("peak_extra_mem"), 0), _num(m.get("speedup_vs_smart_pytorch"), 2),
                    f"{1 / float(floor):.2f}" if floor else ""))  # fmt: skip
    return out


def summary_table(rows: list[dict]) -> str:
    """Ours vs torch.compile, per op / shape / dtype / mode: the short table printed last."""
    lines = [f"{'op':8} {'shape':13} {'dtype':9} {'mode':5} {'provider':13} {'ms':>9} "
             f"{'x compile':>9} {'%copy BW':>8}"]  # fmt: skip
    for (op, provider, mode, shape, dtype), m in _pivot(rows).items():
        if not provider.startswith("ours") or "time" not in m:
            continue
        lines.append(
            f"{op:8} {shape:13} {dtype:9} {mode:5} {provider:13} {float(m['time']):9.4f} "
            f"{_num(m.get('speedup_vs_compile'), 2):>9} {_num(m.get('pct_copy_bw'), 0):>8}"
        )
    step = step_table(rows)
    if step:
        lines.append(f"{'step':26} {'dtype':9} {'provider':13} {'ms':>9} {'peak MiB':>8} "
                     f"{'x smart-pt':>10} {'/ floor':>7}")  # fmt: skip
        lines += [f"{c[0]:26} {c[1]:9} {c[2]:13} {c[3]:>9} {c[4]:>8} {c[5]:>10} {c[6]:>7}"
                  for c in step]  # fmt: skip
    return "\n".join(lines)


def make_plots(rows: list[dict], out_dir: str) -> list[str]:
    """Per op / mode / dtype: time vs size per provider, and speedup over torch.compile."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["metric"] in ("time", "speedup_vs_compile"):
            size = 1
            for d in r["shape"].split("x"):
                size *= int(d)
            groups[(r["op"], r["mode"], r["dtype"], r["metric"])][r["provider"]].append(
                (size, float(r["p50"]))
            )
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for (op, mode, dtype, metric), by_provider in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for provider, points in sorted(by_provider.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
        ax.set_xscale("log")
        if metric == "time":
            ax.set_yscale("log")
            ax.set_ylabel("ms (median)")
        else:
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_ylabel("speedup over torch.compile")
        ax.set_xlabel("elements (N x V)")
        ax.set_title(f"{op} {mode} {dtype}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}_{mode}_{dtype}_{metric}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


@contextlib.contextmanager
def _replacing(path: str, **open_kwargs):
    """Write ``path`` through a temporary file that replaces it at the end: a run killed while
    writing leaves the previous complete file, never a truncated one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", **open_kwargs) as f:
        yield f
    os.replace(tmp, path)


def write_all(rows: list[dict], out_dir: str, copy_bw: float, plots: bool = True) -> list[str]:
    """results.csv, results.md and plots/*.png under out_dir; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "results.csv")
    with _replacing(csv_path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    md_path = os.path.join(out_dir, "results.md")
    with _replacing(md_path) as f:
        f.write(markdown(rows, copy_bw))
    paths = [csv_path, md_path]
    if plots:
        paths += make_plots(rows, os.path.join(out_dir, "plots"))
    return paths


def _rerender(argv: list[str]) -> None:
    """Markdown and plots again from a results.csv (e.g. one fetched from a GPU machine), or
    with ``--summary`` first, only the short table on stdout."""
    if argv[:1] == ["--summary"]:
        with open(argv[1]) as f:
            print(summary_table(list(csv.DictReader(f))))
        return
    csv_path = argv[0]
    out_dir = argv[1] if len(argv) > 1 else os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    copy_bw = copy_bandwidth_of(rows)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(rows, copy_bw))
    print(f"wrote results.md and {len(make_plots(rows, os.path.join(out_dir, 'plots')))} plots "
          f"under {out_dir}")  # fmt: skip


if __name__ == "__main__":
    import sys

    _rerender(sys.argv[1:])
