"""Load a CUDA build of smart_kernels._C (no GPU needed) and check it registered CUDA kernels.

Usage: python scripts/check_cuda_build.py BUILD_LIB_DIR
Loading resolves every symbol (a link error fails here); the dispatcher must then hold a CUDA
kernel for each native op.
"""

import glob
import os
import sys

import torch

lib_dir = sys.argv[1]
(so,) = glob.glob(os.path.join(lib_dir, "smart_kernels", "_C*.so"))
torch.ops.load_library(so)
assert torch.ops.smart_kernels.has_cuda(), "built without CUDA"
# Every raw op with device kernels (csrc/smart_kernels.cpp) must have a CUDA impl registered.
ops = ["sym_kl_fwd", "sym_kl_bwd", "normalize", "normalize_bwd", "perturb_step", "init_noise"]
ops += ["ema_update_", "ema"]
missing = [
    op
    for op in ops
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"smart_kernels::{op}", "CUDA")
]
assert not missing, f"no CUDA kernel registered for {missing}"
print(f"cuda-check: OK ({os.path.basename(so)}: CUDA kernels for {', '.join(ops)})")
