"""Benchmarks that print ratios measured in one run (never absolute pass/fail timings).

    .venv/bin/python benchmarks/bench.py                 # CPU demo model (what CI sees)
    .venv/bin/python benchmarks/bench.py --gpu           # ResNet-50, 224 px, K=65536, bf16, on one GPU

Each section writes what it printed, with the date, machine, commit and command, to
``benchmarks/results/<section>[-gpu].md`` and its numbers to ``.json`` (``benchmarks/record.py``).

Section "methods": training images/s of plain MoCo, MoCo + FT, MoCo + FT + score recording,
MoCo with one BatchNorm instead of the split BatchNorm a single process uses, MoCo + FA, MoCo + HSG
(one pair per view, and the demo row's setting: a quarter of the batch, width-8 generators), BYOL
(+ FA), SimSiam and a standard supervised step of the same backbone (labels, one view, plain BatchNorm:
the speed-of-light reference, ``OneViewSupervised``; a MoCo step does about 4/3 of its work, so MoCo /
supervised cannot exceed about 0.75), each as a ratio to plain MoCo. Every ratio comes from paired rounds: MoCo and
the variant are timed back to back on the same batch (the order alternating from pair to pair), one
ratio per pair, so machine noise that drifts hits both; the ratio printed is the geometric mean of
the pairs with its 95 % Student t interval (on the log ratios), and where a goal applies, whether
the interval's lower bound clears it. ``--only a,b`` times a subset (moco is always kept).
MoCo + FT against the supervised step is taken per pair index (the two ratios to MoCo measured in the
same pass over the variants), with its interval the same way. Each variant's first round (compilation,
cuDNN autotuning, the queue filling) is timed apart from the steady rounds: with ``--compile`` the
first round's excess over a steady round is the compile time. With ``--gpu`` the goals are also an
absolute one (MoCo + FT >= 2500 images/s) and MoCo + FT >= 0.7 of the supervised step's images/s.
``--results DIR`` writes the section's files there instead of ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from record import RESULTS, recorded

from ftcl import config
from ftcl.methods import build_method
from ftcl.methods.base import StepOutput
from ftcl.methods.supervised import Supervised
from ftcl.models.backbones import build_backbone
from ftcl.results.stats import goal_verdict, ratio_interval
from ftcl.scores import ScoreRecorder, histogram_range
from ftcl.train import TrainStep

CPU_MODEL = {"model.width": 16, "model.small_stem": False, "method.queue_size": 4096, "model.feature_dim": 64,
             "optim.batch_size": 256, "optim.amp": False, "optim.channels_last": False}
GPU_MODEL = {"model.backbone": "resnet50", "model.width": 64, "method.queue_size": 65536, "model.feature_dim": 128,
             "optim.batch_size": 256, "optim.amp": True, "optim.channels_last": True}
FT = {"ft.positive.mode": "extrapolate", "ft.negative.mode": "interpolate"}
FA = {"fa.enabled": True}  # Gaussian FA: augmented keys as positives, augmented queue as negatives
HSG = {"hsg.enabled": True}  # a pair of generators sized to the resolution, one extra encoder pass per pair
BYOL = {"method.name": "byol", "model.head": "mlp_bn"}
SIMSIAM = {"method.name": "simsiam", "model.head": "mlp_bn"}
SUPERVISED = {"method.name": "supervised", "method.bn_splits": 1}  # labels, plain BN; one view: OneViewSupervised
VARIANTS: dict[str, tuple[dict, bool]] = {
    "moco": ({}, False),
    "moco+ft": (FT, False),
    "moco+ft+scores": (FT, True),
    "moco+scores": ({}, True),
    "moco[one BN]": ({"method.shuffle_bn": False, "method.bn_splits": 1}, False),  # vs split BN (8)
    "moco+fa": (FA, False),
    "moco+hsg": (HSG, False),
    "moco+hsg/4": ({**HSG, "hsg.fraction": 0.25, "hsg.generator.width": 8}, False),  # the demo's +hsg row
    "byol": (BYOL, False),
    "byol+fa": ({**BYOL, **FA, "fa.placement": "parallel"}, False),
    "byol+scores": (BYOL, True),
    "simsiam": (SIMSIAM, False),
    "supervised": (SUPERVISED, False),  # the speed-of-light reference (one view, OneViewSupervised)
}


class OneViewSupervised(Supervised):
    """The speed-of-light reference: a standard supervised training step of the same backbone,
    cross-entropy on one view (a forward and a backward pass of B images). MoCo's step is a forward
    and a backward pass of the B queries plus a forward pass of the B keys, about 4/3 of this work.
    (The ceiling row's ``method.name: supervised`` trains on both views, about twice this work, so
    it is not the reference.)"""

    def training_step(self, view1: torch.Tensor, view2: torch.Tensor, epoch: int,
                      labels: torch.Tensor | None = None) -> StepOutput:
        f1 = self.backbone(view1).float()
        loss = torch.nn.functional.cross_entropy(self.classifier(f1), labels)
        return StepOutput(loss, f1.new_zeros(f1.shape[0]), None, 1.0)


@dataclass
class SyntheticImages:
    """What ``TrainStep.build`` needs to know about a dataset, for a uint8 batch made here."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crops_on_device: bool = True
    num_classes: int = 1000  # the supervised step's classifier (ImageNet's 1000 classes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: variant -> the lowest ratio to MoCo its goal allows (CPU demo model; the GPU goal is 0.98)
GOALS = {"moco+ft": 0.97, "moco+ft+scores": 0.97}
GPU_GOALS = {"moco+ft": 0.98, "moco+ft+scores": 0.98}
#: --gpu: MoCo + FT's images/s at least this (ResNet-50, 224 px, K = 65536, batch 256, bf16, one GPU)
GPU_RATE_GOAL = 2500.0
#: --gpu: MoCo + FT's images/s over the supervised step's at least this (ideal: about 3/4)
GPU_SUPERVISED_GOAL = 0.7


def bench_methods(base: dict, variants: dict[str, tuple[dict, bool]], images: torch.Tensor, data,
                  device: torch.device, steps: int, pairs: int) -> dict[str, dict]:
    """Per variant: ``images_per_s`` (median over its timed rounds), ``ratios`` to ``moco`` (one per
    pair of back-to-back rounds; the order alternates between pairs), ``first_round_s`` (the warm-up
    round: compilation, autotuning, the queue filling) and ``round_s`` (median steady round)."""
    runners = {}
    labels = torch.randint(0, data.num_classes, (images.shape[0],), generator=torch.Generator().manual_seed(1))
    labels = labels.to(device)  # used by the methods that need labels only (TrainStep drops them otherwise)
    for name, (overrides, record) in variants.items():
        cfg = config.resolve(overrides={**base, **overrides})
        torch.manual_seed(0)
        layout = config.batch_layout(cfg)
        m = cfg.model
        method = build_method(cfg, build_backbone(m.backbone, m.width, m.small_stem, data.channels), layout.bn_splits,
                              data.num_classes)
        if name == "supervised":
            method = OneViewSupervised(method.backbone, data.num_classes, layout.bn_splits)
        step = TrainStep.build(method, data, device, layout, cfg.augment, cfg.optim, cfg.method.momentum)
        recorder = ScoreRecorder(steps, 1, [0], cfg.scores.histogram_every, cfg.scores.bins, device, cfg.scores.rows,
                                 histogram_range(cfg.scores.range, cfg.ft.positive)) if record else None
        runners[name] = (step, recorder)

    def timed(name: str) -> float:
        step, recorder = runners[name]
        if recorder:
            recorder.start_epoch(0)
        _sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            out = step(images, 0, 0.03, labels)
            if recorder:
                recorder.record(i, out.loss, out.pos, out.neg, out.temperature)
        _sync(device)
        return time.perf_counter() - t0

    first: dict[str, float] = {}
    for name in variants:  # warm-up: allocator, cuDNN autotuning, compilation, the queue fills
        first[name] = timed(name)
        print(f"[bench] {name}: first round {first[name]:.1f} s (warm-up: compilation if any, autotuning, queue)",
              flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    ratios: dict[str, list[float]] = {name: [] for name in variants if name != "moco"}
    for p in range(pairs):
        for name in ratios:
            order = ("moco", name) if p % 2 == 0 else (name, "moco")
            t = {n: timed(n) for n in order}
            times["moco"].append(t["moco"])
            times[name].append(t[name])
            ratios[name].append(t["moco"] / t[name])  # images/s of the variant over MoCo's
        print(f"[bench] pair {p + 1}/{pairs} timed", flush=True)
    n = images.shape[0] * steps
    return {name: {"images_per_s": n / statistics.median(times[name]), "ratios": ratios.get(name, [1.0]),
                   "first_round_s": first[name], "round_s": statistics.median(times[name])}
            for name in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="ResNet-50 224 px K=65536 bf16 on CUDA")
    parser.add_argument("--compile", action="store_true", help="optim.compile: torch.compile the encoders")
    parser.add_argument("--steps", type=int, default=None, help="steps per round")
    parser.add_argument("--batch", type=int, default=256, help="global batch (a multiple of 8: split BN)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the section's .md and .json "
                        "(default benchmarks/results/)")
    parser.add_argument("--rounds", type=int, default=12, help="pairs of back-to-back rounds per variant")
    parser.add_argument("--only", default=None, help="comma-separated variants to time (moco is always kept)")
    parser.add_argument("--sections", default="methods,loading,orchestration",
                        help="comma-separated: methods, loading, orchestration, demo (demo runs the whole "
                             "demo DAG, ~15 min), jpeg (per-worker images/s of the imagefolder JPEG data path vs "
                             "a plain torchvision pipeline, benchmarks/jpeg.py, ~2 min)")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    suffix = "-gpu" if args.gpu else ""

    def run_recorded(name: str, section) -> None:  # record.run_recorded, into --results
        with recorded(name, args.results) as numbers:
            numbers.update(section() or {})

    if "methods" in sections:
        run_recorded(f"methods{suffix}{'-compile' if args.compile else ''}", lambda: bench_methods_section(args))
    if "loading" in sections and not args.gpu:
        run_recorded("loading", loading_section)
    if "orchestration" in sections:
        run_recorded(f"orchestration{suffix}", orchestration_section)
    if "demo" in sections:
        run_recorded(f"demo{suffix}", demo_section)
    if "jpeg" in sections:
        from jpeg import jpeg_section

        run_recorded(f"jpeg{suffix}", jpeg_section)


def loading_section() -> dict:
    from orchestration import loading_vs_step

    cfg = config.resolve(overrides={**CPU_MODEL, "data.dataset": "fashion-mnist", "data.train_subset": 4096,
                                    "tracking.enabled": False})
    r = loading_vs_step(cfg)
    print(f"# loading: Fashion-MNIST in memory, crops and views batched on the device\n"
          f"data path {r['loading_images_per_s']:.0f} images/s, training step {r['step_images_per_s']:.0f} "
          f"images/s: loader/step = {r['ratio']:.1f} (> 1: the loader is not the bottleneck)")
    return r


def orchestration_section() -> dict:
    from orchestration import orchestration_overhead

    r = orchestration_overhead()
    print(f"# orchestration: config/tiny.yaml, {r['stages']} stages + aggregate\n"
          f"snakemake -c1 + submitit local + MLflow {r['pipeline_s']:.1f} s, same ftcl commands direct "
          f"{r['direct_s']:.1f} s: ratio {r['ratio']:.2f}, overhead {r['overhead_per_stage_s']:.1f} s per stage")
    return r


def demo_section() -> dict:
    from orchestration import demo_dag

    r = demo_dag()
    print(f"# demo DAG: snakemake -c2 on config/config.yaml ({r['rows_x_seeds']} rows x seeds): "
          f"{r['seconds']:.0f} s\n{r['table']}")
    return r


def bench_methods_section(args: argparse.Namespace) -> dict:

    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device visible")
        device, base, size, channels = torch.device("cuda"), GPU_MODEL, 224, 3
        torch.backends.cudnn.benchmark = True
        steps = args.steps or 20
        desc = (f"ResNet-50, 224 px, K=65536, batch {args.batch}, bf16 + channels_last on "
                f"{torch.cuda.get_device_name()}")
    else:
        device, base, size, channels = torch.device("cpu"), CPU_MODEL, 28, 1
        steps = args.steps or 12
        desc = (f"ResNet-18 width 16, 28 px, K=4096, batch {args.batch} on CPU ({torch.get_num_threads()} threads, "
                f"{platform.processor() or platform.machine()})")
    base = {**base, "data.image_size": size, "optim.compile": args.compile,  # image size: HSG's generator
            "optim.batch_size": args.batch}
    desc += ", torch.compile" if args.compile else ""
    data = SyntheticImages(size, channels, (0.5,) * channels, (0.25,) * channels, num_classes=1000 if args.gpu else 10)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, channels, size, size), dtype=torch.uint8, generator=gen).to(device)
    variants = VARIANTS
    if args.only:
        wanted = {"moco", *args.only.split(",")}
        unknown = wanted - set(VARIANTS)
        if unknown:
            raise SystemExit(f"--only: unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
        variants = {k: v for k, v in VARIANTS.items() if k in wanted}
    goals = GPU_GOALS if args.gpu else GOALS
    print(f"# methods: {desc}; {args.rounds} pairs of back-to-back rounds of {steps} steps per variant; "
          "ratio = geometric mean of the per-pair ratios to MoCo [95% t interval]")
    results = bench_methods(base, variants, images, data, device, steps, args.rounds)
    print(f"{'variant':<18}{'images/s':>11}  {'ratio to moco [95% CI]':<26}goal")
    for name, r in results.items():
        if name == "moco":
            print(f"{name:<18}{r['images_per_s']:>11.1f}  {'1 (reference)':<26}")
            continue
        mean, low, high = ratio_interval(r["ratios"])
        goal = ""
        if name in goals:
            goal = f">= {goals[name]}: {goal_verdict(low, high, goals[name])} (lower bound {low:.3f})"
        print(f"{name:<18}{r['images_per_s']:>11.1f}  {f'{mean:.3f} [{low:.3f}, {high:.3f}]':<26}{goal}")
    print("first round, s (compilation, autotuning, queue) / steady round, s: " + ", ".join(
        f"{name} {r['first_round_s']:.1f} / {r['round_s']:.2f}" for name, r in results.items()))
    out = {name: {"images_per_s": r["images_per_s"], "ratio_to_moco": ratio_interval(r["ratios"])
                  if name != "moco" else [1.0, 1.0, 1.0], "first_round_s": r["first_round_s"],
                  "round_s": r["round_s"], "compile_s": max(0.0, r["first_round_s"] - r["round_s"])}
           for name, r in results.items()}
    goals_out = {}
    if args.gpu and "moco+ft" in results:
        rate = results["moco+ft"]["images_per_s"]
        verdict = "met" if rate >= GPU_RATE_GOAL else "not met"
        print(f"goal: moco+ft at least {GPU_RATE_GOAL:.0f} images/s: {verdict} ({rate:.0f})")
        goals_out["moco+ft images/s"] = {"value": rate, "goal": GPU_RATE_GOAL, "verdict": verdict}
    if "moco+ft" in results and "supervised" in results:
        per_pair = [f / s for f, s in zip(results["moco+ft"]["ratios"], results["supervised"]["ratios"])]
        mean, low, high = ratio_interval(per_pair)
        goal = (f": goal >= {GPU_SUPERVISED_GOAL}: {goal_verdict(low, high, GPU_SUPERVISED_GOAL)}" if args.gpu
                else "")
        print(f"moco+ft / supervised images/s: {mean:.3f} [{low:.3f}, {high:.3f}] (a MoCo step does about 4/3 "
              f"of a supervised step's work: ideal about 0.75){goal}")
        out["moco+ft/supervised"] = [mean, low, high]
        if args.gpu:
            goals_out["moco+ft/supervised"] = {"value": [mean, low, high], "goal": GPU_SUPERVISED_GOAL,
                                               "verdict": goal_verdict(low, high, GPU_SUPERVISED_GOAL)}
    for name, goal_value in goals.items():
        if name in results:
            _, low, high = ratio_interval(results[name]["ratios"])
            goals_out[f"{name}/moco"] = {"value": out[name]["ratio_to_moco"], "goal": goal_value,
                                         "verdict": goal_verdict(low, high, goal_value)}
    out["goals"] = goals_out
    return out

if __name__ == "__main__":
    main()
