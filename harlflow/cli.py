"""``harlflow``: optimize a model, pull an artifact, run an artifact.

Every user error becomes one line on stderr and a non-zero exit (see ``harlflow.core.errors``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path

from flows.jobs import JOBS
from harl.cost_model import RECIPES
from harl.spec import TASK_SCHEDULERS
from harl.strategies import STRATEGIES
from harlflow import examples
from harlflow.core import signals
from harlflow.core.errors import BadInputError, HarlflowError
from tasks.rewrite_methods import METHODS, ORACLES

EXAMPLES = "harlflow.examples:{" + ",".join(examples.NAMES) + "}"


def _prefect_env() -> None:
    """Prefect's home under HARLFLOW_HOME, no analytics: environment only, nothing written;
    set before Prefect is imported."""
    from harlflow.core import config

    os.environ.setdefault("PREFECT_HOME", str(config.home() / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the first start migrates a fresh sqlite database: ~20-40 s on 2 cores, over the 20 s default
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")


def _start_prefect() -> None:
    """Without PREFECT_API_URL, Prefect runs a temporary server on a sqlite file under the home;
    its first start migrates that file, and two runs starting at once would both migrate it.
    Start it here, one run at a time; the flow then uses the running server."""
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # its sqlite lives there
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.client.orchestration import get_client

    from harlflow.core.locks import file_lock

    with file_lock(Path(os.environ["PREFECT_HOME"]) / ".start.lock", "Prefect's database"):
        with get_client(sync_client=True) as client:
            client.hello()


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs a failed task with its traceback; for our own user errors the one-line
    message says everything, so drop the traceback (other exceptions keep theirs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HarlflowError):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_prefect_tracebacks() -> None:
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        for h in logging.getLogger(name).handlers:
            h.addFilter(_NoTracebackForUserErrors())


@contextlib.contextmanager
def _stdout_to_stderr(active: bool):
    """--ci: whatever the run prints (Python or native code) goes to stderr; stdout stays JSON."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cmd_optimize(a: argparse.Namespace) -> int:
    with _stdout_to_stderr(a.ci):
        summary = _optimize(a)
    if a.ci:
        print(json.dumps({"status": "ok", **summary}, default=str))
    else:
        _print_summary(summary)
    return 0


def _settings(a: argparse.Namespace):
    """The run options as checked :class:`~flows.settings.RunSettings` (the target resolved);
    bad values fail here, before any store is touched."""
    from flows.settings import RunSettings
    from harlflow.core.durations import parse_duration

    settings = RunSettings(
        trials=a.trials,
        time_budget_s=parse_duration(a.time_budget) if a.time_budget is not None else None,
        strategy=a.strategy,
        target=a.target,
        rewrite=a.rewrite,
        rewrite_oracle=a.rewrite_oracle,
        seed=a.seed,
        min_trials_per_task=a.min_trials_per_task,
        measure=not a.no_measure,
        measure_seconds=a.measure_seconds,
        measure_untuned=a.measure_untuned,
        s3_uri=a.s3_uri,
        promote=a.promote,
        max_regression=a.max_regression,
        rpc=a.rpc,
        cost_model=a.cost_model,
        task_scheduler=a.task_scheduler,
    ).checked()
    if a.rpc:
        from harl.runners import count_servers, parse_rpc

        spec = parse_rpc(a.rpc)
        if count_servers(spec) == 0:
            raise BadInputError(f"--rpc {a.rpc}: no server is registered under key {spec.key!r}")
    return settings


def _check_home() -> None:
    """The artifact directory must be writable: fail in seconds, with one line, before any work."""
    import tempfile

    from harlflow.core import config
    from harlflow.core.errors import StoreError

    home = config.home()
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=home):
            pass
    except OSError as e:
        raise StoreError(f"artifact directory {home} is not writable: {e.strerror or e}") from None
    config.tuning_db()  # a HARLFLOW_TUNING_DB that is no database URL: one line, now


def _check_mlflow() -> None:
    """MLflow must answer before any tuning starts, not after the measurements."""
    from tasks import tracking

    tracking.experiment_id(tracking.client())


def _optimize(a: argparse.Namespace) -> dict:
    from harlflow.core.config import import_cache_dir, validate_name
    from harlflow.core.signature import parse_input_spec
    from tasks.importing import default_name, import_model

    # Check everything, the model and the stores included, before Prefect starts: bad input
    # fails with one line and writes nothing to the stores. The import is content-addressed,
    # so the flow's import stage then finds it done.
    inputs = [parse_input_spec(s) for s in a.input] or None
    validate_name(a.name or default_name(a.model))
    settings = _settings(a)
    _check_home()
    import_model(
        a.model, cache_dir=import_cache_dir(), inputs=inputs, checkpoint=a.checkpoint, seed=a.seed
    )
    _check_mlflow()

    _start_prefect()
    from flows.optimize import optimize

    _quiet_prefect_tracebacks()
    return optimize(
        model=a.model, settings=settings, name=a.name, inputs=inputs, checkpoint=a.checkpoint
    )


def cmd_retune(a: argparse.Namespace) -> int:
    from harlflow.core.config import sources_cache_dir
    from tasks.sources import list_models

    settings = _settings(a)
    if a.pool is not None:
        _check_pool(a.pool)
        # checked here, but the target as given: each worker resolves "cpu" to its own host
        settings = dataclasses.replace(settings, target=a.target)
    _check_home()
    models = list_models(a.source, sources_cache_dir())  # a bad source fails here
    if not models:
        print(f"harlflow: {a.source} holds no .onnx or .pt2 model yet", file=sys.stderr)
    _check_mlflow()
    _start_prefect()
    from flows.retune import retune

    _quiet_prefect_tracebacks()
    source = (
        a.source
        if a.pool is None or a.source.startswith("s3://")
        else str(Path(a.source).resolve())
    )  # workers run elsewhere: they need the absolute path
    decisions = retune(source=source, settings=settings, pool=a.pool)
    for name, d in decisions.items():
        extra = f"v{d['version']}" if d.get("version") else d.get("error", "")
        print(f"{name:24s} {d['decision']:10s} {extra}")
    return 0


def _prefect_api(needs: str, host: str) -> str:
    """``PREFECT_API_URL``, or one line saying what ``needs`` a Prefect server and how to
    start one listening on ``host``."""
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        shown = "127.0.0.1" if host == "127.0.0.1" else "HOST"
        raise BadInputError(
            f"{needs}: start one with 'prefect server start --host {host} --port 4200' and "
            f"set PREFECT_API_URL=http://{shown}:4200/api"
        )
    return api


def _prefect_healthy(api: str) -> None:
    """The Prefect server at ``api`` answers its health check, or one ``StoreError`` line."""
    import httpx

    from harlflow.core.errors import StoreError

    try:
        httpx.get(f"{api.rstrip('/')}/health", timeout=10).raise_for_status()
    except Exception as e:
        raise StoreError(f"Prefect server {api} is unreachable: {type(e).__name__}: {e}") from None


def _check_pool(pool: str) -> str:
    """A work pool needs a Prefect server that workers on other machines reach: its API URL."""
    from harlflow.core.config import validate_name

    validate_name(pool, "work pool name")
    api = _prefect_api("a work pool needs a Prefect server its workers reach", "0.0.0.0")
    _prefect_healthy(api)
    return api


def cmd_deploy(a: argparse.Namespace) -> int:
    """Create the work pool if needed and deploy optimize and retune to it (flows.pool)."""
    api = _check_pool(a.pool)
    _prefect_env()
    from flows import pool

    names = pool.deploy(a.pool, log=lambda m: print(m, flush=True))
    print(
        f"on each machine: prefect worker start --pool {a.pool} --work-queue "
        f"{pool.OPTIMIZE_QUEUE} --limit 1  (PREFECT_API_URL={api}, and the team's "
        "HARLFLOW_TUNING_DB and MLFLOW_TRACKING_URI)\n"
        f"then: harlflow retune SOURCE --pool {a.pool}, or prefect deployment run "
        f"'{names[1]}' -p source=SOURCE (a worker on queue {pool.RETUNE_QUEUE!r} runs it)"
    )
    return 0


CRON_DEFAULT = "0 3 * * *"
"""``harlflow serve``'s schedule: every night at 03:00"""
FIRST_RUN_S = 30
"""``harlflow serve --interval``: seconds from the start to the first run"""


def cmd_serve(a: argparse.Namespace) -> int:
    """Register a job's flow (``retune`` by default, or a training job: ``--job``) with a
    schedule (``--cron`` or ``--interval``) on the Prefect server and run its flow runs."""
    from prefect.client.schemas.schedules import CronSchedule

    from flows import jobs
    from harlflow.core.config import validate_name
    from harlflow.core.durations import format_duration, parse_duration

    if a.cron is not None and a.interval is not None:
        raise BadInputError("give either --cron or --interval, not both")
    interval = parse_duration(a.interval, "--interval") if a.interval is not None else None
    cron = None if interval is not None else a.cron or CRON_DEFAULT
    if cron is not None:
        try:
            CronSchedule(cron=cron)
        except Exception:
            raise BadInputError(f"invalid --cron {cron!r}: expected e.g. '0 3 * * *'") from None
    if a.job == "retune":
        if a.source is None:
            raise BadInputError("serve: give the SOURCE of the models to retune")
        if a.param:
            raise BadInputError("--param is for a training job's flow (--job); retune takes "
                                "the run options")  # fmt: skip
    elif a.source is not None:
        raise BadInputError(f"serve --job {a.job} takes --param KEY=VALUE, not a SOURCE")
    elif a.pool is not None:
        raise BadInputError(f"--pool is for retune: serve --job {a.job} runs in this process")
    params = jobs.parse_params(a.param)
    api = _prefect_api("harlflow serve needs a Prefect server for its schedule", "127.0.0.1")
    if a.job == "retune":
        settings = _settings(a)
    _prefect_healthy(api)
    if a.job == "retune":
        from tasks.sources import check_source

        check_source(a.source)
        source = a.source if a.source.startswith("s3://") else str(Path(a.source).resolve())
        # the deployment's parameters are JSON: the settings as a dict, checked at each run
        if a.pool is not None:  # the server was checked above
            validate_name(a.pool, "work pool name")
            settings = dataclasses.replace(settings, target=a.target)  # as in cmd_retune
        params = {"source": source, "settings": dataclasses.asdict(settings), "pool": a.pool}
    _check_home()
    _check_mlflow()
    _start_prefect()
    flow = jobs.load(a.job)
    jobs.bind(flow, a.job, params)
    deployment = a.deployment or f"harlflow-{a.job}"
    when = f"cron {cron!r}" if cron is not None else f"every {format_duration(interval)}"
    print(
        f"serving deployment '{flow.name}/{deployment}' ({when}) on {api}; "
        f"trigger a run now with: prefect deployment run '{flow.name}/{deployment}'",
        flush=True,
    )
    flow.serve(name=deployment, schedule=_schedule(cron, interval), parameters=params)
    return 0


def _schedule(cron: str | None, interval: float | None):
    """The Prefect schedule of ``harlflow serve``: the cron expression, or every ``interval``
    seconds with the first run :data:`FIRST_RUN_S` after the start, not one interval after it.
    (Anchored one interval back plus that margin: the server schedules only future runs, and
    with a 5 s margin a busy machine registered the deployment after the first slot had passed,
    which moved the first run an interval later.)"""
    import datetime

    from prefect.schedules import Cron, Interval

    if cron is not None:
        return Cron(cron)
    every = datetime.timedelta(seconds=interval)
    now = datetime.datetime.now(datetime.timezone.utc)
    return Interval(every, anchor_date=now - every + datetime.timedelta(seconds=FIRST_RUN_S))


def _run_job(name: str, *, mlflow: bool = True, **params) -> dict:
    """Run the training job ``name``'s flow (:mod:`flows.training`) with ``params``, its input
    already checked: the home and MLflow answer first, then Prefect starts."""
    from flows import jobs

    _check_home()
    if mlflow:
        _check_mlflow()
    _start_prefect()
    flow = jobs.load(name)
    _quiet_prefect_tracebacks()
    return flow(**params)


def cmd_rewrite_train(a: argparse.Namespace) -> int:
    """Train a rewrite agent on models (flows.training.rewrite_train)."""
    from tasks.rewrite_training import check, load_graphs, registered_name

    check(a.agent, iterations=a.iterations, episodes=a.episodes, max_steps=a.max_steps)
    _check_home()
    load_graphs(a.models, seed=a.seed)  # a bad model fails here; the flow finds it imported
    r = _run_job(
        "rewrite-train", models=a.models, agent=a.agent, oracle=a.oracle, target=a.target,
        out=a.out, iterations=a.iterations, episodes=a.episodes, max_steps=a.max_steps,
        seed=a.seed,
    )  # fmt: skip
    print(f"saved {r['path']}; registered {registered_name(a.agent)} version {r['version']} "
          f"(run {r['run_id']})")  # fmt: skip
    return 0


def _print_summary(s: dict) -> None:
    print()
    print(f"artifact  {s['name']} v{s['version']}: {s['artifact']}")
    for k, v in s["published"].items():
        if k != "local":
            print(f"{k:9s} {v}")
    rw = s.get("rewrite") or {}
    if rw.get("method") not in (None, "none"):
        rules = ", ".join(f"{k}×{v}" for k, v in (rw.get("rules_applied") or {}).items()) or "none"
        print(
            f"rewrite   {rw['method']}: {rw['speedup']:.3f}x on {rw.get('oracle', 'onnxruntime')}; "
            f"rules {rules}"
        )
    per = f", {s['seconds_per_trial']:.2f} s/trial" if s.get("seconds_per_trial") else ""
    print(f"tuning    {s['trials']} trials in {s['tuning_seconds']} s{per}")
    if s.get("stage_seconds"):
        budget = f" of a {s['time_budget']} budget" if s.get("time_budget") else ""
        stages = ", ".join(f"{k} {v:.0f}" for k, v in s["stage_seconds"].items())
        print(f"run       {s['total_seconds']:.0f} s{budget} (seconds per stage: {stages})")
    if s.get("ratio_to_onnxruntime"):
        lo, hi = s.get("ratio_ci") or (float("nan"), float("nan"))
        print(
            f"vs onnxruntime  {s['ratio_to_onnxruntime']:.2f}x its latency (95% interval "
            f"{lo:.2f}-{hi:.2f}, side by side in this run; below 1 is faster)"
        )
    lat, ci = s["latency_ms"], s.get("latency_ci_ms") or {}
    if lat:
        print(f"{'runtime':14s} {'median ms':>10s} {'95% interval':>21s} {'tuned speedup':>14s}")
        for k, v in lat.items():
            speedup = s["speedup"].get(f"vs_{k}", 1.0)
            lo, hi = ci.get(k, (float("nan"), float("nan")))
            print(f"{k:14s} {v:10.4g} {lo:10.4g} - {hi:<8.4g} {speedup:13.2f}x")
        m = s.get("measurement") or {}
        if m:
            print(
                f"measured side by side: {m['blocks']} blocks of fresh processes, {m['rounds']} "
                f"rounds, {m['seconds']} s ({m['stopped']})"
            )
    g = s.get("gate")
    if g:
        if g.get("compared"):
            lo, hi = g["ratio_ci"]
            print(
                f"gate      {g['decision']}: {g['ratio']:.3f}x production "
                f"v{g['production_version']} (95% interval {lo:.3f}-{hi:.3f}, limit "
                f"{g['limit']:.3f}, decided on the {g['basis']})"
            )
        else:
            print(f"gate      promoted without comparison: {g['reason']}")


def cmd_compare(a: argparse.Namespace) -> int:
    """Artifacts and ONNX files timed side by side (:mod:`harlflow.measure`), one table."""
    import tempfile

    from harlflow.measure import Runtime, side_by_side

    if a.measure_seconds <= 0:
        raise BadInputError("--measure-seconds must be > 0")
    runtimes, seen, first_artifact = [], set(), None
    for path in a.models:
        p = Path(path)
        if (p / "manifest.json").is_file():
            kind, first_artifact = "tvm", first_artifact or p
        elif p.is_file() and p.suffix == ".onnx":
            kind = "ort"
        else:
            raise BadInputError(f"{path}: neither a harlflow artifact directory nor an .onnx file")
        label = path
        while label in seen:  # the same thing twice (an A/A check) gets a second label
            label += "'"
        seen.add(label)
        runtimes.append(Runtime(label, kind, str(p)))
    threads = a.threads or (
        json.loads((first_artifact / "manifest.json").read_text())["target"].get("num-cores")
        if first_artifact
        else None
    )
    with tempfile.TemporaryDirectory(prefix="harlflow-compare-") as tmp:
        reference = _compare_inputs(a.input, first_artifact, Path(tmp))
        m = side_by_side(
            runtimes,
            reference,
            threads=int(threads or len(os.sched_getaffinity(0))),
            max_seconds=a.measure_seconds,
            spin=not a.no_spin,
        )
    result = {"models": {r.label: r.path for r in runtimes}, **m.to_dict()}
    if a.json:
        print(json.dumps(result))
        return 0
    first = runtimes[0].label
    head = f"{'model':40s} {'median ms':>10s} {'95% interval':>21s}"
    print(f"{head} {'vs first':>9s} {'95% interval':>15s}")
    for r in runtimes:
        e = m.estimate(r.label)
        row = f"{r.label[-40:]:40s} {e.median_ms:10.4g} {e.ci_ms[0]:10.4g} - {e.ci_ms[1]:<8.4g}"
        if r.label != first:
            q = m.ratio(r.label, first)
            row += f" {q.value:8.3f}x {q.ci[0]:6.3f} - {q.ci[1]:<6.3f}"
        print(row)
    sess = m.session()
    print(
        f"side by side on {sess['threads']} threads: {sess['blocks']} blocks of fresh processes, "
        f"{sess['rounds']} rounds, {sess['seconds']} s ({sess['stopped']})"
    )
    return 0


def _compare_inputs(given: str | None, artifact: Path | None, tmp: Path) -> Path:
    """The inputs ``compare`` runs everything on, as a reference .npz (``input/NAME``): the
    ``--input`` .npz (arrays by input name) or else the first artifact's reference inputs."""
    import numpy as np

    if given is None:
        if artifact is None:
            raise BadInputError("give --input FILE.npz (arrays by input name): no artifact given")
        return artifact / "reference.npz"
    try:
        with np.load(given, allow_pickle=False) as data:
            arrays = {k if k.startswith("input/") else f"input/{k}": data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as e:
        raise BadInputError(f"--input {given} is not a readable .npz: {e}") from None
    if not arrays:
        raise BadInputError(f"--input {given} holds no arrays")
    np.savez(tmp / "inputs.npz", **arrays)
    return tmp / "inputs.npz"


def cmd_pull(a: argparse.Namespace) -> int:
    from tasks import pulling as pull

    if bool(a.ref) == bool(a.from_):
        raise BadInputError("give either NAME[@alias|:version] or --from s3://bucket/prefix/...")
    path = pull.pull_s3(a.from_, a.dest) if a.from_ else pull.pull_mlflow(a.ref, a.dest)
    print(f"pulled into {path} (every file's sha256 matches the manifest)")
    return 0


def _read_inputs(specs: list[str], model) -> dict:
    import numpy as np

    arrays: dict = {}
    for s in specs:
        name, _, path = s.rpartition("=") if "=" in s else ("", "", s)
        if not Path(path).is_file():
            raise BadInputError(f"input file not found: {path}")
        try:
            data = np.load(path, allow_pickle=False)
            if isinstance(data, np.lib.npyio.NpzFile):  # members load lazily: read them here
                data = {k: data[k] for k in data.files}
        except Exception as e:
            raise BadInputError(f"{path} is not a .npy/.npz array file: {e}") from None
        if isinstance(data, dict):
            arrays.update(data)
        else:
            if not name:
                if len(model.inputs) != 1:
                    raise BadInputError(
                        f"the model has {len(model.inputs)} inputs: pass --input NAME=FILE.npy each"
                    )
                name = model.inputs[0].name
            arrays[name] = data
    return arrays


def cmd_run(a: argparse.Namespace) -> int:
    import numpy as np

    from harlflow import runtime
    from tasks.pulling import verify_directory

    verify_directory(Path(a.artifact))
    model = runtime.load(a.artifact)
    out = model(**_read_inputs(a.input, model))
    outs = [out] if isinstance(out, np.ndarray) else out
    for spec, arr in zip(model.outputs, outs, strict=True):
        print(
            f"{spec.name}: shape {list(arr.shape)} {arr.dtype}, first values "
            f"{np.array2string(arr.ravel()[:5], precision=5)}"
        )
    if a.output:
        if a.output.endswith(".npz"):
            np.savez(a.output, **{s.name: o for s, o in zip(model.outputs, outs, strict=True)})
        elif len(outs) == 1:
            np.save(a.output, outs[0])
        else:
            raise BadInputError(
                "the model has several outputs: use an --output file ending in .npz"
            )
        print(f"wrote {a.output}")
    return 0


def cmd_rules(a: argparse.Namespace) -> int:
    """The rewrite rules X-RLflow and greedy rewriting choose from, with what each does."""
    from xrlflow.rules import RULES

    width = max(len(r.name) for r in RULES)
    for i, r in enumerate(RULES, 1):
        print(f"{i:2d} {r.name:{width}s} {r.category:9s} {r.doc}")
    return 0


def cmd_dataset_collect(a: argparse.Namespace) -> int:
    """Tuning databases → the cost model's dataset (parquet; see harl.cost_model.dataset)."""
    from harl.cost_model import dataset

    def progress(db: str, n: int) -> None:
        print(f"{db}: {n} records", flush=True)

    counts = dataset.collect(a.databases, a.out, on_progress=progress)
    print(f"wrote {a.out}: {counts['rows']} rows ({counts['new_rows']} new)")
    return 0


def cmd_db_export(a: argparse.Namespace) -> int:
    """The tuning store → MetaSchedule's JSON files in a new directory."""
    from harl import database
    from harlflow.core.config import tuning_db

    source = a.source or tuning_db()
    if not database.has_records(source):
        raise BadInputError(f"db export: no tuning store at {source}")
    counts = database.export_json(source, a.dest, log=lambda m: print(m, flush=True))
    print(
        f"exported {counts['records']} records of {counts['workloads']} workloads from "
        f"{database.describe(source)} to {a.dest}"
    )
    return 0


def cmd_db_import(a: argparse.Namespace) -> int:
    """MetaSchedule's JSON files → the tuning store (idempotent into a SQL store)."""
    from harl import database
    from harlflow.core.config import tuning_db

    dest = a.dest or tuning_db()
    counts = database.import_json(a.source, dest)
    print(
        f"imported {counts['records']} records from {a.source} into "
        f"{database.describe(dest)} ({counts['new']} new)"
    )
    return 0


def cmd_dataset_generate(a: argparse.Namespace) -> int:
    """Measure the workload suite on each target, collected into a dataset (flows.training)."""
    from tasks import datasets

    units = a.units.split(",") if a.units else None
    targets = a.target or list(datasets.DEFAULT_TARGETS)
    datasets.check_generate(
        targets, units=units, trials_per_task=a.trials_per_task, warm_up=a.warm_up
    )
    summary = _run_job(
        "dataset-generate", out=a.out, work=a.work, targets=targets, units=units,
        trials_per_task=a.trials_per_task, warm_up=a.warm_up, seed=a.seed,
    )  # fmt: skip
    for key, counts in summary["targets"].items():
        print(f"{key}: {counts['trials']} trials measured now, {counts['rows']} rows in "
              f"{summary['path']}")  # fmt: skip
    print(f"registered {datasets.REGISTERED_NAME} version {summary['version']} "
          f"(run {summary['run_id']})")  # fmt: skip
    return 0


def cmd_cost_model_train(a: argparse.Namespace) -> int:
    """Fine-tune (or train) the learned cost model; save it and register it in MLflow."""
    from tasks import cost_model

    start = "scratch" if a.scratch else (a.start or "transfer")
    cost_model.check_train(a.dataset or (), start=start, epochs=a.epochs, holdout=a.holdout,
                           recipe=a.recipe)  # fmt: skip
    r = _run_job(
        "cost-model-train", mlflow=not a.no_register, datasets=a.dataset, start=start,
        out=a.out, epochs=a.epochs, holdout=a.holdout, seed=a.seed, to_registry=not a.no_register,
        recipe=a.recipe,
    )  # fmt: skip
    if r["after"]:
        print(f"held-out workloads after: {cost_model.fmt(r['after'])}")
    if r["version"]:
        print(f"registered {cost_model.REGISTERED_NAME} version {r['version']} "
              f"(run {r['run_id']})")  # fmt: skip
    print(f"saved {r['path']}")
    return 0


def cmd_harl_train(a: argparse.Namespace) -> int:
    """Pre-train HARL's parameter-level agent offline against the learned cost model."""
    from tasks import harl_training

    options = dict(
        units=a.units.split(",") if a.units else None,
        held_out=None if a.held_out is None else [n for n in a.held_out.split(",") if n],
        target=a.target, cost_model=a.cost_model, start=a.start, epochs=a.epochs,
        rounds=a.rounds,
    )  # fmt: skip
    harl_training.check_train(**options)
    r = _run_job("harl-train", out=a.out, **options, seed=a.seed)
    for when in ("before", "after"):
        if r[when] is not None:
            print(f"held-out tasks, {when}: mean predicted gain per trajectory {r[when]:+.4f}")
    print(f"saved the agent ({r['updates']} updates) to {r['path']}")
    print(f"registered {harl_training.REGISTERED_NAME} version {r['version']} "
          f"(run {r['run_id']})")  # fmt: skip
    return 0


def cmd_export_example(a: argparse.Namespace) -> int:
    """Write one of the bundled example models as an ONNX file (to try the ONNX path)."""
    from harlflow.examples import EXAMPLES as FACTORIES
    from tasks.importing import import_model

    if a.example not in FACTORIES:
        raise BadInputError(f"unknown example {a.example!r}: choose from {', '.join(FACTORIES)}")
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        m = import_model(f"harlflow.examples:{a.example}", cache_dir=tmp)
        shutil.copy(m.onnx_path, a.out)
    print(f"wrote {a.out}")
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by optimize, retune and serve: budget, target, stages, publishing."""
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        help="global trial budget (default 64, or no cap with --time-budget; 0: database only)",
    )
    p.add_argument(
        "--time-budget",
        metavar="DURATION",
        help="the whole run's time, import to package: 90s, 20m, 1h. The rewrite search gets "
        "a fifth, tuning what is left after reserving the package stage's time; every "
        "measured trial is kept (with --trials, whichever comes first)",
    )
    p.add_argument(
        "--strategy",
        default="evolutionary",
        choices=list(STRATEGIES),
        help="search strategy: evolutionary (MetaSchedule's, default) or harl",
    )
    p.add_argument(
        "--task-scheduler",
        choices=list(TASK_SCHEDULERS),
        help="which task gets the next round: harl (spends the time left by measured gain per "
        "second) or gradient (MetaSchedule's); default: the strategy's own (harl for harl)",
    )
    p.add_argument(
        "--cost-model",
        default="xgb",
        metavar="xgb|transfer|PATH",
        help="what ranks candidates: xgb (MetaSchedule's XGBoost, default), transfer (the "
        "pre-trained attention cost model, or the team's from 'harlflow cost-model train') or a "
        "saved one's path; the learned ones keep learning from the run's measurements",
    )
    p.add_argument("--target", help="TVM target as JSON, or cpu/host (default: this host's CPU)")
    p.add_argument(
        "--rpc",
        metavar="HOST:PORT:KEY",
        help="measure on the TVM RPC servers registered with this tracker under KEY "
        "(default: measure locally)",
    )
    p.add_argument("--s3-uri", help="also upload the artifact to s3://bucket/prefix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--min-trials-per-task",
        type=int,
        default=4,
        help="measured random schedules each new task gets first (default 4)",
    )
    p.add_argument("--no-measure", action="store_true", help="skip the latency comparison")
    p.add_argument(
        "--rewrite",
        choices=list(METHODS),
        default="greedy",
        help="graph rewriting before tuning (default greedy; xrlflow and rlflow use the agent "
        "from 'harlflow rewrite-train --agent ...', or train one on this model; "
        "tasks/rewrite_methods.py describes each)",
    )
    p.add_argument(
        "--rewrite-oracle",
        choices=list(ORACLES),
        default="tvm",
        help="what judges a rewrite (default tvm: the kernels of the compiled artifact, from "
        "the tuning database's records or the target's measured profile; onnxruntime: "
        "per-operator timings; flops: an analytical count)",
    )
    p.add_argument(
        "--measure-seconds",
        type=float,
        default=10.0,
        help="time limit of the side-by-side latency measurement: fresh processes, rounds "
        "alternated, 95%% intervals (default 10; the --promote gate may take up to 3x)",
    )
    p.add_argument(
        "--measure-untuned",
        action="store_true",
        help="also compile and measure the untuned TVM build (a reference, slow on big models)",
    )
    p.add_argument(
        "--promote",
        action="store_true",
        help="move the registered model's 'production' alias to this version unless it is "
        "slower than the current production version: both are measured side by side, now",
    )
    p.add_argument(
        "--max-regression",
        type=float,
        default=0.05,
        help="allowed slowdown vs production for --promote (fraction, default 0.05): refused "
        "when the ratio's 95%% interval lies above 1 + this, promoted when below; in between "
        "the gate measures longer, then the median decides",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harlflow", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("optimize", help="import, tune, verify, package and publish a model")
    o.add_argument(
        "model", help=f".onnx file, torch.export .pt2 file, or package.module:function ({EXAMPLES})"
    )
    o.add_argument("--name", help="artifact/registered model name (default: the file's stem)")
    o.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME:DIMS:DTYPE",
        help="fix an input's shape, e.g. input:1x3x224x224:float32 (repeatable)",
    )
    o.add_argument(
        "--checkpoint", help="state dict for a model factory (loaded with weights_only=True)"
    )
    _add_run_options(o)
    o.add_argument(
        "--ci",
        action="store_true",
        help="non-interactive: one JSON object on stdout (also for errors); exit codes "
        "2 bad input, 3 tuning, 4 verification, 5 store, 6 regression",
    )
    o.set_defaults(func=cmd_optimize)

    rt = sub.add_parser(
        "retune",
        help="optimise the models of a directory or S3 prefix that "
        "changed since they were last optimised for this target (once)",
    )
    rt.add_argument("source", help="directory or s3://bucket/prefix of .onnx / .pt2 files")
    rt.add_argument(
        "--pool",
        help="optimise the changed models at once on this Prefect work pool's workers "
        "(set up by 'harlflow deploy --pool'; needs PREFECT_API_URL)",
    )
    _add_run_options(rt)
    rt.set_defaults(func=cmd_retune)

    dp = sub.add_parser(
        "deploy",
        help="create a Prefect process work pool (if needed) and deploy the optimize and "
        "retune flows to it, for workers on several machines",
    )
    dp.add_argument("--pool", required=True, help="work pool name, e.g. tuning")
    dp.set_defaults(func=cmd_deploy)

    sv = sub.add_parser(
        "serve",
        help="register 'retune' (or a training job: --job) with a schedule on a Prefect server "
        "(PREFECT_API_URL) and run it when the schedule fires",
    )
    sv.add_argument(
        "source", nargs="?", help="directory or s3://bucket/prefix of .onnx / .pt2 files (retune)"
    )
    sv.add_argument(
        "--job",
        choices=list(JOBS),
        default="retune",
        help="the flow to schedule (default retune): "
        + "; ".join(f"{k}: {j.help}" for k, j in JOBS.items()),
    )
    sv.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a parameter of a training job's flow, repeatable (VALUE as JSON if it parses, "
        "e.g. epochs=3, datasets='[\"a.parquet\"]'; else a string)",
    )
    sv.add_argument("--cron", help=f"schedule (default {CRON_DEFAULT!r}: every night at 03:00)")
    sv.add_argument(
        "--interval",
        help="run every DURATION instead of on --cron (e.g. 6h, 30m), the first run 30 s after "
        "the start",
    )
    sv.add_argument(
        "--deployment", help="deployment name (default harlflow-JOB, e.g. harlflow-retune)"
    )
    sv.add_argument(
        "--pool", help="retune: optimise the changed models on this work pool's workers"
    )
    _add_run_options(sv)
    sv.set_defaults(func=cmd_serve)

    db = sub.add_parser(
        "db", help="the tuning store ($HARLFLOW_TUNING_DB, else $HARLFLOW_HOME/tuning_db)"
    )
    db_sub = db.add_subparsers(dest="db_command", required=True)
    de = db_sub.add_parser("export", help="the store → MetaSchedule JSON files (a new directory)")
    de.add_argument("dest", help="directory to create, as ms.database.JSONDatabase reads it")
    de.add_argument("--from", dest="source", help="store to export (a URL or a directory)")
    de.set_defaults(func=cmd_db_export)
    di = db_sub.add_parser("import", help="MetaSchedule JSON files → the store (idempotent)")
    di.add_argument("source", help="directory of database_workload.json + _tuning_record.json")
    di.add_argument("--to", dest="dest", help="store to import into (a URL or a directory)")
    di.set_defaults(func=cmd_db_import)

    ds = sub.add_parser("dataset", help="the learned cost model's dataset of measured programs")
    ds_sub = ds.add_subparsers(dest="dataset_command", required=True)
    dc = ds_sub.add_parser(
        "collect", help="tuning databases → a parquet dataset (merged, deduplicated)"
    )
    dc.add_argument("databases", nargs="+", metavar="DB", help="tuning database directories")
    dc.add_argument("--out", required=True, help="dataset file (.parquet), created or merged into")
    dc.set_defaults(func=cmd_dataset_collect)
    dg = ds_sub.add_parser(
        "generate",
        help="measure the workload suite (bundled networks, operator shapes) on each target "
        "and collect it; run again to resume",
    )
    dg.add_argument(
        "--out",
        help="dataset file (.parquet), created or merged into (default: "
        "$HARLFLOW_HOME/datasets/suite.parquet)",
    )
    dg.add_argument(
        "--work",
        help="directory of the per-target tuning databases, kept so that a rerun resumes "
        "(default: $HARLFLOW_HOME/datasets/work)",
    )
    dg.add_argument(
        "--target",
        action="append",
        help="a target (JSON or shorthand), repeatable (default: znver5 on 2 cores and on 1, "
        "haswell on 2)",
    )
    dg.add_argument(
        "--units",
        help="comma-separated suite units: network names and ops_gemm, ops_dense, ops_bmm, "
        "ops_conv, ops_depthwise (default: the whole suite)",
    )
    dg.add_argument(
        "--trials-per-task", type=int, default=32, help="programs measured per task (default 32)"
    )
    dg.add_argument("--warm-up", type=int, default=8, help="of those, seeded samples (default 8)")
    dg.add_argument("--seed", type=int, default=0)
    dg.set_defaults(func=cmd_dataset_generate)

    cm = sub.add_parser("cost-model", help="the learned cost model (--cost-model transfer)")
    cm_sub = cm.add_subparsers(dest="cost_model_command", required=True)
    ct = cm_sub.add_parser(
        "train",
        help="fine-tune the cost model on the store's tuning records (or --dataset files), "
        "save it as the team's model and register it in MLflow",
    )
    ct.add_argument(
        "--dataset",
        action="append",
        help="dataset file (.parquet), repeatable (default: the store's tuning records)",
    )
    start = ct.add_mutually_exclusive_group()
    start.add_argument(
        "--from",
        dest="start",
        metavar="PATH",
        help="model to fine-tune (default: the team's model, else the shipped one)",
    )
    start.add_argument("--scratch", action="store_true", help="train a new model")
    ct.add_argument("--out", help="where to save it (default: $HARLFLOW_HOME/cost_model/model.pt)")
    ct.add_argument("--epochs", type=int, help="passes over the data (default: the model's, 30)")
    ct.add_argument(
        "--holdout",
        type=float,
        default=0.2,
        help="fraction of workloads held out to report accuracy on (default 0.2; 0: none)",
    )
    ct.add_argument(
        "--recipe",
        choices=list(RECIPES),
        default="full",
        help="full: train every weight (default); head: only the target embeddings and the "
        "output layer, at a tenth of the learning rate (the pre-trained body frozen)",
    )
    ct.add_argument("--no-register", action="store_true", help="save the file only, no MLflow run")
    ct.add_argument("--seed", type=int, default=0)
    ct.set_defaults(func=cmd_cost_model_train)

    ht = sub.add_parser(
        "harl-train",
        help="pre-train HARL's parameter agent offline on the workload suite, rewarded by the "
        "learned cost model's predictions (nothing is measured)",
    )
    ht.add_argument("--out", help="where to save the agent (default: $HARLFLOW_HOME/harl/agent.pt)")
    ht.add_argument(
        "--units",
        help="comma-separated suite units to train on (default: the whole suite; see "
        "'dataset generate')",
    )
    ht.add_argument(
        "--held-out",
        help="comma-separated networks to score the agent on before and after, never trained "
        "on (default: vit_small,squeezenet_small; '' for none)",
    )
    ht.add_argument("--target", help="target (JSON or shorthand; default: this machine)")
    ht.add_argument(
        "--cost-model",
        default="transfer",
        help="the reward's cost model: 'transfer' (default) or a model file",
    )
    ht.add_argument("--from", dest="start", metavar="PATH", help="agent to continue training")
    ht.add_argument("--epochs", type=int, default=2, help="passes over the tasks (default 2)")
    ht.add_argument(
        "--rounds", type=int, default=6, help="imagined HARL rounds per task and pass (default 6)"
    )
    ht.add_argument("--seed", type=int, default=0)
    ht.set_defaults(func=cmd_harl_train)

    rl_ = sub.add_parser("rules", help="list the graph rewrite rules, in the library's order")
    rl_.set_defaults(func=cmd_rules)

    t = sub.add_parser(
        "rewrite-train", help="train a rewrite agent (X-RLflow or RLFlow) on a set of models"
    )
    t.add_argument("models", nargs="+", help="models as for optimize (ONNX, .pt2, module:function)")
    t.add_argument(
        "--agent",
        choices=["xrlflow", "rlflow"],
        default="xrlflow",
        help="xrlflow: PPO on the real environment; rlflow: a world model of it, the controller "
        "trained in imagination (default xrlflow)",
    )
    t.add_argument(
        "--oracle",
        choices=list(ORACLES),
        default="tvm",
        help="what judges a rewrite (default tvm, as --rewrite-oracle)",
    )
    t.add_argument("--target", help="TVM target for the tvm oracle (default: this host)")
    t.add_argument("--iterations", type=int, default=30, help="PPO iterations (default 30)")
    t.add_argument("--episodes", type=int, default=4, help="episodes per iteration (default 4)")
    t.add_argument(
        "--max-steps", type=int, default=20, help="substitutions per episode (default 20)"
    )
    t.add_argument(
        "--out",
        help="checkpoint path (default $HARLFLOW_HOME/xrlflow/agent.pt, or rlflow.pt)",
    )
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_rewrite_train)

    cp = sub.add_parser(
        "compare",
        help="time artifacts and ONNX files side by side: fresh processes, alternating rounds, "
        "95%% intervals",
    )
    cp.add_argument(
        "models", nargs="+", help="artifact directories (TVM) and .onnx files (onnxruntime)"
    )
    cp.add_argument(
        "--input",
        help=".npz of inputs by name (default: the first artifact's reference inputs)",
    )
    cp.add_argument(
        "--measure-seconds",
        type=float,
        default=20.0,
        help="time limit; it stops sooner once every ratio to the first excludes 1 (default 20)",
    )
    cp.add_argument(
        "--threads", type=int, help="threads and cores each runtime gets (default: the target's)"
    )
    cp.add_argument(
        "--no-spin",
        action="store_true",
        help="turn the runtimes' idle spinning off (TVM_THREAD_POOL_SPIN_COUNT=0, onnxruntime's "
        "allow_spinning=0): not how they are deployed, TVM is much slower without it",
    )
    cp.add_argument("--json", action="store_true", help="print one JSON object, not a table")
    cp.set_defaults(func=cmd_compare)

    pl = sub.add_parser("pull", help="download an artifact and check every file's sha256")
    pl.add_argument(
        "ref", nargs="?", help="NAME, NAME:VERSION or NAME@ALIAS in the MLflow registry"
    )
    pl.add_argument(
        "--from", dest="from_", help="s3://bucket/prefix/NAME/VERSION instead of MLflow"
    )
    pl.add_argument("--dest", required=True, help="directory to create")
    pl.set_defaults(func=cmd_pull)

    r = sub.add_parser("run", help="run an artifact on .npy/.npz inputs")
    r.add_argument("artifact", help="artifact directory (model.so + manifest.json)")
    r.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="[NAME=]FILE",
        help=".npy for the (named) input, or an .npz holding inputs by name",
    )
    r.add_argument("--output", help="write outputs to .npy (one output) or .npz")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("export-example", help="write a bundled example model as ONNX")
    e.add_argument("example", choices=examples.NAMES, help="one of the bundled example models")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export_example)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _prefect_env()  # environment only: Prefect reads it when a command imports it
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "httpcore", "alembic", "urllib3", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signals.install()
    try:
        return args.func(args)
    except HarlflowError as e:
        if signals.requested():  # a signal TVM handed back as an ordinary error
            return _stopped(signals.requested(), args)
        print(f"harlflow: error: {e}", file=sys.stderr)
        if getattr(args, "ci", False):
            print(
                json.dumps(
                    {
                        "status": "error",
                        "error": type(e).__name__,
                        "message": str(e),
                        "exit_code": e.exit_code,
                        **({"gate": e.details} if getattr(e, "details", None) else {}),
                    },
                    default=str,
                )
            )
        return e.exit_code
    except BaseException as e:
        # SIGINT/SIGTERM (signals.Interrupted), Prefect's TerminationSignal, or anything raised
        # while a stop was requested
        stop = signals.requested() or getattr(e, "signum", None) or getattr(e, "signal", None)
        if isinstance(e, KeyboardInterrupt) and not stop:
            stop = signal.SIGINT
        if not stop or isinstance(e, SystemExit):
            raise
        return _stopped(stop, args)


def _stopped(signum: int, args: argparse.Namespace) -> int:
    """End every child process, report the stop and exit with 128 + signum at once: the stages
    have unwound (MLflow runs KILLED, trials committed); what is left is Prefect's and TVM's
    clean-up at exit, which waited on the temporary server just ended (10 s and more)."""
    signals.end_children()
    print(
        f"harlflow: stopped by {signal.Signals(signum).name}; every trial measured so far is "
        "kept in the tuning database",
        file=sys.stderr,
    )
    if getattr(args, "ci", False):
        name = signal.Signals(signum).name
        print(json.dumps({"status": "stopped", "signal": name, "exit_code": 128 + signum}))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
