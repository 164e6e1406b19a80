"""Pre-release gates: thresholds on a finished run's metrics, with pass/fail per model."""

from __future__ import annotations

from typing import Any

# gate key -> (metric path inside a model's metrics, comparison, label)
GATES = {
    "min_worst_group_accuracy": (
        ("performance", "worst_group_accuracy"),
        ">=",
        "worst-group accuracy",
    ),
    "max_accuracy_gap": (("performance", "accuracy_gap"), "<=", "accuracy gap between groups"),
    "max_protected_attention": (
        ("attention", "gradcam", "overall", "protected", "share"),
        "<=",
        "Grad-CAM share on protected regions",
    ),
    "max_flip_rate": (("counterfactual", "flip_rate"), "<=", "counterfactual flip rate"),
}


def _lookup(metrics: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = metrics
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def evaluate_gates(metrics: dict[str, Any], gates: dict[str, float | None]) -> list[dict[str, Any]]:
    """One row per model and configured gate: measured value, threshold, and whether it passes.

    A gate whose metric could not be measured (e.g. no protected region in the data) fails: a
    release check that cannot be checked does not pass.
    """
    rows = []
    for model, model_metrics in metrics["models"].items():
        for key, threshold in gates.items():
            if threshold is None:
                continue
            if key not in GATES:
                raise ValueError(f"unknown gate {key!r}; known gates: {', '.join(GATES)}")
            path, op, label = GATES[key]
            estimate = _lookup(model_metrics, path) or {}
            value = estimate.get("value")
            passed = value is not None and (
                value >= threshold if op == ">=" else value <= threshold
            )
            rows.append(
                {
                    "model": model,
                    "gate": key,
                    "label": label,
                    "op": op,
                    "threshold": threshold,
                    "value": value,
                    "ci_low": estimate.get("ci_low"),
                    "ci_high": estimate.get("ci_high"),
                    "passed": bool(passed),
                }
            )
    return rows


def verdicts(rows: list[dict[str, Any]], models: list[str]) -> dict[str, str]:
    """'pass' for a model whose every gate passed, else 'fail'."""
    return {
        m: "pass" if all(r["passed"] for r in rows if r["model"] == m) else "fail" for m in models
    }
