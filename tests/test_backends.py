"""Backend availability and choice (DESIGN §2): every backend reports usable or a reason."""

from __future__ import annotations

import pytest
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


def test_other_device_types():
    """Tensors on a device without kernels: auto gives the reference, explicit kernels refuse."""
    meta = torch.device("meta")
    assert _backends.choose("sym_kl", None, meta) == "reference"
    for name in ("native", "triton"):
        with pytest.raises(RuntimeError, match="meta"):
            _backends.choose("sym_kl", name, meta)


def test_native_cpu_is_built_in_ci():
    """CI builds the C++ extension: a broken build must fail here, not silently fall back."""
    assert sk.backends()["native"].cpu is None, sk.backends()["native"].cpu
