"""The person-facing side in a real browser: `ftcl ui` on a store made by real stages, driven with
Debian's chromium (headless, through Playwright's Python package; no browser download).

A tiny two-row experiment (digits, ResNet-18 of width 8, 2 epochs) is run stage by stage
(`ftcl pretrain`, `ftcl linear`, `ftcl knn` per row, then `ftcl aggregate`), laid out as the
pipeline lays it out. Then, in the browser: the experiment's runs table lists the parent run of
every row, one pretraining run's artifact viewer shows the score-distribution PNG (loaded, natural
size > 0), and `report.html` holds the ablation table with every row. Screenshots go to
``test-artifacts/browser/`` (git-ignored).

Needs ``/usr/bin/chromium`` (Debian package ``chromium``) and ``pip install playwright``; the
browser tests skip, saying which is missing, without them. `playwright install` is never run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("FTCL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
EXPERIMENT = "tiny-browser"
ROWS = {"moco_v2": {}, "+ft": {"ft.positive.mode": "extrapolate", "ft.negative.mode": "interpolate"}}
# a tiny run: scikit-learn digits (8x8, no download), a width-8 ResNet-18 with the small stem
TINY = {
    "device": "cpu", "data.dataset": "digits", "data.num_workers": 0, "data.train_subset": 320,
    "data.test_subset": 200, "augment.crop_scale": [0.5, 1.0], "model.width": 8, "model.small_stem": True,
    "model.feature_dim": 32, "method.queue_size": 256, "optim.epochs": 2, "optim.batch_size": 64,
    "optim.amp": False, "optim.channels_last": False, "scores.histogram_every": 1, "eval.linear.epochs": 2,
    "eval.knn.k": 20, "log_every": 1000, "checkpoint.keep": 1,
}

# Runs every stage in one Python process (torch and mlflow imported once) through ftcl's own CLI.
BUILD = textwrap.dedent("""
    import json, sys, time
    from ftcl.cli import main
    plan = json.loads(sys.argv[1])
    for argv in plan:
        start = time.monotonic()
        code = main(argv)
        if code:
            sys.exit(f"ftcl {' '.join(argv)} exited with {code}")
        print(f"[store] ftcl {argv[0]}: {time.monotonic() - start:.1f} s", file=sys.stderr)
""")


def _sets(mapping: dict) -> list[str]:
    """``--set key=value`` arguments (JSON values are YAML values)."""
    return [arg for key, value in mapping.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Results of the tiny experiment, as the pipeline lays them out, with its MLflow store."""
    results = tmp_path_factory.mktemp("browser") / "results"
    exp_dir = results / EXPERIMENT
    uri = f"sqlite:///{results / 'mlflow.db'}"
    plan = []
    for row, overrides in ROWS.items():
        seed_dir = exp_dir / row / "seed0"
        common = _sets({**TINY, **overrides, "experiment": EXPERIMENT, "seed": 0, "tracking.uri": uri,
                        "tracking.tags.row": row, "tracking.tags.seed": 0})
        plan.append(["pretrain", *common, "--out", str(seed_dir / "pretrain")])
        for stage in ("linear", "knn"):
            plan.append([stage, *common, "--checkpoint", str(seed_dir / "pretrain"), "--out", str(seed_dir / stage)])
    pipeline = {"experiment": EXPERIMENT, "results_dir": str(results), "seeds": [0],
                "stages": ["pretrain", "linear", "knn"], "tracking": {"uri": uri},
                "ablations": [{"name": row, "baseline": row == "moco_v2", "overrides": overrides}
                              for row, overrides in ROWS.items()]}
    results.mkdir(parents=True, exist_ok=True)
    configfile = results / "pipeline.yaml"
    configfile.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    plan.append(["aggregate", "--configfile", str(configfile)])
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", BUILD, json.dumps(plan)], capture_output=True, text=True,
                          timeout=600, cwd=results.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    timings = [ln for ln in proc.stderr.splitlines() if ln.startswith("[store]")]
    print(f"[store] built in {time.monotonic() - start:.1f} s: " + ", ".join(t.split("ftcl ")[1] for t in timings))
    return {"results": results, "uri": uri, "exp_dir": exp_dir, "report": exp_dir / "report.html"}


@pytest.mark.slow
def test_runs_read_well_in_the_store(store):
    """Names, descriptions, states, stepped metrics and score-distribution files, as the UI shows them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store["uri"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    by_name = {}
    for run in runs:
        by_name.setdefault(run.info.run_name, []).append(run)
    for row, overrides in ROWS.items():
        parent = by_name[f"{row} · seed 0"]
        assert len(parent) == 1
        parent = parent[0]
        tags = parent.data.tags
        assert tags["ftcl.stage"] == "parent" and tags["ftcl.row"] == row and tags["ftcl.seed"] == "0"
        assert {"ftcl.git_commit", "ftcl.launcher"} <= set(tags)
        note = tags["mlflow.note.content"]
        assert row in note and "model.width" in note
        for key, value in overrides.items():
            assert f"`{key}`: `{value}`" in note, note
        assert parent.info.status == "FINISHED", "a parent run ends when its last stage ends"
        children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert set(children) == {"pretrain", "linear", "knn"}
        for stage, child in children.items():
            assert child.data.tags["ftcl.stage"] == stage and child.info.status == "FINISHED"
            assert {"ftcl.git_commit", "ftcl.launcher", "ftcl.row", "ftcl.seed"} <= set(child.data.tags)
        pretrain = children["pretrain"].info.run_id
        for metric in ("pretrain/loss", "scores/pos_mean", "scores/neg_mean", "scores/neg_var"):
            steps = [m.step for m in client.get_metric_history(pretrain, metric)]
            assert steps == [1, 2], f"{metric}: one point per epoch, at steps 1 and 2 (a curve), got {steps}"
        assert "linear/top1" in children["linear"].data.metrics and "knn/top1" in children["knn"].data.metrics
        files = [a.path for a in client.list_artifacts(pretrain, "score_distribution")]
        assert "score_distribution/score_histograms.png" in files, files
        assert any(f.endswith(".parquet") for f in files), files


def test_a_parent_run_shows_the_state_of_its_stages(tmp_path):
    """RUNNING while a stage runs; ended when the last running stage ends: FAILED when one failed."""
    from mlflow.tracking import MlflowClient

    from ftcl import config
    from ftcl.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config.resolve(overrides={"experiment": "states", "tracking.uri": uri, "tracking.tags.row": "+ft",
                                    "tracking.tags.seed": 1, "ft.positive.mode": "extrapolate",
                                    "tracking.tags.description": "FT on the positives only"})
    client = MlflowClient(uri)

    def parent():
        exp = client.get_experiment_by_name("states")
        (run,) = client.search_runs([exp.experiment_id], "tags.`ftcl.stage` = 'parent'")
        return run

    pretrain = Tracker(cfg, tmp_path / "pretrain", "pretrain")
    assert parent().info.status == "RUNNING" and parent().info.run_name == "+ft · seed 1"
    note = parent().data.tags["mlflow.note.content"]
    assert note.startswith("**+ft** · seed 1") and "FT on the positives only" in note
    assert "- `ft.positive.mode`: `extrapolate`" in note and "tracking" not in note
    assert "description" not in client.get_run(pretrain.run_id).data.tags  # the text is no tag
    pretrain.finish("FAILED")
    assert parent().info.status == "FAILED"
    pretrain = Tracker(cfg, tmp_path / "pretrain", "pretrain")  # requeued: the same run continues
    assert parent().info.status == "RUNNING"
    pretrain.finish()
    assert parent().info.status == "FINISHED"
    linear, knn = Tracker(cfg, tmp_path / "linear", "linear"), Tracker(cfg, tmp_path / "knn", "knn")
    linear.finish()
    assert parent().info.status == "RUNNING", "knn still runs"
    knn.finish()
    assert parent().info.status == "FINISHED"
    exp = client.get_experiment_by_name("states")
    assert len(client.search_runs([exp.experiment_id])) == 4  # one parent, three stages


# --------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def chromium():
    """A headless Debian chromium driven by Playwright (skips, naming what is missing)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright's Python package is not installed (pip install playwright; no browser download)")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def ui(store):
    """`ftcl ui` on the store: yields the URL it printed; stopped with Ctrl-C (SIGINT) afterwards."""
    cmd = [sys.executable, "-m", "ftcl.cli", "ui", "--tracking-uri", store["uri"], "--experiment", EXPERIMENT,
           "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=store["results"].parent)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 120
    url = None
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        url = next((ln.strip() for ln in list(lines) if ln.strip().startswith("http://")), None)
        time.sleep(0.2)
    try:
        assert url, f"ftcl ui printed no URL:\n{''.join(lines)}"
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def page(chromium):
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = chromium.new_context(viewport={"width": 1440, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    yield page
    context.close()


def _shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"))


@pytest.mark.slow
def test_the_ui_lists_every_row_and_shows_a_score_distribution_png(chromium, store, ui, page):
    assert "/#/experiments/" in ui
    try:
        _walk_the_ui(page, ui)
    except Exception:
        _shot(page, "failure-ui")
        raise


def _walk_the_ui(page, url: str) -> None:
    page.goto(url)
    # the experiment's runs table: one parent run per row, named "<row> · seed <k>"
    for row in ROWS:
        page.get_by_role("link", name=f"{row} · seed 0", exact=True).wait_for()
    _shot(page, "1-runs")

    # as a person who works with training runs would: the UI's "Model training" mode kept (MLflow
    # remembers it in localStorage), the assistant panel closed
    page.evaluate("""() => {
        localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
        localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
        localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
    }""")
    page.reload()

    # a row's parent run: its description lists the settings of the row
    page.get_by_role("link", name="+ft · seed 0", exact=True).click()
    note = page.get_by_text("ft.positive.mode", exact=True).first
    note.scroll_into_view_if_needed()
    _shot(page, "2-parent-run-description")
    page.go_back()

    # expand the moco_v2 parent run, open its pretraining run: curves of the per-epoch metrics
    row = page.locator("[role=row]", has_text="moco_v2 · seed 0")
    row.locator("[col-id='attributes.`Run Name`'] button").first.click()
    page.get_by_role("link", name="pretrain", exact=True).first.click()
    page.get_by_role("tab", name="Model metrics").click()
    page.get_by_text("(pretrain/loss)").first.wait_for()
    _shot(page, "3-pretrain-metric-curves")

    # its artifacts: the score-distribution PNG shows in the artifact viewer
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("score_distribution", exact=True).click()
    # the folder holds the plots and the raw statistics (per-epoch parquet files)
    for name in ("score_curves.png", "epoch_0000.parquet", "hist_epoch_0001.parquet"):
        page.get_by_text(name, exact=True).wait_for()
    page.get_by_text("score_histograms.png", exact=True).click()
    img = page.locator("img[alt='score_distribution/score_histograms.png']")
    img.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    width, height = img.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert width > 0 and height > 0
    _shot(page, "4-score-distribution-png")


@pytest.mark.slow
def test_the_report_holds_the_ablation_table_with_every_row(chromium, store, page):
    page.goto(store["report"].as_uri())
    table = page.locator("#ablation-table")
    table.wait_for()
    first_cells = table.locator("tbody tr td:first-child").all_inner_texts()
    assert [cell.strip() for cell in first_cells] == list(ROWS)
    for img in page.locator("figure img").all():
        assert img.evaluate("img => img.complete && img.naturalWidth > 0")
    _shot(page, "5-report")
    page.screenshot(path=str(SHOTS / "5-report-full.png"), full_page=True)
