"""The closed loop's timeline as a picture (`mlops backtest` writes it): drift share per day,
the realized metric by labelled day against the metric-decline threshold, the champion
version, and every retraining labelled with what triggered it and how it ended.

Rows are the backtest's timeline rows: `n`, `day`, `drift_share`, `drifted`, `champion`,
`realized`, `realized_day`, `metric`, `events`, `retrainings` (each with `trigger`,
`attempt`, `version`, `outcome`) and, where the day's realized performance was read,
`baseline` (the evaluation metric of the champion that scored the labelled day).
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops.lake import put_file
from mlops.monitoring import decline_threshold
from mlops.spec import Spec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OUTCOME_COLORS = {"promoted": "tab:green", "refused": "tab:orange", "failed": "tab:red"}
THRESHOLD_LABEL = "decline threshold"


def retraining_label(t: dict[str, Any]) -> str:
    """`drift_retrain (retry 1)\\nv4 refused`: what started it, then what came of it."""
    retry = f" (retry {t['attempt'] - 1})" if int(t.get("attempt") or 1) > 1 else ""
    version = f"v{t['version']} " if t.get("version") else ""
    return f"{t.get('trigger') or 'manual'}{retry}\n{version}{t.get('outcome', '')}".rstrip()


def _lag(r: dict[str, Any]) -> int:
    return (dt.date.fromisoformat(r["day"]) - dt.date.fromisoformat(r["realized_day"])).days


def threshold_points(spec: Spec, timeline: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """(x, threshold) at each labelled day whose baseline is known: the realized metric falls
    past it (below, or above for error metrics) when the day counts as declined."""
    out = []
    for r in timeline:
        if r.get("realized") is None or r.get("baseline") is None:
            continue
        limit = decline_threshold(
            r["metric"], float(r["baseline"]), spec.monitoring.metric_decline_tolerance
        )
        out.append((r["n"] - _lag(r), float(limit)))
    return sorted(out)


def timeline_figure(
    spec: Spec, timeline: Sequence[dict[str, Any]], marker: int | None = None
) -> Figure:
    """The figure (three axes sharing the day axis); the caller saves or inspects it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    days = [r["n"] for r in timeline]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(12, 8.5), sharex=True)
    ax1.bar(
        days,
        [r["drift_share"] or 0 for r in timeline],
        color=["tab:red" if r["drifted"] else "tab:gray" for r in timeline],
    )
    ax1.axhline(spec.monitoring.drift_threshold, ls="--", c="k", lw=1, label="drift threshold")
    ax1.set_ylabel("drift share")
    ax1.set_ylim(0, max([1.0, *(r["drift_share"] or 0 for r in timeline)]) * 1.05)
    metric = timeline[0]["metric"] if timeline else ""
    pts = sorted((r["n"] - _lag(r), r["realized"]) for r in timeline if r["realized"] is not None)
    if pts:
        ax2.plot(*zip(*pts, strict=True), "o-", label=f"realized {metric}")
    limits = threshold_points(spec, timeline)
    if limits:
        xs, ys = zip(*limits, strict=True)
        ax2.step(xs, ys, where="post", ls="--", c="tab:red", lw=1, label=THRESHOLD_LABEL)
    if pts or limits:
        ax2.legend(loc="lower left", fontsize=8)
    ax2.set_ylabel(f"realized {metric}\n(by labelled day)")
    ax3.step(days, [r["champion"] or 0 for r in timeline], where="post")
    ax3.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax3.set_ylabel("champion version")
    if marker is not None:
        for ax in (ax1, ax2, ax3):
            ax.axvline(marker - 0.5, c="k", ls=":", lw=1)
        ax1.annotate("drift starts", (marker - 0.4, ax1.get_ylim()[1] * 0.9), fontsize=8)
    ax3.set_xlabel("day")
    top = ax1.get_ylim()[1]
    for r in timeline:
        for i, t in enumerate(r.get("retrainings") or []):
            color = OUTCOME_COLORS.get(t.get("outcome", ""), "tab:gray")
            for ax in (ax1, ax2, ax3):
                ax.axvline(r["n"], c=color, lw=1)
            ax1.annotate(
                retraining_label(t),
                (r["n"], top * (0.97 - 0.22 * i)),
                xytext=(3, 0),
                textcoords="offset points",
                fontsize=7,
                color=color,
                va="top",
                rotation=90,
            )
    fig.suptitle(
        f"{spec.name}: closed loop (retrainings by trigger; green: promoted, orange: refused)"
    )
    fig.tight_layout()
    return fig


def write_timeline(
    spec: Spec, timeline: Sequence[dict[str, Any]], path: Path, marker: int | None = None
) -> Path:
    """The timeline PNG at `path` (written atomically)."""
    import matplotlib.pyplot as plt

    fig = timeline_figure(spec, timeline, marker)
    try:
        buf = io.BytesIO()
        fig.savefig(buf, dpi=90, format="png")
    finally:
        plt.close(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    put_file(path, buf.getvalue())
    return Path(path)
