"""Builds ``smart_kernels._C``: the C++ CPU kernels always, the CUDA kernels when possible.

Environment:
  SMART_KERNELS_CUDA   auto (default): add CUDA kernels iff torch is a CUDA build and a CUDA
                       toolkit (nvcc) is found; 0: never; 1: always, failing loudly if impossible.
  TORCH_CUDA_ARCH_LIST honoured by torch's build tools (required when no GPU is visible).
  MAX_JOBS             honoured by torch's ninja build.
"""

from __future__ import annotations

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("SMART_KERNELS_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"SMART_KERNELS_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if cpp_extension.CUDA_HOME is None:
        problems.append("no CUDA toolkit found (set CUDA_HOME)")
    if problems:
        if mode == "1":
            sys.exit(
                "SMART_KERNELS_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(problems)
            )
        print("smart_kernels: building without CUDA: " + "; ".join(problems))
        return False
    return True


def _extra_cuda_includes() -> list[str]:
    # pip-installed CUDA headers (cusparse/cublas) that a bare system toolkit may lack; only used
    # when the toolkit itself does not have them.
    if os.path.exists(os.path.join(cpp_extension.CUDA_HOME or "", "include", "cusparse.h")):
        return []
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))


def _extension():
    with_cuda = _want_cuda()
    sources = sorted(
        glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/autograd/*.cpp")
    )
    # -fopenmp: at::parallel_for is a header template whose `#pragma omp parallel` is ignored
    # without it (serial kernels); GOMP_* resolve to the libgomp that libtorch_cpu loads.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-fvisibility=hidden"]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "smart_kernels._C", sources, extra_compile_args={"cxx": cxx}
        )
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "smart_kernels._C",
        sources,
        define_macros=[("SMART_KERNELS_WITH_CUDA", "1")],
        include_dirs=_extra_cuda_includes(),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
