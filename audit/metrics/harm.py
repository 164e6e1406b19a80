"""Does a mitigation hurt? Each mitigated model's worst-group accuracy against plain training's.

A model trained with a mitigation other than "none" is compared with its plain-training baseline:
the first model of the run with mitigation "none" trained on the same `train_split` (a model
given by checkpoint, e.g. DFR on the team's own model: the first plain model loaded from the same
checkpoint; failing both, the run's first model when it is plain). The difference of worst
class x group accuracy (mitigated - plain) is paired over the same evaluation images and the
same bootstrap resamples (`headline_samples`); the model is **harmful** when the difference's
95% interval lies wholly below 0, and **helps** when it lies wholly above.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from audit.metrics.aggregate import groups_of
from audit.metrics.bootstrap import estimate
from audit.metrics.performance import headline_samples

PLAIN = "none"


def plain_baseline(name: str, infos: dict[str, dict[str, Any]]) -> str | None:
    """The plain-training model a mitigated model is judged against (None: none in the run)."""
    info = infos[name]
    plain = [n for n, i in infos.items() if i.get("mitigation", PLAIN) == PLAIN and n != name]
    for key in ("train_split", "checkpoint"):
        if info.get(key):
            same = [n for n in plain if infos[n].get(key) == info[key]]
            if same:
                return same[0]
    first = next(iter(infos))
    return first if first in plain else None


def judge_harm(
    tables: dict[str, pd.DataFrame],
    infos: dict[str, dict[str, Any]],
    rows: pd.DataFrame,
    weights: np.ndarray,
) -> dict[str, dict[str, Any]]:
    """model -> {"baseline", "worst_group_accuracy_difference" (estimate), "harmful", "helps"}
    for every model trained with a mitigation that has a plain baseline in the run."""
    groups = groups_of(rows)
    labels = rows["label"].to_numpy()

    def worst(name: str) -> np.ndarray:
        correct = tables[name]["correct"].to_numpy(float)
        return headline_samples(correct, labels, groups, weights)["worst_group_accuracy"]

    out: dict[str, dict[str, Any]] = {}
    for name, info in infos.items():
        if info.get("mitigation", PLAIN) == PLAIN:
            continue
        baseline = plain_baseline(name, infos)
        if baseline is None:
            continue
        diff = worst(name) - worst(baseline)
        value = estimate(diff[0], diff[1:] if len(weights) else None)
        low, high = value["ci_low"], value["ci_high"]
        out[name] = {
            "baseline": baseline,
            "worst_group_accuracy_difference": value,
            "harmful": high is not None and high < 0,
            "helps": low is not None and low > 0,
        }
    return out
