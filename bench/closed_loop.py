"""Closed-loop benchmark: does the continuous-training loop recover from a change?

Four known-truth streams (bench/streams: concept_abrupt, covariate_shift, gradual, control;
deterministic from --seed, --days days, the change at day index --onset) are each laid out
as a project of their own (landing CSVs + a column-label spec) and replayed by
`mlops backtest --spec ... --build-days N --state DIR --json OUT --plot PNG`: the first
champion trains on the first --build-days days, then every later day goes through the real
sensors, jobs and gates with a simulated clock. From the backtest's JSON, per stream:

- days from the onset to the first retraining trigger (a retraining on a day >= onset) and
  to the first promoted post-change champion (such a retraining with outcome promoted);
- retrainings before the onset, and in total;
- the realized primary metric (roc_auc) and accuracy averaged over the days >= onset + 5,
  against two baselines computed offline from the stream's own rows, independent of the
  platform: never retraining (xgboost fitted on the build days) and an oracle that retrains
  on post-change data (the same estimator fitted on days onset .. onset + 4). Both use the
  raw readings x1, x2, x3 and fixed, moderate parameters (ORACLE_PARAMS).

Goals (issue 12): trigger within 2 days of the onset; a promoted post-change champion within
4 days; no retraining in the control and none before the onset; a post-change roc_auc of at
least 95 % of the oracle's. The control's "onset" is nominal: the day the others change.
Each backtest takes 4-7 minutes on a 2-core machine, the four about 20; the projects, states,
logs and timeline PNGs stay in --work (a temporary folder by default, printed first).

    .venv/bin/python bench/closed_loop.py [--streams concept_abrupt,...] [--seed 0]
        [--days 45] [--onset 30] [--build-days 20] [--work DIR] [--out FILE]
        [--backtest-json NAME=FILE ...]   # analyse a backtest JSON instead of running one
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.streams import FEATURES, STREAMS, TARGET, Stream, generate, write_project  # noqa: E402

BIN = Path(sys.executable).parent
PRIMARY = "roc_auc"
METRICS = ("roc_auc", "accuracy")
SETTLE_DAYS = 5  # the post-change metric averages the days >= onset + SETTLE_DAYS
ORACLE_DAYS = 5  # the oracle trains on days onset .. onset + ORACLE_DAYS - 1
GOAL_TRIGGER_DAYS = 2
GOAL_PROMOTED_DAYS = 4
GOAL_ORACLE_RATIO = 0.95
ORACLE_PARAMS = {
    "n_estimators": 200,
    "max_depth": 4,
    "learning_rate": 0.1,
    "subsample": 0.9,
    "tree_method": "hist",
}


# Baselines ---------------------------------------------------------------------------


def _fit(stream: Stream, lo: int, hi: int, seed: int):
    import xgboost as xgb

    rows = stream.rows(lo, hi)
    model = xgb.XGBClassifier(**ORACLE_PARAMS, random_state=seed, n_jobs=2)
    model.fit(rows.select(FEATURES).to_numpy(), rows[TARGET].to_numpy())
    return model


def _day_metrics(model, stream: Stream, i: int) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    day = stream.days[i]
    y = day[TARGET].to_numpy()
    p = model.predict_proba(day.select(FEATURES).to_numpy())[:, 1]
    return {"roc_auc": float(roc_auc_score(y, p)), "accuracy": float(np.mean((p >= 0.5) == y))}


def baselines(stream: Stream, seed: int = 0) -> dict:
    """Never retraining (fit on the build days) and the oracle (fit on days onset ..
    onset + ORACLE_DAYS - 1), each scored per day on the days >= onset + SETTLE_DAYS, then
    averaged over those days as the loop's realized metric is."""
    scored = range(stream.onset + SETTLE_DAYS, stream.n_days)
    out = {}
    for name, (lo, hi) in {
        "never_retrain": (0, stream.build_days),
        "oracle": (stream.onset, stream.onset + ORACLE_DAYS),
    }.items():
        model = _fit(stream, lo, hi, seed)
        per_day = [_day_metrics(model, stream, i) for i in scored]
        out[name] = {
            "trained_on": [str(stream.date(lo)), str(stream.date(hi - 1))],
            **{m: float(np.mean([d[m] for d in per_day])) for m in METRICS},
            "per_day": {
                str(stream.date(i)): {m: round(v, 4) for m, v in d.items()}
                for i, d in zip(scored, per_day, strict=True)
            },
        }
    return out


# The loop, from the backtest's JSON ---------------------------------------------------


def _metric(realized: dict | None, name: str) -> float | None:
    value = (realized or {}).get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def loop_summary(stream: Stream, backtest: dict) -> dict:
    """What the backtest did around the stream's onset (keys: see the module docstring)."""
    onset = stream.onset
    retrainings = sorted(backtest.get("retrainings") or [], key=lambda r: r["day"])
    lags = [stream.index(r["day"]) - onset for r in retrainings]
    after = [(lag, r) for lag, r in zip(lags, retrainings, strict=True) if lag >= 0]
    promoted = [lag for lag, r in after if r.get("outcome") == "promoted"]
    days = sorted(backtest.get("days") or [], key=lambda d: d["day"])
    settled = [d for d in days if stream.index(d["day"]) >= onset + SETTLE_DAYS]
    realized = {}
    for m in METRICS:
        values = [v for d in settled if (v := _metric(d.get("realized"), m)) is not None]
        realized[m] = float(np.mean(values)) if values else None
    n_realized = sum(1 for d in settled if _metric(d.get("realized"), PRIMARY) is not None)
    spans: list[dict] = []
    for d in days:
        if spans and spans[-1]["version"] == d.get("champion_version"):
            spans[-1]["to"] = d["day"]
        else:
            spans.append({"version": d.get("champion_version"), "from": d["day"], "to": d["day"]})

    def scorer(d: dict) -> object:  # the version that scored the day, where the JSON says
        return d.get("scored_by", d.get("champion_version"))

    before_onset = [d for d in days if stream.index(d["day"]) < onset]
    old_champion = scorer(before_onset[-1]) if before_onset else None
    serving = next(
        (
            stream.index(d["day"]) - onset
            for d in days
            if stream.index(d["day"]) >= onset and scorer(d) not in (old_champion, None)
        ),
        None,
    )
    return {
        "first_trigger_lag_days": after[0][0] if after else None,
        "first_trigger": after[0][1].get("trigger") if after else None,
        "first_promoted_lag_days": promoted[0] if promoted else None,
        "new_champion_scoring_lag_days": serving,
        "retrainings_before_onset": sum(1 for lag in lags if lag < 0),
        "retrainings_total": len(retrainings),
        "refused_total": sum(1 for r in retrainings if r.get("outcome") == "refused"),
        "retrainings": retrainings,
        "post_change": realized,
        "post_change_days": len(settled),
        "post_change_days_with_labels": n_realized,
        "champions": spans,
        "days_replayed": len(days),
    }


def goals(stream: Stream, loop: dict, base: dict) -> dict:
    """Each goal: True / False, or None where it does not apply to the stream."""
    trig, prom = loop["first_trigger_lag_days"], loop["first_promoted_lag_days"]
    post, oracle = loop["post_change"][PRIMARY], base["oracle"][PRIMARY]
    return {
        "trigger_within_2_days": (trig is not None and trig <= GOAL_TRIGGER_DAYS)
        if stream.changes
        else None,
        "promoted_within_4_days": (prom is not None and prom <= GOAL_PROMOTED_DAYS)
        if stream.changes
        else None,
        "no_retraining_before_onset": loop["retrainings_before_onset"] == 0,
        "no_retraining_in_control": None if stream.changes else loop["retrainings_total"] == 0,
        "post_change_95pct_of_oracle": post is not None and post >= GOAL_ORACLE_RATIO * oracle,
    }


# Running -------------------------------------------------------------------------------


def run_backtest(spec: Path, state: Path, out_json: Path, build_days: int, log: Path) -> dict:
    """`mlops backtest` on one spec in its own state folder; its output goes to `log` and
    to the console, one line per day, prefixed with the spec's name."""
    cmd = [
        str(BIN / "mlops"),
        "backtest",
        "--spec",
        str(spec),
        "--build-days",
        str(build_days),
        "--state",
        str(state),
        "--json",
        str(out_json),
        "--plot",
        str(out_json.with_suffix(".png")),
    ]
    t = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd,
            cwd=spec.parent.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            print(f"  [{spec.stem}] {line.rstrip()}", flush=True)
        rc = proc.wait()
    return {"command": cmd, "rc": rc, "seconds": round(time.perf_counter() - t, 1), "log": str(log)}


def bench_stream(name: str, args, work: Path, given: Path | None) -> dict:
    stream = generate(
        name, seed=args.seed, days=args.days, onset=args.onset, build_days=args.build_days
    )
    out = {
        "truth": stream.truth,
        "changes": stream.changes,
        "entity": stream.entity,
        "onset": str(stream.onset_date),
        "rows": sum(len(d) for d in stream.days),
    }
    root = work / name
    spec = write_project(stream, root)
    out["spec"] = str(spec)
    print(f"{name}: {stream.truth}; {out['rows']:,} rows in {stream.n_days} days", flush=True)
    if given is None:
        check = subprocess.run(
            [str(BIN / "mlops"), "spec", "check", str(spec)], capture_output=True, text=True
        )
        if check.returncode != 0:
            out["error"] = f"mlops spec check failed:\n{check.stdout}{check.stderr}"
            print(out["error"])
            return out
        given = root / "backtest.json"
        out["backtest"] = run_backtest(
            spec, root / "state", given, args.build_days, root / "backtest.log"
        )
        if out["backtest"]["rc"] != 0:
            out["error"] = f"mlops backtest exited {out['backtest']['rc']}"
    if not given.exists():
        out.setdefault("error", f"no backtest JSON at {given}")
        return out
    out["backtest_json"] = str(given)
    t = time.perf_counter()
    out["baselines"] = baselines(stream, seed=args.seed)
    out["baselines_seconds"] = round(time.perf_counter() - t, 1)
    out["loop"] = loop_summary(stream, json.loads(given.read_text()))
    out["goals"] = goals(stream, out["loop"], out["baselines"])
    return out


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _lag(x: int | None) -> str:
    return "never" if x is None else f"+{x} d"


def table(results: dict) -> str:
    head = (
        f"{'stream':<16} {'entity':<6} {'trigger':>8} {'promoted':>9} {'retrain':>9} "
        f"{'roc_auc loop':>12} {'never':>6} {'oracle':>6} {'/oracle':>7} "
        f"{'acc loop':>8} {'never':>6} {'oracle':>6}  goals"
    )
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        if "loop" not in r:
            lines.append(f"{name:<16} {r.get('error', 'not run')}")
            continue
        loop, base, g = r["loop"], r["baselines"], r["goals"]
        post = loop["post_change"]
        ratio = post[PRIMARY] / base["oracle"][PRIMARY] if post[PRIMARY] is not None else None
        applicable = [v for v in g.values() if v is not None]
        retrain = f"{loop['retrainings_before_onset']}/{loop['retrainings_total']}"
        lines.append(
            f"{name:<16} {'yes' if r['entity'] else 'no':<6} "
            f"{_lag(loop['first_trigger_lag_days']) if r['changes'] else '-':>8} "
            f"{_lag(loop['first_promoted_lag_days']) if r['changes'] else '-':>9} "
            f"{retrain:>9} "
            f"{_f(post['roc_auc']):>12} {_f(base['never_retrain']['roc_auc']):>6} "
            f"{_f(base['oracle']['roc_auc']):>6} {_f(ratio, '.1%'):>7} "
            f"{_f(post['accuracy']):>8} {_f(base['never_retrain']['accuracy']):>6} "
            f"{_f(base['oracle']['accuracy']):>6}  {sum(applicable)}/{len(applicable)}"
        )
    lines.append(
        "trigger / promoted: days from the onset to the first retraining / the first promoted "
        "one; retrain: before the onset / in total;"
    )
    lines.append(
        f"metrics: mean of the days >= onset + {SETTLE_DAYS}; never = the build-days model, "
        f"oracle = trained on days onset .. onset + {ORACLE_DAYS - 1} (offline, xgboost)"
    )
    for name, r in results.items():
        missed = [k for k, v in r.get("goals", {}).items() if v is False]
        if missed:
            lines.append(f"  {name}: missed {', '.join(missed)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--streams", default=",".join(STREAMS), help="comma-separated stream names")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--days", type=int, default=45)
    ap.add_argument("--onset", type=int, default=30, help="day index of the change")
    ap.add_argument("--build-days", type=int, default=20)
    ap.add_argument("--work", help="folder for the projects and backtest states (default: temp)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "closed_loop.json"))
    ap.add_argument(
        "--backtest-json",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="analyse this backtest JSON for stream NAME instead of running the backtest",
    )
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.streams.split(",") if n.strip()]
    unknown = [n for n in names if n not in STREAMS]
    if unknown:
        ap.error(f"unknown stream(s) {unknown}; expected some of {', '.join(STREAMS)}")
    given = {}
    for item in args.backtest_json:
        name, sep, path = item.partition("=")
        if not sep or name not in STREAMS:
            ap.error(f"--backtest-json wants NAME=FILE with NAME one of {', '.join(STREAMS)}")
        given[name] = Path(path).resolve()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-closed-loop-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}")

    t = time.perf_counter()
    results = {n: bench_stream(n, args, work, given.get(n)) for n in names}
    total = time.perf_counter() - t
    print()
    print(table(results))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "closed_loop",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "seed": args.seed,
        "days": args.days,
        "onset_index": args.onset,
        "build_days": args.build_days,
        "settle_days": SETTLE_DAYS,
        "oracle_days": ORACLE_DAYS,
        "oracle_params": ORACLE_PARAMS,
        "goals": {
            "trigger_within_days": GOAL_TRIGGER_DAYS,
            "promoted_within_days": GOAL_PROMOTED_DAYS,
            "post_change_vs_oracle": GOAL_ORACLE_RATIO,
        },
        "work": str(work),
        "total_seconds": round(total, 1),
        "streams": results,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
