"""Test setup. Without a CUDA device, Triton kernels run under the interpreter, which must be
switched on before any Triton kernel module is imported."""

import os
import zlib

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
    # Fresh random inputs per test, reproducible per test id (crc32: stable across processes,
    # unlike hash()). Set SMART_KERNELS_TEST_SEED to vary all of them.
    base = int(os.environ.get("SMART_KERNELS_TEST_SEED", "0"))
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) + base) % (2**31))
