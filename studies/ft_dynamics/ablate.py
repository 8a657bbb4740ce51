"""One run of the FT-dynamics study (docs/FT_DYNAMICS.md): ftcl's MoCo v2 + FT on the study's setting
(``base.yaml``), with one candidate cause changed, on one seed; writes the per-epoch mean positive and
negative score the loss saw to ``runs/<variant>_seed<seed>.json``.

    OMP_NUM_THREADS=1 .venv/bin/python studies/ft_dynamics/ablate.py VARIANT SEED

Variants change a setting (``noft``, ``s1``/``s2``/``s4``: BatchNorm sub-batches, ``head_linear``) or
patch one piece of ftcl for this process only (the key shuffle, which encoder's BatchNorm is split,
the gradient path through the mixed key, the order of the momentum update, weight decay on
BatchNorm and bias parameters, the convolution initialisation): see ``VARIANTS``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import ftcl.methods.moco as moco
import ftcl.train as train
import ftcl.transforms.ft as ft
from ftcl import config
from ftcl.methods.base import ema_update
from ftcl.scores import load_scores

HERE = Path(__file__).resolve().parent


def _after_init(change) -> None:
    original = moco.MoCo.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        change(self)
    moco.MoCo.__init__ = init


def _plain_bn(encoder_name: str):
    def change(method) -> None:
        for m in getattr(method, encoder_name).modules():
            if hasattr(m, "num_splits"):
                m.num_splits = 1
    return change


def _randperm_shuffle() -> None:  # a random permutation, as MoCo's CIFAR notebook, not a derangement
    moco.split_shuffle = lambda n, splits, device, generator=None: torch.randperm(n, device=device)


def _detach_kmix() -> None:  # no gradient to q through k' = lam k + (1 - lam) q
    ft.mix_pair = lambda q, k, lam: (lam * q + (1 - lam) * k, lam * k + (1 - lam) * q.detach())


def _ema_first() -> None:  # the momentum update right before the keys, as MoCo's builder.py
    train.ema_update = lambda pairs, m: None
    keys = moco.MoCo._keys

    def keys_after_update(self, *args, **kwargs):
        with torch.no_grad():
            ema_update(self.momentum_pairs(), 0.99)
        return keys(self, *args, **kwargs)
    moco.MoCo._keys = keys_after_update


def _no_wd_bn_bias() -> None:  # weight decay on conv/linear weights only
    build = train.TrainStep.build.__func__

    def build_grouped(cls, method, data, device, layout, augment, optim, *args, **kwargs):
        step = build(cls, method, data, device, layout, augment, optim, *args, **kwargs)
        params = [p for p in step.method.parameters() if p.requires_grad]
        step.optimizer = torch.optim.SGD(
            [{"params": [p for p in params if p.dim() > 1]},
             {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
            lr=0.0, momentum=optim.momentum, weight_decay=optim.weight_decay)
        return step
    train.TrainStep.build = classmethod(build_grouped)


def _default_init(method) -> None:  # PyTorch's own Conv2d initialisation instead of torchvision's
    for m in method.encoder_q.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.reset_parameters()
    method.encoder_k.load_state_dict(method.encoder_q.state_dict())


#: variant -> (config overrides, patch applied before training)
VARIANTS = {
    "base": ([], None),
    "noft": (["ft.positive.mode=none", "ft.negative.mode=none"], None),
    "s1": (["method.bn_splits=1", "method.shuffle_bn=false"], None),
    "s2": (["method.bn_splits=2"], None),
    "s4": (["method.bn_splits=4"], None),
    "head_linear": (["model.head=linear"], None),
    "randperm": ([], _randperm_shuffle),
    "q_plain": ([], lambda: _after_init(_plain_bn("encoder_q"))),
    "k_plain": ([], lambda: _after_init(_plain_bn("encoder_k"))),
    "detach_kmix": ([], _detach_kmix),
    "ema_first": ([], _ema_first),
    "no_wd_bn_bias": ([], _no_wd_bn_bias),
    "default_init": ([], lambda: _after_init(_default_init)),
}


def main() -> None:
    name, seed = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    overrides, patch = VARIANTS[name]
    if patch is not None:
        patch()
    cfg = config.resolve(HERE / "base.yaml", [f"seed={seed}", *overrides])
    out = HERE / "runs" / f"{name}_seed{seed}"
    train.pretrain(cfg, out, echo=lambda line: print(line, flush=True))
    stats, _ = load_scores(out / "scores")
    per_epoch = stats.groupby("epoch")[["pos_mean", "neg_mean"]].mean()
    result = {"name": name, "seed": seed, "pos": per_epoch["pos_mean"].round(3).tolist(),
              "neg": per_epoch["neg_mean"].round(3).tolist()}
    (HERE / "runs" / f"{name}_seed{seed}.json").write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
