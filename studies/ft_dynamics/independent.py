"""An independent MoCo v2 + FT on Fashion-MNIST, written from the papers and sharing no code with ftcl,
to compare training dynamics (docs/FT_DYNAMICS.md).

Per-image torchvision augmentation (the v2 recipe) in a DataLoader worker, a ResNet-18 layout of
width 16 written here with PyTorch's default initialisation, BatchNorm over ``--splits`` contiguous
chunks of the batch, a random-permutation key shuffle, the momentum update before the keys (MoCo's
``builder.py``), FT as the paper states it (positive extrapolation lambda = 1 + Beta(2, 2) on the
pair, the gradient reaching q through both mixed features; negative interpolation lambda ~ Beta(1.6,
1.6) on a copy of the queue). Prints and writes the mean positive and negative score the loss sees,
per epoch.

    python studies/ft_dynamics/independent.py --ft --splits 8 --seed 0 --out runs/independent_seed0.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2 as T

IMAGES = 20_000
QUEUE, TAU, MOMENTUM, LR, WEIGHT_DECAY, BATCH, DIM, WIDTH = 4096, 0.2, 0.99, 0.06, 5e-4, 256, 128, 16


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


class Pairs(torch.utils.data.Dataset):
    """Two independently augmented views of each image."""

    def __init__(self, images: torch.Tensor, augment):
        self.images, self.augment = images, augment

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.augment(self.images[i]), self.augment(self.images[i])


class ChunkBN(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from each of ``splits`` contiguous chunks of the batch."""

    def __init__(self, channels: int, splits: int):
        super().__init__(channels)
        self.splits = splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.splits == 1:
            return super().forward(x)
        outs, means, variances = [], [], []
        for chunk in x.chunk(self.splits):
            mean, var = self.running_mean.clone(), self.running_var.clone()
            outs.append(F.batch_norm(chunk, mean, var, self.weight, self.bias, True, self.momentum, self.eps))
            means.append(mean)
            variances.append(var)
        with torch.no_grad():
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
        return torch.cat(outs)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), norm(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class Encoder(nn.Module):
    """ResNet-18 layout (7x7 stem, max-pool, 4 stages of 2 blocks) + a 2-layer MLP head, L2-normalised."""

    def __init__(self, width: int, splits: int, dim: int):
        super().__init__()

        def norm(c: int) -> nn.Module:
            return ChunkBN(c, splits)

        self.stem = nn.Sequential(nn.Conv2d(1, width, 7, 2, 3, bias=False), norm(width), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            layers += [Block(cin, cout, 1 if i == 0 else 2, norm), Block(cout, cout, 1, norm)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(cin, cin), nn.ReLU(), nn.Linear(cin, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.layers(self.stem(x)).mean(dim=(2, 3))), dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    p.add_argument("--splits", type=int, default=8, help="BatchNorm chunks of each batch (1: plain BN)")
    p.add_argument("--ft", action="store_true", help="positive extrapolation + negative interpolation")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the recorded runs: 2)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)  # the FT coefficients come from NumPy's global generator
    torch.set_num_threads(a.threads)
    images = torch.from_numpy(read_idx(a.root / "train-images-idx3-ubyte.gz").copy())
    keep = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(1234))[:IMAGES]
    images = images[keep][:, None]
    mean, std = (images.float() / 255).mean().item(), (images.float() / 255).std().item()
    augment = T.Compose([
        T.RandomResizedCrop(28, scale=(0.2, 1.0), antialias=True),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(3, sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize([mean], [std]),
    ])
    loader = torch.utils.data.DataLoader(Pairs(images, augment), batch_size=BATCH, shuffle=True, drop_last=True,
                                         num_workers=1, persistent_workers=True)
    fq, fk = Encoder(WIDTH, a.splits, DIM), Encoder(WIDTH, a.splits, DIM)
    fk.load_state_dict(fq.state_dict())
    fk.requires_grad_(False)
    queue, ptr = F.normalize(torch.randn(QUEUE, DIM), dim=1), 0
    opt = torch.optim.SGD(fq.parameters(), lr=LR, momentum=0.9, weight_decay=WEIGHT_DECAY)
    curve = []
    for epoch in range(a.epochs):
        for group in opt.param_groups:
            group["lr"] = LR * 0.5 * (1 + math.cos(math.pi * epoch / a.epochs))
        fq.train()
        fk.train()
        negs, poss, t0 = [], [], time.time()
        for x1, x2 in loader:
            with torch.no_grad():
                for pq, pk in zip(fq.parameters(), fk.parameters()):
                    pk.mul_(MOMENTUM).add_(pq.detach(), alpha=1 - MOMENTUM)
                perm = torch.randperm(x2.shape[0])
                k = fk(x2[perm])[torch.argsort(perm)]
            q = fq(x1)
            negatives = queue.clone()
            if a.ft:
                lam = 1.0 + float(np.random.beta(2.0, 2.0))
                q, k_mixed = lam * q + (1 - lam) * k, lam * k + (1 - lam) * q
                lam_n = float(np.random.beta(1.6, 1.6))
                negatives = lam_n * negatives + (1 - lam_n) * negatives[torch.randperm(QUEUE)]
            else:
                k_mixed = k
            pos = (q * k_mixed).sum(1, keepdim=True)
            neg = q @ negatives.T
            loss = F.cross_entropy(torch.cat([pos, neg], 1) / TAU, torch.zeros(q.shape[0], dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                queue[(ptr + torch.arange(k.shape[0])) % QUEUE] = k
                ptr = (ptr + k.shape[0]) % QUEUE
            negs.append(neg.mean().item())
            poss.append(pos.mean().item())
        curve.append({"epoch": epoch + 1, "pos": float(np.mean(poss)), "neg": float(np.mean(negs)),
                      "s": time.time() - t0})
        print(json.dumps(curve[-1]), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(curve))


if __name__ == "__main__":
    main()
