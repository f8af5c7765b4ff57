"""Backend availability and choice (DESIGN §2): every backend reports usable or a reason."""

from __future__ import annotations

import torch

import smart_kernels as sk
from smart_kernels import _backends


def test_backends_lists_all_with_reasons():
    info = sk.backends()
    assert set(info) == {"reference", "native", "triton"}
    assert info["reference"].cpu is None
    for b in info.values():
        for reason in (b.cpu, b.cuda):
            assert reason is None or (isinstance(reason, str) and reason)


def test_auto_on_cpu_prefers_native():
    expected = "native" if sk.backends()["native"].cpu is None else "reference"
    assert _backends.choose("sym_kl", None, torch.device("cpu")) == expected


def test_native_cpu_is_built_in_ci():
    """CI builds the C++ extension: a broken build must fail here, not silently fall back."""
    assert sk.backends()["native"].cpu is None, sk.backends()["native"].cpu
