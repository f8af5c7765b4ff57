"""Measurement primitives: timing (``triton.testing.do_bench`` on CUDA, ``torch.utils.benchmark``
on CPU), peak extra memory, the device's copy bandwidth, and the run's environment.
Benchmarks report; they never assert."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


MIN_SAMPLES = 5  # timed samples per measurement, whatever the budget (quantiles of fewer lie)


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles of ``n`` samples (a sample
    is one call, or the mean of a block of calls)."""

    p50: float
    p20: float
    p80: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        return cls(*(_quantile(samples, q) for q in (0.5, 0.2, 0.8)), len(samples))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{os.cpu_count()}cores"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def error_text(exc: BaseException) -> str:
    """An error as a result row's note: "Type: first line of the message" (at most 300
    characters)."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def with_grads_reset(fn: Callable[[], object], grads: Sequence[torch.Tensor]) -> Callable[[], None]:
    """``fn`` preceded by ``x.grad = None`` for each of ``grads`` (repeated backward calls then
    write their gradients afresh instead of accumulating)."""

    def call() -> None:
        for x in grads:
            x.grad = None
        fn()

    return call


def time_call(
    fn: Callable[[], object],
    device: torch.device,
    *,
    grad_to_none: Sequence[torch.Tensor] = (),
    budget_ms: float = 200.0,
    launch_bound: bool = False,
) -> Timing:
    """Time ``fn`` after warm-up: at least MIN_SAMPLES samples, more while ``budget_ms`` lasts.
    CUDA: ``triton.testing.do_bench``, which also clears the L2 cache before every call (so large
    inputs are never served from L2); a call longer than the budget allows for MIN_SAMPLES gets
    more do_bench calls for the missing samples (up to 3). With ``launch_bound`` (tiny inputs)
    the calls run back to back instead, in batches timed by CUDA events: do_bench's L2 clearing
    would hide the host's launch overhead, which is what such a call costs in training.
    CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (per-block means, all intra-op
    threads), topped up with blocks of the same size timed by ``time.perf_counter``; caches are
    not flushed on CPU."""

    call = with_grads_reset(fn, grad_to_none)
    if device.type == "cuda" and not launch_bound:
        from triton.testing import do_bench

        def bench(warmup: float, rep: float) -> list[float]:
            grads = list(grad_to_none) or None
            return list(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grads, return_mode="all"))

        times = bench(max(budget_ms / 4, 5), budget_ms)
        for _ in range(3):  # do_bench times int(rep / its estimate) calls, at least one
            if len(times) >= MIN_SAMPLES:
                break
            times += bench(1e-3, (MIN_SAMPLES - len(times) + 0.5) * 1.25 * max(times))
        return Timing.of(times)
    if device.type == "cuda":
        for _ in range(10):
            call()
        sync(device)
        means = []
        for _ in range(15):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                call()
            end.record()
            end.synchronize()
            means.append(start.elapsed_time(end) / 50)
        return Timing.of(means)
    from torch.utils import benchmark

    call()  # warm-up
    # Timer defaults to one thread: measure with the threads a user's process has.
    timer = benchmark.Timer(
        stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads()
    )
    m = timer.blocked_autorange(min_run_time=budget_ms / 1e3)
    times = [t * 1e3 for t in m.times]
    while len(times) < MIN_SAMPLES:  # a call longer than the budget: autorange ran one block
        start = time.perf_counter()  # (Timer.timeit would add untimed warm-up calls)
        for _ in range(m.number_per_run):
            call()
        times.append((time.perf_counter() - start) / m.number_per_run * 1e3)
    return Timing.of(times)


WARMUP_CALLS = 2  # per callable before time_interleaved's rounds (compiles, allocator growth)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, *, budget_ms: float
) -> tuple[dict[str, Timing], dict[str, str]]:
    """Time several long calls (whole training steps) against each other: after WARMUP_CALLS
    each, rounds that call every one once, the first of the round rotating, each call timed
    alone by the wall clock between two device synchronisations (its host overhead counts, as
    it does in training). Rounds go on until every callable has MIN_SAMPLES samples and the
    remaining callables' calls have taken ``budget_ms`` each on average.

    Timed one after another, each for its own budget, long calls land on whatever state the
    host and GPU are in then (an H100 machine measured one step 112 ms and, minutes later,
    144 ms); interleaved, a drift falls on all of them alike, so their ratios hold.

    Returns (timings, errors): a callable that raises (a failing synchronisation included) is
    dropped from the rounds and its error returned under its name as "Type: first line" (a
    string: a kept exception's traceback would keep every callable's inputs alive)."""
    errors: dict[str, str] = {}

    def timed(name: str) -> float | None:
        try:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
        except Exception as exc:  # the sweep goes on without it
            errors[name] = error_text(exc)
            return None
        return (time.perf_counter() - start) * 1e3

    for name in fns:
        for _ in range(WARMUP_CALLS):
            if name not in errors:
                timed(name)
    samples: dict[str, list[float]] = {n: [] for n in fns if n not in errors}

    def more() -> bool:
        if not samples:
            return False
        short = min(map(len, samples.values())) < MIN_SAMPLES
        return short or sum(map(sum, samples.values())) < budget_ms * len(samples)

    turn = 0
    while more():
        names = list(samples)
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            ms = timed(name)
            if ms is None:
                del samples[name]
            else:
                samples[name].append(ms)
        turn += 1
    return {n: Timing.of(s) for n, s in samples.items()}, errors


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak tensor memory during ``fn`` above what was allocated before it: CUDA from the
    caching allocator's statistics; CPU from the allocator's events under the profiler
    (``profile_memory``: every allocation and free, in order; the running sum's maximum; a free
    of a block allocated before ``fn`` is not reported, so the CPU figure can over-count by
    those); None on other devices."""
    if device.type == "cpu":
        return _cpu_peak_extra_bytes(fn)
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null (the C++ profiler logs "USDT ... profiler_start/stop" lines
    there on every use, with no setting to turn them off)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_extra_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    # fn has run (warm-up, timing) before this call: its own messages were seen then.
    with (
        _stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    cpu = torch._C._autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == cpu]  # fmt: skip
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # < 0 for a free
        peak = max(peak, live)
    return peak


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth, bytes read + written per second, in GB/s (a large copy: DRAM / HBM,
    not a cache; on CPU, where caches are not flushed between calls, a case small enough to stay
    in the last-level cache can exceed 100% of it)."""
    if device.type == "cpu":
        nbytes = min(nbytes, 256 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_call(lambda: dst.copy_(src), device, budget_ms=300).p50
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def git_commit() -> str:
    """``git describe --always --dirty`` of the checkout; ``SMART_KERNELS_GIT_COMMIT`` overrides
    it where the checkout's .git is absent or stale (a copied working tree on a GPU machine)."""
    override = os.environ.get("SMART_KERNELS_GIT_COMMIT", "").strip()
    if override:
        return override
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
            timeout=10,
        )  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> dict[str, str]:
    """What a results row records about the run."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "smart_kernels": _version("smart_kernels"),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
