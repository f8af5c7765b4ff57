"""Results: rows with a stable schema (COLUMNS), written as CSV + markdown + PNG plots, and the
short summary table printed last.

    python -m benchmarks.report RESULTS.csv [OUT_DIR]    re-render markdown + plots from a CSV
    python -m benchmarks.report --summary RESULTS.csv    print the short summary table
    python -m benchmarks.report NEW.csv --merge-into DIR merge NEW's rows into DIR/results.csv
                                                         (same key: NEW's replace), re-render
    python -m benchmarks.report NEW.csv --compare OLD.csv  time of every key in both, NEW / OLD
                                                         (regressions first)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import math
import os
import re
from collections import defaultdict

# The CSV schema: one row per (op, provider, mode, shape, dtype, metric). Skipped providers get
# metric "skipped" and the reason in "note"; a provider that raised gets metric "error" and the
# message; a "time" row's note says how many samples it has and how the run was configured
# ("n=12; size=quick; budget_ms=100; threads=2"). Environment columns repeat on every row.
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
    return {_key(r): float(r["p50"]) for r in rows if r["metric"] == "time"}


# speedup_vs_<name> -> the baseline provider
BASELINES = {
    b.replace("-", "_"): b for b in ("compile", "eager", "smart-pytorch", "floor", "floor-compat")
}


def speedups(rows: list[dict]) -> list[dict]:
    """Time ratios within this run: speedup_vs_compile and speedup_vs_eager for every op, and
    for the end-to-end step speedup_vs_smart_pytorch and speedup_vs_floor (< 1: slower than
    the model passes the method needs: floor for ours-paper, floor-compat for ours-compat)."""
    times = _times(rows)
    out = []
    for (op, provider, mode, shape, dtype), ms in times.items():
        for name, base in BASELINES.items():
            ref = times.get((op, base, mode, shape, dtype))
            if ref is not None:
                key = dict(zip(KEY_COLUMNS, (op, provider, mode, shape, dtype), strict=True))
                out.append(row(key, f"speedup_vs_{name}", "x", ref / ms))
    return out


def _key(r: dict) -> tuple:
    return tuple(r[c] for c in KEY_COLUMNS)


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` rows whose key (op, provider, mode, shape, dtype) ``new`` does not measure, then
    ``new``: every metric of a re-measured key comes from the new run. A new "skipped" row (a
    provider not installed there) does not replace old numbers; a new "error" does. A speedup
    row is kept only while its baseline's time is from the same run (ratios stay within one
    run)."""
    measured_before = {_key(r) for r in old if r["metric"] not in ("skipped", "error")}
    new = [r for r in new if r["metric"] != "skipped" or _key(r) not in measured_before]
    fresh = {_key(r) for r in new}
    rows = [r for r in old if _key(r) not in fresh] + new
    stamp = {_key(r): r.get("timestamp") for r in rows if r["metric"] == "time"}

    def consistent(r: dict) -> bool:
        base = BASELINES.get(r["metric"].removeprefix("speedup_vs_"))
        if not r["metric"].startswith("speedup_vs_") or base is None:
            return True
        key = (r["op"], base, *_key(r)[2:])
        return key in stamp and stamp[key] == r.get("timestamp")

    return [r for r in rows if consistent(r)]


def same_device(old: list[dict], new: list[dict]) -> str | None:
    """Why ``old`` and ``new`` must not be merged (None: they may): rows of another device."""
    before = {r.get("device") for r in old} - {None, ""}
    now = {r.get("device") for r in new} - {None, ""}
    if before and now and before != now:
        return f"results of {sorted(before)} cannot take rows of {sorted(now)}"
    return None


def read_csv(path: str) -> list[dict]:
    """The rows of a results CSV ([] if there is none)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def time_note(n: int, config: str) -> str:
    """A time row's note: the sample count, then the run's settings."""
    return "; ".join(x for x in (f"n={n}", config) if x)


def _split_time_note(note: str | None) -> tuple[str, str]:
    """(sample count, run settings) of a time row's note (see :func:`time_note`)."""
    m = re.match(r"n=(\d+)(?:; )?(.*)", note or "")
    return (m[1], m[2]) if m else ("", note or "")


def _pivot(rows: list[dict]) -> dict[tuple, dict[str, str]]:
    table: dict[tuple, dict[str, str]] = defaultdict(dict)
    for r in rows:
        m = table[_key(r)]
        m[r["metric"]] = r["note"] if r["metric"] in ("skipped", "error") else r["p50"]
        if r["metric"] == "time":
            m["n"] = _split_time_note(r.get("note"))[0]
    return table


def _num(s: str | None, digits: int) -> str:
    return "" if not s else f"{float(s):.{digits}f}"


def _sig(s: str | None, sig: int = 3) -> str:
    """``sig`` significant figures in fixed notation, no exponent (3001, 782, 5.34, 0.300,
    0.0000648)."""
    if not s:
        return ""
    v = float(s)
    if v == 0 or abs(v) >= 10 ** (sig - 1):
        return f"{v:.0f}"
    return f"{v:.{sig - 1 - math.floor(math.log10(abs(v)))}f}"


def copy_bandwidth_of(rows: list[dict]) -> float:
    """The copy bandwidth a run measured, recovered from its bandwidth and % rows (0 if none)."""
    bw = {_key(r): float(r["p50"]) for r in rows if r["metric"] == "bandwidth"}
    return next((bw[k] * 100 / float(r["p50"]) for r in rows
                 if r["metric"] == "pct_copy_bw" and float(r["p50"]) > 0
                 and (k := _key(r)) in bw), 0.0)  # fmt: skip


def _step_ops(rows: list[dict]) -> set[str]:
    """End-to-end ops: timed, but with no bandwidth rows (a whole step has no minimal byte
    count; the harness writes none for an op with ``bandwidth=False``)."""
    timed = {r["op"] for r in rows if r["metric"] == "time"}
    return timed - {r["op"] for r in rows if r["metric"] == "bandwidth"}


def _run_header(run: list[dict]) -> str:
    first = run[0]
    copy_bw = copy_bandwidth_of(run)
    config = next((_split_time_note(r.get("note"))[1] for r in run if r["metric"] == "time"), "")
    text = (f"torch {first.get('torch', '')}, triton {first.get('triton', '') or '-'}, commit "
            f"{first.get('git_commit', '') or '-'}, {first.get('timestamp', '')}")  # fmt: skip
    if config:
        text += f" ({config})"
    if copy_bw > 0:
        text += f"; copy bandwidth {copy_bw:.0f} GB/s measured in the same run"
    text += f" (ops: {', '.join(dict.fromkeys(r['op'] for r in run))})."
    if "TRITON_INTERPRET=1" in config:
        text += (" ours-triton ran under the Triton interpreter (TRITON_INTERPRET=1): its times "
                 "are the interpreter's, not a compiled kernel's.")  # fmt: skip
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(rows: list[dict]) -> str:
    env = rows[0] if rows else {}
    runs: dict[str, list[dict]] = {}  # one harness run = one start timestamp
    for r in rows:
        runs.setdefault(r.get("timestamp", ""), []).append(r)
    header = [_run_header(run) for run in runs.values()]
    lines = [
        f"# smart_kernels benchmarks: {env.get('device', '')}",
        "",
        *(f"* {h}" if len(header) > 1 else h for h in header),
        "",
        "Times are medians (ms) of n samples; GB/s uses each op's minimal byte count; x = speedup "
        "over torch.compile / eager within the same run.",
    ]
    if str(env.get("device", "")).startswith("cpu"):
        lines += [
            "",
            "CPU: caches are not flushed between calls, so a case that fits in the last-level "
            "cache can exceed 100% of the copy bandwidth (a large copy).",
        ]
    lines += [
        "",
        "| op | shape | dtype | mode | provider | ms | n | GB/s | % copy BW | peak MiB "
        "| x compile | x eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    steps = _step_ops(rows)
    for (op, provider, mode, shape, dtype), m in _pivot(rows).items():
        for status in ("skipped", "error"):
            if status in m:
                lines.append(f"| {op} | {shape} | {dtype} | {mode} | {provider} | {status}: "
                             f"{_cell(m[status])} | | | | | | |")  # fmt: skip
        if "skipped" in m or "error" in m or op in steps:  # a step's times: its own table
            continue
        lines.append(
            f"| {op} | {shape} | {dtype} | {mode} | {provider} | {_sig(m.get('time'), 4)} | "
            f"{m.get('n', '')} | {_sig(m.get('bandwidth'))} | {_sig(m.get('pct_copy_bw'))} | "
            f"{_sig(m.get('peak_extra_mem'))} | {_num(m.get('speedup_vs_compile'), 2)} | "
            f"{_num(m.get('speedup_vs_eager'), 2)} |"
        )
    step = step_table(rows)
    if step:
        lines += [
            "",
            "## End-to-end step (smart_step)",
            "",
            "One training step per provider (same model, batch, AdamW). x smart-pytorch = "
            "smart-pytorch's ms / this ms (> 1: faster); / floor = this ms / the ms of the model "
            "passes the method needs, with plain stand-ins for our ops (1.15 = 15% above it): "
            "floor for ours-paper (its teacher forward included), floor-compat for ours-compat "
            "(no teacher); not shown for plain and smart-pytorch.",
            "",
            "| case | dtype | provider | ms | n | peak MiB | x smart-pytorch | / floor |",
            "|---|---|---|---|---|---|---|---|",
            *(f"| {' | '.join(cells)} |" for cells in step),
        ]
    return "\n".join(lines) + "\n"


# provider -> the floor (the model passes it needs) its "/ floor" cell divides by
FLOOR_OF = {"ours-paper": "floor", "floor": "floor",
            "ours-compat": "floor-compat", "floor-compat": "floor-compat"}  # fmt: skip


def step_table(rows: list[dict]) -> list[tuple[str, ...]]:
    """The end-to-end step rows (``_step_ops``): case, dtype, provider, ms, samples, peak MiB,
    speedup over smart-pytorch, and ms over the floor's ms (``FLOOR_OF``)."""
    steps = _step_ops(rows)
    out = []
    for (op, provider, _mode, shape, dtype), m in _pivot(rows).items():
        if "time" not in m or op not in steps:
            continue
        base = FLOOR_OF.get(provider)
        floor = m.get(f"speedup_vs_{base.replace('-', '_')}") if base else None
        out.append((f"{op} {shape}", dtype, provider, _sig(m["time"], 4), m.get("n", ""),
                    _sig(m.get("peak_extra_mem")), _num(m.get("speedup_vs_smart_pytorch"), 2),
                    f"{1 / float(floor):.2f}" if floor else ""))  # fmt: skip
    return out


def _aligned(table: list[tuple[str, ...]], right: set[int]) -> list[str]:
    """Rows of cells padded to the widest cell of each column (``right``: right-aligned)."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [" ".join(c.rjust(w) if i in right else c.ljust(w)
                     for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in table]  # fmt: skip


def summary_table(rows: list[dict]) -> str:
    """Ours vs torch.compile / eager, per op / shape / dtype / mode (the short table printed
    last), then the end-to-end step table."""
    steps = _step_ops(rows)
    table = [("op", "shape", "dtype", "mode", "provider", "ms", "x compile", "x eager",
              "%copy BW")]  # fmt: skip
    for (op, provider, mode, shape, dtype), m in _pivot(rows).items():
        if not provider.startswith("ours") or "time" not in m or op in steps:
            continue
        table.append((op, shape, dtype, mode, provider, _sig(m["time"], 4),
                      _num(m.get("speedup_vs_compile"), 2), _num(m.get("speedup_vs_eager"), 2),
                      _sig(m.get("pct_copy_bw"))))  # fmt: skip
    lines = _aligned(table, {5, 6, 7, 8}) if len(table) > 1 else []
    step = step_table(rows)
    if step:
        head = ("step", "dtype", "provider", "ms", "n", "peak MiB", "x smart-pt", "/ floor")
        lines += _aligned([head, *step], {3, 4, 5, 6, 7})
    return "\n".join(lines)


def make_plots(rows: list[dict], out_dir: str) -> list[str]:
    """Per op / mode / dtype: time vs size (the product of the shape's dimensions) per
    provider, and speedup over torch.compile; end-to-end ops (no size axis) have none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["metric"] in ("time", "speedup_vs_compile"):
            dims = r["shape"].split("x")
            if not all(d.isdigit() for d in dims):  # a named case (a step): no size axis
                continue
            size = 1
            for d in dims:
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
        ax.set_xlabel("elements (product of the shape)")
        ax.set_title(f"{op} {mode} {dtype}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}_{mode}_{dtype}_{metric}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    for stale in set(glob.glob(os.path.join(out_dir, "*.png"))) - set(paths):
        os.remove(stale)  # a plot of an op or case no longer in the results
    return paths


@contextlib.contextmanager
def _replacing(path: str, **open_kwargs):
    """Write ``path`` through a temporary file that replaces it at the end: a run killed while
    writing leaves the previous complete file, never a truncated one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", **open_kwargs) as f:
        yield f
    os.replace(tmp, path)


def write_all(rows: list[dict], out_dir: str, plots: bool = True) -> list[str]:
    """results.csv, results.md and plots/*.png under out_dir; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "results.csv")
    with _replacing(csv_path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    md_path = os.path.join(out_dir, "results.md")
    with _replacing(md_path) as f:
        f.write(markdown(rows))
    paths = [csv_path, md_path]
    if plots:
        paths += make_plots(rows, os.path.join(out_dir, "plots"))
    return paths


def compare_table(new: list[dict], old: list[dict], slower: float = 1.1) -> str:
    """Every (op, provider, mode, shape, dtype) timed in both: old ms, new ms, new / old, the
    largest ratio first, "slower" past ``slower``. Across runs (and commits): the same device
    but not the same moment, so a few % is noise; ratios within one run are in the tables."""
    old_ms, new_ms = _times(old), _times(new)
    both = sorted(new_ms.keys() & old_ms.keys(), key=lambda k: -new_ms[k] / old_ms[k])
    table = [("op", "shape", "dtype", "mode", "provider", "old ms", "new ms", "new/old", "")]
    for k in both:
        ratio = new_ms[k] / old_ms[k]
        op, provider, mode, shape, dtype = k
        table.append((op, shape, dtype, mode, provider, _sig(str(old_ms[k]), 4),
                      _sig(str(new_ms[k]), 4), f"{ratio:.2f}",
                      "slower" if ratio > slower else ""))  # fmt: skip
    only = len(new_ms.keys() - old_ms.keys()), len(old_ms.keys() - new_ms.keys())
    tail = (
        f"{len(both)} timed in both; {only[0]} only in the new results, {only[1]} only in the old"
    )
    return "\n".join([*(_aligned(table, {5, 6, 7}) if both else []), tail])


def main(argv: list[str] | None = None) -> None:
    """Markdown and plots again from a results.csv (e.g. one fetched from a GPU machine), only
    the short table (``--summary``), or NEW.csv merged into DIR/results.csv (``--merge-into``)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("csv", help="a results.csv written by the harness")
    parser.add_argument("out_dir", nargs="?", help="where to write (default: the CSV's folder)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--summary", action="store_true", help="print the short table only")
    how.add_argument(
        "--merge-into",
        metavar="DIR",
        help="merge the CSV's rows into DIR/results.csv and re-render DIR",
    )
    how.add_argument(
        "--compare",
        metavar="OLD_CSV",
        help="the time of every key in both CSVs, this one over OLD_CSV (regressions first)",
    )
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.csv):
        parser.error(f"csv: no such file: {args.csv}")
    rows = read_csv(args.csv)
    if not rows or "metric" not in rows[0]:
        parser.error(f"csv: {args.csv} has no result rows")
    if args.summary:
        if args.out_dir:
            parser.error("--summary prints to stdout: give no out_dir")
        print(summary_table(rows))
        return
    if args.compare:
        if args.out_dir:
            parser.error("--compare prints to stdout: give no out_dir")
        if not os.path.isfile(args.compare):
            parser.error(f"--compare: no such file: {args.compare}")
        old = read_csv(args.compare)
        why_not = same_device(old, rows)
        if why_not:
            parser.error(f"--compare {args.compare}: {why_not}")
        print(compare_table(rows, old))
        return
    if args.merge_into:
        if args.out_dir:
            parser.error("--merge-into writes into DIR: give no out_dir")
        out_dir = args.merge_into
        old = read_csv(os.path.join(out_dir, "results.csv"))
        why_not = same_device(old, rows)
        if why_not:
            parser.error(f"--merge-into {out_dir}: {why_not}")
        rows = merge(old, rows)
        paths = write_all(rows, out_dir, plots=not args.no_plots)
        print(f"merged {args.csv} into {paths[0]} ({len(rows)} rows); wrote {len(paths) - 2} "
              f"plots")  # fmt: skip
        return
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.csv))
    os.makedirs(out_dir, exist_ok=True)
    with _replacing(os.path.join(out_dir, "results.md")) as f:
        f.write(markdown(rows))
    n_plots = 0 if args.no_plots else len(make_plots(rows, os.path.join(out_dir, "plots")))
    print(f"wrote results.md and {n_plots} plots under {out_dir}")


if __name__ == "__main__":
    main()
