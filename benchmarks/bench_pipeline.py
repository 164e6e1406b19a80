"""Wall-clock time of the data generator, of `audit demo` from scratch, of the demo's audit without
the trust checks (their cost), and of training with each mitigation, on this machine.

Run: `.venv/bin/python benchmarks/bench_pipeline.py [--skip-mitigations]`. Everything goes to a
temporary folder. The stage timings of each run are in its run.log.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from click.testing import CliRunner

from audit.cli import demo_config
from audit.cli import main as cli
from audit.config import from_dict
from audit.data.doctor_nurse import DoctorNurseSpec, generate
from audit.models.mitigations import MITIGATIONS
from audit.runner import RunOptions, run_audit


def timed(label: str, func) -> float:  # noqa: ANN001
    start = time.perf_counter()
    func()
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.1f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-mitigations", action="store_true")
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        timed(
            "doctor/nurse generation (default, 4,400 images + masks + 1,600 twins)",
            lambda: generate(DoctorNurseSpec(), root / "data_only", progress=False),
        )

        def demo() -> None:
            result = CliRunner().invoke(
                cli, ["demo", "--out", str(root / "run"), "--data", str(root / "data"), "--quiet"]
            )
            assert result.exit_code == 0, result.output

        timed("audit demo from scratch (generation, 2 trainings, audit, trust, report, PDF)", demo)
        html = (root / "run" / "report.html").stat().st_size / 1e6
        pdf = (root / "run" / "report.pdf").stat().st_size / 1e6
        print(f"report.html {html:.1f} MB, report.pdf {pdf:.1f} MB")
        manifest = root / "data" / "manifest.csv"
        quiet = RunOptions(progress=False, render=False)
        raw = demo_config(manifest, 0)
        with_trust = timed(
            "the demo's audit without the report",
            lambda: run_audit(from_dict(raw), root / "a", echo=lambda _: None, options=quiet),
        )
        without = timed(
            "the same without the trust checks",
            lambda: run_audit(
                from_dict(raw | {"trust": {"enabled": False}}),
                root / "b",
                echo=lambda _: None,
                options=quiet,
            ),
        )
        print(f"trust checks add {100 * (with_trust / without - 1):.0f}% to the audit")
        if args.skip_mitigations:
            return
        base = None
        for mitigation in MITIGATIONS:
            model = {"name": "m", "train_split": "train_biased", "mitigation": mitigation}
            config = raw | {"model": [model], "trust": {"enabled": False}}
            seconds = timed(
                f"train + audit one model, mitigation {mitigation}",
                lambda c=config, m=mitigation: run_audit(
                    from_dict(c), root / m, echo=lambda _: None, options=quiet
                ),
            )
            base = base or seconds
            print(f"  relative to plain training: {seconds / base:.2f}x")


if __name__ == "__main__":
    main()
