"""Side by side: the trust figures and verdicts of two runs of the same audit (e.g. before and after
a change to the trust checks).

    python benchmarks/compare_trust.py RUN_A RUN_B

Per model and method: the randomization test's final rank correlation and verdict, deletion and
insertion AUC minus random and the `faithful` verdict; per model the protected-region occlusion
effect (mean fill) and the run's gate verdicts; each figure with its bootstrap 95% interval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _ci(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    low, high = entry.get("ci_low"), entry.get("ci_high")
    interval = "" if low is None else f" [{low:.3f}, {high:.3f}]"
    return f"{entry['value']:.3f}{interval} (n={entry.get('n', '?')})"


def rows(metrics: dict[str, Any]) -> dict[str, str]:
    """Figure name -> shown value, for every trust figure and verdict of a run."""
    out: dict[str, str] = {}
    for name, model in metrics["models"].items():
        trust = model.get("trust") or {}
        for method, entry in (trust.get("methods") or {}).items():
            rand, faith = entry["randomization"], entry["faithfulness"]
            key = f"{name} / {method}"
            out[f"{key}: final rank correlation"] = _ci(rand["final_spearman"])
            out[f"{key}: trusted"] = str(entry["trusted"])
            out[f"{key}: deletion AUC - random"] = _ci(faith["deletion_minus_random"])
            out[f"{key}: insertion AUC - random"] = _ci(faith["insertion_minus_random"])
            out[f"{key}: faithful"] = str(faith["faithful"])
        effect = (((trust.get("occlusion") or {}).get("protected") or {}).get("mean") or {}).get(
            "overall", {}
        )
        out[f"{name}: protected occlusion effect (mean fill)"] = _ci(effect.get("effect"))
    for gate in metrics.get("gates") or []:
        if gate["gate"] == "max_protected_occlusion_effect":
            out[f"{gate['model']}: occlusion gate passed"] = str(gate.get("passed"))
    for name, verdict in (metrics.get("verdicts") or {}).items():
        out[f"{name}: verdict"] = str(verdict)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs=2, type=Path)
    args = parser.parse_args()
    a, b = (rows(json.loads((run / "metrics.json").read_text())) for run in args.runs)
    width = max(len(k) for k in a | b)
    print(f"{'':{width}}  {args.runs[0].name:>34}  {args.runs[1].name:>34}")
    for key in a | b:
        print(f"{key:{width}}  {a.get(key, '-'):>34}  {b.get(key, '-'):>34}")


if __name__ == "__main__":
    main()
