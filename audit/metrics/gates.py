"""Pre-release gates: thresholds on a finished run's metrics, with pass/fail per model.

Every gate is one entry of `GATES`: the metric it reads, the comparison, its default threshold,
what it protects against and where the default comes from (both shown in the report). Adding a
gate is one entry here and one field of the same name in `audit.config.GateConfig`.

Which gates apply (the `[gates]` table of a config, or the `gates` object of a run's config.json):

- no `[gates]` table: every gate, at its default threshold;
- a `[gates]` table: only the gates given in it;
- `defaults = true` inside it: the gates given, plus every other gate at its default;
- `from_defaults = [...]`: these gates take (or took) their default threshold. A run writes the
  resolved gates into config.json with this list, so `audit check` can say where each came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

OPERATORS = (">=", "<=")
META_KEYS = ("defaults", "from_defaults")  # keys of a gates table that are not gates


@dataclass(frozen=True)
class Gate:
    """One pre-release check on a model's metrics.

    metric: path to an estimate (`{"value", "ci_low", "ci_high"}`) inside `metrics.models.<name>`;
    op: ">=" (a floor) or "<=" (a ceiling); bounds: the thresholds a config may set.
    """

    metric: tuple[str, ...] | None
    op: str
    label: str
    default: float
    protects: str
    why_default: str
    bounds: tuple[float, float] = (0.0, 1.0)
    # Path inside each block of `metrics.models.<name>.fairness` (one per protected attribute and
    # the intersection): where a run has those blocks, the gate applies to each of them instead.
    per_attribute: tuple[str, ...] | None = None
    # The explanation method the metric is measured with: where the run's randomization test
    # says that method's maps do not depend on the model, the gate is "not trusted".
    method: str | None = None
    # An opt-in gate applies only where a config names it, never as a default.
    opt_in: bool = False


GATES: dict[str, Gate] = {
    "min_worst_group_accuracy": Gate(
        metric=("performance", "worst_group_accuracy"),
        per_attribute=("worst_cell_accuracy",),
        op=">=",
        label="worst-group accuracy",
        default=0.85,
        protects=(
            "A model that is accurate on average but fails the people of one class x group cell "
            "(e.g. female doctors)."
        ),
        why_default=(
            "A choice of this project, not a standard: far above chance and below what a model "
            "that learnt the task itself reaches on every cell of the reference data set. Set "
            "the accuracy your use needs."
        ),
    ),
    "max_accuracy_gap": Gate(
        metric=("performance", "accuracy_gap"),
        per_attribute=("accuracy_gap",),
        op="<=",
        label="accuracy gap between groups",
        default=0.05,
        protects="A model that works markedly better for one group than for another.",
        why_default=(
            "Just outside sampling noise: with 400 test images per group at 90% accuracy the 95% "
            "interval of a difference is about +/-4 points, so a gap over 5 points is unlikely "
            "to be chance. Smaller test sets need a wider threshold."
        ),
    ),
    "max_protected_attention": Gate(
        metric=("attention", "gradcam", "overall", "protected", "share"),
        method="gradcam",
        op="<=",
        label="Grad-CAM share on protected regions",
        default=0.30,
        protects=(
            "A model that decides from how the protected attribute looks (e.g. hair and face) "
            "instead of from the evidence for the class."
        ),
        why_default=(
            "A choice of this project: at most 30% of the explanation on the protected regions. "
            "Compare it with the regions' share of the pixels (what evenly spread attention "
            "would give), shown in the report, and lower it where they are small."
        ),
    ),
    "max_flip_rate": Gate(
        metric=("counterfactual", "flip_rate"),
        op="<=",
        label="counterfactual flip rate",
        default=0.10,
        protects=(
            "Decisions that change when only the person's group changes (the same image with "
            "the protected attribute swapped)."
        ),
        why_default=(
            "A choice of this project: at most one decision in ten may flip; a model that ignores "
            "the attribute flips only where it is unsure anyway."
        ),
    ),
    "max_attention_gap_between_groups": Gate(
        metric=None,
        per_attribute=("attention_gap",),
        method="gradcam",
        op="<=",
        label="gap between groups in Grad-CAM share on protected regions",
        default=0.10,
        protects=(
            "A model that looks at the protected regions of one group far more than of another "
            "(e.g. 30% on women's hair and face against 10% on men's): it treats the groups "
            "differently even where its accuracy does not show it yet."
        ),
        why_default=(
            "A choice of this project: at most 10 points between the groups' mean shares, about "
            "twice the sampling noise of a few hundred images per group. Lower it for large sets."
        ),
    ),
    "max_protected_occlusion_effect": Gate(
        metric=("trust", "occlusion", "protected", "mean", "overall", "effect"),
        op="<=",
        label="drop in confidence when the protected regions are hidden, beyond a control",
        default=0.10,
        protects=(
            "A model whose decision depends on the protected attribute's pixels: hiding hair and "
            "face (filled with the image's mean colour) lowers its confidence in its prediction "
            "more than hiding a patch of the same shape elsewhere."
        ),
        why_default=(
            "A choice of this project: at most 10 points of probability beyond the control; a "
            "model that uses the attribute loses far more when it cannot see it."
        ),
    ),
    "min_slice_accuracy": Gate(
        metric=("discovery", "worst_slice", "accuracy"),
        op=">=",
        label="accuracy of the worst discovered slice",
        default=0.70,
        opt_in=True,
        protects=(
            "A model that fails a coherent group of images that no annotation names (a "
            "background, a watermark, a scanner), found from the model's own features."
        ),
        why_default=(
            "A choice of this project, applied only when a config names it: discovered slices "
            "are found where the model errs, so a floor well below the worst-group gate's."
        ),
    ),
}


def resolve_gates(table: Mapping[str, Any] | None) -> dict[str, tuple[float, str]]:
    """The gates that apply: gate key -> (threshold, source), source "config" or "default".

    `table` is a config's `[gates]` table or a run's config.json `gates` object; None (no table)
    means every gate at its default. Raises ValueError naming an unknown key or gate.
    """
    if table is None:
        table = {"defaults": True}
    for key in table:
        if key not in GATES and key not in META_KEYS:
            raise ValueError(f"unknown gate {key!r}; known gates: {', '.join(GATES)}")
    from_defaults = list(table.get("from_defaults") or [])
    for key in from_defaults:
        if key not in GATES:
            raise ValueError(
                f"gates.from_defaults: unknown gate {key!r}; known gates: {', '.join(GATES)}"
            )
    resolved = {}
    for key, gate in GATES.items():
        value = table.get(key)
        if key in from_defaults:
            resolved[key] = (gate.default if value is None else float(value), "default")
        elif value is not None:
            resolved[key] = (float(value), "config")
        elif table.get("defaults") and not gate.opt_in:
            resolved[key] = (gate.default, "default")
    return resolved


def _lookup(metrics: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = metrics
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def evaluate_gates(
    metrics: dict[str, Any], gates: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """One row per model and applying gate: measured value, threshold, whether it passes, and
    the gate's `protects`, `why_default`, `default` and `source` ("config" or "default").

    `gates` is a gates table as `resolve_gates` takes it (a run's config.json `gates`). A gate
    whose metric could not be measured (e.g. no protected region in the data) fails: a release
    check that cannot be checked does not pass.
    """
    resolved = resolve_gates(gates)
    rows = []
    for model, model_metrics in metrics["models"].items():
        fairness = model_metrics.get("fairness") or {}
        for key, (threshold, source) in resolved.items():
            gate = GATES[key]
            if gate.per_attribute and fairness:
                targets = [
                    (attribute, _lookup(block, gate.per_attribute), block)
                    for attribute, block in fairness.items()
                ]
            elif gate.metric is not None:
                targets = [(None, _lookup(model_metrics, gate.metric), None)]
            else:
                targets = [(None, None, None)]
            for attribute, found, block in targets:
                estimate = found or {}
                value = estimate.get("value")
                passed = value is not None and (
                    value >= threshold if gate.op == ">=" else value <= threshold
                )
                untrusted = _untrusted(model_metrics, gate.method)
                row = {
                    "model": model,
                    "gate": key,
                    "label": gate.label,
                    "op": gate.op,
                    "threshold": threshold,
                    "value": value,
                    "ci_low": estimate.get("ci_low"),
                    "ci_high": estimate.get("ci_high"),
                    "passed": bool(passed),
                    "source": source,
                    "default": gate.default,
                    "protects": gate.protects,
                    "why_default": gate.why_default,
                }
                row["status"] = "pass" if passed else "fail"
                if untrusted:
                    row["passed"] = False
                    row["status"] = "not trusted"
                    row["note"] = untrusted
                if attribute is not None:
                    row["attribute"] = attribute
                    if len(fairness) > 1:
                        row["label"] = f"{gate.label} ({attribute})"
                    skipped = (block or {}).get("skipped") or {}
                    if (skipped.get("cells") or skipped.get("groups")) and "note" not in row:
                        row["note"] = (
                            f"{len(skipped.get('groups') or [])} groups and "
                            f"{skipped.get('cells', 0)} "
                            f"cells with fewer than {block.get('min_cell_size')} images were "
                            "too few to judge and skipped"
                        )
                rows.append(row)
    return rows


def _untrusted(model_metrics: dict[str, Any], method: str | None) -> str | None:
    """Why a gate measured with `method` cannot be believed for this model, or None."""
    if method is None:
        return None
    checked = ((model_metrics.get("trust") or {}).get("methods") or {}).get(method)
    if not checked or checked.get("trusted", True):
        return None
    final = checked["randomization"].get("final_spearman", {}).get("value")
    shown = "undefined" if final is None else f"{final:.2f}"
    return (
        f"not trusted: {method} maps barely change when the model's weights are randomized "
        f"(rank correlation {shown} after the full cascade), so they do not show this model"
    )


def verdicts(rows: list[dict[str, Any]], models: list[str]) -> dict[str, str]:
    """'pass' for a model whose every gate passed, else 'fail'."""
    return {
        m: "pass" if all(r["passed"] for r in rows if r["model"] == m) else "fail" for m in models
    }
