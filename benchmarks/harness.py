"""The benchmark harness: one command, every op and provider, a CSV with a stable schema, a
markdown table and plots.

    python -m benchmarks [--op sym_kl,kl|all] [--mode fwd,bwd,full] [--quick|--smoke]
                         [--device cpu|cuda] [--out DIR]

Every requested provider yields numbers, a row saying why it was skipped, or an "error" row (the
exit status is non-zero when one of ours errors). Tiny (launch-bound) cases are timed back to
back rather than with L2 flushes between calls. ``fwd`` is a training forward (inputs require
grad); ``bwd`` repeats the backward of one retained graph; ``full`` is forward + backward.
Timing: median and p20/p80 (``benchmarks/common.py``); effective bandwidth from each op's minimal
byte count, and its % of the copy bandwidth measured at the start of the same run; peak memory
above the inputs (MiB).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, report  # noqa: E402
from benchmarks.spec import MODES, Case, OpBench, Provider  # noqa: E402


def all_ops() -> dict[str, OpBench]:
    from benchmarks import bench_ema, bench_perturb, bench_smart_step, bench_sym_kl

    ops = (*bench_sym_kl.OPS, *bench_perturb.OPS, *bench_ema.OPS, *bench_smart_step.OPS)
    return {op.name: op for op in ops}


def _mode_callable(provider: Provider, inputs: list[torch.Tensor], mode: str):
    """(callable to time, tensors whose .grad is reset between calls)."""
    fn = provider.fn
    if mode == "fwd":
        return (lambda: fn(*inputs)), []
    if mode == "full":
        return (lambda: fn(*inputs).backward()), inputs
    out = fn(*inputs)  # bwd: one graph, backward repeated
    return (lambda: out.backward(retain_graph=True)), inputs


def measure(
    op: OpBench, case: Case, provider: Provider, mode: str, device: torch.device,
    copy_bw: float, budget_ms: float,
) -> list[dict]:  # fmt: skip
    """Result rows (report.COLUMNS minus the environment) for one op/case/provider/mode."""
    key = {"op": op.name, "provider": provider.name, "mode": mode, "shape": case.label,
           "dtype": case.dtype_name}  # fmt: skip
    if provider.skip is not None:
        return [report.skip_row(key, provider.skip)]
    if provider.modes is not None and mode not in provider.modes:
        return [report.skip_row(key, provider.why_not)]
    launch_bound = op.min_bytes(case, "full") < (1 << 20)
    try:
        inputs = op.make_inputs(case, device)
        fn, grads = _mode_callable(provider, inputs, mode)
        t = common.time_call(
            fn, device, grad_to_none=grads, budget_ms=budget_ms, launch_bound=launch_bound
        )
        for x in grads:
            x.grad = None
        peak = common.peak_extra_bytes(fn, device)
    except Exception as exc:  # recorded as an error (metric "error"), the sweep goes on
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return [report.error_row(key, msg)]
    finally:
        inputs = fn = grads = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    nbytes = op.min_bytes(case, mode)
    gbps = [nbytes / (max(ms, 1e-9) * 1e-3) / 1e9 for ms in (t.p50, t.p80, t.p20)]
    rows = [
        report.row(key, "time", "ms", t.p50, t.p20, t.p80),
        report.row(key, "bandwidth", "GB/s", *gbps),
        report.row(key, "pct_copy_bw", "%", *(100 * g / copy_bw for g in gbps)),
    ]
    if peak is not None:
        rows.append(report.row(key, "peak_extra_mem", "MiB", peak / 2**20))
    return rows


def run(
    ops: list[OpBench], modes: list[str], size: str, device: torch.device,
    budget_ms: float, progress: bool = True, only: set[str] | None = None,
    checkpoint: Callable[[list[dict], float], None] | None = None,
) -> tuple[list[dict], dict[str, str], float]:  # fmt: skip
    """All measurements; ``checkpoint(rows, copy_bw)``, if given, gets the rows so far after each
    one (so a run killed by a time limit still leaves its finished measurements)."""
    env = common.environment(device)
    copy_bw = common.copy_bandwidth_gbps(device)
    print(
        f"== smart_kernels benchmarks on {env['device']} | torch {env['torch']} | triton "
        f"{env['triton'] or '-'} | smart_kernels {env['smart_kernels'] or '-'} | commit "
        f"{env['git_commit'] or '-'} | copy bandwidth {copy_bw:.0f} GB/s (measured)",
        flush=True,
    )
    jobs = []
    for op in ops:
        providers = [p for p in op.providers(device) if only is None or p.name in only]
        for case in op.cases(device, size):
            for mode in modes:
                if mode in op.modes:
                    jobs += [(op, case, p, mode) for p in providers]
    rows = []
    bar = _progress(jobs, progress)
    for op, case, provider, mode in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{op.name} {case.label} {provider.name} {mode}")
        rows += measure(op, case, provider, mode, device, copy_bw, budget_ms)
        if checkpoint is not None:
            checkpoint(_finish(rows, env), copy_bw)
    return _finish(rows, env), env, copy_bw


def _finish(rows: list[dict], env: dict[str, str]) -> list[dict]:
    """Measured rows + the within-run speedups, each with the environment columns."""
    return [{**r, **env} for r in rows + report.speedups(rows)]


def _progress(jobs, enabled):
    if not enabled:
        return jobs
    try:
        from tqdm import tqdm
    except ImportError:
        return jobs
    return tqdm(jobs, desc="bench", unit="run", file=sys.stderr, disable=None)  # off if not a tty


def main(argv: list[str] | None = None, default_ops: str = "all") -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--op", default=default_ops, help="comma-separated op names, or all")
    parser.add_argument("--mode", default=",".join(MODES), help="comma-separated: fwd,bwd,full")
    parser.add_argument("--provider", default=None, help="comma-separated provider names")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    size.add_argument("--smoke", action="store_true", help="tiny shapes (tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/<device>/")
    parser.add_argument("--budget-ms", type=float, default=None, help="timing budget per run")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    known = all_ops()
    names = list(known) if args.op == "all" else [n.strip() for n in args.op.split(",")]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"--op: unknown {unknown}; available: {sorted(known)}")
    modes = [m.strip() for m in args.mode.split(",")]
    if any(m not in MODES for m in modes):
        parser.error(f"--mode: expected some of {MODES}, got {args.mode!r}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    size_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    budget = args.budget_ms or (20.0 if args.smoke else 100.0 if args.quick else 200.0)

    only = None if args.provider is None else {p.strip() for p in args.provider.split(",")}
    if only is not None:
        available = {p.name for n in names for p in known[n].providers(torch.device(args.device))}
        if only - available:
            parser.error(f"--provider: unknown {sorted(only - available)}; "
                         f"available: {sorted(available)}")  # fmt: skip
    out_dir = args.out or os.path.join(
        common.ROOT, "benchmarks", "results", common.device_name(device).replace(" ", "_")
    )

    def checkpoint(rows: list[dict], copy_bw: float) -> None:  # CSV + markdown, no plots
        report.write_all(rows, out_dir, copy_bw, plots=False)

    ops = [known[n] for n in names]
    progress = not args.no_progress
    # Partial results only into an explicit --out (never over the committed results/<device>/)
    save = checkpoint if args.out else None
    rows, env, copy_bw = run(ops, modes, size_name, device, budget, progress, only, save)
    paths = report.write_all(rows, out_dir, copy_bw, plots=not args.no_plots)
    print(report.summary_table(rows))
    n_plots = sum(p.endswith(".png") for p in paths)
    print(f"wrote {paths[0]}, {paths[1]} and {n_plots} plots under {out_dir}")
    errors = [r for r in rows if r["metric"] == "error"]
    for r in errors:
        print(f"ERROR {r['op']} {r['provider']} {r['mode']} {r['shape']} {r['dtype']}: {r['note']}")
    if any(r["provider"].startswith("ours") for r in errors):
        sys.exit(1)  # our own kernels failing is a failure of the run, not a skip


if __name__ == "__main__":
    main()
