"""The benchmark harness runs end to end on tiny shapes (CPU): a CSV with the stable schema, a
markdown table, plots, and for every requested provider numbers or a stated skip reason; an
error in our own kernels fails the run. No speed is asserted."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import report  # noqa: E402
from benchmarks.bench_perturb import PERTURB_SEQUENCE, PERTURB_TOKEN  # noqa: E402
from benchmarks.bench_smart_step import SMART_STEP  # noqa: E402
from benchmarks.bench_sym_kl import KL, SYM_KL  # noqa: E402
from benchmarks.common import MIN_SAMPLES  # noqa: E402

# The published schema (README): changing it is a breaking change for whoever reads the CSVs.
SCHEMA = [
    "op", "provider", "mode", "shape", "dtype", "metric", "unit", "p50", "p20", "p80", "note",
    "device", "torch", "triton", "smart_kernels", "python", "git_commit", "timestamp",
]  # fmt: skip


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--device", "cpu", "--op",
         "sym_kl,kl,perturb_step,perturb_step_seq,smart_step", "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return out, rows, proc.stdout


def test_csv_schema(smoke_run):
    out, rows, _ = smoke_run
    with open(out / "results.csv") as f:
        header = next(csv.reader(f))
    assert header == SCHEMA == report.COLUMNS
    assert rows and all(r["device"] and r["torch"] and r["timestamp"] for r in rows)
    assert (out / "results.md").read_text().startswith("# smart_kernels benchmarks")
    assert any(p.suffix == ".png" for p in (out / "plots").iterdir())


def test_every_provider_has_numbers_or_a_reason(smoke_run):
    _, rows, _ = smoke_run
    assert not [r for r in rows if r["metric"] == "error"]
    for op in (SYM_KL, KL, PERTURB_TOKEN, PERTURB_SEQUENCE, SMART_STEP):
        for provider in {p.name for p in op.providers(torch.device("cpu"))}:
            for mode in op.modes:
                key = (op.name, provider, mode)
                mine = [r for r in rows if (r["op"], r["provider"], r["mode"]) == key]
                assert mine, key
                for r in mine:
                    if r["metric"] == "skipped":
                        assert r["note"], key
                    else:
                        assert float(r["p50"]) > 0 and r["unit"], r
    measured = {(r["op"], r["provider"]) for r in rows if r["metric"] == "time"}
    assert {("sym_kl", "ours-native"), ("sym_kl", "eager"), ("kl", "compile")} <= measured
    metrics = {r["metric"] for r in rows}
    assert {"time", "bandwidth", "pct_copy_bw", "speedup_vs_compile", "speedup_vs_eager",
            "peak_extra_mem"} <= metrics  # fmt: skip


def test_summary_printed(smoke_run):
    _, _, stdout = smoke_run
    assert "copy bandwidth" in stdout and "ours-native" in stdout


def test_a_failing_provider_of_ours_fails_the_run(tmp_path):
    """An error in our own kernels is an "error" row and a non-zero exit, never a skip."""
    code = (
        "import smart_kernels as sk\n"
        "def boom(*a, **k): raise RuntimeError('CUDA error: illegal memory access')\n"
        "sk.sym_kl = boom\n"
        "from benchmarks.harness import main\n"
        f"main(['--smoke', '--device', 'cpu', '--op', 'sym_kl', '--mode', 'fwd', '--provider', "
        f"'ours-native', '--out', {str(tmp_path)!r}, '--no-plots', '--no-progress'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert "ERROR sym_kl ours-native fwd" in proc.stdout
    with open(tmp_path / "results.csv") as f:
        assert any(r["metric"] == "error" for r in csv.DictReader(f))


def test_end_to_end_step_table(smoke_run):
    """smart_step gets its own table (ms, x smart-pytorch, / floor) in the markdown and on stdout;
    the ratios are those of the same run's times."""
    out, rows, stdout = smoke_run
    times = {(r["shape"], r["provider"]): float(r["p50"]) for r in rows
             if r["op"] == "smart_step" and r["metric"] == "time"}  # fmt: skip
    shapes = {s for s, _ in times}
    assert len(shapes) == 2  # the BERT and the GPT-2 (token-level logits) cases
    md = (out / "results.md").read_text()
    assert "## End-to-end step (smart_step)" in md
    for shape in shapes:
        cells = {}
        for line in md.splitlines():
            if line.startswith(f"| smart_step {shape} |"):
                c = [x.strip() for x in line.strip("|").split("|")]
                cells[c[2]] = c
        assert set(cells) == {
            "plain", "smart-pytorch", "ours-compat", "ours-paper", "floor", "floor-compat"
        }  # fmt: skip
        paper = cells["ours-paper"]  # case, dtype, provider, ms, n, peak, x smart-pt, / floor
        assert int(paper[4]) >= MIN_SAMPLES
        assert float(paper[6]) == pytest.approx(
            times[shape, "smart-pytorch"] / times[shape, "ours-paper"], abs=0.006
        )
        # each of ours over its own floor: ours-paper's passes include the teacher forward,
        # ours-compat's do not
        for ours, floor in (("ours-paper", "floor"), ("ours-compat", "floor-compat")):
            assert float(cells[ours][7]) == pytest.approx(
                times[shape, ours] / times[shape, floor], abs=0.006
            )
            assert cells[floor][7] == "1.00"
        assert cells["smart-pytorch"][6] == "1.00"
        assert cells["plain"][7] == cells["smart-pytorch"][7] == ""
    assert "x smart-pt" in stdout and "/ floor" in stdout
    again = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "--summary", str(out / "results.csv")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert again.strip() == stdout[stdout.index("op  ") : stdout.index("wrote")].strip()


def test_checkpoint_after_each_measurement(tmp_path):
    """run(checkpoint=...) hands over the rows so far after every measurement (a run killed by a
    time limit keeps what it finished); the last call holds all rows."""
    from benchmarks.harness import run

    seen: list[list[dict]] = []
    rows, _, _ = run([SYM_KL], ["fwd"], "smoke", torch.device("cpu"), 5.0, False,
                     {"eager", "ours-native"}, lambda r, bw: seen.append(r))  # fmt: skip
    n_cases = len(SYM_KL.cases(torch.device("cpu"), "smoke"))
    assert len(seen) == 2 * n_cases
    times = [sum(r["metric"] == "time" for r in s) for s in seen]
    assert times == list(range(1, 2 * n_cases + 1))
    assert seen[-1] == rows and all(r["device"] for r in rows)
    assert any(r["metric"] == "speedup_vs_eager" for r in seen[-1])


def test_cpu_peak_memory_counts_live_tensors():
    """On CPU the peak comes from the allocator's events: here y and z (4 MB each) are alive
    together, then y is freed before the third."""
    from benchmarks.common import peak_extra_bytes

    x = torch.randn(1000, 1000)

    def fn():
        y = x * 2
        z = y + 1
        del y
        return (z * 3).sum()

    peak = peak_extra_bytes(fn, torch.device("cpu"))
    assert 8_000_000 <= peak < 8_000_000 + 4096


def test_time_rows_record_samples_and_config(smoke_run):
    """Every time row says how many samples its quantiles come from (at least MIN_SAMPLES) and
    how the run was configured; the end-to-end step has no bandwidth rows (it has no minimal
    byte count)."""
    _, rows, _ = smoke_run
    times = [r for r in rows if r["metric"] == "time"]
    for r in times:
        n, config = r["note"].split("; ", 1)
        assert int(n.removeprefix("n=")) >= MIN_SAMPLES, r
        assert config.startswith("size=smoke; budget_ms=20; threads="), r
    assert {r["metric"] for r in rows if r["op"] == "smart_step"} & {
        "bandwidth", "pct_copy_bw"} == set()  # fmt: skip
    assert any(r["shape"] == "gpt2-smoke 2x8x128" for r in times)


def _main(argv: list[str]) -> None:
    from benchmarks.harness import main

    main([*argv, "--device", "cpu", "--no-plots", "--no-progress"])


def test_default_out_is_untracked(tmp_path, monkeypatch):
    """Without --out the results go to benchmarks/out/<device>/ (git-ignored), never over the
    committed benchmarks/results/."""
    from benchmarks import common

    monkeypatch.setattr(common, "ROOT", str(tmp_path))
    _main(["--smoke", "--op", "kl,kl", "--mode", "fwd", "--provider", "eager"])
    (written,) = (tmp_path / "benchmarks" / "out").iterdir()
    assert written.name == common.device_name(torch.device("cpu"))
    assert not (tmp_path / "benchmarks" / "results").exists()
    times = [r for r in report.read_csv(written / "results.csv") if r["metric"] == "time"]
    assert len(times) == len(KL.cases(torch.device("cpu"), "smoke"))  # --op kl,kl: once


def test_merge_keeps_rows_not_measured_again(tmp_path):
    """--merge keeps the earlier rows of keys this run does not measure, and replaces the rest."""
    args = ["--smoke", "--op", "kl", "--mode", "fwd", "--out", str(tmp_path)]
    _main([*args, "--provider", "eager,compile"])
    first = report.read_csv(tmp_path / "results.csv")
    _main([*args, "--provider", "eager", "--merge"])
    merged = report.read_csv(tmp_path / "results.csv")
    stamps = {
        p: {r["timestamp"] for r in merged if r["provider"] == p} for p in ("eager", "compile")
    }
    assert stamps["compile"] == {first[0]["timestamp"]}  # kept from the first run
    assert len(stamps["eager"]) == 1 and stamps["eager"] != stamps["compile"]  # replaced
    # ratios are within one run: eager's over compile (eager re-measured) and compile's over
    # eager (its baseline re-measured) are gone
    lost = [r for r in first if (r["provider"], r["metric"]) in
            {("eager", "speedup_vs_compile"), ("compile", "speedup_vs_eager")}]  # fmt: skip
    assert lost and len(merged) == len(first) - len(lost)
    _main([*args, "--provider", "eager"])  # no --merge: only this run's rows
    assert {r["provider"] for r in report.read_csv(tmp_path / "results.csv")} == {"eager"}


def test_case_filter(tmp_path):
    """--case keeps the cases whose label contains one of the given parts."""
    _main(["--smoke", "--op", "sym_kl,kl", "--mode", "fwd", "--provider", "eager", "--case",
           "3x257", "--out", str(tmp_path)])  # fmt: skip
    rows = report.read_csv(tmp_path / "results.csv")
    assert {(r["op"], r["shape"]) for r in rows} == {("sym_kl", "3x257"), ("kl", "3x257")}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--op", "smart_step", "--mode", "fwd"], "smart_step has modes full"),
        (["--op", "ema", "--mode", "bwd"], "ema has modes fwd"),
        (["--device", "meta"], "--device: expected cpu, cuda or cuda:<index>"),
        (["--device", "bogus"], "--device: expected cpu, cuda or cuda:<index>"),
        (["--budget-ms", "0"], "--budget-ms: expected a positive number"),
        (["--budget-ms", "-5"], "--budget-ms: expected a positive number"),
        (["--op", "nope"], "--op: unknown ['nope']"),
        (["--op", "kl", "--case", "4x3,9x9"], "--case: no smoke case of kl on cpu matches '9x9'"),
    ],
)
def test_harness_argument_errors(argv, message, capsys):
    from benchmarks.harness import main

    with pytest.raises(SystemExit) as exc:
        main(["--smoke", "--no-progress", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_report_cli(tmp_path, capsys):
    """report: clear usage errors; --merge-into merges a fetched CSV into a results folder."""
    from benchmarks.report import main

    required = "the following arguments are required: csv"
    for argv, message in (([], required), ([str(tmp_path / "none.csv")], "no such file"),
                          (["--summary"], required)):  # fmt: skip
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
    _main(["--smoke", "--op", "kl", "--mode", "fwd", "--provider", "eager", "--out",
           str(tmp_path / "a")])  # fmt: skip
    _main(["--smoke", "--op", "sym_kl", "--mode", "fwd", "--provider", "eager", "--out",
           str(tmp_path / "b")])  # fmt: skip
    main([str(tmp_path / "b" / "results.csv"), "--merge-into", str(tmp_path / "a"), "--no-plots"])
    merged = report.read_csv(tmp_path / "a" / "results.csv")
    assert {r["op"] for r in merged} == {"kl", "sym_kl"}
    md = (tmp_path / "a" / "results.md").read_text()
    assert "| kl | 4x3 | float32 | fwd | eager |" in md
    assert "| sym_kl | 4x3 | float32 | fwd | eager |" in md
    assert "size=smoke; budget_ms=20" in md  # the runs' settings in the header


def test_min_samples_when_a_call_outlasts_the_budget(monkeypatch):
    """A call longer than the budget still gets MIN_SAMPLES samples: on CPU (blocks topped up)
    and on CUDA (a second do_bench for the missing samples; faked here, no GPU needed)."""
    import time

    from benchmarks.common import time_call

    t = time_call(lambda: time.sleep(0.004), torch.device("cpu"), budget_ms=1)
    assert t.n >= MIN_SAMPLES and 4 <= t.p50 < 40
    triton_testing = pytest.importorskip("triton.testing", reason="the CUDA half fakes do_bench")
    calls = []

    def fake_do_bench(fn, warmup, rep, grad_to_none, return_mode):
        # like triton's: int(rep / estimate) samples, the estimate (here 13 ms) from other calls
        # than the samples (10 ms)
        assert return_mode == "all"
        calls.append(rep)
        return [10.0] * max(1, int(rep / 13.0))

    monkeypatch.setattr(triton_testing, "do_bench", fake_do_bench)
    t = time_call(lambda: None, torch.device("cuda"), budget_ms=5)
    assert t.n >= MIN_SAMPLES and t.p50 == 10.0 and calls[0] == 5


def test_merge_keeps_ratios_within_one_run():
    """A re-measured baseline drops the old ratios against it; a provider skipped in the new run
    (not installed there) keeps its old numbers; an error replaces them."""

    def rows(provider, stamp, metric="time", p50="1", base=None):
        key = {"op": "kl", "provider": provider, "mode": "fwd", "shape": "4x3", "dtype": "float32"}
        r = {**key, "metric": metric, "p50": p50, "note": "", "timestamp": stamp, "device": "cpu-2"}
        return [r] if base is None else [r, {**r, "metric": f"speedup_vs_{base}"}]

    old = rows("compile", "t1") + rows("eager", "t1", base="compile") + rows("liger", "t1")
    old += rows("ours-native", "t1")
    new = rows("compile", "t2") + rows("liger", "t2", "skipped", "")
    new += rows("ours-native", "t2", "error", "")
    merged = report.merge(old, new)
    got = {(r["provider"], r["metric"], r["timestamp"]) for r in merged}
    assert got == {("compile", "time", "t2"), ("eager", "time", "t1"), ("liger", "time", "t1"),
                   ("ours-native", "error", "t2")}  # fmt: skip
    assert report.same_device(old, [{"device": "cuda-x"}]) is not None
    assert report.same_device(old, [{"device": "cpu-2"}]) is None


def test_compare_two_runs(tmp_path, capsys):
    """report --compare: new / old time for every key in both, the largest ratio first, flagged
    past 1.1; keys in one file only are counted."""

    def row(provider, ms, stamp):
        key = {"op": "kl", "provider": provider, "mode": "fwd", "shape": "4x3", "dtype": "float32"}
        return {**key, "metric": "time", "p50": str(ms), "timestamp": stamp, "device": "cpu-2"}

    old = [row("eager", 2.0, "t1"), row("ours-native", 1.0, "t1"), row("compile", 3.0, "t1")]
    new = [row("eager", 2.0, "t2"), row("ours-native", 1.5, "t2"), row("liger", 1.0, "t2")]
    lines = report.compare_table(new, old).splitlines()
    assert "ours-native" in lines[1] and lines[1].split()[-2:] == ["1.50", "slower"]
    assert "eager" in lines[2] and lines[2].split()[-1] == "1.00"
    assert lines[-1] == "2 timed in both; 1 only in the new results, 1 only in the old"
    for name, rows in (("new", new), ("old", old)):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=report.COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    report.main([str(tmp_path / "new.csv"), "--compare", str(tmp_path / "old.csv")])
    assert "slower" in capsys.readouterr().out


def test_interleaved_rounds():
    """time_interleaved: every callable warmed up, then rounds of one call each with the first
    rotating, until MIN_SAMPLES and the budget (per callable) are reached; a callable that
    raises is dropped and reported, the others go on."""
    import time

    from benchmarks.common import WARMUP_CALLS, time_interleaved

    log: list[str] = []

    def step(name: str, ms: float):
        def fn():
            log.append(name)
            time.sleep(ms / 1e3)

        return fn

    def broken():
        log.append("c")
        if log.count("c") > WARMUP_CALLS + 2:  # fails in its third round
            raise RuntimeError("CUDA error: out of memory")

    fns = {"a": step("a", 2.0), "b": step("b", 4.0), "c": broken}
    timings, errors = time_interleaved(fns, torch.device("cpu"), budget_ms=60)
    w = WARMUP_CALLS
    assert log[: 3 * w] == ["a"] * w + ["b"] * w + ["c"] * w
    rounds = log[3 * w :]
    assert rounds[:9] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # the first rotates
    assert "c" not in rounds[9:] and set(timings) == {"a", "b"}
    assert errors == {"c": "RuntimeError: CUDA error: out of memory"}
    a, b = timings["a"], timings["b"]
    assert a.n >= MIN_SAMPLES and abs(a.n - b.n) <= 1
    assert 1.3 < b.p50 / a.p50 < 2.5 and a.p50 >= 2
    assert a.n * a.p50 + b.n * b.p50 >= 0.9 * 60 * 2  # the budget: 60 ms per callable


def test_interleaved_op_rows(monkeypatch):
    """An ``interleave`` op: one row set per provider in the providers' order, a skip row for
    a provider not installed, an error row for one whose warm-up fails, times for the rest."""
    from benchmarks import harness
    from benchmarks.spec import Case, OpBench, Provider

    def ok(x):
        return (x * 2).sum()

    def boom(x):
        raise RuntimeError("CUDA error: illegal memory access")

    op = OpBench(
        "fake_step", lambda d, s: [Case((4, 3), torch.float32)],
        lambda c, d: [torch.randn(c.shape, requires_grad=True)],
        lambda d: [Provider("plain", ok), Provider("missing", skip="not installed"),
                   Provider("ours-x", boom), Provider("ours-y", ok)],
        lambda c, m: 1 << 30, modes=("full",), bandwidth=False, interleave=True,
    )  # fmt: skip
    rows = harness.measure_interleaved(
        op, op.cases(None, "smoke")[0], op.providers(None), "full", torch.device("cpu"),
        copy_bw=1.0, budget_ms=5,
    )  # fmt: skip
    kinds = [(r["provider"], r["metric"]) for r in rows]
    assert kinds == [
        ("plain", "time"), ("plain", "peak_extra_mem"), ("missing", "skipped"),
        ("ours-x", "error"), ("ours-y", "time"), ("ours-y", "peak_extra_mem"),
    ]  # fmt: skip
    assert "illegal memory access" in rows[3]["note"]
    assert all(int(report._split_time_note(r["note"])[0]) >= MIN_SAMPLES
               for r in rows if r["metric"] == "time")  # fmt: skip

    def sticky(*args, **kwargs):  # e.g. a CUDA error that every later synchronisation raises
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(harness.common, "time_interleaved", sticky)
    rows = harness.measure_interleaved(
        op, op.cases(None, "smoke")[0], op.providers(None), "full", torch.device("cpu"),
        copy_bw=1.0, budget_ms=5,
    )  # fmt: skip
    assert [(r["provider"], r["metric"]) for r in rows] == [
        ("plain", "error"), ("missing", "skipped"), ("ours-x", "error"), ("ours-y", "error"),
    ]  # fmt: skip
    assert "illegal memory access was encountered" in rows[-1]["note"]
