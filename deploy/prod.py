"""The production profile on one machine: `make prod-up`, `make prod-demo`, `make prod-down`.

    .venv/bin/python deploy/prod.py init      # databases, Dagster's tables and pools only
    .venv/bin/python deploy/prod.py up        # init, then MLflow server, celery workers,
                                              # dagster-daemon, dagster-webserver
    .venv/bin/python deploy/prod.py demo [-- demo args]   # the closed loop on them, then an
                                              # asset backfill through the daemon
    .venv/bin/python deploy/prod.py backfill -- --job J --from D --to D   # the same, any days
    .venv/bin/python deploy/prod.py status
    .venv/bin/python deploy/prod.py down      # stop everything `up` started
    .venv/bin/python deploy/prod.py clean     # down, drop the local databases, rm .mlops/prod

Settings come from deploy/prod.env when it exists, else deploy/prod.env.example, checked by the
platform's settings model (mlops/settings.py: a wrong or unknown MLOPS_* line stops here, named).
Logs and pid
files live under .mlops/prod/{logs,pids}; each service runs in its own process group and `down`
stops exactly the groups whose pids it recorded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the project's packages, deploy.services

from deploy import processes, services  # noqa: E402
from mlops.settings import Settings, SettingsError, settings, unknown, variable  # noqa: E402

DEPLOY = ROOT / "deploy"
STATE = ROOT / ".mlops" / "prod"
LOGS, PIDS = STATE / "logs", STATE / "pids"
BIN = Path(sys.executable).parent
PATH_SETTINGS = ("DAGSTER_HOME", "MLOPS_LAKE_URL", "MLOPS_MLFLOW_ARTIFACTS_DESTINATION")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# What the profile cannot do without (the model's defaults are the default profile's).
REQUIRED = (
    "pg_host",
    "pg_port",
    "pg_user",
    "pg_db",
    "mlflow_backend_uri",
    "mlflow_artifacts_destination",
    "mlflow_host",
    "mlflow_port",
    "dagster_ui_port",
)


def env_file() -> Path:
    path = DEPLOY / "prod.env"
    return path if path.exists() else DEPLOY / "prod.env.example"


def under_root(value: str) -> str:
    """A relative path is relative to the project root; URLs and absolute paths stay."""
    if value and "://" not in value and not Path(value).is_absolute():
        return str(ROOT / value)
    return value


def load_env(path: Path | None = None) -> tuple[dict[str, str], Settings, Path]:
    """os.environ plus the profile's file (KEY=VALUE lines, dotenv syntax), the file winning:
    every process gets the same values whatever the calling shell (or make, which exports
    DAGSTER_HOME) has set. Also the settings model over the same file (which wins there too)."""
    from dotenv import dotenv_values  # the env-file parser pydantic-settings uses

    path = path or env_file()
    values = dotenv_values(path)
    if bad := [k for k, v in values.items() if v is None]:
        sys.exit(f"{path}: expected KEY=VALUE, got {', '.join(map(repr, bad))}")
    if typos := unknown(values):
        sys.exit(f"{path}: {', '.join(typos)}: not a setting of the platform (mlops/settings.py)")
    try:
        s = settings(env_file=path)
    except SettingsError as e:
        sys.exit(str(e))
    if missing := [variable(f) for f in REQUIRED if getattr(s, f) is None]:
        sys.exit(f"{path}: set {', '.join(missing)} (see deploy/prod.env.example)")
    env = {k: v or "" for k, v in values.items()}
    for key in PATH_SETTINGS:
        if key in env:
            env[key] = under_root(env[key])
    return {**os.environ, **env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}, s, path


# --- processes ------------------------------------------------------------------------------


def _pid(name: str) -> int | None:
    f = PIDS / f"{name}.pid"
    if not f.exists():
        return None
    pid = int(f.read_text())
    if not processes.group_alive(pid):
        f.unlink()
        return None
    return pid


def start(name: str, args: list[str], env: dict[str, str]) -> None:
    if _pid(name):
        print(f"  {name}: already running (pid {_pid(name)})")
        return
    LOGS.mkdir(parents=True, exist_ok=True)
    PIDS.mkdir(parents=True, exist_ok=True)
    proc = processes.start(args, LOGS / f"{name}.log", env)
    (PIDS / f"{name}.pid").write_text(str(proc.pid))
    print(f"  {name}: pid {proc.pid}, log {LOGS / f'{name}.log'}")


def stop(name: str, grace: float = 30) -> None:
    pid = _pid(name)
    if pid is None:
        return
    processes.stop(pid, grace)  # started by another invocation: a recorded pid, not a child
    (PIDS / f"{name}.pid").unlink(missing_ok=True)
    print(f"  {name}: stopped")


def wait_for(name: str, ready, timeout: float = 180) -> None:
    log, pid = LOGS / f"{name}.log", _pid(name)
    if pid is None and not ready():
        sys.exit(f"{name} exited while starting: see {log}")
    try:
        processes.wait_until(ready, name, log, timeout, proc=pid, interval=1)
    except processes.NotReady as e:
        sys.exit(str(e))


# --- databases -------------------------------------------------------------------------------


def _databases(s: Settings) -> list:
    """The profile's databases as SQLAlchemy URLs: Dagster's, MLflow's, Optuna's."""
    from sqlalchemy.engine import make_url

    dagster = make_url("postgresql+psycopg2://").set(
        host=s.pg_host,
        port=s.pg_port,
        username=s.pg_user,
        password=s.pg_password.get_secret_value() if s.pg_password else None,
        database=s.pg_db,
    )
    urls = [dagster, make_url(s.mlflow_backend_uri)]
    if s.optuna_storage:
        urls.append(make_url(s.optuna_storage))
    return urls


def _admin(url):
    import psycopg2

    conn = psycopg2.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        password=url.password or "",
        dbname="postgres",
        connect_timeout=5,
    )
    conn.autocommit = True
    return conn


def create_databases(s: Settings) -> None:
    import psycopg2

    for url in _databases(s):
        where = f"{url.host}:{url.port or 5432}/{url.database}"
        try:
            conn = _admin(url)
        except psycopg2.OperationalError as e:
            sys.exit(
                f"PostgreSQL at {url.host}:{url.port or 5432} refused user {url.username}: "
                f"{str(e).strip()}. Check the MLOPS_PG_* / *_URI lines of the env file."
            )
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.database,))
                if cur.fetchone():
                    print(f"  database {where}: exists")
                    continue
                try:
                    cur.execute(f'CREATE DATABASE "{url.database}"')
                except psycopg2.Error as e:
                    sys.exit(f"cannot create {where} ({e.pgerror or e}): create it, then rerun")
                print(f"  database {where}: created")
        finally:
            conn.close()


def drop_databases(s: Settings) -> None:
    for url in _databases(s):
        if url.host not in LOCAL_HOSTS:
            print(f"  database {url.host}/{url.database}: not local, left alone")
            continue
        conn = _admin(url)
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
        finally:
            conn.close()
        print(f"  database {url.host}/{url.database}: dropped")


def forget_online_states(s: Settings) -> None:
    """The specs' entity states in a local online store (the demo writes them)."""
    from urllib.parse import urlsplit

    url = s.online_store_url
    if not url.startswith("redis") or urlsplit(url).hostname not in LOCAL_HOSTS:
        return
    from mlops.online_store import make_store
    from mlops.spec import find_specs

    store = make_store(url)
    try:
        for spec in find_specs(ROOT / "specs"):
            store.delete_spec(spec.name)
            print(f"  online store {url}: {spec.name} states deleted")
    finally:
        store.close()


# --- commands --------------------------------------------------------------------------------


def workers(s: Settings) -> list[str]:
    return [f"celery-worker-{i}" for i in range(1, s.celery_workers + 1)]


def init(env: dict[str, str], s: Settings) -> None:
    """What must exist before any service starts: the instance's dagster.yaml, the databases,
    Dagster's tables and the concurrency pools (also deploy/compose.yaml's one-shot `init`)."""
    home = Path(env["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    print("databases:")
    create_databases(s)
    # Create Dagster's tables and the concurrency pools once, before several processes would
    # race to (orchestration/pools.py).
    subprocess.run(
        [sys.executable, "-m", "orchestration.pools"],
        env=env,
        cwd=ROOT,
        check=True,
    )


def up(env: dict[str, str], s: Settings) -> None:
    init(env, s)
    print("services:")
    dest = under_root(s.mlflow_artifacts_destination)
    if "://" not in dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
    mlflow = services.mlflow_server_args(s.mlflow_backend_uri, dest, s.mlflow_port, s.mlflow_host)
    start("mlflow", mlflow, env)
    since = {}
    for name in workers(s):
        # A worker started now must say " ready." below what the log holds; one that is
        # already running said it before.
        since[name] = 0 if _pid(name) else services.log_size(LOGS / f"{name}.log")
        start(name, services.celery_worker_args(DEPLOY / "celery.yaml", name), env)
    start("dagster-daemon", [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], env)
    ui = [s.dagster_ui_host, str(s.dagster_ui_port)]
    start(
        "dagster-webserver",
        [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", ui[0], "-p", ui[1]],
        env,
    )
    mlflow_url = s.mlflow_tracking_uri
    wait_for("mlflow", lambda: services.http_ok(f"{mlflow_url}/health"))
    for name in workers(s):
        log = LOGS / f"{name}.log"
        wait_for(name, lambda log=log, n=since[name]: services.worker_ready(log, n))
    wait_for("dagster-webserver", lambda: services.http_ok(f"http://{ui[0]}:{ui[1]}/server_info"))
    print(
        f"\nup. Dagster UI http://{ui[0]}:{ui[1]}  MLflow {s.mlflow_ui_url}\n"
        f"logs {LOGS}; `make prod-demo` runs the loop on these services, `make prod-down` "
        "stops them."
    )


def down(s: Settings) -> None:
    for name in ["dagster-webserver", "dagster-daemon", *workers(s), "mlflow"]:
        stop(name)
    for f in PIDS.glob("*.pid") if PIDS.exists() else []:  # workers from a larger setting
        stop(f.stem)


def status(s: Settings) -> int:
    names = ["mlflow", *workers(s), "dagster-daemon", "dagster-webserver"]
    running = {n: _pid(n) for n in names}
    for n, pid in running.items():
        print(f"  {n:<20} {'pid ' + str(pid) if pid else 'not running'}")
    return 0 if all(running.values()) else 1


def require_up(s: Settings) -> None:
    if status(s) != 0:
        sys.exit("the production services are not all running: `make prod-up` first")


def ui_url(s: Settings) -> str:
    return f"http://{s.dagster_ui_host}:{s.dagster_ui_port}"


def backfill(env: dict[str, str], s: Settings, args: list[str]) -> int:
    """A Dagster asset backfill (orchestration/backfills.py): launched through the webserver,
    run by the daemon, shown in the UI; waits for it and prints where each run's steps ran."""
    require_up(s)
    cmd = [sys.executable, "-m", "orchestration.backfills", "--url", ui_url(s), *args]
    return subprocess.run(cmd, env=env, cwd=ROOT).returncode


def demo(env: dict[str, str], s: Settings, args: list[str]) -> int:
    """The closed loop (demo/run.py) with the instance in PostgreSQL, MLflow over
    HTTP and Optuna in PostgreSQL (the demo executes its runs in its own process); then the
    last days again as a Dagster asset backfill through the daemon: runs requested as their
    days' inputs exist, queued, launched within deploy/dagster.yaml's limits, each sending its
    steps to the celery workers."""
    import datetime as dt

    import yaml

    require_up(s)
    code = subprocess.run([sys.executable, "-m", "demo", *args], env=env, cwd=ROOT)
    if code.returncode:
        return code.returncode
    spec = yaml.safe_load((ROOT / "specs" / "machine_failure.yaml").read_text())
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--start", type=dt.date.fromisoformat, default=None)
    known = parser.parse_known_args(args)[0]
    # The demo's last day: yesterday (UTC) unless --start moved its days (demo/run.py).
    last = (
        known.start + dt.timedelta(days=known.days - 1)
        if known.start
        else dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    )
    first = last - dt.timedelta(days=2)
    print(f"\nasset backfill of {spec['name']}_data_job, {first} to {last}, through the daemon:")
    job = ["--job", f"{spec['name']}_data_job", "--from", str(first), "--to", str(last)]
    return backfill(env, s, [*job, "--timeout", "900"])


def clean(s: Settings) -> None:
    down(s)
    drop_databases(s)
    forget_online_states(s)
    shutil.rmtree(STATE, ignore_errors=True)
    print(f"  removed {STATE}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["init", "up", "down", "status", "demo", "backfill", "clean"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="demo / backfill arguments")
    p.add_argument(
        "--env-file",
        type=Path,
        default=None,
        help="settings file (default deploy/prod.env, else deploy/prod.env.example)",
    )
    args = p.parse_args(argv)
    env, s, source = load_env(args.env_file)
    print(f"settings: {source.resolve()}")
    if args.command == "init":
        init(env, s)
    elif args.command == "up":
        up(env, s)
    elif args.command == "down":
        down(s)
    elif args.command == "status":
        return status(s)
    elif args.command == "demo":
        return demo(env, s, [a for a in args.rest if a != "--"])
    elif args.command == "backfill":
        return backfill(env, s, [a for a in args.rest if a != "--"])
    elif args.command == "clean":
        clean(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
