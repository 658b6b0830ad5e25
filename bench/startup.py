"""Startup benchmark: what the code location, the daemon and the CLI cost before any work is done.

Every figure is a ratio of two things measured in the same run (timings on a shared machine
are noisy; a ratio of neighbours is not), printed with the absolute numbers:

a. import: `python -c "import orchestration.definitions"` over `python -c "import dagster"`,
   fresh interpreters, alternating, median of --repeats (default 5), an empty DAGSTER_HOME and
   the project's specs/. Goal <= 1.3.
b. daemon run: one `machine_failure_data_job` partition submitted as the CLI does
   (`dagster job launch -w <workspace>`), dequeued and launched by a real `dagster-daemon run`
   on the default profile's instance (orchestration/instance.py), queued -> success, against
   the same job through `execute_in_process` in a fresh interpreter (the execute call alone,
   and the whole subprocess with its imports). Once per executor variant (--variants:
   in_process, multiprocess = spawn, forkserver), each with its own daemon (its code server
   reads MLOPS_EXECUTOR) and its own partition, after the day its features look back at was
   built. Reported per run: the breakdown from the run's events (queued -> starting: the
   dequeue; starting -> started: the run worker's start; first step start -> last step end,
   per-step compute and step worker start; -> success), the CLI's own time, and the peak RSS
   and CPU seconds of the run worker's process tree (sampled from /proc every 0.1 s).
   Goal: queued -> success <= 1.5 x the in-process subprocess, and under 10 s.
c. --scale: bench/scale.py (backfill, default profile vs celery; needs PostgreSQL and Redis)
   with small arguments, its ratio folded in. Off by default.
d. CLI: `mlops status --spec machine_failure` over `mlops --help`, fresh processes,
   alternating, median of --status-repeats (default 3), after one untimed call of each, on an
   empty instance and registry; `history` and `impact` the same way, reported alongside.
   Goal <= 3.
e. sensor tick: the new-data sensors over --files (default 10,000) landing files spread over
   --specs (default 10) spec copies ("10 specs' worth of history": 1,000 days each, from
   1990-01-01), each file a copy of one generated day; one tick of every sensor from no
   cursor, then one from that tick's cursor (the rest of the 500-runs-per-tick cap), through
   `dg.build_sensor_context`. The figure is the sum over the sensors (one daemon round over
   all the files). Goal <= 5 s. --specs 1 puts every file under one spec.

Wall seconds stretch with the machine's load; (a), (b), (d) and (e) also give the CPU seconds
of what they timed, which do not.

Byte-code: every process the bench starts caches it under one folder of its own
(PYTHONPYCACHEPREFIX, PYTHONDONTWRITEBYTECODE unset), as a Python writes __pycache__ by
default; untimed first calls fill it. --no-bytecode-cache keeps the environment's setting
(with PYTHONDONTWRITEBYTECODE=1 and no .pyc in the virtualenv, every fresh interpreter
compiles every module it imports, which dominates every figure here).

A figure that fails is reported with its error and the others still run; the exit code is 1
when any failed. Results: bench/results/startup.json; the daemons' logs next to it
(startup_daemon_<variant>.log).

    .venv/bin/python bench/startup.py [--only a,b,d,e] [--repeats 5] [--files 10000]
        [--variants in_process,multiprocess,forkserver] [--scale] [--machines 50]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BIN = Path(sys.executable).parent
RESULTS = REPO / "bench" / "results"
JOB = "machine_failure_data_job"
VARIANTS: dict[str, dict[str, str]] = {
    "in_process": {"MLOPS_EXECUTOR": "in_process"},
    "multiprocess": {"MLOPS_EXECUTOR": "multiprocess", "MLOPS_MULTIPROCESS_START_METHOD": "spawn"},
    "forkserver": {
        "MLOPS_EXECUTOR": "multiprocess",
        "MLOPS_MULTIPROCESS_START_METHOD": "forkserver",
    },
}
GOALS = {"a": 1.3, "b_ratio": 1.5, "b_seconds": 10.0, "d": 3.0, "e_seconds": 5.0}
IMPORT_TIMEOUT = 300  # one fresh interpreter on a loaded 2-core machine
RUN_TIMEOUT = 900  # one daemon run (a spawned step imports the code location: ~60 s loaded)
SENSOR_START = dt.date(1990, 1, 1)


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def _timed(
    args: list[str], env: dict[str, str], timeout: float, cwd: Path = REPO
) -> tuple[float, float]:
    """(wall, CPU) seconds of one subprocess (CPU: user + system, its children included; the
    bench runs nothing else meanwhile); raises with its output when it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)[:200]} exited {p.returncode}:\n{_tail(p)}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _tail(p: subprocess.CompletedProcess, n: int = 2000) -> str:
    return f"{(p.stdout or '')[-n:]}\n{(p.stderr or '')[-n:]}".strip()


def _compare(
    first: Callable[[], tuple[float, float]],
    second: Callable[[], tuple[float, float]],
    repeats: int,
) -> dict:
    """Both timed `repeats` times, alternating (the pair's order swapped every round): the
    wall and CPU seconds of each call, their medians and the ratios first / second."""
    xs, ys = [], []
    for i in range(repeats):
        if i % 2 == 0:
            xs.append(first())
            ys.append(second())
        else:
            ys.append(second())
            xs.append(first())
    wall = (_median([x[0] for x in xs]), _median([y[0] for y in ys]))
    cpu = (_median([x[1] for x in xs]), _median([y[1] for y in ys]))
    return {
        "first_wall_s": [round(x[0], 3) for x in xs],
        "second_wall_s": [round(y[0], 3) for y in ys],
        "first_cpu_s": [round(x[1], 3) for x in xs],
        "second_cpu_s": [round(y[1], 3) for y in ys],
        "first_median_s": wall[0],
        "second_median_s": wall[1],
        "first_median_cpu_s": cpu[0],
        "second_median_cpu_s": cpu[1],
        "ratio": round(wall[0] / wall[1], 3),
        "ratio_cpu": round(cpu[0] / cpu[1], 3),
    }


def _named(c: dict, first: str, second: str) -> dict:
    return {k.replace("first", first).replace("second", second): v for k, v in c.items()}


# Byte-code for the bench's processes: where they cache it (None: as this environment has it).
PYCACHE: Path | None = None


def _bytecode(cache: bool) -> dict:
    """With `cache`, every process the bench starts (and the bench) writes and reads byte-code
    under one folder of its own (PYTHONPYCACHEPREFIX), as a Python without
    PYTHONDONTWRITEBYTECODE does in __pycache__: a fresh interpreter then pays for executing
    its imports, not for compiling every source file first. The virtualenv is not written."""
    global PYCACHE
    before = {
        "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
        "PYTHONPYCACHEPREFIX": os.environ.get("PYTHONPYCACHEPREFIX", ""),
    }
    if cache:
        PYCACHE = Path(tempfile.gettempdir()) / "mlops-bench-pycache"
        PYCACHE.mkdir(exist_ok=True)
        sys.dont_write_bytecode = False
        sys.pycache_prefix = str(PYCACHE)
    return {"environment": before, "bench_cache": str(PYCACHE) if PYCACHE else None}


def _base_env(root: Path) -> dict[str, str]:
    """The process environment with every MLOPS_ store moved under `root` (mlops/config.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLOPS_")}
    if PYCACHE is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    return {
        **env,
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        "DAGSTER_HOME": str(root / "dagster_home"),
        "MLOPS_LAKE_URL": str(root / "lake"),
        "MLOPS_MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MLOPS_MLFLOW_ARTIFACT_ROOT": str(root / "mlartifacts"),
        "MLOPS_ONLINE_STORE_URL": f"sqlite:///{root / 'online.db'}",
    }


def _spec_copy(root: Path, name: str = "machine_failure", start: dt.date | None = None) -> Path:
    """A copy of specs/machine_failure.yaml in root/specs, landing folders under root/landing,
    settle_seconds 0 (the bench writes complete files); `name` renames the spec and its model."""
    data = yaml.safe_load((REPO / "specs" / "machine_failure.yaml").read_text())
    landing = root / "landing" / name
    data["name"] = name
    data["model"]["registered_name"] = name
    data["source"]["path"] = str(landing / "readings")
    data["source"]["settle_seconds"] = 0
    if start is not None:
        data["source"]["start_date"] = start.isoformat()
    data["labels"]["events"]["path"] = str(landing / "events")
    (root / "specs").mkdir(parents=True, exist_ok=True)
    out = root / "specs" / f"{name}.yaml"
    out.write_text(f"# bench/startup.py copy of specs/machine_failure.yaml\n{yaml.safe_dump(data)}")
    return out


def _age_files(folder: Path, seconds: float = 3600) -> None:
    """Landing files dated back, as files that landed a while ago (settled)."""
    past = time.time() - seconds
    for p in folder.rglob("*"):
        if p.is_file():
            os.utime(p, (past, past))


# --- a. import ------------------------------------------------------------------------------


def figure_a(args: argparse.Namespace, tmp: Path) -> dict:
    env = _base_env(tmp)
    Path(env["DAGSTER_HOME"]).mkdir(parents=True)

    def imp(module: str) -> Callable[[], tuple[float, float]]:
        return lambda: _timed([sys.executable, "-c", f"import {module}"], env, IMPORT_TIMEOUT)

    defs, base = imp("orchestration.definitions"), imp("dagster")
    defs(), base()  # untimed: the byte-code cache and the file cache as later processes see them
    c = _compare(defs, base, args.repeats)
    out = {
        **_named(c, "definitions", "dagster"),
        "goal": GOALS["a"],
        "meets_goal": c["ratio"] <= GOALS["a"],
    }
    print(
        f"a. import orchestration.definitions {c['first_median_s']:.2f} s / import dagster "
        f"{c['second_median_s']:.2f} s = {c['ratio']:.2f} (goal <= {GOALS['a']}; median of "
        f"{args.repeats}); CPU {c['first_median_cpu_s']:.2f} s / {c['second_median_cpu_s']:.2f} "
        f"s = {c['ratio_cpu']:.2f}"
    )
    return out


# --- b. one run through the daemon ----------------------------------------------------------


def _proc_table() -> dict[int, int]:
    """pid -> parent pid, from /proc (psutil is not in the lock)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        out[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _descendants(root: int, table: dict[int, int]) -> list[int]:
    kids: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _started(pid: int) -> int | None:
    """A process's start time (clock ticks after boot): with the pid, who it is."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def _rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB: its resident size now and at its peak."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


class WorkerMemory:
    """Samples the run workers under the daemon (the code server's children, or `api
    execute_run`) and their children (step processes, the forkserver): the peak of their
    summed RSS (shared pages counted in each), and each process's own peak (VmHWM)."""

    def __init__(self, daemon_pid: int) -> None:
        self.daemon_pid = daemon_pid
        self.peak_tree_kb = 0
        self.peak_process_kb: dict[int, int] = {}
        self.cmd: dict[int, str] = {}
        self.cpu: dict[int, float] = {}
        self.seen: set[int] = set()  # every descendant of the daemon

    def sample(self) -> None:
        table = _proc_table()
        below = _descendants(self.daemon_pid, table)
        self.seen.update(below)
        for p in below:
            self.cmd.setdefault(p, _cmdline(p))
        # The daemon's code server starts each run worker as a multiprocessing child
        # (DefaultRunLauncher -> gRPC StartRun); `dagster api execute_run` where a launcher
        # runs the CLI instead.
        servers = {p for p in below if " api grpc" in self.cmd[p]}
        workers = [
            p
            for p in below
            if "execute_run" in self.cmd[p]
            or (table.get(p) in servers and "resource_tracker" not in self.cmd[p])
        ]
        tree = set(workers)
        for w in workers:
            tree.update(_descendants(w, table))
        total = 0
        for pid in tree:
            rss, hwm = _rss_kb(pid)
            total += rss
            self.cmd.setdefault(pid, _cmdline(pid))
            self.peak_process_kb[pid] = max(self.peak_process_kb.get(pid, 0), hwm, rss)
            self.cpu[pid] = max(self.cpu.get(pid, 0.0), _cpu_s(pid))
        self.peak_tree_kb = max(self.peak_tree_kb, total)

    def report(self) -> dict:
        procs = sorted(self.peak_process_kb.items(), key=lambda kv: -kv[1])
        return {
            "peak_tree_rss_mb": round(self.peak_tree_kb / 1024, 1),
            "processes_seen": len(procs),
            # CPU seconds of the run's processes at their last sample (a lower bound: a step
            # process's last moments between samples are missed). Apart from the machine's
            # load, unlike the wall times.
            "cpu_s_sampled": round(sum(self.cpu.values()), 2),
            # The daemon replaces its code server every 60 s (RELOAD_WORKSPACE_INTERVAL: a fresh
            # import of the code location each time); the ones seen while the run went on.
            "code_servers_seen": sum(1 for p in self.seen if " api grpc" in self.cmd.get(p, "")),
            "peak_rss_mb_by_process": [
                {"pid": p, "peak_rss_mb": round(kb / 1024, 1), "cmd": self.cmd.get(p, "")[:100]}
                for p, kb in procs[:8]
            ],
        }


@contextlib.contextmanager
def daemon(env: dict[str, str], workspace: Path, log: Path) -> Iterator[subprocess.Popen]:
    """`dagster-daemon run`, stopped with SIGTERM (then killed), its leftovers too."""
    f = log.open("w")
    proc = subprocess.Popen(
        [str(BIN / "dagster-daemon"), "run", "-w", str(workspace)],
        env=env,
        cwd=REPO,
        stdout=f,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        family = {p: _started(p) for p in _descendants(proc.pid, _proc_table())}
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        f.close()
        deadline = time.time() + 20
        while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in family):
            time.sleep(0.2)  # the code server notices its parent is gone
        for pid, started in family.items():
            if started is not None and _started(pid) == started:  # still the one it started
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def _wait_ready(instance, proc: subprocess.Popen, since: float, log: Path, timeout: float) -> float:
    """Seconds until every daemon has a heartbeat newer than `since`: the daemon loads its
    workspace (starts the code server and waits for it) before any daemon thread beats."""
    required = set(instance.get_required_daemon_types())
    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError(
                f"dagster-daemon exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        beats = instance.get_daemon_heartbeats()
        if required and all(k in beats and beats[k].timestamp >= since for k in required):
            return time.perf_counter() - t
        time.sleep(0.25)
    raise TimeoutError(
        f"no heartbeat from {sorted(required)} within {timeout} s:\n{log.read_text()[-3000:]}"
    )


def _breakdown(instance, run_id: str) -> dict:
    """Phases and steps of a finished run from its events (seconds)."""
    from dagster import DagsterEventType as E

    at: dict[str, float] = {}
    steps: dict[str, dict[str, float]] = {}
    for e in instance.all_logs(run_id):
        ev = e.dagster_event
        if ev is None:
            continue
        kind = ev.event_type
        if kind in (E.RUN_ENQUEUED, E.RUN_DEQUEUED, E.RUN_STARTING, E.RUN_START):
            at.setdefault(kind.value, e.timestamp)
        elif kind in (E.RUN_SUCCESS, E.RUN_FAILURE):
            at["end"] = e.timestamp
        elif ev.step_key and kind in (
            E.STEP_WORKER_STARTING,
            E.STEP_WORKER_STARTED,
            E.STEP_START,
            E.STEP_SUCCESS,
            E.STEP_FAILURE,
        ):
            steps.setdefault(ev.step_key, {}).setdefault(kind.value, e.timestamp)

    def gap(a: str, b: str) -> float | None:
        return round(at[b] - at[a], 3) if a in at and b in at else None

    starts = [s["STEP_START"] for s in steps.values() if "STEP_START" in s]
    ends = [s.get("STEP_SUCCESS", s.get("STEP_FAILURE")) for s in steps.values()]
    ends = [x for x in ends if x is not None]
    per_step = {}
    for key, s in sorted(steps.items(), key=lambda kv: min(kv[1].values())):
        end = s.get("STEP_SUCCESS", s.get("STEP_FAILURE"))
        per_step[key] = {
            "compute_s": round(end - s["STEP_START"], 3) if end and "STEP_START" in s else None,
            "worker_start_s": round(s["STEP_START"] - s["STEP_WORKER_STARTING"], 3)
            if "STEP_WORKER_STARTING" in s and "STEP_START" in s
            else None,
        }
    first, last = (min(starts), max(ends)) if starts and ends else (None, None)
    return {
        "queued_to_success_s": gap("PIPELINE_ENQUEUED", "end"),
        # The queued run coordinator dequeues and launches in one go (RUN_STARTING).
        "queued_to_starting_s": gap("PIPELINE_ENQUEUED", "PIPELINE_STARTING"),
        "starting_to_started_s": gap("PIPELINE_STARTING", "PIPELINE_START"),
        "started_to_first_step_s": round(first - at["PIPELINE_START"], 3)
        if first and "PIPELINE_START" in at
        else None,
        "first_step_to_last_step_end_s": round(last - first, 3) if first and last else None,
        "last_step_end_to_success_s": round(at["end"] - last, 3) if last and "end" in at else None,
        "steps": per_step,
    }


def _daemon_run(
    env: dict[str, str], workspace: Path, log: Path, day: str, ready_timeout: float
) -> dict:
    """One partition through a fresh daemon: warm it up, submit as the CLI does, watch."""
    import dagster as dg

    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]  # DagsterInstance.get() in this process
    tag = uuid.uuid4().hex[:8]
    with dg.DagsterInstance.get() as instance, daemon(env, workspace, log) as proc:
        t_daemon = time.time()
        ready_s = _wait_ready(instance, proc, t_daemon, log, ready_timeout)
        memory = WorkerMemory(proc.pid)
        tags = json.dumps({"dagster/partition": day, "mlops/bench": tag})
        launch = [str(BIN / "dagster"), "job", "launch", "-w", str(workspace), "-j", JOB]
        t0 = time.perf_counter()
        cli = subprocess.Popen(
            [*launch, "--tags", tags],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        cli_s = run = None
        while time.perf_counter() - t0 < RUN_TIMEOUT:
            memory.sample()
            if cli_s is None and cli.poll() is not None:
                cli_s = time.perf_counter() - t0
                if cli.returncode != 0:
                    raise RuntimeError(
                        f"dagster job launch exited {cli.returncode}:\n{cli.stdout.read()[-3000:]}"
                    )
            runs = instance.get_runs(dg.RunsFilter(tags={"mlops/bench": tag}), limit=1)
            run = runs[0] if runs else None
            if run is not None and run.is_finished:
                break
            time.sleep(0.1)
        else:
            cli.kill()
            raise TimeoutError(
                f"run for {day} not finished within {RUN_TIMEOUT} s (status: {run.status.value if run else 'not created'})"
            )
        observed_s = time.perf_counter() - t0
        memory.sample()
        out = {
            "partition": day,
            "run_id": run.run_id,
            "status": run.status.value,
            "daemon_ready_s": round(ready_s, 2),
            "cli_launch_s": round(cli_s, 2) if cli_s is not None else None,
            "submit_to_success_observed_s": round(observed_s, 2),
            **_breakdown(instance, run.run_id),
            "run_worker_memory": memory.report(),
        }
        if run.status != dg.DagsterRunStatus.SUCCESS:
            errors = [
                e.dagster_event.event_specific_data.error.message.strip()[-800:]
                for e in instance.all_logs(run.run_id)
                if e.dagster_event
                and e.dagster_event.is_failure
                and getattr(e.dagster_event.event_specific_data, "error", None)
            ]
            raise RuntimeError(f"run {run.run_id} for {day}: {run.status.value}: {errors}")
    return out


IN_PROCESS = """
import json, sys, time
t0 = time.perf_counter()
import dagster as dg
from orchestration.definitions import defs
job = defs.resolve_job_def(sys.argv[1])
t1 = time.perf_counter()
with dg.DagsterInstance.get() as instance:
    t2 = time.perf_counter()
    r = job.execute_in_process(partition_key=sys.argv[2], instance=instance, raise_on_error=False)
    t3 = time.perf_counter()
print(json.dumps({"success": r.success, "import_s": t1 - t0, "instance_s": t2 - t1,
                  "execute_s": t3 - t2, "run_id": r.run_id}))
"""


# The days the measured runs' features look back at (lookback_days: 1), built beforehand by
# their own assets, so every measured run reads one built day and writes nothing another reads.
LOOKBACK_SETUP = """
import sys
import dagster as dg
from orchestration.definitions import defs
job = defs.resolve_job_def(sys.argv[1])
keys = [k for k in job.asset_layer.executable_asset_keys if k.path[-1] != "features"]
with dg.DagsterInstance.get() as instance:
    for day in sys.argv[2:]:
        r = job.execute_in_process(
            partition_key=day, instance=instance, asset_selection=keys, raise_on_error=False
        )
        if not r.success:
            sys.exit(f"setup run {r.run_id} for {day} failed")
"""


def _in_process(env: dict[str, str], day: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", IN_PROCESS, JOB, day],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if p.returncode != 0:
        raise RuntimeError(f"execute_in_process subprocess exited {p.returncode}:\n{_tail(p)}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    if not r["success"]:
        raise RuntimeError(f"execute_in_process run {r['run_id']} for {day} failed:\n{_tail(p)}")
    return {
        "partition": day,
        "execute_s": round(r["execute_s"], 3),
        "imports_s": round(r["import_s"], 3),
        "subprocess_wall_s": round(wall, 3),
        "subprocess_cpu_s": round(cpu, 3),
    }


def _daemon_errors(log: Path) -> list[str]:
    """The daemon's ERROR and WARNING lines and tracebacks' last lines (colours stripped)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()
    out = []
    for i, ln in enumerate(lines):
        if " - ERROR - " in ln or " - WARNING - " in ln:
            out.append(ln[:300])
        elif ln.startswith("Traceback"):
            end = next(
                (j for j in range(i + 1, len(lines)) if lines[j] and not lines[j].startswith(" ")),
                i,
            )
            out.append(f"Traceback ... {lines[end][:250]}")
    return out[:20]


def figure_b(args: argparse.Namespace, tmp: Path) -> dict:
    from demo.generate import generate
    from mlops.spec import load_spec
    from orchestration.instance import write_default_instance

    env = _base_env(tmp)
    write_default_instance(env["DAGSTER_HOME"])
    env["MLOPS_SPECS_DIR"] = str(_spec_copy(tmp).parent)
    spec = load_spec(Path(env["MLOPS_SPECS_DIR"]) / "machine_failure.yaml")
    variants = [v for v in args.variants.split(",") if v]
    # Every other day (the in-process run, then each variant), so no run looks back at a day
    # another measured run built; a few more days for the labels' late events.
    n = 2 * (len(variants) + 1) + 4
    generate(spec, days=n, machines=args.machines, seed=11)
    _age_files(tmp / "landing")
    day = [
        (spec.source.start_date + dt.timedelta(days=1 + 2 * i)).isoformat()
        for i in range(len(variants) + 1)
    ]
    workspace = tmp / "workspace.yaml"
    workspace.write_text(
        yaml.safe_dump(
            {
                "load_from": [
                    {
                        "python_module": {
                            "module_name": "orchestration.definitions",
                            "location_name": "mlops",
                            "working_directory": str(REPO),
                        }
                    }
                ]
            }
        )
    )
    lookback = [(dt.date.fromisoformat(d) - dt.timedelta(days=1)).isoformat() for d in day]
    p = subprocess.run(
        [sys.executable, "-c", LOOKBACK_SETUP, JOB, *lookback],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    if p.returncode != 0:
        raise RuntimeError(f"building the lookback days failed:\n{_tail(p)}")
    inproc = _in_process(env, day[0])
    print(
        f"b. execute_in_process {JOB} {day[0]}: execute {inproc['execute_s']:.2f} s, "
        f"subprocess {inproc['subprocess_wall_s']:.2f} s (imports {inproc['imports_s']:.2f} s; CPU "
        f"{inproc['subprocess_cpu_s']:.2f} s)"
    )
    out: dict = {"job": JOB, "machines": args.machines, "in_process": inproc, "variants": {}}
    failed = []
    for i, name in enumerate(variants, start=1):
        log = RESULTS / f"startup_daemon_{name}.log"
        venv = {**env, **VARIANTS[name]}
        try:
            r = _daemon_run(venv, workspace, log, day[i], args.ready_timeout)
        except Exception as e:  # reported; the next variant still runs
            failed.append(name)
            out["variants"][name] = {"error": _error(e), "daemon_errors": _daemon_errors(log)}
            print(f"   {name}: FAILED {str(e).splitlines()[0][:200]}")
            continue
        total = r["queued_to_success_s"]
        r["ratio_to_in_process_subprocess"] = round(total / inproc["subprocess_wall_s"], 3)
        r["ratio_to_execute_call"] = round(total / inproc["execute_s"], 3)
        r["meets_goal"] = (
            r["ratio_to_in_process_subprocess"] <= GOALS["b_ratio"] and total < GOALS["b_seconds"]
        )
        r["daemon_errors"] = _daemon_errors(log)
        r["daemon_log"] = str(log.relative_to(REPO))
        out["variants"][name] = r
        steps = r["steps"].values()
        r["steps_compute_total_s"] = round(sum(x["compute_s"] or 0 for x in steps), 3)
        r["step_worker_start_total_s"] = round(sum(x["worker_start_s"] or 0 for x in steps), 3)
        slowest = max(r["steps"].items(), key=lambda kv: kv[1]["compute_s"] or 0)
        mem = r["run_worker_memory"]
        print(
            f"   {name}: queued -> success {total:.2f} s = "
            f"{r['ratio_to_in_process_subprocess']:.2f} x the in-process subprocess, "
            f"{r['ratio_to_execute_call']:.2f} x its execute call (goal <= {GOALS['b_ratio']} "
            f"and < {GOALS['b_seconds']:.0f} s)\n"
            f"      dequeue {r['queued_to_starting_s']} s, run worker start "
            f"{r['starting_to_started_s']} s, first step to last step end "
            f"{r['first_step_to_last_step_end_s']} s (compute {r['steps_compute_total_s']} s, "
            f"step worker starts {r['step_worker_start_total_s']} s; slowest compute "
            f"{slowest[0]} {slowest[1]['compute_s']} s), to success "
            f"{r['last_step_end_to_success_s']} s\n"
            f"      CLI launch {r['cli_launch_s']} s; run worker tree peak RSS "
            f"{mem['peak_tree_rss_mb']} MB over {mem['processes_seen']} process(es); "
            f"{mem['code_servers_seen']} code server(s) seen; run CPU {mem['cpu_s_sampled']} s"
        )
    out["goal"] = {
        "ratio_to_in_process_subprocess": GOALS["b_ratio"],
        "seconds": GOALS["b_seconds"],
    }
    if failed:
        raise FigureError(f"variant(s) failed: {', '.join(failed)}", out)
    return out


# --- d. the CLI -----------------------------------------------------------------------------


def figure_d(args: argparse.Namespace, tmp: Path) -> dict:
    from orchestration.instance import write_default_instance

    env = _base_env(tmp)
    write_default_instance(env["DAGSTER_HOME"])
    mlops = str(BIN / "mlops")

    def verb(*args: str) -> Callable[[], tuple[float, float]]:
        return lambda: _timed([mlops, *args, "--spec", "machine_failure"], env, IMPORT_TIMEOUT)

    status = verb("status")

    def helps() -> tuple[float, float]:
        return _timed([mlops, "--help"], env, IMPORT_TIMEOUT)

    # Read-only: the empty instance and registry are not created by the verbs; the first call
    # of each is untimed (file-system caches).
    first_status, first_help = status(), helps()
    c = _compare(status, helps, args.status_repeats)
    out = {
        "untimed_first_status_s": round(first_status[0], 3),
        "untimed_first_help_s": round(first_help[0], 3),
        **_named(c, "status", "help"),
        "goal": GOALS["d"],
        "meets_goal": c["ratio"] <= GOALS["d"],
    }
    print(
        f"d. mlops status {c['first_median_s']:.2f} s / mlops --help {c['second_median_s']:.2f} s"
        f" = {c['ratio']:.2f} (goal <= {GOALS['d']}; median of {args.status_repeats}; the "
        f"first status {first_status[0]:.2f} s); CPU {c['first_median_cpu_s']:.2f} s / "
        f"{c['second_median_cpu_s']:.2f} s = {c['ratio_cpu']:.2f}"
    )
    # The other report verbs, against the same --help (no goal of their own: "about 2 s").
    others = {"history": verb("history"), "impact": verb("impact", "--partition", "2026-01-05")}
    out["verbs"] = {}
    for name, call in others.items():
        call()
        v = _compare(call, helps, args.status_repeats)
        out["verbs"][name] = _named(v, name, "help")
        print(
            f"   mlops {name} {v['first_median_s']:.2f} s / --help {v['second_median_s']:.2f} s "
            f"= {v['ratio']:.2f}"
        )
    return out


# --- e. a new-data sensor tick over many files ----------------------------------------------


def figure_e(args: argparse.Namespace, tmp: Path) -> dict:
    import dagster as dg

    from demo.generate import generate
    from mlops.spec import load_spec
    from orchestration.definitions import build_definitions
    from resources.clock import ClockResource
    from resources.lake import LakeResource
    from sensors.new_data import new_data_sensor_name

    n_specs = max(1, args.specs)
    per_spec = [
        args.files // n_specs + (1 if i < args.files % n_specs else 0) for i in range(n_specs)
    ]
    # One generated day, copied under every date name.
    seed_root = tmp / "seed"
    seed_spec = load_spec(_spec_copy(seed_root, start=SENSOR_START))
    generate(seed_spec, days=1, machines=args.machines, seed=11)
    sample = next(seed_spec.landing_dir.iterdir()).read_bytes()
    pattern = seed_spec.source.file_pattern
    names = [f"machine_failure_{i}" for i in range(n_specs)] if n_specs > 1 else ["machine_failure"]
    t = time.perf_counter()
    for name, count in zip(names, per_spec, strict=True):
        spec = load_spec(_spec_copy(tmp, name=name, start=SENSOR_START))
        spec.landing_dir.mkdir(parents=True)
        for i in range(count):
            day = SENSOR_START + dt.timedelta(days=i)
            (spec.landing_dir / pattern.replace("{date}", day.isoformat())).write_bytes(sample)
    _age_files(tmp / "landing")
    write_s = time.perf_counter() - t

    lake = str(tmp / "lake")
    defs = build_definitions(tmp / "specs", lake)
    repo = defs.get_repository_def()
    home = tmp / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    resources = {"lake": LakeResource(base_url=lake), "clock": ClockResource()}
    per_sensor = {}
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        for name, count in zip(names, per_spec, strict=True):
            sensor = repo.get_sensor_def(
                new_data_sensor_name(load_spec(tmp / "specs" / f"{name}.yaml"))
            )
            ticks, cursor = [], None
            for _ in range(2):
                ctx = dg.build_sensor_context(
                    instance=instance, cursor=cursor, resources=resources, definitions=defs
                )
                t, c = time.perf_counter(), time.process_time()
                data = sensor.evaluate_tick(ctx)
                wall, cpu = time.perf_counter() - t, time.process_time() - c
                ticks.append((wall, len(data.run_requests or []), cpu))
                cursor = data.cursor or cursor
            per_sensor[name] = {
                "files": count,
                "first_tick_s": round(ticks[0][0], 3),
                "first_tick_run_requests": ticks[0][1],
                "first_tick_cpu_s": round(ticks[0][2], 3),
                "second_tick_cpu_s": round(ticks[1][2], 3),
                "second_tick_s": round(ticks[1][0], 3),
                "second_tick_run_requests": ticks[1][1],
                "cursor_bytes": len(cursor or ""),
            }
    first = sum(s["first_tick_s"] for s in per_sensor.values())
    second = sum(s["second_tick_s"] for s in per_sensor.values())
    cpu = [sum(s[f"{k}_tick_cpu_s"] for s in per_sensor.values()) for k in ("first", "second")]
    out = {
        "files": args.files,
        "specs": n_specs,
        "write_files_s": round(write_s, 2),
        "first_tick_total_s": round(first, 3),
        "second_tick_total_s": round(second, 3),
        "first_tick_total_cpu_s": round(cpu[0], 3),
        "second_tick_total_cpu_s": round(cpu[1], 3),
        "first_tick_max_s": max(s["first_tick_s"] for s in per_sensor.values()),
        "run_requests_first": sum(s["first_tick_run_requests"] for s in per_sensor.values()),
        "run_requests_second": sum(s["second_tick_run_requests"] for s in per_sensor.values()),
        "ratio_to_goal": round(max(first, second) / GOALS["e_seconds"], 3),
        "goal_s": GOALS["e_seconds"],
        "meets_goal": max(first, second) <= GOALS["e_seconds"],
        "sensors": per_sensor,
    }
    print(
        f"e. new-data sensors over {args.files} files in {n_specs} spec(s): first tick "
        f"{first:.2f} s ({out['run_requests_first']} run requests; slowest sensor "
        f"{out['first_tick_max_s']:.2f} s), second tick {second:.2f} s "
        f"({out['run_requests_second']} run requests) (goal <= {GOALS['e_seconds']:.0f} s); CPU "
        f"{cpu[0]:.2f} s and {cpu[1]:.2f} s"
    )
    return out


# --- c. bench/scale.py ----------------------------------------------------------------------


def figure_c(args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / "scale.json"
    cmd = [sys.executable, "bench/scale.py", "--days", "10", "--out", str(out)]
    env = dict(os.environ)
    if PYCACHE is not None:  # the same byte-code setting as the other figures
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0 or not out.exists():
        raise RuntimeError(f"bench/scale.py exited {p.returncode}:\n{_tail(p)}")
    r = json.loads(out.read_text())
    print(f"c. bench/scale.py --days 10: production/default {r['ratio_production_to_default']:.2f}")
    return {"command": " ".join(cmd[1:4]), "ratio": r["ratio_production_to_default"], **r}


# --- the run --------------------------------------------------------------------------------


class FigureError(Exception):
    """A figure that failed part-way: what it measured before the failure comes with it."""

    def __init__(self, message: str, partial: dict) -> None:
        super().__init__(message)
        self.partial = partial


def _error(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(e), e)).strip()[-4000:]


FIGURES = {"a": figure_a, "b": figure_b, "c": figure_c, "d": figure_d, "e": figure_e}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", default="a,b,d,e", help="figures to run, comma-separated (a,b,c,d,e)")
    ap.add_argument("--repeats", type=int, default=5, help="(a) imports timed per side")
    ap.add_argument("--status-repeats", type=int, default=3, help="(d) CLI calls timed per side")
    ap.add_argument("--variants", default="in_process,multiprocess,forkserver", help="(b)")
    ap.add_argument("--machines", type=int, default=50, help="(b, e) machines per generated day")
    ap.add_argument("--ready-timeout", type=float, default=600, help="(b) daemon start, seconds")
    ap.add_argument("--files", type=int, default=10_000, help="(e) landing files in all")
    ap.add_argument("--specs", type=int, default=10, help="(e) spec copies sharing the files")
    ap.add_argument("--scale", action="store_true", help="(c) also run bench/scale.py --days 10")
    ap.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="leave byte-code as the environment has it (PYTHONDONTWRITEBYTECODE=1: every "
        "process compiles every module it imports)",
    )
    ap.add_argument("--out", default=str(RESULTS / "startup.json"))
    args = ap.parse_args()
    only = [f.strip() for f in args.only.split(",") if f.strip()]
    if args.scale and "c" not in only:
        only.append("c")
    unknown = [f for f in only if f not in FIGURES] + [
        v for v in args.variants.split(",") if v and v not in VARIANTS
    ]
    if unknown:
        ap.error(f"unknown figure(s) or variant(s): {', '.join(unknown)}")
    RESULTS.mkdir(parents=True, exist_ok=True)

    result: dict = {
        "benchmark": "startup",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "bytecode": _bytecode(not args.no_bytecode_cache),
        },
        "figures": {},
        "errors": {},
    }
    for key in sorted(only, key="abcde".index):
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"mlops-startup-{key}-") as tmp:
            try:
                result["figures"][key] = FIGURES[key](args, Path(tmp))
            except Exception as e:  # reported; the other figures still run
                result["errors"][key] = _error(e)
                if isinstance(e, FigureError):
                    result["figures"][key] = e.partial
                print(f"{key}. FAILED: {_error(e)[:1500]}")
        if key in result["figures"]:
            result["figures"][key]["bench_seconds"] = round(time.perf_counter() - t, 1)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(
        f"load average {result['machine']['load_average_at_start']} -> "
        f"{result['machine']['load_average_at_end']} ({os.cpu_count()} cpus); wrote {out}"
    )
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
