"""Wall-clock time of the data generator and of `audit demo` from scratch, on this machine.

Run: `.venv/bin/python benchmarks/bench_pipeline.py`. Everything goes to a temporary folder.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from click.testing import CliRunner

from audit.cli import main as cli
from audit.data.doctor_nurse import DoctorNurseSpec, generate


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        generate(DoctorNurseSpec(), root / "data_only", progress=False)
        generation = time.perf_counter() - start
        start = time.perf_counter()
        result = CliRunner().invoke(
            cli, ["demo", "--out", str(root / "run"), "--data", str(root / "data"), "--quiet"]
        )
        demo = time.perf_counter() - start
        assert result.exit_code == 0, result.output
        html = (root / "run" / "report.html").stat().st_size / 1e6
        pdf = (root / "run" / "report.pdf").stat().st_size / 1e6
    print(f"cores: {os.cpu_count()}")
    print(f"doctor/nurse generation (default, 4,400 images + masks + twins): {generation:.1f} s")
    print(
        f"audit demo from scratch (generation, 2 trainings, explanations, report, PDF): {demo:.1f} s"
    )
    print(f"report.html {html:.1f} MB, report.pdf {pdf:.1f} MB")


if __name__ == "__main__":
    main()
