"""The person-facing side in a real browser: `ftcl ui` on a store made by real stages, driven with
Debian's chromium (headless, through Playwright's Python package; no browser download).

A tiny two-row experiment (digits, ResNet-18 of width 8, 2 epochs) is run stage by stage
(`ftcl pretrain`, `ftcl linear`, `ftcl knn` per row, then `ftcl aggregate`), laid out as the
pipeline lays it out. Then, in the browser: the experiment's runs table lists the row run of every
row, with its parent run under it, one pretraining run's artifact viewer shows the
score-distribution PNG (loaded, natural size > 0), and `report.html` holds the ablation table with
every row. A second, untrained store
(`Tracker`s logging what the stages log, in seconds) checks how rows are compared: the experiment
opens on its runs table, and MLflow's compare view of two parent runs shows each row's overrides
and headline results. A third store of two rows x two seeds (``Tracker``s and result files, then
`ftcl aggregate`), opened by `ftcl ui` with no option in its project folder, shows the row runs at
the top of the runs table and compares them on the ablation table's numbers (means, deltas and
their intervals). Screenshots go to ``test-artifacts/browser/`` (git-ignored).

Needs ``/usr/bin/chromium`` (Debian package ``chromium``) and ``pip install playwright``; the
browser tests skip, saying which is missing, without them. `playwright install` is never run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
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
                        "tracking.tags.row": row, "tracking.tags.seed": 0,
                        "tracking.tags.overrides": json.dumps(overrides)})
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
        assert parent.data.params == {"seed": "0", **overrides}, "the row's overrides, for comparing rows"
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
        headline = {**{k: children["pretrain"].data.metrics[k] for k in ("scores/pos_mean", "scores/neg_mean")},
                    "linear/top1": children["linear"].data.metrics["linear/top1"],
                    "knn/top1": children["knn"].data.metrics["knn/top1"]}
        assert parent.data.metrics == headline, "the parent shows the latest headline result of each stage"
        (row_run,) = by_name[row]  # the row run above it, with the ablation table's numbers (one seed)
        assert row_run.data.tags["ftcl.stage"] == "row" and "mlflow.parentRunId" not in row_run.data.tags
        assert tags["mlflow.parentRunId"] == row_run.info.run_id
        assert row_run.data.params == overrides
        assert row_run.data.metrics["linear_top1/mean"] == pytest.approx(headline["linear/top1"])
        assert row_run.data.metrics["knn_top1/n"] == 1 and "knn_top1/std" not in row_run.data.metrics
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
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["ftcl.stage"] for r in runs) == ["knn", "linear", "parent", "pretrain", "row"]
    (row,) = [r for r in runs if r.data.tags["ftcl.stage"] == "row"]  # the row run above the parent
    assert row.info.run_name == "+ft" and row.info.status == "FINISHED"
    assert parent().data.tags["mlflow.parentRunId"] == row.info.run_id


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
    with _serve(store["uri"], EXPERIMENT, store["results"].parent) as url:
        yield url


@contextlib.contextmanager
def _serve(uri: str, experiment: str, cwd: Path) -> Iterator[str]:
    """`ftcl ui --experiment` on ``uri`` as a person starts it: the URL it printed, then Ctrl-C."""
    with _ftcl_ui(["--tracking-uri", uri, "--experiment", experiment], cwd) as (url, _):
        yield url


@contextlib.contextmanager
def _ftcl_ui(args: list[str], cwd: Path) -> Iterator[tuple[str, list[str]]]:
    """`ftcl ui ARGS --port 0` in ``cwd`` as a person starts it: (the URL it printed, its output
    lines so far), then Ctrl-C."""
    cmd = [sys.executable, "-m", "ftcl.cli", "ui", *args, "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=cwd)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 120
    url = None
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        url = next((ln.strip() for ln in list(lines) if ln.strip().startswith("http://")), None)
        time.sleep(0.2)
    try:
        assert url, f"ftcl ui printed no URL:\n{''.join(lines)}"
        yield url, lines
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
    # the experiment's runs table: one row run per row, its parent run "<row> · seed <k>" under it
    _expand_row_runs(page, ROWS)
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
    _expand_row_runs(page, ["+ft"])
    page.get_by_role("link", name="+ft · seed 0", exact=True).click()
    note = page.get_by_text("ft.positive.mode", exact=True).first
    note.scroll_into_view_if_needed()
    _shot(page, "2-parent-run-description")
    page.go_back()

    # expand the moco_v2 parent run, open its pretraining run: curves of the per-epoch metrics
    _expand_row_runs(page, ["moco_v2"])
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


# --------------------------------------------------------------------------- comparing rows

COMPARE_EXPERIMENT = "tiny-compare"
#: what each row's stages log (values with decimals, shown as logged); the +ft row's linear stage
#: ran twice: its first run (39.5) was superseded, so the parent shows the second
COMPARE_ROWS = {
    "moco_v2": ({}, {"scores/pos_mean": 0.61, "scores/neg_mean": 0.12, "linear/top1": 40.25, "knn/top1": 35.5,
                     "det/voc07_AP50": 55.5, "det/voc07_AP": 30.25}),
    "+ft": ({"ft.positive.mode": "extrapolate", "ft.negative.mode": "interpolate"},
            {"scores/pos_mean": 0.65, "scores/neg_mean": 0.08, "linear/top1": 43.75, "knn/top1": 37.25,
             "det/voc07_AP50": 57.75, "det/voc07_AP": 31.5}),
}
STAGE_METRICS = {"pretrain": ("scores/",), "linear": ("linear/",), "knn": ("knn/",), "detection": ("det/",)}


@pytest.fixture(scope="module")
def compare_store(tmp_path_factory):
    """A store of two rows x one seed whose stage runs log what the stages log (no training): the
    pretraining per epoch, the others once, through ``Tracker`` as the stages do."""
    from mlflow.tracking import MlflowClient

    from ftcl import config
    from ftcl.tracking import Tracker, supersede_run

    results = tmp_path_factory.mktemp("compare") / "results"
    uri = f"sqlite:///{results / 'mlflow.db'}"
    start = time.monotonic()
    for row, (overrides, final) in COMPARE_ROWS.items():
        cfg = config.resolve(overrides={**overrides, "experiment": COMPARE_EXPERIMENT, "seed": 0, "tracking.uri": uri,
                                        "tracking.tags.row": row, "tracking.tags.seed": 0,
                                        "tracking.tags.overrides": json.dumps(overrides)})
        seed_dir = results / COMPARE_EXPERIMENT / row / "seed0"
        if row == "+ft":  # a first linear run, superseded (its folder moved aside) before the rerun
            with Tracker(cfg, seed_dir / "_superseded" / "linear", "linear") as old:
                old.log_metrics({"linear/top1": 39.5}, step=2)
            supersede_run(MlflowClient(uri), old.run_id, "20260101T000000Z")
        for stage, prefixes in STAGE_METRICS.items():
            metrics = {k: v for k, v in final.items() if k.startswith(prefixes)}
            with Tracker(cfg, seed_dir / stage, stage) as tracker:
                if stage == "pretrain":  # per epoch, the last epoch's values are the final ones
                    tracker.log_metrics({"pretrain/loss": 6.0, **{k: v / 2 for k, v in metrics.items()}}, step=1)
                tracker.log_metrics(metrics, step=2)
    print(f"[compare store] built in {time.monotonic() - start:.1f} s")
    return {"uri": uri, "results": results}


@pytest.fixture(scope="module")
def compare_ui(compare_store):
    with _serve(compare_store["uri"], COMPARE_EXPERIMENT, compare_store["results"].parent) as url:
        yield url


def test_parent_runs_hold_each_row_overrides_and_headline_results(compare_store):
    from mlflow.tracking import MlflowClient

    from ftcl.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    client = MlflowClient(compare_store["uri"])
    exp = client.get_experiment_by_name(COMPARE_EXPERIMENT)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    runs = client.search_runs([exp.experiment_id], "tags.`ftcl.stage` = 'parent'")
    got = {r.info.run_name: (r.data.params, r.data.metrics) for r in runs}
    assert got == {f"{row} · seed 0": ({"seed": "0", **overrides}, final)
                   for row, (overrides, final) in COMPARE_ROWS.items()}


@pytest.mark.slow
def test_the_experiment_opens_on_its_runs_table_and_compares_rows_on_their_parent_runs(
        chromium, compare_store, compare_ui, page):
    try:
        _compare_rows(page, compare_ui)
    except Exception:
        _shot(page, "failure-compare")
        raise


def _compare_rows(page, url: str) -> None:
    page.add_init_script(CLOSED_ASSISTANT)
    # the URL `ftcl ui` prints opens the experiment on its runs table (not MLflow 3's GenAI overview)
    page.goto(url)
    _expand_row_runs(page, COMPARE_ROWS)  # each row run holds its seed's parent run
    assert "/runs" in page.url and "workflowType=machine_learning" in page.url, page.url
    page.get_by_role("heading", name="Runs").wait_for()
    assert not page.get_by_text("Detect Issues").count(), "a GenAI page"
    _shot(page, "6-experiment-opens-on-runs")

    # select both parent runs and open MLflow's compare view
    for row in COMPARE_ROWS:
        page.locator("[role=row]", has_text=f"{row} · seed 0").locator("input.ag-checkbox-input").first.check()
    _shot(page, "7-two-parent-runs-selected")
    page.get_by_role("button", name="Compare", exact=True).click()
    page.get_by_text("Comparing 2 Runs").wait_for()
    page.get_by_role("switch", name="Metrics - Show diff only").wait_for()
    runs = _compare_table_row(page, "Run Name:")
    assert sorted(runs) == sorted(f"{row} · seed 0" for row in COMPARE_ROWS), runs

    # every headline metric, with each row's value in its run's column
    shown = page.evaluate(METRICS_GRID_JS)
    expected = {name: [_number(COMPARE_ROWS[run.split(" · ")[0]][1][name]) for run in runs]
                for name in COMPARE_ROWS["moco_v2"][1]}
    assert {name: values for name, values in shown.items() if name in expected} == expected, shown
    # the params: each row's overrides (the baseline overrides nothing) and the seed
    for key, value in COMPARE_ROWS["+ft"][0].items():
        assert _compare_table_row(page, key) == [value if run.startswith("+ft") else "" for run in runs]
    assert _compare_table_row(page, "seed") == ["0", "0"]
    page.get_by_role("switch", name="Metrics - Show diff only").scroll_into_view_if_needed()
    _shot(page, "8-compare-parent-runs")

    # what `ftcl ui` tells a person who opens the experiment from MLflow's own experiment list: pick
    # 'Model training' once, and the experiment opens on its runs table
    page.goto("about:blank")  # a fresh load of the UI, as a new tab
    page.goto(url.split("#")[0] + "#/experiments")
    experiment = page.get_by_role("link", name=COMPARE_EXPERIMENT, exact=True)
    experiment.wait_for()
    page.get_by_role("button", name="Model training", exact=True).click()
    page.wait_for_function("() => localStorage.getItem('mlflow.workflowType_v1') === '\"machine_learning\"'")
    experiment.click()
    page.get_by_role("link", name="+ft", exact=True).wait_for()  # the row run
    assert "/runs" in page.url, page.url
    _shot(page, "9-experiment-list-model-training")


def _expand_row_runs(page, rows) -> None:
    """Open the row runs of ``rows`` in the runs table (its top level), showing their seed 0 parent runs."""
    for row in rows:
        page.get_by_role("link", name=row, exact=True).wait_for()
        seed_run = page.get_by_role("link", name=f"{row} · seed 0", exact=True)
        if seed_run.count():
            continue  # open already
        _row_line(page, row).locator("[col-id='attributes.`Run Name`'] button").first.click()
        seed_run.wait_for()


def _row_line(page, run_name: str):
    """The runs table's line of the run named exactly ``run_name``."""
    return page.locator("[role=row]").filter(has=page.get_by_role("link", name=run_name, exact=True))


def _number(value: float) -> str:
    """A metric value as the compare view shows it."""
    return f"{value:g}"


def _compare_table_row(page, header: str) -> list[str]:
    """The cells of the compare view's table row headed ``header`` (one per run, in column order)."""
    row = page.locator("tr").filter(has=page.locator(f"th:text-is('{header}')")).first
    return [cell.strip() for cell in row.locator("td").all_inner_texts()]


# --------------------------------------------------------------------------- row runs

ROW_EXPERIMENT = "tiny-rows"
FT_OVERRIDES = {"ft.positive.mode": "extrapolate", "ft.negative.mode": "interpolate"}
#: row -> (overrides, seed -> (linear top-1, kNN top-1)) written as the stages write them
ROW_RESULTS = {
    "moco_v2": ({}, {0: (40.25, 35.5), 1: (41.75, 36.5)}),
    "+ft": (FT_OVERRIDES, {0: (43.5, 37.25), 1: (44.0, 38.75)}),
}


@pytest.fixture(scope="module")
def row_store(tmp_path_factory):
    """A project folder (``config/config.yaml``, ``results/``) of two rows x two seeds whose stages
    logged through ``Tracker`` and wrote their result files as the stages do (no training), then
    ``ftcl aggregate``: the row runs hold the ablation table's numbers."""
    from ftcl import config
    from ftcl.cli import main
    from ftcl.tracking import Tracker

    work = tmp_path_factory.mktemp("rows")
    results = work / "results"
    uri = f"sqlite:///{results / 'mlflow.db'}"
    start = time.monotonic()
    for row, (overrides, seeds) in ROW_RESULTS.items():
        for seed, (linear, knn) in seeds.items():
            cfg = config.resolve(overrides={
                **overrides, "experiment": ROW_EXPERIMENT, "seed": seed, "tracking.uri": uri,
                "tracking.tags.row": row, "tracking.tags.seed": seed, "tracking.tags.overrides": json.dumps(overrides),
                "tracking.tags.description": f"row {row}"})
            seed_dir = results / ROW_EXPERIMENT / row / f"seed{seed}"
            pretrain = {"epochs": 2, "scores/pos_mean": {"moco_v2": 0.5, "+ft": 0.6}[row] + seed / 10,
                        "scores/neg_mean": 0.1}
            for stage, result in (("pretrain", pretrain), ("linear", {"top1": linear}), ("knn", {"top1": knn})):
                with Tracker(cfg, seed_dir / stage, stage) as tracker:
                    tracker.log_metrics({"pretrain/loss": 6.0, "scores/pos_mean": result["scores/pos_mean"]}
                                        if stage == "pretrain" else {f"{stage}/top1": result["top1"]}, step=2)
                (seed_dir / stage / f"{stage}.json").write_text(json.dumps(result))
    (work / "config").mkdir()
    (work / "config" / "config.yaml").write_text(yaml.safe_dump({
        "experiment": ROW_EXPERIMENT, "results_dir": str(results), "seeds": [0, 1],
        "stages": ["pretrain", "linear", "knn"],
        "ablations": [{"name": row, "baseline": row == "moco_v2", "description": f"row {row}", "overrides": overrides}
                      for row, (overrides, _) in ROW_RESULTS.items()]}, sort_keys=False))
    assert main(["aggregate", "--configfile", str(work / "config" / "config.yaml")]) == 0
    print(f"[row store] built in {time.monotonic() - start:.1f} s")
    return {"uri": uri, "work": work}


def test_row_runs_hold_the_tables_numbers_with_the_seed_runs_under_them(row_store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(row_store["uri"])
    exp = client.get_experiment_by_name(ROW_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    rows = {r.info.run_name: r for r in runs if r.data.tags.get("ftcl.stage") == "row"}
    assert set(rows) == set(ROW_RESULTS)
    for run in runs:
        stage = run.data.tags.get("ftcl.stage")
        if stage == "parent":
            assert run.data.tags["mlflow.parentRunId"] == rows[run.data.tags["ftcl.row"]].info.run_id
        elif stage in ("row", "aggregate"):
            assert "mlflow.parentRunId" not in run.data.tags  # the runs table's top level
    ft = rows["+ft"].data.metrics
    assert ft["linear_top1/mean"] == 43.75 and ft["linear_top1/n"] == 2
    assert ft["linear_top1/delta"] == pytest.approx(2.75)  # paired: (43.5 - 40.25, 44.0 - 41.75)
    assert ft["linear_top1/delta_low"] == pytest.approx(2.75 - 12.706204736 * 0.5)  # t(0.975, 1) sd 1 / sqrt 2
    assert rows["moco_v2"].data.metrics["knn_top1/mean"] == 36.0
    assert rows["moco_v2"].data.metrics["scores_pos/mean"] == pytest.approx(0.55)  # the last epoch's, seeds 0 and 1


@pytest.fixture(scope="module")
def row_ui(row_store):
    """`ftcl ui` started in the project folder with no option: it opens the config's experiment."""
    with _ftcl_ui([], row_store["work"]) as (url, lines):
        yield url, lines


@pytest.mark.slow
def test_the_experiment_shows_its_row_runs_on_top_and_compares_them(chromium, row_store, row_ui, page):
    url, lines = row_ui
    assert f"experiment '{ROW_EXPERIMENT}': the experiment of config/config.yaml in this folder" in "".join(lines)
    try:
        _compare_row_runs(page, url)
    except Exception:
        _shot(page, "failure-row-runs")
        raise


def _compare_row_runs(page, url: str) -> None:
    page.add_init_script(CLOSED_ASSISTANT)
    page.goto(url)  # the runs table of the config's experiment
    for row in ROW_RESULTS:
        page.get_by_role("link", name=row, exact=True).wait_for()
    assert "workflowType=machine_learning" in page.url, page.url
    top = [name for name in page.locator("[role=row] [col-id='attributes.`Run Name`']").all_inner_texts()
           if name.strip()]
    _shot(page, "10-row-runs-on-top")
    assert not [name for name in top if "· seed" in name], f"seed runs shown at the top level: {top}"
    _expand_row_runs(page, ["+ft"])  # its seeds' runs are under it
    page.get_by_role("link", name="+ft · seed 1", exact=True).wait_for()
    _shot(page, "11-row-run-open")
    _row_line(page, "+ft").locator("[col-id='attributes.`Run Name`'] button").first.click()  # closed again:
    page.get_by_role("link", name="+ft · seed 1", exact=True).wait_for(state="hidden")  # selecting it selects them

    # select both row runs and open MLflow's compare view: the table's numbers side by side
    for row in ROW_RESULTS:
        _row_line(page, row).locator("input.ag-checkbox-input").first.check()
    page.get_by_role("button", name="Compare", exact=True).click()
    page.get_by_text("Comparing 2 Runs").wait_for()
    switch = page.get_by_role("switch", name="Metrics - Show diff only")
    switch.wait_for()
    switch.scroll_into_view_if_needed()
    _shot(page, "12-compare-row-runs")
    page.set_viewport_size({"width": 1440, "height": 1600})  # the run names and the metrics in one picture
    page.screenshot(path=str(SHOTS / "12-compare-row-runs-full.png"), full_page=True)
    text = page.inner_text("body")
    for row in ROW_RESULTS:
        assert row in text, row
    shown = page.evaluate(METRICS_GRID_JS)
    runs = _compare_table_row(page, "Run Name:")
    assert sorted(runs) == sorted(ROW_RESULTS), runs
    assert shown["linear_top1/mean"] == [_number({"+ft": 43.75, "moco_v2": 41.0}[run]) for run in runs], shown
    assert "linear_top1/delta_low" in shown and "linear_top1/delta_high" in shown, shown
    assert shown["scores_pos/mean"] == [_number({"+ft": 0.65, "moco_v2": 0.55}[run]) for run in runs], shown
    assert "43.75" in page.inner_text("body")


#: MLflow's assistant panel closed (screenshots show the page); the UI's mode is left alone
CLOSED_ASSISTANT = """
    localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
    localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
"""

#: The compare view's metrics: a grid of names beside a grid of values, cells placed by position.
METRICS_GRID_JS = """() => {
    const toggle = document.querySelector('[aria-label="Metrics - Show diff only"]');
    let section = toggle;
    while (section && section.querySelectorAll('[role=grid]').length < 2) section = section.parentElement;
    const [names, values] = section.querySelectorAll('[role=grid]');
    const cells = grid => [...grid.querySelectorAll('[role=rowgroup] > div')].map(
        d => ({top: d.style.top, left: parseFloat(d.style.left), text: d.innerText.trim()}));
    const rows = {};
    for (const c of cells(names)) rows[c.top] = {name: c.text, values: []};
    for (const c of cells(values).sort((a, b) => a.left - b.left)) if (rows[c.top]) rows[c.top].values.push(c.text);
    return Object.fromEntries(Object.values(rows).map(r => [r.name, r.values]));
}"""
