"""``ftcl ui``: the MLflow UI on the project's store, started fast and stopped cleanly.

It runs ``mlflow server`` as a child process in its own session (so its own process group) with
one worker and MLflow's background job execution off (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``):
on a small machine that starts in seconds as two processes instead of a dozen. It waits until the
server answers ``/health``, prints the URL to open (the experiment's page with ``--experiment``),
and on Ctrl-C (SIGINT), SIGTERM or SIGHUP stops every process it started: SIGTERM to the whole
process group and to every descendant seen, a grace period, then SIGKILL to whatever is left.

It opens where the user works (:func:`choose_experiment`): the runs table of ``--experiment``, else
of the pipeline config's experiment (``--configfile``, else ``config/config.yaml`` in the current
folder), else of the experiment of the store updated last; it prints which one and why. An
experiment the store does not hold is named, with the experiments it does hold, and the UI opens
on the experiment list.

The store is the one the stages write: ``--tracking-uri``, else the pipeline config's store (its
``tracking.uri``, else ``sqlite:///<results_dir>/mlflow.db``, as the pipeline gave its stages,
whatever ``$MLFLOW_TRACKING_URI`` says), else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<results-dir>/mlflow.db``; new experiments created from the UI put their artifacts in
``<results-dir>/mlartifacts`` (as :mod:`ftcl.tracking` does). A tracking URI that is already a
server (``http(s)://``) needs no UI process: its URL is printed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from ftcl.constants import RESULTS_DIR
from ftcl.tracking.store import default_artifact_root, sqlite_path, tracking_uri
from ftcl.ui.processes import (
    descendants,
    free_port,
    log_tail,
    port_in_use,
    server_command,
    server_env,
    stop_process_tree,
)

DEFAULT_PORT = 5000
#: the pipeline config ``ftcl ui`` reads when no ``--configfile`` is given (as ``ftcl table`` and Snakemake do)
DEFAULT_CONFIG = Path("config/config.yaml")
#: MLflow 3.17 opens an experiment on its GenAI pages unless told otherwise (see :func:`experiment_url`)
MODE_HINT = ("this link opens the runs table; from MLflow's own experiment list, pick 'Model training' "
             "(top left) once and this browser keeps it.")
HEALTH_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------- pure helpers


def base_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def experiment_url(base: str, experiment_id: str | None) -> str:
    """The UI page of an experiment, or the UI's home page.

    ``<base>/#/experiments/<id>?workflowType=machine_learning``: the runs table. MLflow 3.17's UI
    opens an experiment in the mode its ``workflowType`` says (this URL parameter, else the mode the
    browser last picked with the GenAI / Model training switch, kept in its localStorage as
    ``mlflow.workflowType_v1``, else GenAI: an empty traces overview). The experiment's
    ``mlflow.experimentKind`` tag, which :func:`ftcl.tracking.get_or_create_experiment` sets to
    ``custom_model_development``, does not decide it there (MLflow UIs without that switch read it).
    """
    base = base.rstrip("/")
    if experiment_id is None:
        return f"{base}/"
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


def pipeline_config_path(configfile: str | Path | None, cwd: Path | None = None) -> tuple[Path, str] | None:
    """The pipeline config ``ftcl ui`` opens the experiment of, and how to name it: ``--configfile``,
    else ``config/config.yaml`` when ``cwd`` (default: the current folder) holds one, else None."""
    if configfile is not None:
        return Path(configfile), f"--configfile {configfile}"
    if ((cwd or Path.cwd()) / DEFAULT_CONFIG).is_file():
        return DEFAULT_CONFIG, f"{DEFAULT_CONFIG} in this folder"
    return None


def choose_experiment(flag: str | None, config: tuple[str, str] | None,
                      activity: Mapping[str, float]) -> tuple[str | None, str]:
    """``(experiment, why)``: the experiment ``ftcl ui`` opens (pure). ``flag``: ``--experiment``;
    ``config``: ``(how the pipeline config is named, its experiment)``; ``activity``: experiment ->
    its last update (ms; :func:`experiment_activity`), consulted only when neither is given."""
    if flag:
        return flag, "--experiment"
    if config is not None:
        return config[1], f"the experiment of {config[0]}"
    if not activity:
        return None, "the store has no experiment"
    name = max(activity, key=lambda k: (activity[k], k))
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(activity[name] / 1000))
    return name, f"the most recently updated experiment in the store (last update {when}; no pipeline config)"


# --------------------------------------------------------------------------- REST


def _request(url: str, method: str = "GET", body: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """One HTTP request to the local MLflow server (http.client): ``(status, body)``."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def healthy(base: str, timeout: float = 2.0) -> bool:
    try:
        return _request(f"{base}/health", timeout=timeout)[0] == 200
    except Exception:  # refused, reset, timed out, half-started server
        return False


def experiment_id(base: str, name: str) -> str | None:
    """The id of experiment ``name`` on the server at ``base``; None when there is none."""
    query = urllib.parse.urlencode({"experiment_name": name})
    status, body = _request(f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}")
    if status == 404:
        return None
    if status != 200:
        raise OSError(f"MLflow server {base} answered HTTP {status} for experiment {name!r}")
    return str(json.loads(body.decode())["experiment"]["experiment_id"])


def _experiments(base: str) -> list[dict]:
    status, body = _request(f"{base}/api/2.0/mlflow/experiments/search", "POST", {"max_results": 1000})
    if status != 200:
        raise OSError(f"MLflow server {base} answered HTTP {status} for the experiment list")
    return json.loads(body.decode()).get("experiments", [])


def experiment_names(base: str) -> list[str]:
    try:
        return [e["name"] for e in _experiments(base)]
    except (OSError, ValueError):
        return []


def experiment_activity(base: str) -> dict[str, int]:
    """Experiment name -> its last update (ms since the epoch): the experiment's own last update
    time, or the start or end of its newest run when later."""
    activity = {}
    for exp in _experiments(base):
        times = [int(exp.get("last_update_time") or exp.get("creation_time") or 0)]
        status, body = _request(f"{base}/api/2.0/mlflow/runs/search", "POST", {
            "experiment_ids": [exp["experiment_id"]], "max_results": 1, "order_by": ["attributes.start_time DESC"]})
        if status == 200:
            for run in json.loads(body.decode()).get("runs", []):
                times += [int(run["info"].get(key) or 0) for key in ("start_time", "end_time")]
        activity[exp["name"]] = max(times)
    return activity


# --------------------------------------------------------------------------- command


def _pipeline_config(configfile: str | None) -> tuple[str, dict] | None:
    """``(how it is named, the pipeline config)`` of :func:`pipeline_config_path`. A ``--configfile``
    that cannot be read is an error; a ``config/config.yaml`` that cannot is skipped, with a warning."""
    from ftcl import pipeline
    from ftcl.errors import ConfigError

    found = pipeline_config_path(configfile)
    if found is None:
        return None
    path, label = found
    try:
        return label, pipeline.read(path, resolve_runs=False).config
    except ConfigError as err:
        if configfile is not None:
            raise
        print(f"[ui] warning: {path} is left aside ({err})", flush=True)
        return None


def store_uri(args: argparse.Namespace, config: Mapping | None) -> str:
    """The store ``ftcl ui`` serves (module docstring): ``--tracking-uri``, else the pipeline
    config's, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<--results-dir>/mlflow.db``."""
    if args.tracking_uri or config is None:
        return tracking_uri(args.tracking_uri, args.results_dir or RESULTS_DIR, create=False)
    return tracking_uri(config["tracking"]["uri"], args.results_dir or config.get("results_dir") or RESULTS_DIR,
                        create=False, environment=False)


def open_experiment(base: str, uri: str, flag: str | None, config: tuple[str, dict] | None,
                    strict: bool = False) -> str | None:
    """Choose the experiment to open (:func:`choose_experiment`), say which and why, and return its
    id on the server at ``base``; None (the experiment list) when the store does not hold it. A
    server that does not answer: OSError with ``strict``, else a warning (and the experiment list)."""
    named = None if config is None else (config[0], config[1]["experiment"])
    try:
        activity = experiment_activity(base) if not flag and named is None else {}
        name, why = choose_experiment(flag, named, activity)
        print(f"[ui] experiment {name!r}: {why}" if name else f"[ui] {why}", flush=True)
        exp_id = experiment_id(base, name) if name else None
    except (OSError, ValueError, KeyError) as err:
        if strict:
            raise OSError(err) from err
        print(f"[ui] warning: could not look up the experiment to open ({err}); showing the experiment list",
              flush=True)  # the UI still works; only the link is less direct
        return None
    if name and exp_id is None:
        names = ", ".join(experiment_names(base)) or "none"
        print(f"[ui] warning: no experiment {name!r} in {uri} (experiments: {names}); showing the experiment list",
              flush=True)
    return exp_id


def cmd_ui(args: argparse.Namespace) -> int:
    needed = args.configfile or not (args.experiment and args.tracking_uri)  # for the experiment or the store
    config = _pipeline_config(args.configfile) if needed else None
    uri = store_uri(args, None if config is None else config[1])
    if uri.startswith(("http://", "https://")):  # already a server with its own UI
        base = uri.rstrip("/")
        try:
            exp_id = open_experiment(base, uri, args.experiment, config, strict=True)
        except OSError as err:
            print(f"ftcl ui: error: tracking server {uri} does not answer ({err})", file=sys.stderr)
            return 1
        print(f"{uri} is a tracking server already; its UI is at:\n  {experiment_url(base, exp_id)}", flush=True)
        return 0
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise FileNotFoundError(f"no MLflow store at {db} (run a stage or the pipeline first, or give "
                                "--tracking-uri / --results-dir)")
    port = free_port(args.host) if args.port == 0 else args.port
    if port_in_use(args.host, port):
        print(f"ftcl ui: error: port {port} on {args.host} is in use (another UI?); pick one with --port P, "
              "or --port 0 for a free one", file=sys.stderr)
        return 2
    base = base_url(args.host, port)
    log_path: Path | None
    if args.log == "-":
        log_path, log_file = None, None
    else:
        if args.log:
            log_path = Path(args.log)
        elif db is not None:
            log_path = db.parent / "mlflow-ui.log"
        else:
            log_path = Path(tempfile.gettempdir()) / f"ftcl-ui-{port}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "w")  # noqa: SIM115 (closed in finally)

    stop_requested: list[int] = []

    def on_signal(signum, _frame):  # only note it: the loops below poll, so no process is missed
        stop_requested.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    proc: subprocess.Popen | None = None
    seen: list = []
    try:
        cmd = server_command(uri, args.host, port, default_artifact_root(uri))
        print(f"[ui] starting the MLflow UI on {uri} (one worker, job execution off)"
              + (f"; server log: {log_path}" if log_path else ""), flush=True)
        proc = subprocess.Popen(cmd, env=server_env(), start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT if log_file else None)

        def log_hint() -> str:
            return f"; its log ({log_path}):\n{log_tail(log_path)}" if log_path else ""

        t0 = time.monotonic()
        while not stop_requested and not healthy(base):
            if proc.poll() is not None:
                print(f"ftcl ui: error: the MLflow server exited with status {proc.returncode} before it "
                      f"answered {base}/health" + log_hint(), file=sys.stderr)
                return 1
            if time.monotonic() - t0 > args.timeout:
                print(f"ftcl ui: error: no answer from {base}/health after {args.timeout:.0f} s"
                      + log_hint(), file=sys.stderr)
                return 1
            seen = descendants(proc.pid) or seen
            time.sleep(0.2)
        if not stop_requested:
            seen = descendants(proc.pid) or seen
            exp_id = open_experiment(base, uri, args.experiment, config)
            print(f"[ui] ready after {time.monotonic() - t0:.1f} s. Open:\n\n    {experiment_url(base, exp_id)}\n\n"
                  f"[ui] {MODE_HINT}\n[ui] Ctrl-C stops it.", flush=True)
        while not stop_requested and proc.poll() is None:
            time.sleep(0.2)
        if not stop_requested:
            print(f"ftcl ui: error: the MLflow server exited with status {proc.returncode}"
                  + log_hint(), file=sys.stderr)
            return 1
        print(f"\n[ui] {signal.Signals(stop_requested[0]).name}: stopping the MLflow UI ...", flush=True)
        return 0
    finally:
        if proc is not None:
            stop_process_tree(proc, known=seen)
            if stop_requested:
                print("[ui] stopped.", flush=True)
        if log_file:
            log_file.close()
        for s, handler in old.items():
            signal.signal(s, handler)
