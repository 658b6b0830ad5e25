"""The promotion gate, promote and rollback (the champion_model asset's logic).

A version's evaluation, which the gates judge, is mlops/model_evaluation.py.

One implementation for the Dagster checks, the champion_model asset and the `mlops promote`
/ `mlops rollback` commands, so the UI and the CLI can never disagree about a gate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from mlops import registry
from mlops.lake import Lake
from mlops.model_evaluation import (
    EvaluationError,
    evaluate_version,
    json_safe,
    load_evaluation,
    save_evaluation,
)
from mlops.model_loader import ModelRefused, load_model, verify_servable
from mlops.spec import Spec

if TYPE_CHECKING:
    import numpy as np
    import polars as pl
else:
    from mlops.lazy import numpy as np
    from mlops.lazy import polars as pl

GATES = ("thresholds", "improvement", "slices", "serving_smoke")
LOWER_IS_BETTER = {"log_loss", "brier", "rmse", "mae", "ece"}


class PromotionError(ValueError):
    pass


@dataclass
class GateResult:
    name: str
    passed: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


def better(metric: str, a: float, b: float, margin: float = 0.0) -> bool:
    """Is a better than b by at least margin, for this metric's direction?"""
    if metric in LOWER_IS_BETTER:
        return a <= b - margin
    return a >= b + margin


# Gates ----------------------------------------------------------------------------------------


def threshold_gate(spec: Spec, doc: dict[str, Any]) -> GateResult:
    """Absolute minimums (maximums for error metrics) on the test split.

    A challenger that misses a bar the serving champion misses too, on the same rows, and
    beats it there, is not held back by it: after a change the new regime can be harder
    than the old one, and refusing the better model would keep the worse one serving."""
    m = doc["challenger"]["metrics"]
    champ = (doc.get("champion") or {}).get("metrics") or {}
    fails, seen, waived = [], {}, []
    for metric, limit in sorted(spec.gates.thresholds.items()):
        value = m.get(metric)
        seen[metric] = value
        ok = value is not None and (value <= limit if metric in LOWER_IS_BETTER else value >= limit)
        if ok:
            continue
        op = "<=" if metric in LOWER_IS_BETTER else ">="
        old = champ.get(metric)
        old_ok = old is not None and (old <= limit if metric in LOWER_IS_BETTER else old >= limit)
        if (
            value is not None
            and old is not None
            and not old_ok
            and better(metric, value, old, 1e-12)
        ):
            waived.append(
                f"{metric} {_fmt(value)} misses {op} {limit}, but the champion's {_fmt(old)} "
                "on the same rows misses it too and is worse"
            )
            continue
        fails.append(f"{metric} {_fmt(value)} does not meet {op} {limit}")
    reason = "; ".join(fails) or ("; ".join(waived) if waived else "all thresholds met")
    return GateResult(
        "thresholds",
        not fails,
        reason,
        {"values": seen, "thresholds": dict(spec.gates.thresholds), "waived": waived},
    )


def improvement_gate(spec: Spec, doc: dict[str, Any]) -> GateResult:
    metric = doc["primary_metric"]
    if doc["champion"] is None:
        return GateResult("improvement", True, "first model: no champion to beat")
    new, old = doc["challenger"]["metrics"].get(metric), doc["champion"]["metrics"].get(metric)
    need = spec.gates.min_improvement
    if new is None or old is None:
        return GateResult("improvement", False, f"{metric} not computable on the test split")
    ok = better(metric, new, old, need)
    reason = (
        f"{metric} {new:.4f} vs champion v{doc['champion']['version']} {old:.4f} "
        f"(needs {'-' if metric in LOWER_IS_BETTER else '+'}{need})"
    )
    return GateResult(
        "improvement", ok, reason, {"challenger": new, "champion": old, "min_improvement": need}
    )


def slice_gate(spec: Spec, doc: dict[str, Any]) -> GateResult:
    if doc["champion"] is None:
        return GateResult("slices", True, "first model: no champion slices to compare")
    metric, tol = doc["primary_metric"], spec.gates.slice_tolerance
    worse = []
    new_s, old_s = doc["challenger"]["slices"], doc["champion"]["slices"]
    for col, values in sorted(new_s.items()):
        for value, m in sorted(values.items()):
            a, b = m.get(metric), old_s.get(col, {}).get(value, {}).get(metric)
            if a is None or b is None:
                continue  # too few rows, or one class only: not comparable
            if not better(metric, a, b, -tol):
                worse.append(f"{col}={value}: {metric} {a:.4f} vs champion {b:.4f}")
    return GateResult(
        "slices",
        not worse,
        "; ".join(worse) or f"no slice worse than the champion by more than {tol}",
        {"tolerance": tol},
    )


def serving_smoke_gate(spec: Spec, tracking_uri: str, version: int, calls: int = 200) -> GateResult:
    """Load through the serving loader, score the input example, time single-row calls."""
    try:
        model = load_model(tracking_uri, spec.registered_model_name, version=version)
    except Exception as e:
        return GateResult("serving_smoke", False, f"model did not load: {e}")
    if model.input_example is None or model.input_example.empty:
        return GateResult("serving_smoke", False, "model has no input example to score")
    try:
        scores = model.score_matrix(model.input_example)
    except Exception as e:
        return GateResult("serving_smoke", False, f"scoring the input example failed: {e}")
    if not np.all(np.isfinite(scores)):
        return GateResult("serving_smoke", False, "input example scores are not finite")
    row = model.input_example.head(1)
    model.score_matrix(row)  # warm-up
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        model.score_matrix(row)
        times.append((time.perf_counter() - t) * 1000)
    p95 = float(np.percentile(times, 95))
    budget = spec.gates.latency_budget_ms
    ok = p95 <= budget
    return GateResult(
        "serving_smoke",
        ok,
        f"single-row p95 {p95:.2f} ms {'within' if ok else 'over'} budget {budget} ms",
        {
            "p95_ms": p95,
            "p50_ms": float(np.percentile(times, 50)),
            "budget_ms": budget,
            "calls": calls,
        },
    )


def gates(spec: Spec, doc: dict[str, Any], tracking_uri: str) -> list[GateResult]:
    return [
        threshold_gate(spec, doc),
        improvement_gate(spec, doc),
        slice_gate(spec, doc),
        serving_smoke_gate(spec, tracking_uri, doc["version"]),
    ]


# The gate-result tags: written by the gate checks and the decision, read by the decision,
# `mlops status` and `mlops lineage`. One codec, so writer and readers cannot drift apart.
GATE_TAG = f"{registry.TAG}gate."
GATE_STATUS_TAG = f"{registry.TAG}gate_status"
# The Dagster run whose champion_model decided the version (training's: mlops.dagster_run_url).
DECISION_RUN_URL_TAG = f"{registry.TAG}decision_dagster_run_url"


def gate_result_tags(results: list[GateResult]) -> dict[str, str]:
    """`mlops.gate.<name>`: `passed: <reason>` or `failed: <reason>`, one tag per result."""
    return {GATE_TAG + r.name: ("passed: " if r.passed else "failed: ") + r.reason for r in results}


def read_gate_tags(tags: dict[str, str]) -> dict[str, GateResult]:
    """The gate results recorded in a version's tags, by gate name, in name order."""
    out = {}
    for key, value in sorted(tags.items()):
        if key.startswith(GATE_TAG):
            status, _, why = value.partition(": ")
            out[key.removeprefix(GATE_TAG)] = GateResult(
                key.removeprefix(GATE_TAG), status == "passed", why
            )
    return out


def gate_tags(results: list[GateResult]) -> dict[str, str]:
    """A decision's tags: every gate's result and the overall `mlops.gate_status`."""
    tags = gate_result_tags(results)
    tags[GATE_STATUS_TAG] = "passed" if all(r.passed for r in results) else "failed"
    return tags


def summary(results: list[GateResult]) -> str:
    failed = [r for r in results if not r.passed]
    if not failed:
        return "all gates passed"
    return "; ".join(f"{r.name}: {r.reason}" for r in failed)


# Promote / rollback ---------------------------------------------------------------------------


@dataclass
class PromotionDecision:
    promoted: bool
    from_version: int | None
    to_version: int
    reason: str
    gates: list[GateResult]

    def as_dict(self) -> dict[str, Any]:
        return json_safe({**asdict(self), "gates": [asdict(g) for g in self.gates]})


def gate_run_tag(gate: str) -> str:
    """The tag naming the Dagster run whose model_evaluation a gate's recorded result judged."""
    return f"{registry.TAG}gate_run.{gate}"


def recorded_gates(
    tracking_uri: str, model_name: str, version: int, evaluation_run_id: str | None = None
) -> list[GateResult]:
    """The gate results the Dagster checks recorded on the version, one per gate.

    A gate with no recorded result (its check did not run, or raised), or, given
    `evaluation_run_id`, one recorded for another evaluation of the version, is a failed
    gate that says so: nothing is promoted on a result nobody saw."""
    tags = registry.version_tags(tracking_uri, model_name, version)
    recorded = read_gate_tags(tags)
    out = []
    for g in GATES:
        judged = tags.get(gate_run_tag(g))
        if g not in recorded:
            out.append(
                GateResult(g, False, f"no result recorded (its check did not run for v{version})")
            )
        elif evaluation_run_id is not None and judged != evaluation_run_id:
            out.append(
                GateResult(
                    g,
                    False,
                    f"no result recorded for this evaluation (run {evaluation_run_id[:8]}); "
                    f"the one on v{version} judged run {(judged or '-')[:8]}",
                )
            )
        else:
            out.append(recorded[g])
    return out


def decide_promotion(
    spec: Spec,
    lake: Lake,
    tracking_uri: str,
    version: int,
    doc: dict[str, Any],
    *,
    force: bool = False,
    reason: str = "",
    dagster_run_id: str = "",
    actor: str = "dagster",
    results: list[GateResult] | None = None,
    dagster_run_url: str = "",
) -> PromotionDecision:
    """Apply the gate to an evaluation document; move `champion` if it passes (or is forced).

    `results`: gate results already computed for this document (the Dagster checks', from
    recorded_gates), so a latency measured once decides once; without them the gates run
    here. A refusal is recorded (tag, deployment history, challenger alias, the version's
    description): it is an outcome, returned, never raised.
    """
    name = spec.registered_model_name
    current = registry.alias_version(tracking_uri, name, registry.CHAMPION)
    compared = (doc.get("champion") or {}).get("version")
    if current not in (compared, version) and not force:
        # The champion moved after this evaluation: its comparison no longer holds.
        why = (
            f"stale evaluation: it compared against v{compared or '-'}, the champion is "
            f"now v{current}; re-run model_evaluation"
        )
        return PromotionDecision(False, current, version, why, results or [])
    results = results if results is not None else gates(spec, doc, tracking_uri)
    registry.tag_version(tracking_uri, name, version, gate_tags(results))
    passed = all(r.passed for r in results)
    if current == version:
        return PromotionDecision(False, current, version, "already the champion", results)
    if not passed and not force:
        why = summary(results)
        _record_refusal(spec, lake, tracking_uri, version, current, why, dagster_run_id, actor)
        _describe(
            tracking_uri, name, version, f"refused: {why}", results, current, dagster_run_id,
            dagster_run_url,
        )  # fmt: skip
        return PromotionDecision(False, current, version, why, results)
    if force and not reason:
        raise PromotionError("--force needs --reason: say why the gate is overridden")
    action = "promote" if passed else "force_promote"
    text = summary(results) if passed and not reason else reason
    if not passed:
        text = f"{reason} (overrode: {summary(results)})"
    tags = registry.version_tags(tracking_uri, name, version)
    registry.move_champion(
        tracking_uri,
        lake,
        spec.name,
        name,
        registry.Deployment(
            action=action,
            from_version=current,
            to_version=version,
            reason=text,
            dagster_run_id=dagster_run_id,
            mlflow_run_id=tags.get(f"{registry.TAG}mlflow_run_id", ""),
            actor=actor,
        ),
    )
    registry.tag_version(
        tracking_uri, name, version, {f"{registry.TAG}promotion": f"{action}: {text}"}
    )
    _describe(
        tracking_uri, name, version, f"{action}: {text}", results, current, dagster_run_id,
        dagster_run_url,
    )  # fmt: skip
    return PromotionDecision(True, current, version, text, results)


def decision_description(
    decision: str,
    results: list[GateResult],
    champion_before: int | None,
    dagster_run_id: str = "",
    dagster_run_url: str = "",
) -> str:
    """The version's description after the gate (Markdown on MLflow's version page): the
    outcome, each gate's result and the Dagster run that decided."""
    action, _, why = decision.partition(": ")
    head = {
        "promote": "Promoted to champion",
        "force_promote": "Promoted to champion by force",
        "refused": "Refused by the promotion gate",
    }.get(action, action)
    before = f"v{champion_before}" if champion_before else "none"
    lines = [f"**{head}** (champion before: {before}): {why}", ""]
    if results:
        lines += ["| gate | result | reason |", "|---|---|---|"]
        lines += [
            f"| {r.name} | {'passed' if r.passed else 'FAILED'} | "
            f"{r.reason.replace('|', '/').replace(chr(10), ' ')} |"
            for r in results
        ]
    if dagster_run_url:
        lines += ["", f"Decided by Dagster run [{dagster_run_id[:8] or 'run'}]({dagster_run_url})."]
    elif dagster_run_id:
        lines += ["", f"Decided by Dagster run {dagster_run_id}."]
    return "\n".join(lines)


def _describe(
    tracking_uri: str,
    name: str,
    version: int,
    decision: str,
    results: list[GateResult],
    champion_before: int | None,
    dagster_run_id: str,
    dagster_run_url: str,
) -> None:
    """The gate outcome in the version's description, and the deciding run's page as a tag."""
    registry.describe_version(
        tracking_uri,
        name,
        version,
        decision_description(decision, results, champion_before, dagster_run_id, dagster_run_url),
    )
    if dagster_run_url:
        registry.tag_version(tracking_uri, name, version, {DECISION_RUN_URL_TAG: dagster_run_url})


def _record_refusal(
    spec: Spec,
    lake: Lake,
    tracking_uri: str,
    version: int,
    champion: int | None,
    why: str,
    dagster_run_id: str,
    actor: str,
) -> None:
    """A refusal is recorded like a promotion: the version's `mlops.promotion` tag, a
    `refused` row in the deployment history, and `challenger` off the refused version."""
    name = spec.registered_model_name
    registry.tag_version(
        tracking_uri, name, version, {f"{registry.TAG}promotion": f"refused: {why}"}
    )
    tags = registry.version_tags(tracking_uri, name, version)
    registry.record_deployment(
        lake,
        spec.name,
        registry.Deployment(
            action=registry.REFUSED,
            from_version=champion,
            to_version=version,
            reason=why,
            dagster_run_id=dagster_run_id,
            mlflow_run_id=tags.get(f"{registry.TAG}mlflow_run_id", ""),
            actor=actor,
        ),
    )
    registry.reassign_challenger(tracking_uri, name, version)


def judge_gate(
    gate: str, spec: Spec, lake: Lake, tracking_uri: str, version: int, evaluation_run_id: str
) -> GateResult:
    """One gate on the version's saved evaluation (a gate check's logic). The result is
    recorded on the version with the evaluation it judged: champion_model decides on those."""
    name = spec.registered_model_name
    doc = load_evaluation(lake, spec, version)
    if doc is None:
        raise PromotionError(f"no evaluation for {name} v{version}: run model_evaluation")
    judges = {
        "thresholds": lambda: threshold_gate(spec, doc),
        "improvement": lambda: improvement_gate(spec, doc),
        "slices": lambda: slice_gate(spec, doc),
        "serving_smoke": lambda: serving_smoke_gate(spec, tracking_uri, version),
    }
    result = judges[gate]()
    tags = {**gate_result_tags([result]), gate_run_tag(gate): evaluation_run_id}
    registry.tag_version(tracking_uri, name, version, tags)
    return result


@dataclass
class ChampionOutcome:
    decision: PromotionDecision
    champion: int | None  # the aliases after the decision
    challenger: int | None


def decide_on_evaluation(
    spec: Spec,
    lake: Lake,
    tracking_uri: str,
    version: int,
    evaluation_run_id: str,
    dagster_run_id: str,
    before_move: Callable[[str], None],
    dagster_run_url: str = "",
) -> ChampionOutcome:
    """champion_model's logic: decide on the gate results the checks recorded for this
    evaluation (a second latency measurement could disagree with the first on a busy host;
    a gate without a result for it counts as failed), then move the alias or record the
    refusal. `before_move(action)` raises to stop first (the run is gone)."""
    name = spec.registered_model_name
    doc = load_evaluation(lake, spec, version)
    if doc is None:
        raise PromotionError(f"no evaluation for {name} v{version}: run model_evaluation")
    recorded = recorded_gates(tracking_uri, name, version, evaluation_run_id=evaluation_run_id)
    before_move(f"decide on v{version} (move alias {registry.CHAMPION} of {name})")
    decision = decide_promotion(
        spec,
        lake,
        tracking_uri,
        version,
        doc,
        dagster_run_id=dagster_run_id,
        results=recorded,
        dagster_run_url=dagster_run_url,
    )
    return ChampionOutcome(
        decision,
        registry.alias_version(tracking_uri, name, registry.CHAMPION),
        registry.alias_version(tracking_uri, name, registry.CHALLENGER),
    )


def decision_text(tags: dict[str, str]) -> str | None:
    """What the gate made of a version, from its tags: `promote: ...`, `refused: ...`, or
    None when nothing decided it. Versions refused before refusals were recorded carry
    `rejected: ...`, or only their failed `mlops.gate.*` tags (their checks wrote no
    `mlops.gate_run.*`, and champion_model never ran)."""
    promotion = tags.get(f"{registry.TAG}promotion")
    if promotion and promotion.startswith("rejected: "):
        return "refused: " + promotion.removeprefix("rejected: ")
    if promotion:
        return promotion
    if any(k.startswith(gate_run_tag("")) for k in tags):
        return None  # checks of this version ran, champion_model did not decide (yet)
    failed = [f"{r.name}: {r.reason}" for r in read_gate_tags(tags).values() if not r.passed]
    return f"refused: {'; '.join(failed)}" if failed else None


def promote(
    spec: Spec,
    lake: Lake,
    tracking_uri: str,
    version: int,
    *,
    force: bool = False,
    reason: str = "",
    actor: str = "cli",
) -> PromotionDecision:
    """`mlops promote`: evaluate against the current champion now, then gate. `force`
    overrides the gate, never the serving loader's check: a forced version must load in a
    format the platform writes and score its input example."""
    if force and not reason:
        raise PromotionError("--force needs --reason: say why the gate is overridden")
    if force:
        _require_servable(spec, tracking_uri, version, "promoted, not even with --force")
    try:
        doc = evaluate_version(spec, lake, tracking_uri, version)
    except EvaluationError as e:
        raise PromotionError(f"cannot evaluate v{version}: {e}") from None
    save_evaluation(lake, spec, doc)
    return decide_promotion(
        spec, lake, tracking_uri, version, doc, force=force, reason=reason, actor=actor
    )


def _require_servable(spec: Spec, tracking_uri: str, version: int, what: str) -> None:
    """verify_servable, or PromotionError saying why the version cannot be `what`."""
    name = spec.registered_model_name
    try:
        verify_servable(tracking_uri, name, version)
    except ModelRefused as e:
        raise PromotionError(
            f"{name} v{version} cannot be {what}: it does not pass the serving loader's "
            f"check: {e}. Pick a version that loads and scores its input example"
        ) from None


def rollback(
    spec: Spec,
    lake: Lake,
    tracking_uri: str,
    to: int | None = None,
    *,
    force: bool = False,
    reason: str = "",
    dagster_run_id: str = "",
    actor: str = "cli",
) -> PromotionDecision:
    """Point `champion` back at `to`, or at the champion before the current one.

    Only to a version the deployment history shows was champion before, and that still
    loads and scores its input example (verify_servable). `force` (with a reason, recorded
    as a `force_rollback`) lifts the first rule, never the second."""
    name = spec.registered_model_name
    current = registry.alias_version(tracking_uri, name, registry.CHAMPION)
    if current is None:
        raise PromotionError(f"{name} has no champion to roll back")
    target = to if to is not None else registry.previous_champion(lake, spec.name, current)
    if target is None:
        raise PromotionError(
            f"{name} v{current} has no previous champion in the deployment history; "
            "name one with --to N"
        )
    if target == current:
        raise PromotionError(f"v{target} is already the champion")
    if force and not reason:
        raise PromotionError("--force needs --reason: say why the rollback rule is overridden")
    registry.version_tags(tracking_uri, name, target)  # raises if the version does not exist
    history = registry.deployment_history(lake, spec.name)
    was_champion = history.filter(
        pl.col("action").is_in(registry.MOVES) & (pl.col("to_version") == target)
    ).height
    if not was_champion and not force:
        before = sorted(
            set(history.filter(pl.col("action").is_in(registry.MOVES))["to_version"].to_list())
        )
        raise PromotionError(
            f"{name} v{target} was never champion (the deployment history's champions: "
            f"{', '.join(f'v{v}' for v in before) or 'none'}): a rollback returns only to one "
            "of those. Promote it through the gate (mlops promote), or override with "
            "--force --reason '...' (recorded)"
        )
    _require_servable(spec, tracking_uri, target, "rolled back to")
    action = "rollback" if was_champion else "force_rollback"
    text = reason or f"rollback from v{current}"
    if not was_champion:
        text = f"{reason} (forced: v{target} was never champion)"
    registry.move_champion(
        tracking_uri,
        lake,
        spec.name,
        name,
        registry.Deployment(
            action=action,
            from_version=current,
            to_version=target,
            reason=text,
            dagster_run_id=dagster_run_id,
            actor=actor,
        ),
    )
    return PromotionDecision(True, current, target, text, [])


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
