"""The benchmark harness runs end to end on tiny shapes (CPU): a CSV with the stable schema, a
markdown table, and for every requested provider numbers or a stated skip reason. No speed is
asserted."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import report  # noqa: E402
from benchmarks.bench_sym_kl import sym_kl_providers  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--device", "cpu", "--op", "sym_kl",
         "--mode", "fwd,full", "--out", str(out), "--no-progress"],
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
    assert header == report.COLUMNS
    assert rows and all(r["device"] and r["torch"] and r["timestamp"] for r in rows)
    assert (out / "results.md").read_text().startswith("# smart_kernels benchmarks")
    assert any(p.suffix == ".png" for p in (out / "plots").iterdir())


def test_every_provider_has_numbers_or_a_reason(smoke_run):
    _, rows, _ = smoke_run
    import torch

    expected = {p.name for p in sym_kl_providers(torch.device("cpu"))}
    for provider in expected:
        for mode in ("fwd", "full"):
            mine = [r for r in rows if r["provider"] == provider and r["mode"] == mode]
            assert mine, (provider, mode)
            for r in mine:
                if r["metric"] == "skipped":
                    assert r["note"], (provider, mode)
                else:
                    assert float(r["p50"]) >= 0 and r["unit"], r
    times = [r for r in rows if r["metric"] == "time" and r["provider"] == "ours-native"]
    assert times and all(float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]) for r in times)
    assert {r["metric"] for r in rows} >= {
        "time",
        "bandwidth",
        "pct_copy_bw",
        "speedup_vs_compile",
        "speedup_vs_eager",
    }


def test_summary_printed(smoke_run):
    _, _, stdout = smoke_run
    assert "copy bandwidth" in stdout and "ours-native" in stdout
