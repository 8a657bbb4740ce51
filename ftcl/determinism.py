"""``deterministic: {enabled: true, threads: N}``: bit-identical reruns of a stage on one machine.

What makes two runs of the same row and seed differ (measured, README "Reproducibility"): on one
machine with the same number of CPU threads, ftcl's CPU stages are already bit-identical (every
random draw is seeded, in-memory data has no loader workers); a different thread count changes the
order of floating-point reductions, and so the numbers; another CPU (instruction set, oneDNN
kernels) or a GPU's non-deterministic kernels (cuDNN algorithm search, atomics in backward passes)
change them too. This option pins what a run config can pin: the thread count (which otherwise
follows the launcher's ``cpus_per_task``) and PyTorch's deterministic algorithms (cuDNN benchmark
off, deterministic cuBLAS workspace). It does not make runs identical across machines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def apply(cfg: Mapping) -> None:
    """Apply ``cfg["deterministic"]`` to this process (a no-op when not enabled)."""
    det = cfg.get("deterministic") or {}
    if not det.get("enabled"):
        return
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (CUDA >= 10.2)
    torch.set_num_threads(int(det["threads"]))
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic kernel warns
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
