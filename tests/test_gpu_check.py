"""The prepared GPU check (benchmarks/gpu_check.sh) starts on the GPU node's image as it comes.

The image holds torch, torchvision, numpy, pandas, scipy, pyyaml, pillow, matplotlib, seaborn,
scikit-learn, pyarrow, tabulate, psutil, attrs, cloudpickle, pytest, pytest-timeout, typing-extensions,
packaging, filelock, jinja2 and requests (and what they need), but not jsonschema (with its
dependencies), simplejpeg, mlflow, submitit, snakemake or pycocotools, and it has no network. The
slow test rebuilds that environment from this venv's own package folders (a venv without system site
packages, the image's distributions linked in), fetches the wheels with benchmarks/fetch_wheels.sh
(this Python's builds, to install them; the cp312 set, to check that it installs for the node's
Python 3.12) and runs the check's CPU rehearsal in it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402  (benchmarks/ is not a package)

#: the distributions the node's image has (beyond what they need, which image_distributions adds)
IMAGE = ("torch", "torchvision", "numpy", "attrs", "cloudpickle", "pandas", "scipy", "pyyaml", "pillow", "matplotlib",
         "seaborn", "scikit-learn", "pyarrow", "tabulate", "psutil", "pytest", "pytest-timeout", "typing-extensions",
         "packaging", "filelock", "jinja2", "requests", "pip")
#: import names the image lacks: the wheels' (installed by the check) and the pipeline's (never needed)
WHEEL_MODULES = ("jsonschema", "jsonschema_specifications", "referencing", "rpds", "simplejpeg")
ABSENT = (*WHEEL_MODULES, "mlflow", "submitit", "snakemake", "pycocotools")
#: the node's interpreter, for evaluating requirement markers
NODE = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
        "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _needed(requires: list[str] | None, env: dict[str, str], extras: set[str] = frozenset()) -> list[Requirement]:
    """The requirements of ``requires`` that apply in ``env`` (with ``extras`` asked for)."""
    out = []
    for line in requires or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            out.append(req)
    return out


def image_distributions() -> dict[str, metadata.Distribution]:
    """The image's distributions as this venv has them, with everything they need to import."""
    seen: dict[str, metadata.Distribution] = {}
    todo: list[tuple[str, set[str]]] = [(name, set()) for name in IMAGE]
    env = default_environment()
    while todo:
        name, extras = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if _norm(name) in seen and not extras:
            continue
        seen[_norm(name)] = dist
        todo += [(req.name, set(req.extras)) for req in _needed(dist.requires, env, extras)]
    return seen


def pins() -> list[tuple[str, str]]:
    text = subprocess.run(["bash", str(REPO / "benchmarks" / "fetch_wheels.sh"), "--pins"], capture_output=True,
                          text=True, check=True).stdout
    return [tuple(line.split("==")) for line in text.split()]


def unmet(requires: dict[str, list[str] | None], env: dict[str, str], have: set[str]) -> dict[str, list[str]]:
    """Per distribution, its requirements in ``env`` that are none of ``have``."""
    out = {}
    for name, lines in requires.items():
        missing = [str(r) for r in _needed(lines, env) if _norm(r.name) not in have]
        if missing:
            out[name] = missing
    return out


def make_image_env(folder: Path) -> Path:
    """A venv without system site packages whose site-packages links in only the image's
    distributions from this venv; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    site = next((folder / "lib").glob("python3*/site-packages"))
    for dist in image_distributions().values():
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            src, dst = Path(dist.locate_file(top)), site / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
    return folder / "bin" / "python"


def bare_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would leak this venv into a child."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(REPO / ".venv")))
    return {**env, **extra}


# ---------------------------------------------------------------------------------- fast checks
def test_the_wheels_are_pinned_to_this_venvs_versions_and_only_what_the_image_lacks():
    pinned = dict(pins())
    assert {_norm(n) for n in pinned} == {"jsonschema", "jsonschema-specifications", "referencing", "rpds-py",
                                          "simplejpeg"}
    assert {n: metadata.version(n) for n in pinned} == pinned
    image = image_distributions()
    assert not set(map(_norm, pinned)) & set(image), "a pinned wheel the image already has"
    assert not {"mlflow", "submitit", "snakemake", "pycocotools"} & set(image)
    # every dependency of a wheel, on the node's Python 3.12, is another wheel or in the image
    requires = {n: metadata.distribution(n).requires for n in pinned}
    assert unmet(requires, NODE, set(image) | set(map(_norm, pinned))) == {}


def test_a_part_past_its_budget_is_killed_with_its_process_group(tmp_path):
    code = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); "
            "print('child', p.pid, flush=True); time.sleep(60)")
    log = tmp_path / "part.log"
    start = time.monotonic()
    rc, secs, timed_out = gpu_check.run_part([sys.executable, "-c", code], 2, log, dict(os.environ))
    assert timed_out and rc is not None and time.monotonic() - start < 20
    text = log.read_text()
    assert "timed out after 2 s" in text
    child = int(re.search(r"child (\d+)", text).group(1))
    for _ in range(50):  # the grandchild went with its group (gone, or a zombie until reaped)
        try:
            state = Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {child} of the killed part still runs")


def test_the_summary_lists_every_part_and_judges_the_goals(tmp_path):
    (tmp_path / "results").mkdir()
    methods = {"moco": {"images_per_s": 2400.0, "ratio_to_moco": [1, 1, 1], "compile_s": 80.0},
               "moco+ft": {"images_per_s": 2600.0, "ratio_to_moco": [1.0, 0.99, 1.01], "compile_s": 10.0},
               "moco+ft+scores": {"images_per_s": 2380.0, "ratio_to_moco": [0.99, 0.975, 1.005]},
               "supervised": {"images_per_s": 3500.0, "ratio_to_moco": [1.45, 1.44, 1.46]},
               "moco+ft/supervised": [0.74, 0.72, 0.76]}
    (tmp_path / "results" / "methods-gpu.json").write_text(json.dumps({"results": methods}))
    (tmp_path / "loader.json").write_text(json.dumps({"images_per_s": 3900.0}))
    (tmp_path / "loader-gpu.json").write_text(json.dumps({"images_per_s": 7800.0}))
    status = {"environment": {"status": "ok", "result": "torch", "secs": 9.0},
              "methods-eager": {"status": "timed out after 100 s", "result": "", "secs": 100.0}}
    text = gpu_check.write_summary(tmp_path, status, gpu_check.GPU, False, time.monotonic(), "header", final=True)
    for part in gpu_check.PARTS:
        assert f"| {part}: " in text
    assert "| cuda-tests: CUDA-marked tests (pytest -m cuda) | not reached |" in text
    assert "timed out after 100 s" in text
    goals = {row["goal"]: row for row in json.loads((tmp_path / "summary.json").read_text())["goals"]}
    assert [g["verdict"] for g in goals.values()] == ["eager: met", "eager: met", "eager: undecided", "met",
                                                      "measured (no goal)"]
    assert "3900 / 2600 (MoCo + FT, eager) = 1.50" in goals["loader images/s >= training step images/s"]["measured"]
    decode = goals["decode: gpu against decode: fast (loader images/s, every CPU core)"]["measured"]
    assert decode == "7800 / 3900 = 2.00"
    assert (tmp_path / "summary.md").read_text() == text


# ------------------------------------------------------------------------- the rehearsal, slow
def _pip(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, **kw)


def _fetch(dest: Path, version: str) -> None:
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "fetch_wheels.sh"), "--python-version", version,
                          "--dest", str(dest)], capture_output=True, text=True, env={**os.environ,
                          "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(list(dest.glob("*.whl"))) == len(pins())


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_rehearsal_runs_in_the_images_environment(tmp_path):
    python = make_image_env(tmp_path / "image")
    for module in ABSENT:
        probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True, env=bare_env())
        assert probe.returncode != 0 and "No module named" in probe.stderr, f"{module} importable in the image env"
    probe = subprocess.run([str(python), "-c", "import torch, torchvision, numpy, yaml, pandas, scipy, PIL, pyarrow, "
                            "matplotlib, pytest"], capture_output=True, text=True, env=bare_env())
    assert probe.returncode == 0, probe.stderr

    name, version = pins()[0]
    reach = _pip(["download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(tmp_path / "probe"),
                  f"{name}=={version}"], env={**os.environ, "PIP_RETRIES": "0", "PIP_TIMEOUT": "20"})
    if reach.returncode != 0:
        pytest.skip(f"pip cannot reach the package index: {(reach.stderr or reach.stdout).strip()[-300:]}")

    # the node's set: cp312 builds, installable for Python 3.12 on manylinux x86_64 with nothing else
    node = tmp_path / "cp312"
    _fetch(node, "3.12")
    tags = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    dry = _pip(["install", "--dry-run", "--no-index", "--find-links", str(node), "--no-deps", "--only-binary=:all:",
                "--python-version", "3.12", "--implementation", "cp", *tags, "--target", str(tmp_path / "t312"),
                *[f"{n}=={v}" for n, v in pins()]], env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert all(f"{n}-{v}" in dry.stdout for n, v in pins()), dry.stdout
    wheel_requires = {}
    for wheel in node.glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            text = zf.read(meta).decode()
        wheel_requires[wheel.name] = [line.split(":", 1)[1].strip() for line in text.splitlines()
                                      if line.startswith("Requires-Dist:")]
    have = set(image_distributions()) | {_norm(n) for n, _ in pins()}
    assert unmet(wheel_requires, NODE, have) == {}

    # this machine's Python: the same versions' builds for it, then the rehearsal
    here = tmp_path / f"cp{sys.version_info.major}{sys.version_info.minor}"
    _fetch(here, f"{sys.version_info.major}.{sys.version_info.minor}")
    out = tmp_path / "out"
    start = time.monotonic()
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--rehearse"], capture_output=True,
                         text=True, cwd=tmp_path,
                         env=bare_env(PYTHON=str(python), FTCL_WHEELS=str(here), OUT=str(out)))
    wall = time.monotonic() - start
    print(f"rehearsal: {wall:.0f} s\n{run.stdout[-4000:]}")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert summary in run.stdout
    parts = json.loads((out / "summary.json").read_text())["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    assert {p: s["status"] for p, s in parts.items()} == {
        "environment": "ok", "cuda-tests": "skipped: no CUDA", "methods-eager": "ok", "data": "ok", "loader": "ok",
        "loader-gpu": "ok", "pretrain": "ok", "smoke": "ok", "methods-compile": "skipped: no CUDA"}
    env = json.loads((out / "environment.json").read_text())
    assert env["imported_not_needed"] == [] and env["installed_not_needed"] == []
    assert env["decoder"].startswith("TurboJPEG") and env["jsonschema"] == dict(pins())["jsonschema"]
    assert "2 skipped" in parts["cuda-tests"]["result"]
    assert (out / "pretrain" / "pretrain.json").exists() and not (out / "pretrain" / "checkpoints").exists()
    assert json.loads((out / "loader-gpu.json").read_text())["decode"] == "gpu"  # the CPU decode stands in
    smoke = json.loads((out / "smoke.json").read_text())  # the IN-100 paper config's stage commands, smoke mode
    assert smoke["row"] == "+ft" and list(smoke["stages"]) == ["pretrain", "linear", "knn"]
    assert all(s["exit"] == 0 for s in smoke["stages"].values())
    assert 0 <= smoke["stages"]["knn"]["result"]["top1"] <= 100
    for part in gpu_check.PARTS:
        if part != "methods-compile":
            assert (out / f"{part}.log").stat().st_size > 0
