"""The `audit` command line: data, train, run, demo, check, report, explain."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from audit.cli_errors import EXIT_BAD_INPUT, EXIT_GATES_FAILED, BadInput, user_errors  # noqa: F401
from audit.cli_import import import_


class FullHelpGroup(click.Group):
    """A group whose command list shows each command's whole first paragraph, wrapped.

    Click cuts a command's short help to fit one line ("... exit 0 if all pass, 1 if...");
    here it is wrapped over as many lines as it needs instead.
    """

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is None or command.hidden:
                continue
            text = command.short_help or (command.help or "").split("\f")[0].split("\n\n")[0]
            rows.append((name, " ".join(text.split())))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(
    cls=FullHelpGroup,
    context_settings={
        "help_option_names": ["-h", "--help"],
        "show_default": True,
        "max_content_width": 100,
    },
)
@click.version_option(package_name="audit")
def main() -> None:
    """Bias audits of image classifiers with CAM, Grad-CAM and Guided Grad-CAM."""


# -- data -------------------------------------------------------------------------------------
@main.group(cls=FullHelpGroup)
def data() -> None:
    """Generate the reference data set, import a data set, or validate a manifest."""


data.add_command(import_)


@data.command("doctor-nurse")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("datasets/doctor_nurse"),
    help="Folder to write.",
)
@click.option(
    "--seed", type=int, default=0, help="Random seed: the same seed gives byte-identical files."
)
@click.option(
    "--image-size", type=click.IntRange(32, 512), default=64, help="Image side in pixels."
)
@click.option(
    "--n-train", type=click.IntRange(4), default=1600, help="Images in each training split."
)
@click.option("--n-val", type=click.IntRange(4), default=400, help="Images in the val split.")
@click.option(
    "--n-test",
    type=click.IntRange(4),
    default=800,
    help="Images in the test split (each with a twin).",
)
@click.option(
    "--doctor-male",
    type=click.FloatRange(0, 1),
    default=0.78,
    help="Share of doctors who are men in train_biased.",
)
@click.option(
    "--nurse-female",
    type=click.FloatRange(0, 1),
    default=0.93,
    help="Share of nurses who are women in train_biased.",
)
@click.option(
    "--doctor-old",
    type=click.FloatRange(0, 1),
    default=0.7,
    help="Share of doctors who are old in train_biased (each sex alike).",
)
@click.option(
    "--nurse-young",
    type=click.FloatRange(0, 1),
    default=0.7,
    help="Share of nurses who are young in train_biased (each sex alike).",
)
@click.option(
    "--mark-class",
    type=click.Choice(["", "doctor", "nurse"]),
    default="",
    help="Add a hidden shortcut: a corner mark on this class's images, named by no column "
    "(split train_marked; which images carry it: hidden_mark.csv).",
)
@click.option(
    "--mark-train",
    type=click.FloatRange(0, 1),
    default=0.95,
    help="Share of the mark class's train_marked images with the mark.",
)
@click.option(
    "--mark-test",
    type=click.FloatRange(0, 1),
    default=0.5,
    help="Share of the mark class's val and test images with the mark.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def data_doctor_nurse(out: Path, overwrite: bool, quiet: bool, **spec: Any) -> None:
    """Generate the doctor/nurse data set with exact region masks and counterfactual twins."""
    from audit.data.doctor_nurse import DoctorNurseSpec, generate

    manifest = generate(DoctorNurseSpec(**spec), out, overwrite=overwrite, progress=not quiet)
    click.echo(f"wrote {manifest}")


@data.command("validate")
@click.argument("manifest", type=click.Path(path_type=Path))
def data_validate(manifest: Path) -> None:
    """Check a manifest and print every problem, one per line (exit 1 if any, 2 if no file)."""
    from audit.data.manifest import validate

    if manifest.is_dir():
        raise BadInput(
            f"{manifest} is a folder; give the manifest file (e.g. {manifest}/manifest.csv)"
        )
    if not manifest.is_file():
        raise BadInput(f"manifest not found: {manifest}")
    problems = validate(manifest)
    for problem in problems:
        click.echo(f"{manifest}: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{manifest}: ok")


# -- train ------------------------------------------------------------------------------------
@main.command()
@click.option(
    "--manifest",
    type=click.Path(path_type=Path),
    required=True,
    help="manifest.csv of the data set.",
)
@click.option("--split", default="train_biased", help="Split to train on.")
@click.option("--val-split", default="val", help="Split for validation accuracy ('' for none).")
@click.option("--arch", default="small_cnn", help="small_cnn or a torchvision classifier name.")
@click.option("--epochs", type=click.IntRange(1), default=10)
@click.option("--batch-size", type=click.IntRange(1), default=64)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=3e-3)
@click.option("--image-size", type=click.IntRange(8), default=64)
@click.option("--seed", type=int, default=0)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Checkpoint to write (a state dict).",
)
@user_errors
def train(
    manifest: Path,
    split: str,
    val_split: str,
    arch: str,
    epochs: int,
    batch_size: int,
    lr: float,
    image_size: int,
    seed: int,
    out: Path,
) -> None:
    """Train one classifier on a manifest split and save its checkpoint."""
    import torch

    from audit.config import ModelConfig
    from audit.data.manifest import read_manifest
    from audit.models.io import save_checkpoint
    from audit.models.sources import prepare_model
    from audit.models.train import TrainConfig, train_model
    from audit.pipeline.frames import FrameDataset

    m = read_manifest(manifest)
    classes = sorted(set(m.table["label"]))
    spec = ModelConfig(name="model", arch=arch, train_split=split, epochs=epochs)
    torch.manual_seed(seed)
    prepared = prepare_model(spec, classes, base_dir=Path("."), image_size=image_size)
    for message in prepared.messages:
        click.echo(message)
    groups = sorted(set(m.table["group"]) - {""})

    def frames(rows: Any) -> FrameDataset:
        return FrameDataset(m, rows, classes, prepared.preprocess, groups=groups)

    train_rows = m.split(split)
    val = frames(m.split(val_split)) if val_split else None
    model = prepared.model
    with prepared.preprocess.attach(model):
        history = train_model(
            model, frames(train_rows), TrainConfig(epochs, batch_size, lr, seed=seed), val=val
        )
    save_checkpoint(
        model,
        out,
        arch=arch,
        classes=classes,
        meta={
            "split": split,
            "epochs": epochs,
            "seed": seed,
            "history": history.loss,
            "preprocess": prepared.preprocess.to_dict(),
        },
    )
    click.echo(f"wrote {out} (classes {classes}; final loss {history.loss[-1]:.4f})")


# -- run / demo -------------------------------------------------------------------------------
def _report_gates(run_dir: Path) -> int:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    failed = [g for g in metrics["gates"] if not g["passed"]]
    for name, verdict in metrics["verdicts"].items():
        click.echo(f"verdict: {name}: {verdict.upper()}")
    return len(failed)


def run_options(func: Callable) -> Callable:
    """Options of `audit run` and `audit demo` that say how to run, never what is computed."""
    options = [
        click.option(
            "--device",
            default="auto",
            help="auto (a GPU when there is one), cpu, cuda or cuda:N.",
        ),
        click.option(
            "--workers",
            type=click.IntRange(0),
            default=None,
            help="DataLoader worker processes decoding images [default: one per two cores, <= 4].",
        ),
        click.option(
            "--ray",
            "ray_address",
            is_flag=False,
            flag_value="local",
            default=None,
            metavar="[ADDRESS]",
            help="Run the map stage on Ray: alone, a local Ray; with ADDRESS (e.g. "
            "ray://head:10001 or auto), an existing cluster.",
        ),
        click.option(
            "--precision",
            type=click.Choice(["fp32", "bf16"]),
            default="fp32",
            help="bf16: bfloat16 autocast for the map (GPUs), used only where it predicts the "
            "first batches exactly as fp32 does.",
        ),
        click.option(
            "--resume", is_flag=True, help="Continue an interrupted run of the same --out."
        ),
        click.option(
            "--force",
            is_flag=True,
            help="Replace an earlier run in --out (only the files the audit wrote are removed).",
        ),
        click.option(
            "--skip-bad-images",
            is_flag=True,
            help="Skip images that fail to decode (counted in the report) instead of stopping.",
        ),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _options(render: bool, **kwargs: Any) -> Any:
    from audit.runner import RunOptions

    quiet = kwargs.pop("quiet")
    return RunOptions(
        device=kwargs.pop("device"),
        workers=kwargs.pop("workers"),
        ray=kwargs.pop("ray_address"),
        resume=kwargs.pop("resume"),
        force=kwargs.pop("force"),
        skip_bad_images=kwargs.pop("skip_bad_images"),
        precision=kwargs.pop("precision"),
        progress=not quiet,
        render=render,
    )


def _run(spec: Any, out: Path, options: Any) -> Path:
    """Run an audit; an interruption ends with one line saying how to resume, exit 130 (Ctrl-C)
    or 143 (SIGTERM)."""
    from audit.api import run as run_api
    from audit.pipeline.rundir import RunInterrupted

    try:
        return run_api(spec, out=out, options=options, echo=click.echo).folder
    except RunInterrupted as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Run folder [default: reports/<config name>].",
)
@click.option(
    "--fail-on-gates", is_flag=True, help="Exit 1 when a gate fails (as `audit check` does)."
)
@click.option(
    "--no-report", is_flag=True, help="Skip the HTML/PDF report (render later with `audit report`)."
)
@run_options
@user_errors
def run(config: Path, out: Path | None, fail_on_gates: bool, no_report: bool, **how: Any) -> None:
    """Run the audit described by a TOML CONFIG into a run folder."""
    from audit.config import load_config

    spec = load_config(config)
    out = out or Path("reports") / config.stem
    run_dir = _run(spec, out, _options(not no_report, **how))
    click.echo(f"run folder: {run_dir}")
    if _report_gates(run_dir) and fail_on_gates:
        sys.exit(EXIT_GATES_FAILED)


def demo_config(manifest: Path, seed: int) -> dict[str, Any]:
    """The demo audit: a model trained on train_biased against one trained on train_balanced."""
    return {
        "seed": seed,
        "title": "Doctor/nurse bias audit (Grad-CAM paper's experiment, generated data)",
        "data": {
            "manifest": str(manifest),
            "protected_regions": ["hair", "face"],
            "core_regions": ["stethoscope", "badge"],
        },
        "model": [
            {"name": "biased", "arch": "small_cnn", "train_split": "train_biased", "epochs": 10},
            {
                "name": "unbiased",
                "arch": "small_cnn",
                "train_split": "train_balanced",
                "epochs": 10,
            },
        ],
        "explain": {"methods": ["gradcam", "guided_gradcam"], "samples_per_cell": 6},
        # Half the default trust sample: the demo's finding is clear on 128 images, and the checks
        # are a third of its time on two cores (README, "make demo").
        "trust": {"samples": 128, "faithfulness_samples": 32},
    }


@main.command()
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("reports/demo"), help="Run folder."
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path),
    default=Path("datasets/doctor_nurse"),
    help="Data set folder (generated if missing).",
)
@click.option("--seed", type=int, default=0)
@run_options
@user_errors
def demo(out: Path, data_dir: Path, seed: int, **how: Any) -> None:
    """Generate the doctor/nurse set if missing and audit a biased model against an unbiased one.

    A re-run replaces the demo's own earlier run folder (only the files the audit wrote).
    """
    from audit.config import from_dict
    from audit.data.doctor_nurse import DoctorNurseSpec, generate
    from audit.pipeline.rundir import written_files

    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        click.echo(f"generating the doctor/nurse data set in {data_dir}")
        generate(
            DoctorNurseSpec(seed=0),
            data_dir,
            overwrite=data_dir.exists() and not any(data_dir.iterdir()),
            progress=not how["quiet"],
        )
    config = from_dict(demo_config(manifest, seed))
    options = _options(True, **how)
    options.force = options.force or written_files(out) is not None
    options.parallel_models = True  # two small CNNs: one process of one thread each is faster
    run_dir = _run(config, out, options)
    click.echo(
        f"run folder: {run_dir}\nreport: {run_dir / 'report.html'} and {run_dir / 'report.pdf'}"
    )
    _report_gates(run_dir)


# -- check / report / explain -----------------------------------------------------------------
@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--junit",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write the gates as JUnit XML (one test case per model x gate) for CI.",
)
def check(run_dir: Path, junit: Path | None) -> None:
    """Re-apply the gates to a finished run: exit 0 if all pass, 1 if one fails, 2 on bad input."""
    from audit.metrics.gates import evaluate_gates
    from audit.metrics.validity import STATUS_ORDER, apply_to_gates
    from audit.report.junit import write_junit
    from audit.report.words import gate_figure, threshold_text

    if not run_dir.exists():
        raise BadInput(f"{run_dir} is not a finished audit run: folder not found")
    if not run_dir.is_dir():
        raise BadInput(f"{run_dir} is not a finished audit run: not a folder")
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        config = json.loads((run_dir / "config.json").read_text())
        rows = evaluate_gates(metrics, config.get("gates", {}))
        rows = apply_to_gates(rows, (metrics.get("validity") or {}).get("findings") or [])
    except FileNotFoundError as error:
        raise BadInput(
            f"{run_dir} is not a finished audit run: {Path(error.filename).name} is missing"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise BadInput(f"{run_dir}: unreadable run files: {error}") from None
    failed = 0
    for row in rows:
        status = "PASS" if row["passed"] else "FAIL"
        status = row["status"].upper() if row.get("status") in STATUS_ORDER else status
        source = " (default)" if row.get("source") == "default" else ""
        click.echo(  # the report's units: percent for shares and accuracies, points for gaps
            f"{status} {row['model']}: {row['label']} = {gate_figure(row, interval=False)} "
            f"(must be {row['op']} {threshold_text(row)}{source})"
        )
        failed += not row["passed"]
    if not rows:
        click.echo("no gates configured")
    if junit is not None:
        try:
            write_junit(rows, junit)
        except OSError as error:
            raise BadInput(f"--junit {junit}: cannot write: {error.strerror or error}") from None
        click.echo(f"wrote {junit}")
    sys.exit(EXIT_GATES_FAILED if failed else 0)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--no-pdf", is_flag=True, help="Only the HTML page.")
@user_errors
def report(run_dir: Path, no_pdf: bool) -> None:
    """Render report.html and report.pdf again from a finished run, without recomputing.

    It holds the run folder's lock, as a run does: never two writers of the same report."""
    from audit.pipeline.rundir import run_lock
    from audit.report.render import load_run, render_report

    with run_lock(run_dir, named="RUN_DIR"):
        load_run(run_dir)
        render_report(run_dir, pdf=not no_pdf, echo=click.echo)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    required=True,
    help="Model checkpoint: a state dict (read with weights_only).",
)
@click.option("--arch", default="small_cnn", help="Architecture of the checkpoint.")
@click.option("--classes", required=True, help="Comma-separated class names, in the model's order.")
@click.option(
    "--method",
    "methods",
    multiple=True,
    default=["gradcam"],
    help="Method(s): cam, gradcam, gradcam++, saliency, guided_backprop, guided_gradcam.",
)
@click.option("--layer", default=None, help="Layer name (default: the last conv feature map).")
@click.option("--image-size", type=click.IntRange(8), default=64)
@click.option(
    "--trust",
    is_flag=True,
    help="Allow a pickled whole-model checkpoint (runs code from the file).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("reports/explain"),
    help="Folder for predictions.csv and one overlay folder per image; nothing is written outside it.",
)
@user_errors
def explain(
    images: tuple[Path, ...],
    checkpoint: Path,
    arch: str,
    classes: str,
    methods: tuple[str, ...],
    layer: str | None,
    image_size: int,
    trust: bool,
    out: Path,
) -> None:
    """Explain a model's predictions on image files; write overlay PNGs and a CSV into --out.

    OUT/predictions.csv lists each image with its prediction; OUT/<name>/image.png is the input
    and OUT/<name>/<method>.png its map, <name> being the file's stem (-2, -3, ... if repeated).
    """
    import pandas as pd
    import torch

    from audit.config import ModelConfig
    from audit.explain import METHODS, explain_many
    from audit.models.sources import prepare_model
    from audit.models.zoo import default_layer
    from audit.report.explain_out import overlay_names, save_explanations

    names = [c.strip() for c in classes.split(",") if c.strip()]
    for method in methods:
        if method not in METHODS:
            raise BadInput(f"--method: unknown method {method!r}; choose from {', '.join(METHODS)}")
    raw = [_read_input_image(path) for path in images]  # before anything heavy
    spec = ModelConfig(name="model", arch=arch, checkpoint=str(checkpoint), trust=trust)
    prepared = prepare_model(spec, names, base_dir=Path("."), image_size=image_size)
    model, preprocess = prepared.model, prepared.preprocess
    x = torch.stack([preprocess.geometry(image).float() / 255 for image in raw])
    try:
        with preprocess.attach(model):
            result = explain_many(
                model, x, methods, {"pred": None}, layer=layer or default_layer(arch)
            )
    except ValueError as error:  # the engine's checks of the user's layer and model
        raise BadInput(" ".join(str(error).split())) from None
    folders = overlay_names(images)
    save_explanations(out, x, result, folders)
    probs = result.probs
    table = pd.DataFrame(
        {
            "image": [str(p) for p in images],
            "folder": folders,
            "prediction": [names[i] for i in result.predictions.tolist()],
            "confidence": probs.max(1).values.numpy().round(6),
        }
    )
    table.to_csv(out / "predictions.csv", index=False)
    click.echo(table.to_string(index=False))
    click.echo(f"overlays in {out}")


def _read_input_image(path: Path) -> Any:
    """One input of `audit explain` as a (3, H, W) uint8 tensor; BadInput naming the file
    when it is missing, not a file, or not a decodable image."""
    from PIL import Image

    from audit.data.images import read_rgb

    if not path.exists():
        raise BadInput(f"{path}: file not found")
    if not path.is_file():
        raise BadInput(f"{path}: not a file")
    try:
        return read_rgb(str(path))
    except (OSError, RuntimeError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BadInput(f"{path}: not a readable image: {reason}") from None
