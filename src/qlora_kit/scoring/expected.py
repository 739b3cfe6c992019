"""The source's reported numbers next to what this run measured, within tolerance or not."""
from __future__ import annotations

from typing import Any


def _lookup(metrics: dict[str, Any], dotted: str) -> Any:
    cur: Any = metrics
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _why_missing(metrics: dict[str, Any], dotted: str) -> str:
    """The most specific status on the way to a metric this run did not produce."""
    cur: Any = metrics
    why = ""
    for part in dotted.split("."):
        if isinstance(cur, dict) and isinstance(cur.get("status"), str) and cur["status"] != "ok":
            why = cur["status"]
        if not isinstance(cur, dict) or part not in cur:
            break
        cur = cur[part]
    return why or f"this run has no {dotted}"


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def compare_expected(expected: dict[str, dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    """The recipe's `expected:` numbers next to this run's, for metrics.json and the report.

    An entry names the metric it compares with (`metric:`, a dotted metrics.json key, or one per
    sub-value for a dict value) and may carry `tolerance` (same shape as value), `out_of` (the
    size the source measured on; a run on fewer items is not comparable), `scale` (multiplies the
    measured number, e.g. 100 for lm-eval's fractions vs a leaderboard's percent), `applies_to`
    and `cite`. Entries without `metric:` have no counterpart in what the kit measures.
    """
    out: dict[str, Any] = {}
    for key, entry in expected.items():
        value, metric = entry.get("value"), entry.get("metric")
        row: dict[str, Any] = {"source": value, "reproduced": None, "within_tolerance": None}
        if not metric:
            row["status"] = ("not measured in this run: the kit measures no counterpart"
                             + (f" ({entry['applies_to']})" if entry.get("applies_to") else ""))
            out[key] = row
            continue
        scale = float(entry.get("scale", 1.0))
        tol = entry.get("tolerance")
        subkeys = list(value) if isinstance(value, dict) else [None]
        paths = {s: (metric[s] if isinstance(metric, dict) else (f"{metric}.{s}" if s is not None else metric))
                 for s in subkeys if not isinstance(metric, dict) or s in metric}
        got = {s: _lookup(metrics, p) for s, p in paths.items()}
        measured = {s: v * scale for s, v in got.items() if _number(v)}
        if not measured:
            first = next(iter(paths.values()), str(metric))
            row["status"] = f"not measured in this run: {_why_missing(metrics, first)}"
            out[key] = row
            continue
        if entry.get("out_of") is not None:
            parent = ".".join(next(iter(paths.values())).split(".")[:-1])
            size = _lookup(metrics, parent + ".out_of") if parent else None
            if _number(size) and size != entry["out_of"]:
                row["reproduced"] = measured if isinstance(value, dict) else measured[None]
                row["status"] = (f"not comparable: this run measured out of {size}, the source out of "
                                 f"{entry['out_of']} (eval.prompt_set_limit)")
                out[key] = row
                continue
        checks = []
        for s, v in measured.items():
            want = value[s] if s is not None else value
            t = tol.get(s) if isinstance(tol, dict) else (tol if s is None else None)
            if _number(want) and _number(t):
                checks.append(abs(v - want) <= t)
        row["reproduced"] = measured if isinstance(value, dict) else measured[None]
        row["within_tolerance"] = all(checks) if checks else None
        missing = [s for s in subkeys if s not in measured]
        row["status"] = "measured" + (f" (not measured: {', '.join(map(str, missing))})" if missing else "")
        out[key] = row
    return out
