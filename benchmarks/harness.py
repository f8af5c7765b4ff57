"""The benchmark harness: one command, every op and provider, a CSV with a stable schema, a
markdown table and plots.

    python -m benchmarks [--op sym_kl,kl|all] [--mode fwd,bwd,full] [--quick|--smoke]
                         [--provider P,..] [--case LABEL_PART,..] [--device cpu|cuda]
                         [--out DIR] [--merge]

Every requested provider yields numbers, a row saying why it was skipped, or an "error" row (the
exit status is non-zero when one of ours errors). Tiny (launch-bound) cases are timed back to
back rather than with L2 flushes between calls. ``fwd`` is a training forward (inputs require
grad); ``bwd`` repeats the backward of one retained graph; ``full`` is forward + backward.
Timing: median and p20/p80 of at least 5 samples (``benchmarks/common.py``); effective bandwidth
from each op's minimal byte count, and its % of the copy bandwidth measured at the start of the
same run; peak memory above the inputs (MiB).

Output goes to benchmarks/out/<device>/ (not tracked) unless ``--out`` names a directory; the CSV
and markdown are rewritten after every measurement (a run stopped by a time limit keeps what it
finished; an ``interleave`` op's measurement is a whole case, all its providers). ``--merge``
keeps the rows already in that directory's results.csv and replaces only those this run measures
again (same op, provider, mode, shape, dtype): the way to update the committed results, e.g.
``--out benchmarks/results/cpu-2cores --merge``.
"""

from __future__ import annotations

import argparse
import gc
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


def _key(op: OpBench, case: Case, provider: Provider, mode: str) -> dict:
    return {"op": op.name, "provider": provider.name, "mode": mode, "shape": case.label,
            "dtype": case.dtype_name}  # fmt: skip


def _not_run(provider: Provider, mode: str) -> str | None:
    """Why ``provider`` is not timed in ``mode`` (not installed, not comparable), or None."""
    if provider.skip is not None:
        return provider.skip
    if provider.modes is not None and mode not in provider.modes:
        return provider.why_not
    return None


def _rows(
    op: OpBench, case: Case, key: dict, mode: str, t: common.Timing, peak: int | None,
    copy_bw: float, config: str,
) -> list[dict]:  # fmt: skip
    """The time row (its note: the sample count and ``config``), bandwidth rows (ops with a
    minimal byte count) and the peak-memory row of one measurement."""
    rows = [
        {
            **report.row(key, "time", "ms", t.p50, t.p20, t.p80),
            "note": report.time_note(t.n, config),
        }
    ]
    if op.bandwidth:
        nbytes = op.min_bytes(case, mode)
        gbps = [nbytes / (max(ms, 1e-9) * 1e-3) / 1e9 for ms in (t.p50, t.p80, t.p20)]
        rows += [
            report.row(key, "bandwidth", "GB/s", *gbps),
            report.row(key, "pct_copy_bw", "%", *(100 * g / copy_bw for g in gbps)),
        ]
    if peak is not None:
        rows.append(report.row(key, "peak_extra_mem", "MiB", peak / 2**20))
    return rows


def _release(device: torch.device) -> None:
    gc.collect()  # inputs that form reference cycles (smart_step's models) go now, not later
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(
    op: OpBench, case: Case, provider: Provider, mode: str, device: torch.device,
    copy_bw: float, budget_ms: float, config: str = "",
) -> list[dict]:  # fmt: skip
    """Result rows (report.COLUMNS minus the environment) for one op/case/provider/mode; the time
    row's note holds the sample count and ``config`` (e.g. "n=12; size=quick; ...")."""
    key = _key(op, case, provider, mode)
    why_not = _not_run(provider, mode)
    if why_not is not None:
        return [report.skip_row(key, why_not)]
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
        return [report.error_row(key, common.error_text(exc))]
    finally:
        inputs = fn = grads = None
        _release(device)
    return _rows(op, case, key, mode, t, peak, copy_bw, config)


def measure_interleaved(
    op: OpBench, case: Case, providers: list[Provider], mode: str, device: torch.device,
    copy_bw: float, budget_ms: float, config: str = "",
) -> list[dict]:  # fmt: skip
    """``measure`` for every provider of one op/case/mode at once (``op.interleave``): each gets
    its own inputs, all alive together, and ``common.time_interleaved`` times them in
    alternating rounds; then the peak memory of each. A provider that fails gets an error row,
    the others go on. Rows in the providers' order."""
    keys = {p.name: _key(op, case, p, mode) for p in providers}
    out: dict[str, list[dict]] = {}
    fns: dict[str, Callable[[], None]] = {}
    try:
        for p in providers:
            why_not = _not_run(p, mode)
            if why_not is not None:
                out[p.name] = [report.skip_row(keys[p.name], why_not)]
                continue
            try:
                fn, grads = _mode_callable(p, op.make_inputs(case, device), mode)
                fns[p.name] = common.with_grads_reset(fn, grads)
            except Exception as exc:
                out[p.name] = [report.error_row(keys[p.name], common.error_text(exc))]
        try:
            timings, errors = common.time_interleaved(fns, device, budget_ms=budget_ms)
        except Exception as exc:  # not one provider's: every one still running gets it
            timings, errors = {}, dict.fromkeys(fns, common.error_text(exc))
        for name, t in timings.items():
            try:
                peak = common.peak_extra_bytes(fns[name], device)
            except Exception as exc:
                errors[name] = common.error_text(exc)
                continue
            out[name] = _rows(op, case, keys[name], mode, t, peak, copy_bw, config)
        for name, message in errors.items():
            out[name] = [report.error_row(keys[name], message)]
    finally:
        fn = grads = fns = timings = errors = None
        _release(device)
    return [r for p in providers if p.name in out for r in out[p.name]]


def run(
    ops: list[OpBench], modes: list[str], size: str, device: torch.device,
    budget_ms: float, progress: bool = True, only: set[str] | None = None,
    checkpoint: Callable[[list[dict], float], None] | None = None,
    case_filter: list[str] | None = None,
) -> tuple[list[dict], dict[str, str], float]:  # fmt: skip
    """All measurements; ``checkpoint(rows, copy_bw)``, if given, gets the rows so far after each
    one (so a run killed by a time limit still leaves its finished measurements);
    ``case_filter``: only the cases whose label contains one of these strings."""
    env = common.environment(device)
    config = run_config(size, budget_ms)
    copy_bw = common.copy_bandwidth_gbps(device)
    print(
        f"== smart_kernels benchmarks on {env['device']} | torch {env['torch']} | triton "
        f"{env['triton'] or '-'} | smart_kernels {env['smart_kernels'] or '-'} | commit "
        f"{env['git_commit'] or '-'} | copy bandwidth {copy_bw:.0f} GB/s (measured)",
        flush=True,
    )
    jobs = []  # (op, case, providers measured together, mode)
    for op in ops:
        providers = [p for p in op.providers(device) if only is None or p.name in only]
        for case in _cases(op, device, size, case_filter):
            for mode in modes:
                if mode in op.modes:
                    together = [providers] if op.interleave else [[p] for p in providers]
                    jobs += [(op, case, ps, mode) for ps in together]
    rows = []
    bar = _progress(jobs, progress)
    for op, case, ps, mode in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{op.name} {case.label} {','.join(p.name for p in ps)} {mode}")
        if op.interleave:
            rows += measure_interleaved(op, case, ps, mode, device, copy_bw, budget_ms, config)
        else:
            rows += measure(op, case, ps[0], mode, device, copy_bw, budget_ms, config)
        if checkpoint is not None:
            checkpoint(_finish(rows, env), copy_bw)
    return _finish(rows, env), env, copy_bw


def _cases(op: OpBench, device: torch.device, size: str, case_filter: list[str] | None):
    cases = op.cases(device, size)
    return [c for c in cases if case_filter is None or any(f in c.label for f in case_filter)]


def run_config(size: str, budget_ms: float) -> str:
    """What the run was asked for, recorded with every time row: the case set, the timing budget,
    the intra-op threads, and the settings that change which code runs."""
    parts = [f"size={size}", f"budget_ms={budget_ms:g}", f"threads={torch.get_num_threads()}"]
    for var in ("TRITON_INTERPRET", "SMART_KERNELS_BACKEND", "SMART_KERNELS_CPU_ISA"):
        if os.environ.get(var):
            parts.append(f"{var}={os.environ[var]}")
    return "; ".join(parts)


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


def _parse_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu, cuda or cuda:<index>, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {name}: no CUDA device visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def main(argv: list[str] | None = None, default_ops: str = "all") -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    known = all_ops()
    parser.add_argument("--op", default=default_ops,
                        help=f"comma-separated, or all (default {default_ops}): "
                             f"{', '.join(known)}")  # fmt: skip
    parser.add_argument("--mode", default=",".join(MODES), help="comma-separated: fwd,bwd,full")
    parser.add_argument(
        "--provider",
        default=None,
        help="comma-separated provider names (default: all of each op's)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    size.add_argument("--smoke", action="store_true", help="tiny shapes (tests)")
    parser.add_argument("--case", default=None,
                        help="comma-separated parts of case labels: only the cases whose label "
                             "contains one (e.g. gpt2, 4096x32000)")  # fmt: skip
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:<index> (default: cuda if visible)",
    )
    parser.add_argument("--out", default=None, help="default: benchmarks/out/<device>/")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows already in OUT/results.csv that this run does not "
                             "measure again")  # fmt: skip
    parser.add_argument(
        "--budget-ms",
        type=float,
        default=None,
        help="timing budget per measurement, ms (default 200; --quick 100, "
        "--smoke 20); at least 5 samples are taken whatever it is",
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    names = list(known) if args.op == "all" else [n.strip() for n in args.op.split(",")]
    names = list(dict.fromkeys(names))  # --op kl,kl measures kl once
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"--op: unknown {unknown}; available: {sorted(known)}")
    modes = list(dict.fromkeys(m.strip() for m in args.mode.split(",")))
    if any(m not in MODES for m in modes):
        parser.error(f"--mode: expected some of {MODES}, got {args.mode!r}")
    if args.op != "all":  # an op named explicitly must have one of the modes asked for
        for n in names:
            if not set(modes) & set(known[n].modes):
                parser.error(f"--mode {args.mode}: {n} has modes {', '.join(known[n].modes)}")
    names = [n for n in names if set(modes) & set(known[n].modes)]
    if not names:
        parser.error(f"--mode {args.mode}: no op of --op {args.op} has it")
    device = _parse_device(parser, args.device)
    size_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.budget_ms is not None and not args.budget_ms > 0:
        parser.error(f"--budget-ms: expected a positive number of ms, got {args.budget_ms:g}")
    budget = args.budget_ms or (20.0 if args.smoke else 100.0 if args.quick else 200.0)

    only = None if args.provider is None else {p.strip() for p in args.provider.split(",")}
    if only is not None:
        available = {p.name for n in names for p in known[n].providers(device)}
        if only - available:
            parser.error(f"--provider: unknown {sorted(only - available)}; "
                         f"available: {sorted(available)}")  # fmt: skip
    case_filter = None if args.case is None else [c.strip() for c in args.case.split(",")]
    if case_filter is not None:
        labels = [c.label for n in names for c in known[n].cases(device, size_name)]
        for part in case_filter:
            if not any(part in label for label in labels):
                parser.error(
                    f"--case: no {size_name} case of {', '.join(names)} on {device.type} "
                    f"matches {part!r}; cases: {', '.join(dict.fromkeys(labels))}"
                )
    out_dir = args.out or os.path.join(
        common.ROOT, "benchmarks", "out", common.device_name(device).replace(" ", "_")
    )
    kept = report.read_csv(os.path.join(out_dir, "results.csv")) if args.merge else []
    why_not = report.same_device(kept, [{"device": common.device_name(device)}])
    if why_not:
        parser.error(f"--merge into {out_dir}: {why_not}")

    def checkpoint(rows: list[dict], copy_bw: float) -> None:  # CSV + markdown, no plots
        report.write_all(report.merge(kept, rows), out_dir, plots=False)

    ops = [known[n] for n in names]
    new, _, _ = run(
        ops, modes, size_name, device, budget, not args.no_progress, only, checkpoint, case_filter
    )
    rows = report.merge(kept, new)
    paths = report.write_all(rows, out_dir, plots=not args.no_plots)
    print(report.summary_table(rows))
    errors = [r for r in new if r["metric"] == "error"]
    for r in errors:
        print(f"ERROR {r['op']} {r['provider']} {r['mode']} {r['shape']} {r['dtype']}: {r['note']}")
    n_plots = sum(p.endswith(".png") for p in paths)
    this_run = set(map(id, new))  # merge passes this run's rows through as they are
    n_kept = sum(id(r) not in this_run for r in rows)
    print(f"wrote {paths[0]}, {paths[1]} and {n_plots} plots under {out_dir}"
          + (f" (with {n_kept} earlier rows kept)" if kept else ""))  # fmt: skip
    if any(r["provider"].startswith("ours") for r in errors):
        sys.exit(1)  # our own kernels failing is a failure of the run, not a skip


if __name__ == "__main__":
    main()
