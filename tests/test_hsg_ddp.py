"""MoCo + HSG under DDP (2 CPU processes, gloo): generated keys get the same cross-process Shuffle-BN
as real keys (MoCo Sec. 3.3), and each process's generator receives the gradient of its own
samples' keys, wherever they were computed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import tiny_method

from ftcl.losses import info_nce

WORLD, PER_PROCESS, SEED = 2, 4, 3
HSG = {"hsg.enabled": True, "method.bn_splits": 1, "method.shuffle_bn": True}  # bn_splits 1: a multi-GPU run


def _inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Process ``rank``'s real images, query views and generator noise (different in every process)."""
    g = torch.Generator().manual_seed(100 + rank)
    images, queries = torch.randn(2, PER_PROCESS, 1, 8, 8, generator=g)
    return images, queries, torch.randn(PER_PROCESS, 16, generator=g)


def _pair_step(method, x: torch.Tensor, x1: torch.Tensor, z: torch.Tensor):
    """The generated keys' images ``G_b(x, z)`` (their gradient kept) and the pair loss against ``x1``."""
    x2 = method.hsg.gen_b(x, z)
    x2.retain_grad()
    torch.manual_seed(SEED)  # rank 0 draws the global permutation from here
    return x2, method._pair_loss(x1, x2)


def _child(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        method = tiny_method("moco", world=2, **HSG)  # seeded: the same weights in every process
        seen = {}
        method.encoder_k.register_forward_hook(lambda m, args, output: seen.update(input=args[0].detach()))
        x2, loss = _pair_step(method, *_inputs(rank))
        loss.backward()
        torch.save({"loss": loss.detach(), "key_input": seen["input"], "x2_grad": x2.grad,
                    "gen_grad": [p.grad for p in method.hsg.gen_b.parameters()]}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _reference():
    """One process, the same global batch and permutation by hand: gather, permute, one key batch per
    process slice, unshuffle; each process's queries with its own BatchNorm batch; summed losses."""
    method = tiny_method("moco", world=2, **HSG)
    x, x1, z = (torch.cat(parts) for parts in zip(*(_inputs(r) for r in range(WORLD)), strict=True))
    x2 = method.hsg.gen_b(x, z)
    x2.retain_grad()
    torch.manual_seed(SEED)
    perm = torch.randperm(WORLD * PER_PROCESS)
    slices = perm.view(WORLD, PER_PROCESS)
    keys = torch.cat([method.encoder_k(x2[s]) for s in slices])[torch.argsort(perm)]
    with torch.no_grad():
        unshuffled = torch.cat([method.encoder_k(x2[r * PER_PROCESS:(r + 1) * PER_PROCESS]) for r in range(WORLD)])
    losses = []
    for r in range(WORLD):
        q = method.encoder_q(x1[r * PER_PROCESS:(r + 1) * PER_PROCESS])
        k = keys[r * PER_PROCESS:(r + 1) * PER_PROCESS]
        losses.append(info_nce((q * k).sum(dim=1), q @ method.queue.T, method.temperature))
    sum(losses).backward()
    return {"perm": perm, "x2": x2.detach(), "keys": keys.detach(), "unshuffled": unshuffled,
            "losses": torch.stack(losses).detach(), "x2_grad": x2.grad,
            "gen_grad": [p.grad for p in method.hsg.gen_b.parameters()]}


@pytest.mark.slow
def test_generated_keys_are_shuffled_across_processes_with_gradients(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_child, args=(f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ref = _reference()
    n = PER_PROCESS
    for r in range(WORLD):
        own = slice(r * n, (r + 1) * n)
        # the key encoder of process r saw slice r of the permuted global batch, not its own samples
        assert torch.allclose(got[r]["key_input"], ref["x2"][ref["perm"][own]], atol=1e-6)
        assert set(ref["perm"][own].tolist()) != set(range(r * n, (r + 1) * n))  # another BatchNorm batch
        # so the keys (and the loss) are those of the shuffle, which differ from the unshuffled ones
        assert not torch.allclose(ref["keys"][own], ref["unshuffled"][own], atol=1e-3)
        assert torch.allclose(got[r]["loss"], ref["losses"][r], atol=1e-5)
        # each process's generated images get the gradient of every process's loss through their keys
        assert got[r]["x2_grad"].abs().sum() > 0
        assert torch.allclose(got[r]["x2_grad"], ref["x2_grad"][own], atol=1e-6)
    # DDP averages the generators' gradients: their sum over processes is the gradient of the summed losses
    for p, (g0, g1, expected) in enumerate(zip(got[0]["gen_grad"], got[1]["gen_grad"], ref["gen_grad"], strict=True)):
        assert expected.abs().sum() > 0
        assert torch.allclose(g0 + g1, expected, atol=1e-6, rtol=1e-4), f"generator parameter {p}"
