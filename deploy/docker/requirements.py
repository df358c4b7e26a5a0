"""Print pip requirements of an image from pyproject.toml, torch left out (installed on its own
first: the CPU wheel, or CUDA torch from the PyTorch index of the variant).

  serve    the dependencies (ONNX Runtime + FAISS on the CPU: no torch, no onnx)
  train    what the `train` extra adds to them (onnx; torch apart)
  cuda     both, with FAISS_GPU_SPEC (e.g. faiss-gpu-cu12) instead of faiss-cpu

Usage: python requirements.py pyproject.toml serve|train|cuda [FAISS_GPU_SPEC]
"""

import sys
import tomllib

path, kind = sys.argv[1], sys.argv[2]
with open(path, "rb") as f:
    project = tomllib.load(f)["project"]
serve = list(project["dependencies"])
train = [d for d in project["optional-dependencies"]["train"] if not d.startswith("torch")]
if kind == "serve":
    deps = serve
elif kind == "train":
    deps = train
elif kind == "cuda":
    deps = [d for d in serve + train if not d.startswith("faiss-cpu")] + [sys.argv[3]]
else:
    sys.exit(f"requirements.py: cpu images are 'serve' or 'train', else 'cuda'; not {kind!r}")
print("\n".join(deps))
