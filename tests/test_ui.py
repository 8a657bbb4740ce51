"""`ftcl ui`: the MLflow UI on a store, answering its REST API, and every process it started gone
after Ctrl-C (SIGINT) or SIGTERM; plus its URL and argument handling, which start nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from ftcl import ui
from ftcl.cli import main

START_TIMEOUT_S = 120


def make_store(folder: Path, experiment: str = "ui-test") -> tuple[str, str]:
    """A sqlite store with one experiment and one finished run; returns (uri, experiment id)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(experiment, artifact_location=str(folder / "mlartifacts" / experiment))
    run = client.create_run(exp_id, run_name="moco_v2 · seed 0", tags={"ftcl.row": "moco_v2", "ftcl.seed": "0"})
    client.log_metric(run.info.run_id, "linear/top1", 50.0, step=1)
    client.set_terminated(run.info.run_id)
    return uri, exp_id


class UiProcess:
    """`ftcl ui` as a person starts it in a terminal: its own process group, output read live."""

    def __init__(self, *args: str, cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "ftcl.cli", "ui", *args], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in iter(self.proc.stdout.readline, ""):
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_url(self, timeout: float = START_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            url = next((ln.strip() for ln in list(self.lines) if ln.strip().startswith("http://")), None)
            if url:
                return url
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"ftcl ui printed no URL (exit {self.proc.poll()}):\n{self.output}")

    def ctrl_c(self) -> None:
        """What a terminal does on Ctrl-C: SIGINT to the foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                p.kill()
            self.proc.kill()
        self.proc.wait(timeout=10)


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still running (same PID and start time; a zombie counts as gone)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def serving(port: int) -> list[str]:
    """Command lines of live processes started for ``port`` (``mlflow server``, its uvicorn worker),
    including any started after the others were collected."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["status"] != psutil.STATUS_ZOMBIE and f"--port {port}" in cmd and "ui" not in p.info["cmdline"]:
            found.append(cmd)
    return found


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ui_serves_the_store_and_stops_every_process_it_started(tmp_path, how):
    uri, exp_id = make_store(tmp_path)
    started = time.monotonic()
    ui_proc = UiProcess("--tracking-uri", uri, "--experiment", "ui-test", "--port", "0", cwd=tmp_path)
    try:
        url = ui_proc.wait_for_url()
        ready_s = time.monotonic() - started
        assert url.endswith(f"/#/experiments/{exp_id}?workflowType=machine_learning"), url
        base = url.split("/#/")[0]
        with urllib.request.urlopen(f"{base}/health", timeout=10) as resp:
            assert resp.status == 200
        names = [e["name"] for e in post_json(f"{base}/api/2.0/mlflow/experiments/search",
                                               {"max_results": 100})["experiments"]]
        assert "ui-test" in names
        runs = post_json(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
        assert [r["info"]["run_name"] for r in runs] == ["moco_v2 · seed 0"]

        # one worker, no job runner: the server and its uvicorn worker, nothing more
        procs = descendants(ui_proc.proc.pid)
        assert 1 <= len(procs) <= 3, [p.cmdline() for p in procs]
        assert any("mlflow" in " ".join(p.cmdline()) for p in procs)
        everything = [psutil.Process(ui_proc.proc.pid), *procs]

        t0 = time.monotonic()
        if how == "ctrl-c":
            ui_proc.ctrl_c()
        else:
            ui_proc.proc.send_signal(signal.SIGTERM)
        assert ui_proc.proc.wait(timeout=30) == 0, ui_proc.output
        stop_s = time.monotonic() - t0
        assert not alive(everything), [p.cmdline() for p in alive(everything)]
        assert not serving(int(base.rsplit(":", 1)[1]))
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{base}/health", timeout=2)
        assert "stopped" in ui_proc.output
        assert ui.MODE_HINT in ui_proc.output  # how MLflow's own experiment list opens the runs table too
        print(f"[ui] ready after {ready_s:.1f} s, stopped in {stop_s:.1f} s ({how})")
    finally:
        ui_proc.kill()


@pytest.mark.slow
def test_ui_stopped_while_starting_leaves_no_process(tmp_path):
    uri, _ = make_store(tmp_path)
    port = ui.free_port()
    ui_proc = UiProcess("--tracking-uri", uri, "--port", str(port), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        procs: list[psutil.Process] = []
        while time.monotonic() < deadline:  # the server has started, but is not answering yet
            procs = descendants(ui_proc.proc.pid)
            if any("mlflow" in " ".join(p.cmdline()) for p in procs):
                break
            time.sleep(0.05)
        assert procs, ui_proc.output
        time.sleep(1.0)
        everything = [psutil.Process(ui_proc.proc.pid), *descendants(ui_proc.proc.pid)]
        ui_proc.ctrl_c()
        assert ui_proc.proc.wait(timeout=40) == 0, ui_proc.output
        assert "ready" not in ui_proc.output, "stopped too late: the server was already answering"
        assert not alive(everything), [p.cmdline() for p in alive(everything)]
        assert not serving(port)
    finally:
        ui_proc.kill()


def test_missing_store_is_a_one_line_error(tmp_path, capsys):
    assert main(["ui", "--tracking-uri", f"sqlite:///{tmp_path / 'nope.db'}"]) == 2
    err = capsys.readouterr().err
    assert "no MLflow store" in err and "nope.db" in err and len(err.strip().splitlines()) == 1


def test_default_store_is_the_results_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["ui", "--results-dir", str(tmp_path / "results")]) == 2
    assert str(tmp_path / "results" / "mlflow.db") in capsys.readouterr().err


def test_a_busy_port_is_refused_before_starting_anything(tmp_path, capsys):
    uri, _ = make_store(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--tracking-uri", uri, "--port", str(port)]) == 2
    assert f"port {port}" in capsys.readouterr().err


def test_urls_and_server_command():
    assert ui.experiment_url("http://127.0.0.1:5000", "3") == (
        "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning")
    assert ui.experiment_url("http://127.0.0.1:5000/", None) == "http://127.0.0.1:5000/"
    assert ui.base_url("0.0.0.0", 5000) == "http://127.0.0.1:5000"
    assert ui.default_artifact_root("sqlite:////data/results/mlflow.db") == "/data/results/mlartifacts"
    assert ui.default_artifact_root("postgresql://db/mlflow") is None
    cmd = ui.server_command("sqlite:////x/mlflow.db", "127.0.0.1", 5123, "/x/mlartifacts")
    assert cmd[:4] == [sys.executable, "-m", "mlflow", "server"]
    assert cmd[cmd.index("--workers") + 1] == "1" and cmd[cmd.index("--port") + 1] == "5123"
    assert ui.server_env({})["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_a_tracking_server_uri_needs_no_ui_process(capsys, monkeypatch):
    monkeypatch.setattr(ui, "experiment_id", lambda base, name: "7")
    assert main(["ui", "--tracking-uri", "http://mlflow.example:5000", "--experiment", "x"]) == 0
    assert "http://mlflow.example:5000/#/experiments/7?workflowType=machine_learning" in capsys.readouterr().out


@pytest.mark.slow
def test_a_server_that_fails_to_start_is_reported_with_its_log(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ftcl.cli", "ui", "--port", "0", "--log", str(tmp_path / "ui.log"),
                           "--tracking-uri", "postgresql://nobody@127.0.0.1:1/none"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert "exited with status" in proc.stderr and str(tmp_path / "ui.log") in proc.stderr
    assert "Error" in proc.stderr.strip().splitlines()[-1]  # the tail of the server's log says why


# --------------------------------------------------------------------------- which experiment it opens


def test_the_experiment_is_chosen_from_the_flag_then_the_pipeline_config_then_the_latest_activity():
    activity = {"Default": 1_000, "fmnist-demo": 5_000, "ft-study": 9_000}
    config = ("config/config.yaml in this folder", "fmnist-demo")
    assert ui.choose_experiment("methods", config, activity) == ("methods", "--experiment")
    assert ui.choose_experiment(None, config, activity) == (
        "fmnist-demo", "the experiment of config/config.yaml in this folder")
    name, why = ui.choose_experiment(None, None, activity)
    assert name == "ft-study" and why.startswith("the most recently updated experiment in the store")
    assert ui.choose_experiment(None, None, {}) == (None, "the store has no experiment")


def test_the_pipeline_config_is_the_given_one_else_the_one_in_this_folder(tmp_path):
    assert ui.pipeline_config_path(None, tmp_path) is None
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text("experiment: here\n")
    assert ui.pipeline_config_path(None, tmp_path) == (Path("config/config.yaml"), "config/config.yaml in this folder")
    given = tmp_path / "other.yaml"
    assert ui.pipeline_config_path(str(given), tmp_path) == (given, f"--configfile {given}")


def write_pipeline(path: Path, experiment: str, results_dir: Path, uri: str | None = None) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"experiment": experiment, "results_dir": str(results_dir),
                                    "tracking": {"uri": uri}, "ablations": [{"name": "moco_v2", "baseline": True}]}))
    return path


def serve_http(monkeypatch, experiments: dict[str, str], activity: dict[str, int]) -> None:
    """A tracking server (``http://``: no UI process) holding ``experiments`` (name -> id)."""
    monkeypatch.setattr(ui, "experiment_id", lambda base, name: experiments.get(name))
    monkeypatch.setattr(ui, "experiment_names", lambda base: list(experiments))
    monkeypatch.setattr(ui, "experiment_activity", lambda base: activity)


def test_ui_opens_the_runs_table_of_the_pipeline_configs_experiment(tmp_path, capsys, monkeypatch):
    serve_http(monkeypatch, {"Default": "0", "demo": "3", "other": "4"}, {"Default": 1, "demo": 5, "other": 9})
    monkeypatch.chdir(tmp_path)
    server = "http://mlflow.example:5000"
    configfile = write_pipeline(tmp_path / "pipeline.yaml", "demo", tmp_path / "results", server)
    assert main(["ui", "--configfile", str(configfile)]) == 0
    out = capsys.readouterr().out
    assert f"experiment 'demo': the experiment of --configfile {configfile}" in out
    assert f"{server}/#/experiments/3?workflowType=machine_learning" in out

    # the project's own config/config.yaml when no --configfile is given; --experiment still wins
    (tmp_path / "config").mkdir()
    write_pipeline(tmp_path / "config" / "config.yaml", "other", tmp_path / "results", server)
    assert main(["ui"]) == 0
    out = capsys.readouterr().out
    assert "experiment 'other': the experiment of config/config.yaml in this folder" in out
    assert f"{server}/#/experiments/4?workflowType=machine_learning" in out
    assert main(["ui", "--experiment", "demo"]) == 0
    assert f"{server}/#/experiments/3?" in capsys.readouterr().out


def test_ui_without_a_pipeline_config_opens_the_most_recently_updated_experiment(tmp_path, capsys, monkeypatch):
    serve_http(monkeypatch, {"Default": "0", "old": "1", "new": "2"}, {"Default": 1, "old": 5, "new": 9})
    monkeypatch.chdir(tmp_path)  # no config/config.yaml here
    assert main(["ui", "--tracking-uri", "http://mlflow.example:5000"]) == 0
    out = capsys.readouterr().out
    assert "experiment 'new': the most recently updated experiment in the store" in out
    assert "http://mlflow.example:5000/#/experiments/2?workflowType=machine_learning" in out


def test_ui_names_a_missing_experiment_and_shows_the_list(tmp_path, capsys, monkeypatch):
    serve_http(monkeypatch, {"Default": "0", "demo": "3"}, {"Default": 1, "demo": 5})
    monkeypatch.chdir(tmp_path)
    configfile = write_pipeline(tmp_path / "pipeline.yaml", "not-run-yet", tmp_path / "results",
                                "http://mlflow.example:5000")
    assert main(["ui", "--configfile", str(configfile)]) == 0
    out = capsys.readouterr().out
    assert "no experiment 'not-run-yet'" in out and "experiments: Default, demo" in out
    assert out.rstrip().endswith("http://mlflow.example:5000/")  # the experiment list


def test_ui_uses_the_store_of_the_pipeline_config(tmp_path, capsys, monkeypatch):
    """The store the pipeline gave its stages (its results_dir), whatever $MLFLOW_TRACKING_URI says."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    configfile = write_pipeline(tmp_path / "pipeline.yaml", "demo", tmp_path / "results")
    assert main(["ui", "--configfile", str(configfile)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "results" / "mlflow.db") in err and "elsewhere" not in err


@pytest.mark.slow
def test_ui_started_in_a_project_folder_opens_its_experiment(tmp_path):
    """End to end on a real store: the MLflow server started, the pipeline config's experiment (not
    the one updated last) looked up on it, its runs table's URL printed."""
    results = tmp_path / "results"
    results.mkdir()
    uri, exp_id = make_store(results, "demo")
    make_store_experiment(uri, results, "newer")
    (tmp_path / "config").mkdir()
    write_pipeline(tmp_path / "config" / "config.yaml", "demo", Path("results"))
    ui_proc = UiProcess("--port", "0", cwd=tmp_path)
    try:
        url = ui_proc.wait_for_url()
        assert url.endswith(f"/#/experiments/{exp_id}?workflowType=machine_learning"), ui_proc.output
        assert "experiment 'demo': the experiment of config/config.yaml in this folder" in ui_proc.output
        ui_proc.ctrl_c()
        assert ui_proc.proc.wait(timeout=30) == 0, ui_proc.output
    finally:
        ui_proc.kill()


def make_store_experiment(uri: str, folder: Path, experiment: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp_id = client.create_experiment(experiment, artifact_location=str(folder / "mlartifacts" / experiment))
    client.set_terminated(client.create_run(exp_id, run_name="later").info.run_id)
    return exp_id
