"""Test setup. Without a CUDA device, Triton kernels run under the interpreter, which must be
switched on before any Triton kernel module is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs per test, reproducible per test id.
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
