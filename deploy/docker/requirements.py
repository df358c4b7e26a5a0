"""Print the image's pip requirements: pyproject's dependencies without torch (installed first,
from the PyTorch index of the variant) and, for VARIANT=cuda, with faiss-gpu instead of faiss-cpu.

Usage: python requirements.py pyproject.toml cpu|cuda [FAISS_GPU_SPEC]
"""

import sys
import tomllib

path, variant = sys.argv[1], sys.argv[2]
with open(path, "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
deps = [d for d in deps if not d.startswith("torch")]
if variant == "cuda":
    deps = [d for d in deps if not d.startswith("faiss-cpu")] + [sys.argv[3]]
elif variant != "cpu":
    sys.exit(f"requirements.py: VARIANT must be cpu or cuda, not {variant!r}")
print("\n".join(deps))
