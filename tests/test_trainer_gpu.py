"""SmartTrainer on a CUDA device with bf16 autocast (TrainingArguments(bf16=True)): the three
tasks train, R_s and D_Breg are finite and positive, the teacher lives on the GPU in fp32 and is
updated once per optimizer step. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from test_trainer import TASKS, train_and_check  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("task", TASKS)
def test_trains_on_cuda_under_bf16_autocast(tmp_path, task):
    trainer = train_and_check(tmp_path, task, use_cpu=False, bf16=True)
    assert all(p.is_cuda and p.dtype == torch.float32 for p in trainer.teacher.parameters())
