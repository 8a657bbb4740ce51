"""The GPU check's summary: each part's one-line result and the goals' verdicts, from the files the
parts wrote (``benchmarks/gpu_parts.py``, ``bench.py``), as ``summary.md`` and ``summary.json``."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gpu_parts import NOT_NEEDED, PARTS, TITLES, _load, _write_json

if TYPE_CHECKING:
    from gpu_check import Sizes

def _interval(r) -> str:
    return f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"


def _methods(out: Path, compiled: bool, gpu: bool) -> dict | None:
    name = f"methods{'-gpu' if gpu else ''}{'-compile' if compiled else ''}"
    data = _load(out / "results" / f"{name}.json")
    return data["results"] if data else None


def part_result(part: str, out: Path, log: Path, gpu: bool) -> str:
    """The summary's one-line result of a finished part, from its JSON (else its log's last line)."""
    if part == "environment" and (env := _load(out / "environment.json")):
        return (f"Python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), {env['device']}, "
                f"{env['cpus']} CPUs; jsonschema {env['jsonschema']}; decoder: {env['decoder']}; "
                f"not imported by the check: {', '.join(NOT_NEEDED)}"
                + (f" (imported: {env['imported_not_needed']})" if env["imported_not_needed"] else ""))
    if part.startswith("methods") and (r := _methods(out, part == "methods-compile", gpu)):
        rows = [f"moco {r['moco']['images_per_s']:.0f}"]
        rows += [f"{n} {r[n]['images_per_s']:.0f} ({_interval(r[n]['ratio_to_moco'])} x moco)"
                 for n in ("moco+ft", "moco+ft+scores", "supervised") if n in r]
        text = "images/s: " + ", ".join(rows)
        if "moco+ft/supervised" in r:
            text += f"; moco+ft / supervised {_interval(r['moco+ft/supervised'])}"
        if part == "methods-compile":
            text += "; compile time, s (first round minus a steady round): " + ", ".join(
                f"{n} {v['compile_s']:.0f}" for n, v in r.items() if isinstance(v, dict) and "compile_s" in v)
        return text
    if part == "data" and (d := _load(out / "data.json")):
        return f"{d['files']} JPEGs, {d['mean_kb']:.0f} KB mean, {d['processes']} processes"
    if part in ("loader", "loader-gpu") and (d := _load(out / ("loader.json" if part == "loader"
                                                                   else "loader-gpu.json"))):
        return (f"{d['images_per_s']:.0f} images/s ({d['workers']} workers, batch {d['batch']}, decode {d['decode']} "
                f"to {d['device']}; {d['decoder'].split(',')[0]})")
    if part == "smoke" and (d := _load(out / "smoke.json")) and d["stages"]:
        done = []
        for stage, r in d["stages"].items():
            score = {"linear": "top1", "knn": "top1"}.get(stage)
            value = r.get("result", {}).get(score) if score else None
            done.append(f"{stage} {r['seconds']:.0f} s" + (f" (top-1 {value:.1f})" if value is not None else "")
                        + ("" if not r["exit"] else f" exit {r['exit']}"))
        return f"{d['row']}, world {d['world']}: planned {d['plan_s']:.0f} s, " + ", ".join(done)
    text = log.read_text(errors="replace") if log.exists() else ""
    if part.startswith("methods"):  # no result file: killed or failed; the first rounds it printed
        first = [line.split("] ", 1)[1].split(" (")[0] for line in text.splitlines()
                 if line.startswith("[bench] ") and "first round" in line]
        if first:
            return "no result; " + ", ".join(first) + " (warm-up: compilation if any)"
    if part == "pretrain":
        epochs = [line.strip() for line in text.splitlines() if line.startswith("[pretrain] epoch ")
                  and "img/s" in line]
        if epochs:
            return epochs[-1].replace("|", "/")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(("[gpu_check]", "$ "))]
    return (lines[-1][:200] if lines else "").replace("|", "/")


def goals(out: Path, gpu: bool) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) rows from the parts' results."""

    def goal_verdict(low: float, high: float, goal: float) -> str:  # ftcl.results.stats's, without its imports
        return "met" if low >= goal else "not met" if high < goal else "undecided"

    rows = []
    modes = {mode: r for mode, compiled in (("eager", False), ("compiled", True))
             if (r := _methods(out, compiled, gpu))}
    if not modes:
        return [("the methods goals", "no methods result", "not measured")]

    def per_mode(label: str, value, verdict) -> None:
        measured, verdicts = [], []
        for mode, r in modes.items():
            v = value(r)
            if v is not None:
                measured.append(f"{mode} {v[0]}")
                verdicts.append(f"{mode}: {verdict(r)}")
        rows.append((label, "; ".join(measured) or "not measured", "; ".join(verdicts) or "not measured"))

    def rate(r):
        return r["moco+ft"]["images_per_s"] if "moco+ft" in r else None

    per_mode("ResNet-50 MoCo v2 + FT at K = 65536 >= 2500 images/s",
             lambda r: (f"{rate(r):.0f} images/s",) if rate(r) else None,
             lambda r: "met" if rate(r) >= 2500 else "not met")
    per_mode("MoCo v2 + FT >= 0.7 x the supervised step's images/s (ideal about 0.75: a MoCo step does about "
             "4/3 of a supervised step's work)",
             lambda r: (_interval(r["moco+ft/supervised"]),) if "moco+ft/supervised" in r else None,
             lambda r: goal_verdict(*r["moco+ft/supervised"][1:], 0.7))
    per_mode("FT + score recording within 2 % of MoCo (lower bound >= 0.98)",
             lambda r: (_interval(r["moco+ft+scores"]["ratio_to_moco"]),) if "moco+ft+scores" in r else None,
             lambda r: goal_verdict(*r["moco+ft+scores"]["ratio_to_moco"][1:], 0.98))
    loader = _load(out / "loader.json")
    steps = {mode: rate(r) for mode, r in modes.items() if rate(r)}
    if loader and steps:
        mode, step = max(steps.items(), key=lambda kv: kv[1])
        ratio = loader["images_per_s"] / step
        rows.append(("loader images/s >= training step images/s",
                     f"{loader['images_per_s']:.0f} / {step:.0f} (MoCo + FT, {mode}) = {ratio:.2f}",
                     "met" if ratio >= 1 else "not met"))
    else:
        rows.append(("loader images/s >= training step images/s", "not measured", "not measured"))
    on_device = _load(out / "loader-gpu.json")
    if loader and on_device:
        rows.append(("decode: gpu against decode: fast (loader images/s, every CPU core)",
                     f"{on_device['images_per_s']:.0f} / {loader['images_per_s']:.0f} = "
                     f"{on_device['images_per_s'] / loader['images_per_s']:.2f}", "measured (no goal)"))
    return rows


def write_summary(out: Path, status: dict[str, dict], sizes: Sizes, rehearse: bool, started: float,
                  header: str, final: bool) -> str:
    gpu = not rehearse
    lines = [f"# GPU check{' rehearsal (CPU, tiny sizes)' if rehearse else ''}", "", header, "",
             "| part | status | result | budget | time |", "|---|---|---|---|---|"]
    for part in PARTS:
        s = status.get(part, {"status": "not reached" if final else "pending", "result": "", "secs": None})
        budget = "rest" if math.isinf(sizes.budgets[part]) else f"{sizes.budgets[part]:.0f} s"
        secs = "" if s["secs"] is None else f"{s['secs']:.0f} s"
        lines.append(f"| {part}: {TITLES[part]} | {s['status']} | {s['result']} | {budget} | {secs} |")
    lines += ["", f"Whole check: {time.monotonic() - started:.0f} s of a {sizes.deadline:.0f} s deadline.", "",
              "| goal | measured | verdict |", "|---|---|---|"]
    try:
        rows = goals(out, gpu)
    except Exception as err:  # the summary must come out whatever a part left behind
        rows = [("goals", f"could not be read: {err!r}", "")]
    lines += [f"| {g} | {m} | {v} |" for g, m, v in rows]
    if rehearse:
        lines += ["", "Rehearsal: the CPU demo model at tiny sizes; the figures and verdicts say nothing about a GPU."]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    _write_json(out / "summary.json", {"rehearsal": rehearse, "header": header, "parts": status,
                                       "goals": [{"goal": g, "measured": m, "verdict": v} for g, m, v in rows]})
    return text
