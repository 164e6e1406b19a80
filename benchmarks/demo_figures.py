"""Print the README's demo table and paired-difference sentence from a finished `audit demo` run.

    .venv/bin/python benchmarks/demo_figures.py RUN_DIR [--manifest PATH]

Why: the README quotes the demo's figures; copying them by hand lets them drift from what a run
measures. This script reads RUN_DIR/metrics.json (and, for the training split's composition by
attributes other than the default group, the data set's manifest when it can be found) and prints
markdown in the README's format: the biased-vs-unbiased table, the "Brackets are bootstrap ..."
paragraph with the paired differences, and the shares the first page quotes. Every number comes
from the run; a figure the run does not hold is printed as "n/a", never guessed.

Rounding follows the README: accuracies and shares in percent with one decimal, intervals joined
by an en dash, gaps and differences in points (signed, "to" between the bounds, for the paired
differences), fairness differences and rank correlations with two decimals.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

NA = "n/a"

# Plural nouns for group names in the header ("78% of doctors men"); other names print as they are.
_GROUP_NOUNS = {"female": "women", "male": "men"}

# Short names of the gates for the table's gate row, in the README's words.
_GATE_SHORT = {
    "min_worst_group_accuracy": "worst group",
    "max_accuracy_gap": "accuracy gap",
    "max_attention_gap_between_groups": "attention gap",
    "max_protected_attention": "protected attention",
    "max_flip_rate": "flips",
    "max_protected_occlusion_effect": "occlusion",
}


def dig(obj: Any, *keys: Any) -> Any:
    """Follow keys (dict keys or list indices) into obj; None where any step is missing."""
    for key in keys:
        if isinstance(obj, dict):
            obj = obj.get(key)
        elif isinstance(obj, list) and isinstance(key, int) and -len(obj) <= key < len(obj):
            obj = obj[key]
        else:
            return None
        if obj is None:
            return None
    return obj


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def pct(x: Any) -> str:
    """0.6225 -> '62.3%'."""
    v = _num(x)
    return NA if v is None else f"{100 * v:.1f}%"


def _interval(stat: Any, number: Any, unit: str, joiner: str) -> str:
    """'{value}{unit} [{low}{joiner}{high}]' of a {'value', 'ci_low', 'ci_high'} block."""
    v, lo, hi = (_num(dig(stat, k)) for k in ("value", "ci_low", "ci_high"))
    if v is None:
        return NA
    if lo is None or hi is None:
        return f"{number(v)}{unit}"
    return f"{number(v)}{unit} [{number(lo)}{joiner}{number(hi)}]"


def _p(x: float) -> str:
    return f"{100 * x:.1f}"


def _sp(x: float) -> str:
    return f"{100 * x:+.1f}"


def pct_ci(stat: Any) -> str:
    """{'value', 'ci_low', 'ci_high'} -> '62.3% [58.9–65.5]'."""
    return _interval(stat, _p, "%", "–")


def points_ci(stat: Any) -> str:
    """{'value', 'ci_low', 'ci_high'} in probability units -> '11.6 points [9.7–13.6]'."""
    return _interval(stat, _p, " points", "–")


def signed_points_ci(stat: Any) -> str:
    """A paired difference -> '+93.0 points [+89.2 to +96.0]'."""
    return _interval(stat, _sp, " points", " to ")


def two(x: Any) -> str:
    v = _num(x)
    if v is None:
        return NA
    s = f"{v:.2f}"
    return "0.00" if s == "-0.00" else s


def cell_words(cls: str, group: str) -> str:
    """('nurse', 'male x old') -> 'old male nurses' (adjectives last attribute first, as English)."""
    parts = [p.strip() for p in group.split(" x ")]
    return " ".join([*reversed(parts), f"{cls}s"])


def region_words(regions: Any) -> str:
    return " + ".join(regions) if isinstance(regions, list) and regions else NA


def _resolve_manifest(metrics: dict, run_dir: Path, given: str | None) -> Path | None:
    """The data set's manifest: --manifest, else metrics' path from the cwd or the run's parents."""
    if given:
        return Path(given)
    rel = dig(metrics, "data", "manifest")
    if not isinstance(rel, str):
        return None
    p = Path(rel)
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, *(d / p for d in run_dir.parents)]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return None
    try:  # a manifest of the same name but another data set must not describe this run
        expected = json.loads((run_dir / "run.json").read_text()).get("manifest_sha256")
    except (OSError, json.JSONDecodeError, AttributeError):
        expected = None
    if expected and hashlib.sha256(found.read_bytes()).hexdigest() != expected:
        print(f"note: {found} is not the run's manifest (sha256 differs); ignored", file=sys.stderr)
        return None
    return found


def split_composition(metrics: dict, split: str, manifest: Path | None) -> dict[str, dict]:
    """Per attribute, per class: {group: share} of the training split.

    From the manifest's `group:<attr>` columns when it can be read; else from metrics' default
    group (data.splits.<split>.group_share_per_class), which covers one attribute only.
    """
    out: dict[str, dict] = {}
    if manifest is not None:
        try:
            with manifest.open(newline="") as f:
                reader = csv.DictReader(f)
                attrs = [c for c in reader.fieldnames or [] if c.startswith("group:")]
                counts: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
                for row in reader:
                    if row.get("split") != split:
                        continue
                    for a in attrs:
                        if row.get(a):
                            counts[a[len("group:") :]][row["label"]][row[a]] += 1
            for attr, per_class in counts.items():
                out[attr] = {
                    c: {g: n / sum(cnt.values()) for g, n in cnt.items()}
                    for c, cnt in per_class.items()
                }
        except (OSError, KeyError, csv.Error):
            out = {}
    if not out:
        shares = dig(metrics, "data", "splits", split, "group_share_per_class")
        if isinstance(shares, dict):
            out["group"] = shares
    return out


def header_cell(name: str, split: Any, composition: dict[str, dict], classes: list) -> str:
    """'biased model (trained on `train_biased`: 78% of doctors men, ...)'."""
    if not isinstance(split, str):
        return f"{name} model"
    notes = []
    for attr_shares in composition.values():
        for cls in classes:
            shares = attr_shares.get(cls) or {}
            if not shares:
                continue
            group, share = max(shares.items(), key=lambda kv: kv[1])
            if round(100 * share) > 50:
                notes.append(f"{round(100 * share)}% of {cls}s {_GROUP_NOUNS.get(group, group)}")
    tail = f": {', '.join(notes)}" if notes else ""
    return f"{name} model (trained on `{split}`{tail})"


def worst_cell(model: dict, attr: str, train_shares: dict | None, named: bool) -> str:
    """Worst class x attribute cell, e.g. '6.0% [2.9–9.4] (male nurses; female doctors 50.0%)'.

    The second cell named is the other classes' minority cell in the training split (the cell
    a biased training set starves, like the worst one), when the split's shares are known.
    """
    fair = dig(model, "fairness", attr) or {}
    worst = fair.get("worst_cell_accuracy")
    text = pct_ci(worst)
    if text == NA or not named:
        return text
    cls, group = dig(worst, "class"), dig(worst, "group")
    if not (isinstance(cls, str) and isinstance(group, str)):
        return text
    notes = [cell_words(cls, group)]
    per_cell = fair.get("per_cell") or {}
    for other in sorted({c.get("class") for c in per_cell.values() if isinstance(c, dict)} - {cls}):
        shares = (train_shares or {}).get(other)
        if not shares:
            continue
        minority = min(shares.items(), key=lambda kv: kv[1])[0]
        stat = per_cell.get(f"{other} / {minority}")
        if stat is not None:
            notes.append(f"{cell_words(other, minority)} {pct(dig(stat, 'value'))}")
    return f"{text} ({'; '.join(notes)})"


def share_row(model: dict, region: str) -> str:
    return pct_ci(dig(model, "attention", "gradcam", "overall", region, "share"))


def trust_cell(model: dict) -> str:
    methods = dig(model, "trust", "methods") or {}
    names = {"gradcam": "Grad-CAM", "guided_gradcam": "Guided Grad-CAM"}
    rhos = [
        two(dig(methods, m, "randomization", "final_spearman", "value"))
        for m in ("gradcam", "guided_gradcam")
    ]
    trusted = {m: dig(methods, m, "trusted") for m in ("gradcam", "guided_gradcam")}
    if all(v is True for v in trusted.values()):
        verdict = "both trusted"
    elif all(v is False for v in trusted.values()):
        verdict = "neither trusted"
    elif any(v is None for v in trusted.values()):
        verdict = "trust n/a"
    else:
        verdict = ", ".join(f"{names[m]} {'trusted' if v else 'not'}" for m, v in trusted.items())
    return f"{' / '.join(rhos)} ({verdict})"


def gate_row(metrics: dict, names: list[str]) -> tuple[str, list[str]]:
    """('gates (12: worst group, ...)', ['fail 10 of 12', 'pass 12 of 12'])."""
    gates = metrics.get("gates")
    if not isinstance(gates, list) or not gates:
        return "gates", [NA for _ in names]
    per_model = [[g for g in gates if g.get("model") == n] for n in names]
    first = per_model[0] if per_model and per_model[0] else gates
    per_attr, plain, attrs = [], [], []
    for g in first:
        short = _GATE_SHORT.get(g.get("gate"), str(g.get("gate")))
        if g.get("attribute"):
            if short not in per_attr:
                per_attr.append(short)
            if g["attribute"] not in attrs:
                attrs.append(g["attribute"])
        elif short not in plain:
            plain.append(short)

    def _and(items: list[str]) -> str:
        return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"

    parts = [f"{_and(per_attr)} per {_and(attrs)}"] if per_attr else []
    label = f"gates ({len(first)}: {'; '.join(parts + plain)})"
    cells = []
    for model_gates in per_model:
        if not model_gates:
            cells.append(NA)
            continue
        failed = sum(1 for g in model_gates if g.get("passed") is False)
        passed = sum(1 for g in model_gates if g.get("passed") is True)
        total = len(model_gates)
        cells.append(f"fail {failed} of {total}" if failed else f"pass {passed} of {total}")
    return label, cells


def occlusion_fill(metrics: dict, config: dict) -> str:
    fills = dig(config, "trust", "occlusion_fills")
    return fills[0] if isinstance(fills, list) and fills else "mean"


def table(metrics: dict, config: dict, manifest: Path | None) -> list[str]:
    models = metrics.get("models") or {}
    names = list(models)
    data = metrics.get("data") or {}
    classes = data.get("classes") or []
    area = data.get("region_area") or {}
    fill = occlusion_fill(metrics, config)
    protected = region_words(data.get("protected_regions"))
    core = region_words(data.get("core_regions"))
    eval_split = data.get("eval_split") or "test"

    heads, sex_shares = [], {}
    for n in names:
        split = models[n].get("train_split")
        comp = split_composition(metrics, split, manifest) if isinstance(split, str) else {}
        heads.append(header_cell(n, split, comp, classes))
        sex_shares[n] = comp.get("sex") or comp.get("group")

    test_shares = dig(data, "splits", eval_split, "group_share_per_class") or {}
    balanced = bool(test_shares) and all(
        abs(s - 1 / len(per)) < 1e-9 for per in test_shares.values() for s in per.values()
    )
    n_test = dig(models, names[0], "performance", "n") if names else None
    acc_label = f"accuracy on the {'balanced ' if balanced else ''}{eval_split} set" + (
        f" ({n_test} images)" if n_test is not None else ""
    )

    def row(label: str, cells: list[str]) -> str:
        return f"| {label} | {' | '.join(cells)} |" if label else f"| | {' | '.join(cells)} |"

    def each(fn) -> list[str]:
        return [fn(models[n], i) for i, n in enumerate(names)]

    inter = (
        next(
            (
                k
                for k, v in (dig(models, names[0], "fairness") or {}).items()
                if dig(v, "kind") == "intersection"
            ),
            None,
        )
        if names
        else None
    )

    def named_worst(attr: str):
        return lambda m, i: worst_cell(
            m, attr, sex_shares[names[i]] if attr == "sex" else None, named=i == 0
        )

    def parity(m: dict, _i: int) -> str:
        f = dig(m, "fairness", "sex") or {}
        return (
            f"{two(dig(f, 'demographic_parity_difference', 'value'))} / "
            f"{two(dig(f, 'equalized_odds_difference', 'value'))}"
        )

    lines = [
        row("", heads),
        "|---|" + "---|" * len(names),
        row(acc_label, each(lambda m, i: pct_ci(dig(m, "performance", "accuracy")))),
        row("worst class x sex cell", each(named_worst("sex"))),
        row("worst class x age cell", each(named_worst("age"))),
        row(
            "worst class x sex x age cell (the intersection)",
            each(named_worst(inter)) if inter else [NA] * len(names),
        ),
        row("demographic parity / equalized odds difference (sex)", each(parity)),
        row(
            f"Grad-CAM mass on {protected} ({pct(area.get('protected'))} of the pixels)",
            each(lambda m, i: share_row(m, "protected")),
        ),
        row(
            "gap in that share between women and men",
            each(
                lambda m, i: points_ci(
                    dig(m, "fairness", "sex", "attention", "gradcam", "protected", "gap")
                )
            ),
        ),
        row(
            f"Grad-CAM mass on clothes ({pct(area.get('clothes'))} of the pixels)",
            each(lambda m, i: share_row(m, "clothes")),
        ),
        row(
            f"Grad-CAM mass on {core} ({pct(area.get('core'))} of the pixels)",
            each(lambda m, i: share_row(m, "core")),
        ),
        row(
            "counterfactual flip rate (sex twin)",
            each(lambda m, i: pct_ci(dig(m, "counterfactual", "flip_rate"))),
        ),
        row(
            f"confidence lost when {protected} are hidden, beyond a same-shaped control",
            each(
                lambda m, i: points_ci(
                    dig(m, "trust", "occlusion", "protected", fill, "overall", "effect")
                )
            ),
        ),
        row(
            "Grad-CAM / Guided Grad-CAM rank correlation after randomizing every layer",
            each(lambda m, i: trust_cell(m)),
        ),
        row(*gate_row(metrics, names)),
    ]
    return lines


def paragraph(metrics: dict, config: dict) -> str:
    data = metrics.get("data") or {}
    models = metrics.get("models") or {}
    comp = dig(metrics, "comparisons", 0) or {}
    a, b = comp.get("a"), comp.get("b")
    n_boot = metrics.get("bootstrap")
    k = dig(models, a, "trust", "n_images") if a else None
    fill = occlusion_fill(metrics, config)
    protected = region_words(data.get("protected_regions"))
    boot = f"{n_boot:,}" if isinstance(n_boot, int) else NA
    occl = dig(comp, "occlusion_difference", "protected", fill, "effect_difference")
    text = (
        f"Brackets are bootstrap 95% intervals ({boot} resamples; the occlusion and trust figures "
        f"on the seeded sample of {k if k is not None else NA} test images). "
        f"{str(b).capitalize() if b else NA} minus {a or NA}, paired over the same images: "
        f"worst-group accuracy {signed_points_ci(comp.get('worst_group_accuracy_difference'))}, "
        f"{protected} attention "
        f"{signed_points_ci(dig(comp, 'attention_share_difference', 'protected'))}, "
        f"flip rate {signed_points_ci(comp.get('flip_rate_difference'))}, "
        f"occlusion effect {signed_points_ci(occl)}"
    )
    lo, hi = _num(dig(occl, "ci_low")), _num(dig(occl, "ci_high"))
    if lo is not None and hi is not None:
        if hi < 0:
            text += (
                f" (the {a} model's dependence on the protected pixels is larger; "
                "the interval excludes zero)"
            )
        elif lo > 0:
            text += (
                f" (the {b} model's dependence on the protected pixels is larger; "
                "the interval excludes zero)"
            )
        else:
            text += " (the interval includes zero)"
    return text + "."


def first_page(metrics: dict) -> list[str]:
    """The shares README's prose quotes: each model's clothes, core and protected shares."""
    data = metrics.get("data") or {}
    area = data.get("region_area") or {}
    lines = []
    for name, model in (metrics.get("models") or {}).items():
        for key, words in (
            ("clothes", "clothes"),
            ("core", region_words(data.get("core_regions"))),
            ("protected", region_words(data.get("protected_regions"))),
        ):
            share = pct(dig(model, "attention", "gradcam", "overall", key, "share", "value"))
            lines.append(
                f"- {name} model, Grad-CAM share on {words}: {share} "
                f"({pct(area.get(key))} of the pixels)"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished `audit demo` / `audit run` folder")
    parser.add_argument("--manifest", help="the data set's manifest (default: from metrics.json)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read {run_dir / 'metrics.json'}: {e}", file=sys.stderr)
        return 2
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    manifest = _resolve_manifest(metrics, run_dir, args.manifest)
    if manifest is None:
        print(
            "note: the data set's manifest was not found; the header gives the training split's "
            "composition by the default group only (pass --manifest for every attribute)",
            file=sys.stderr,
        )
    print("\n".join(table(metrics, config, manifest)))
    print()
    print(paragraph(metrics, config))
    print()
    print("First-page shares:")
    print("\n".join(first_page(metrics)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
