"""The demo's ``--dataset`` loader (examples/finetune_smart.py ``load_hf_dataset``) on a stand-in
``datasets`` module (no download, no datasets install): which load_dataset calls it makes, sentence
pairs, ClassLabel and integer labels, GLUE's unlabelled test rows, the evaluation split it picks,
a held-out part of train when there is none, and clear exits for unusable datasets."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _demo():
    path = ROOT / "examples" / "finetune_smart.py"
    spec = importlib.util.spec_from_file_location("finetune_smart", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("finetune_smart", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


demo = _demo()


class ClassLabel:
    def __init__(self, names):
        self.names = names


class Value:
    def __init__(self, dtype):
        self.dtype = dtype


class Table:
    """The slice of datasets.Dataset the loader uses: column_names, features, table[column]."""

    def __init__(self, features: dict, **columns: list):
        self.columns = columns
        self.column_names = list(columns)
        self.features = features

    def __getitem__(self, column: str) -> list:
        return self.columns[column]


def rte_like(n: int, *, labels=None, feature=None, texts=("sentence1", "sentence2")) -> Table:
    labels = [i % 2 for i in range(n)] if labels is None else labels
    cols = {c: [f"{c} {i}" for i in range(n)] for c in texts}
    feature = ClassLabel(["entailment", "not_entailment"]) if feature is None else feature
    return Table({"label": feature}, **cols, label=labels)


@pytest.fixture
def fake_datasets(monkeypatch):
    """Installs a stand-in ``datasets``; ``fake.data`` is what load_dataset returns for any
    call in ``fake.accept`` (others raise, as an unknown name would), ``fake.calls`` the calls."""
    fake = types.ModuleType("datasets")
    fake.calls, fake.accept, fake.data = [], set(), {}

    def load_dataset(*call):
        fake.calls.append(call)
        if call not in fake.accept:
            raise FileNotFoundError(f"no dataset {call}")
        return fake.data

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    return fake


def test_glue_name_pairs_and_validation_split(fake_datasets):
    fake_datasets.accept = {("glue", "rte")}
    fake_datasets.data = {
        "train": rte_like(20),
        "validation": rte_like(6),
        "test": rte_like(5, labels=[-1] * 5),  # GLUE: unlabelled
    }
    train, held, names, name = demo.load_hf_dataset("glue/rte", 8, 4, seed=0)
    assert fake_datasets.calls == [("glue", "rte")]
    assert names == ("entailment", "not_entailment") and name == "glue/rte"
    assert len(train.labels) == 8 and len(held.labels) == 4
    assert all(len(t) == 2 and t[0].startswith("sentence1") for t in train.texts)
    # held out = the validation split (its texts end in 0..5), never train's
    validation = {f"sentence1 {i}" for i in range(6)}
    assert {t[0] for t in held.texts} <= validation
    # the same seed, the same subsets; texts stay with their labels
    again = demo.load_hf_dataset("glue/rte", 8, 4, seed=0)[0]
    assert again.texts == train.texts and again.labels == train.labels
    for (text, _), y in zip(train.texts, train.labels, strict=True):
        assert int(text.split()[1]) % 2 == y


def test_no_labelled_evaluation_split_holds_out_part_of_train(fake_datasets, tmp_path):
    fake_datasets.accept = {(str(tmp_path),)}
    fake_datasets.data = {
        "train": rte_like(30, feature=Value("int64"), texts=("text",)),
        "test": rte_like(5, labels=[-1] * 5, texts=("text",)),
    }
    train, held, names, _ = demo.load_hf_dataset(str(tmp_path), 10, 6, seed=1)
    assert fake_datasets.calls == [(str(tmp_path),)]  # a local folder: load_dataset(path)
    assert names == ("0", "1")  # integer labels without names
    assert len(train.labels) == 10 and len(held.labels) == 6
    assert not {t for t in train.texts} & {t for t in held.texts}


def test_unusable_datasets_exit_with_a_reason(fake_datasets):
    with pytest.raises(SystemExit, match=r"cannot load --dataset(.|\n)*no dataset"):
        demo.load_hf_dataset("org/missing", 4, 4, seed=0)
    assert fake_datasets.calls == [("org", "missing"), ("org/missing",)]
    fake_datasets.accept = {("org", "reg")}
    fake_datasets.data = {"train": rte_like(8, labels=[0.5] * 8, feature=Value("float32"))}
    with pytest.raises(SystemExit, match="not a class label"):
        demo.load_hf_dataset("org/reg", 4, 4, seed=0)
    fake_datasets.data = {"train": rte_like(8, texts=("tokens",))}
    with pytest.raises(SystemExit, match="expected a 'label' column and text columns"):
        demo.load_hf_dataset("org/reg", 4, 4, seed=0)
    fake_datasets.data = {"validation": rte_like(8)}
    with pytest.raises(SystemExit, match="no train split"):
        demo.load_hf_dataset("org/reg", 4, 4, seed=0)
