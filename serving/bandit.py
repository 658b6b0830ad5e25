"""Bandit routing (`mlops serve --mode bandit`): Thompson sampling between the champion and
the challenger on the reward that field feedback brings back.

Each served model version is an arm with a Beta posterior over its reward rate (prior
Beta(1, 1)). A request goes to the arm whose posterior sample is higher; with probability
2 x `floor` it goes to one picked uniformly instead (the exploration floor: each arm keeps
at least `floor` of the traffic, so an arm that had bad luck early can recover). The
request's answer comes from that arm, and its log lines carry the decision: the arms'
posteriors at that moment and whether it explored.

The reward of a reading is what a technician's label says about the arm's decision:
binary classification scores (decision, label) with the reward table (default: 1 for a
correct decision, 0 otherwise; `tp`/`tn`/`fp`/`fn` each in [0, 1], e.g. a missed failure
costing more than a false alarm); regression rewards 1 when |score - label| <= tolerance.
A fractional reward r updates Beta(a, b) to Beta(a + r, b + 1 - r).

The posteriors are rebuilt from the files, not from memory: every worker tails the
spec's request log and feedback files (all workers', `window_days` back at start), pairs
each feedback line with the bandit-routed reading it names (by request id and record, or
by entity and timestamp) and updates that reading's arm. So every worker of a server
converges to the same posteriors whichever worker served the request or took the
feedback, and a restart resumes where it was. The first feedback for a reading is its
reward; later corrections are counted, not rewarded twice.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlops.feedback import PREFIX as FEEDBACK
from mlops.inference_log import log_files

MAX_REMEMBERED = 500_000  # bandit-routed readings kept for pairing with feedback
MAX_PENDING = 100_000  # feedback lines read before the reading they name (retried)
PENDING_TRIES = 5  # refreshes a feedback line waits for its reading (others' feedback: dropped)


@dataclass(frozen=True)
class Reward:
    """What a labelled decision is worth, in [0, 1]."""

    tp: float = 1.0
    tn: float = 1.0
    fp: float = 0.0
    fn: float = 0.0
    tolerance: float | None = None  # regression: |score - label| within it rewards 1

    def of(self, task: str, decision: Any, score: Any, label: float) -> float | None:
        if task == "binary_classification":
            if decision is None:
                return None
            d, y = int(float(decision)) == 1, int(label) == 1
            return self.tp if d and y else self.fn if y else self.fp if d else self.tn
        if self.tolerance is None or score is None:
            return None
        return 1.0 if abs(float(score) - float(label)) <= self.tolerance else 0.0


@dataclass
class Arm:
    alpha: float = 1.0
    beta: float = 1.0
    pulls: int = 0  # readings routed to it (in the files read)
    rewarded: int = 0  # of those, readings whose feedback came back

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def info(self) -> dict[str, Any]:
        return {
            "alpha": round(self.alpha, 4),
            "beta": round(self.beta, 4),
            "mean": round(self.mean, 4),
            "pulls": self.pulls,
            "rewarded": self.rewarded,
        }


@dataclass
class _Tail:
    offsets: dict[str, int] = field(default_factory=dict)

    def read(self, path: Path) -> list[dict[str, Any]]:
        """Whole lines appended to `path` since the last read."""
        start = self.offsets.get(path.name, 0)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return []
        if size <= start:
            return []
        with open(path, "rb") as f:
            f.seek(start)
            chunk = f.read(size - start)
        cut = chunk.rfind(b"\n") + 1
        self.offsets[path.name] = start + cut
        out = []
        for raw in chunk[:cut].splitlines():
            try:
                line = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(line, dict):
                out.append(line)
        return out


class Bandit:
    """Thompson sampling over the served versions; posteriors from the log and feedback files."""

    def __init__(
        self,
        directory: str | Path,
        task: str,
        reward: Reward,
        floor: float = 0.05,
        window_days: int = 7,
        seed: int | None = None,
    ):
        if not 0.0 <= floor <= 0.5:
            raise ValueError(f"bandit floor {floor} must be in [0, 0.5]")
        self.directory = Path(directory)
        self.task, self.reward, self.floor = task, reward, floor
        self.since = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=window_days)
        self.rng = random.Random(seed)
        self.arms: dict[int, Arm] = {}
        self.corrections = 0  # feedback for a reading already rewarded
        # reading key -> [version, decision, score, rewarded]; two keys share one list
        self._served: OrderedDict[tuple, list[Any]] = OrderedDict()
        self._pending: list[tuple[dict[str, Any], int]] = []
        self._tail = _Tail()
        self._lock = threading.Lock()  # arms and rng
        self._refresh = threading.Lock()  # one tail at a time

    def arm(self, version: int) -> Arm:
        return self.arms.setdefault(version, Arm())

    # Routing -----------------------------------------------------------------------------
    def choose(self, champion: int, challenger: int | None) -> tuple[int, dict[str, Any]]:
        """The version that answers this request, and the decision for the log."""
        if challenger is None or challenger == champion:
            return champion, {"explore": False, "arms": {}}
        with self._lock:
            a, b = self.arm(champion), self.arm(challenger)
            explore = self.rng.random() < 2 * self.floor
            if explore:
                pick = self.rng.choice((champion, challenger))
            else:
                sa = self.rng.betavariate(a.alpha, a.beta)
                sb = self.rng.betavariate(b.alpha, b.beta)
                pick = champion if sa >= sb else challenger
            arms = {
                str(v): [round(x.alpha, 4), round(x.beta, 4)]
                for v, x in ((champion, a), (challenger, b))
            }
        return pick, {"explore": explore, "arms": arms}

    # Learning from the files -------------------------------------------------------------
    def refresh(self) -> int:
        """Read what the log and the feedback files gained; returns the rewards applied."""
        with self._refresh:
            served = [
                ln
                for p in log_files(self.directory, since=self.since)
                for ln in self._tail.read(p)
                if "bandit" in ln and ln.get("status") == 200
            ]
            fed = [
                ln
                for p in log_files(self.directory, since=self.since, prefix=FEEDBACK)
                for ln in self._tail.read(p)
            ]
            with self._lock:
                for ln in served:
                    self._remember(ln)
                todo, self._pending = self._pending + [(ln, 0) for ln in fed], []
                applied = sum(self._apply(ln, tries) for ln, tries in todo)
                self._pending = self._pending[-MAX_PENDING:]
        return applied

    def _remember(self, ln: dict[str, Any]) -> None:
        version = ln.get("model_version")
        if version is None or ln.get("route") not in ("champion", "canary"):
            return
        out = ln.get("outputs") or {}
        what = [int(version), out.get("decision"), out.get("score"), False]
        keys = [
            ("r", ln.get("request_id"), ln.get("record")),
            ("e", ln.get("entity"), ln.get("event_time")),
        ]
        for k in keys:
            self._served[k] = what
        self.arm(int(version)).pulls += 1
        while len(self._served) > 2 * MAX_REMEMBERED:
            self._served.popitem(last=False)

    def _apply(self, ln: dict[str, Any], tries: int) -> int:
        label = ln.get("label")
        if label is None:
            return 0
        if ln.get("request_id"):
            rec = ln.get("record")
            key = ("r", ln["request_id"], 0 if rec is None else rec)
        else:
            key = ("e", ln.get("entity"), ln.get("event_time"))
        hit = self._served.get(key)
        if hit is None:
            if tries < PENDING_TRIES:  # its reading may not be read yet
                self._pending.append((ln, tries + 1))
            return 0
        version, decision, score, done = hit
        if done:
            self.corrections += 1
            return 0
        r = self.reward.of(self.task, decision, score, float(label))
        if r is None:
            return 0
        arm = self.arm(version)
        arm.alpha += r
        arm.beta += 1.0 - r
        arm.rewarded += 1
        hit[3] = True
        return 1

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "floor": self.floor,
                "arms": {str(v): a.info() for v, a in sorted(self.arms.items())},
                "corrections_ignored": self.corrections,
                "feedback_waiting": len(self._pending),
            }
