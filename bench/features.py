"""Feature store benchmark: online latency, online materialization, historical retrieval.

1. Online lookup + compute latency, p50/p99 over `--calls` calls: one entity, and a batch of
   100 entities (one store round trip), on SQLite and on Redis; both without writing the
   reading back (lookup + compute) and as served (appending the reading to the state).
2. Online materialization throughput: states for 10,000 entities (a day of hourly rows each)
   computed from valid rows and written to each store (entities/s).
3. Historical retrieval: rows/s for 1M (entity, timestamp) rows, point in time, from the lake.

    .venv/bin/python bench/features.py [--calls 2000] [--entities 10000] [--points 1000000]
        [--redis redis://127.0.0.1:6379/0] [--out bench/results/features.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import features_day, project, validated_day  # noqa: E402
from demo.generate import generate  # noqa: E402
from mlops import online  # noqa: E402
from mlops.features import historical_features  # noqa: E402
from mlops.lake import Lake  # noqa: E402
from mlops.online_store import RedisOnlineStore, SQLiteOnlineStore  # noqa: E402
from mlops.spec import load_spec  # noqa: E402


def _pct(xs: list[float]) -> dict[str, float]:
    a = np.array(xs) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def _build(root: Path, machines: int, days: int):
    spec = load_spec(project(root))
    generate(spec, days=days, machines=machines, seed=3)
    lake = Lake(str(root / "lake"))
    for i in range(days):
        day = spec.source.start_date + dt.timedelta(days=i)
        validated_day(spec, lake, day)
        features_day(spec, lake, day)
    return spec, lake


def _latency(spec, store, readings: list[tuple[str, dict]], calls: int) -> dict[str, dict]:
    svc = online.OnlineFeatures(spec, store, fallback="reading_only")
    out = {}
    for mode, append in (("lookup_compute", False), ("served_with_append", True)):
        one, batch = [], []
        for i in range(calls):
            entity, reading = readings[i % len(readings)]
            if append:  # a later reading each call, as live traffic
                reading = {
                    **reading,
                    "timestamp": reading["timestamp"] + dt.timedelta(seconds=i + 1),
                }
            t = time.perf_counter()
            svc.get(entity, reading, append=append)
            one.append(time.perf_counter() - t)
        for i in range(max(calls // 20, 20)):
            items = [readings[(i * 100 + k) % len(readings)] for k in range(100)]
            t = time.perf_counter()
            svc.get_many(items, append=False)
            batch.append(time.perf_counter() - t)
        out[mode] = {"one_entity": _pct(one)}
        if not append:
            out[mode]["batch_of_100"] = _pct(batch)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--entities", type=int, default=10_000)
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "features.json"))
    args = ap.parse_args()
    result: dict = {"benchmark": "features", "calls": args.calls}
    with tempfile.TemporaryDirectory(prefix="mlops-bench-fs-") as tmp:
        root = Path(tmp)
        spec, lake = _build(root / "small", machines=200, days=3)
        history = lake.read_many(spec.name, "validated_data", ["2026-01-01", "2026-01-02"])
        day3 = lake.read(spec.name, "validated_data", "2026-01-03")
        readings = [(r["machine_id"], r) for r in day3.iter_rows(named=True)]
        states = online.states_from_rows(spec, history)
        stores = {
            "sqlite": SQLiteOnlineStore(root / "online.db"),
            "redis": RedisOnlineStore(args.redis, prefix=f"bench-{uuid.uuid4().hex[:6]}"),
        }
        result["online"] = {}
        for name, store in stores.items():
            store.write_states(spec.name, states)
            result["online"][name] = _latency(spec, store, readings, args.calls)
            r = result["online"][name]
            print(
                f"{name:>6} one entity: lookup+compute p50 "
                f"{r['lookup_compute']['one_entity']['p50_ms']:.3f} ms p99 "
                f"{r['lookup_compute']['one_entity']['p99_ms']:.3f} ms; served (+append) p50 "
                f"{r['served_with_append']['one_entity']['p50_ms']:.3f} ms p99 "
                f"{r['served_with_append']['one_entity']['p99_ms']:.3f} ms; batch of 100 p50 "
                f"{r['lookup_compute']['batch_of_100']['p50_ms']:.2f} ms p99 "
                f"{r['lookup_compute']['batch_of_100']['p99_ms']:.2f} ms"
            )

        # 2. Online materialization: 10,000 entities (one day of hourly rows each).
        base = history.filter(pl.col("timestamp") >= dt.datetime(2026, 1, 2))
        reps = -(-args.entities // base["machine_id"].n_unique())
        many = pl.concat(
            [
                base.with_columns((pl.col("machine_id") + f"-{k}").alias("machine_id"))
                for k in range(reps)
            ]
        )
        many = many.filter(
            pl.col("machine_id").is_in(
                many["machine_id"].unique(maintain_order=True).head(args.entities).implode()
            )
        )
        result["materialize"] = {}
        for name, store in stores.items():
            t = time.perf_counter()
            st = online.states_from_rows(spec, many)
            n = store.write_states(spec.name, st)
            secs = time.perf_counter() - t
            stats = store.stats(spec.name)
            result["materialize"][name] = {
                "entities": n,
                "seconds": secs,
                "entities_per_s": n / secs,
                "bytes": stats.bytes,
            }
            print(
                f"{name:>6} materialize {n} entities: {secs:.2f} s, {n / secs:,.0f} entities/s, "
                f"{stats.bytes / 1e6:.1f} MB"
            )
            store.delete_spec(spec.name)
            store.close()

        # 3. Historical retrieval over 10 days x 200 machines of features.
        spec_h, lake_h = _build(root / "hist", machines=200, days=10)
        rng = np.random.default_rng(0)
        start = dt.datetime(2026, 1, 1)
        offsets = rng.integers(0, 10 * 24 * 3600, args.points)
        points = pl.DataFrame(
            {
                "machine_id": [f"M{int(i):04d}" for i in rng.integers(1, 201, args.points)],
                "timestamp": [start + dt.timedelta(seconds=int(s)) for s in offsets],
            }
        )
        t = time.perf_counter()
        out = historical_features(spec_h, lake_h, points)
        secs = time.perf_counter() - t
        found = out.filter(pl.col("feature_time").is_not_null()).height
        result["historical"] = {
            "rows": args.points,
            "seconds": secs,
            "rows_per_s": args.points / secs,
            "with_features": found,
        }
        print(
            f"historical: {args.points:,} entity-timestamps in {secs:.2f} s, "
            f"{args.points / secs:,.0f} rows/s ({found:,} with features)"
        )
    result["goal_one_entity_p99_ms"] = 1.0
    result["when"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
