"""What every stage sets up in its process before it computes: the device, the seeds, torch.distributed
and the thread and algorithm pins of ``deterministic``. Pretraining, evaluation and detection import
this module, not each other.

**Determinism** (``deterministic: {enabled: true, threads: N}``): what makes two runs of the same row
and seed differ (measured, docs/RESULTS.md "Reproducibility"): on one machine with the same number
of CPU threads, ftcl's CPU stages are already bit-identical (every random draw is seeded, in-memory
data has no loader workers); a different thread count changes the order of floating-point
reductions, and so the numbers; another CPU (instruction set, oneDNN kernels) or a GPU's
non-deterministic kernels (cuDNN algorithm search, atomics in backward passes) change them too.
:func:`apply_determinism` pins what a run config can pin: the thread count (which otherwise follows
the launcher's ``cpus_per_task``) and PyTorch's deterministic algorithms (cuDNN benchmark off,
deterministic cuBLAS workspace). It does not make runs identical across machines.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from ftcl.errors import ConfigError


def select_device(name: str) -> torch.device:
    """``auto``: the current CUDA device when one is visible, else the CPU; ``cuda`` without one is a
    ``ConfigError`` naming the key."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("key 'device' is 'cuda' but no CUDA device is visible; allowed here: 'auto', 'cpu'")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def apply_determinism(enabled: bool, threads: int) -> None:
    """Pin the CPU thread count and PyTorch's deterministic algorithms (module docstring); a no-op
    unless ``enabled``."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (CUDA >= 10.2)
    torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic kernel warns
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def distributed() -> bool:
    """Whether this process is one of several of an initialised torch.distributed job."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def setup_distributed() -> tuple[int, int]:
    """Initialise torch.distributed from torchrun / submitit environment variables when WORLD_SIZE > 1
    (NCCL on CUDA, else gloo); returns ``(rank, world)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank(), world_size()


def rng_state() -> dict:
    """Every generator's state, for a checkpoint (resume continues the same random stream)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
