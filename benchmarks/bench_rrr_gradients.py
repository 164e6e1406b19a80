"""Why Right for the Right Reasons hurts on doctor/nurse: where a model's input gradient lies and
how much the model still depends on the masked regions, plain training against RRR.

For one seed, the built-in SmallCNN is trained on `train_biased` (20 epochs, as in
bench_mitigations.py) plainly and with `mitigation = "right_reasons"` at each `--lambdas` value
(no selection: the last epoch, so that the penalty's effect is seen whole). On the first
`--images` test images each model gets:

- the mean squared input gradient per pixel (the gradient of the logit difference, summed over
  the colour channels) on hair + face (the mask RRR penalises), on the job cue (stethoscope,
  badge) and on the rest of the image: where the model is locally sensitive;
- the occlusion effect of hair + face (mean fill, against a same-shaped control, the audit's
  `region_occlusion`): how much the prediction depends on those pixels when they are removed,
  not only nudged;
- test accuracy and the worst class x sex cell.

    .venv/bin/audit data doctor-nurse --out /tmp/dn95 --doctor-male 0.95 --nurse-female 0.95
    nice .venv/bin/python benchmarks/bench_rrr_gradients.py /tmp/dn95/manifest.csv --seed 0
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_mitigations import evaluate, load  # benchmarks/, beside this script

from audit.data.manifest import read_manifest
from audit.models.mitigations import MitigationConfig
from audit.models.train import TrainConfig, train_model
from audit.models.zoo import SmallCNN


def gradient_energy(
    model: torch.nn.Module, images: torch.Tensor, regions: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Mean squared input gradient of the logit difference per pixel, in each region (N, H, W)."""
    model.eval()
    x = images.clone().requires_grad_(True)
    logits = model(x)
    (grads,) = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), x)
    energy = grads.pow(2).sum(1)
    return {name: float(energy[mask].mean()) for name, mask in regions.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("manifest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[1.0])
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    manifest = read_manifest(args.manifest)
    classes = sorted(set(manifest.table["label"]))
    groups = sorted(set(manifest.table["group"]) - {""})
    train, _ = load(args.manifest, "train_biased", groups, classes, 64)
    val, _ = load(args.manifest, "val", groups, classes, 64)
    test, core = load(args.manifest, "test", groups, classes, 64)
    n = args.images
    protected = test.protected[:n]
    regions = {"hair + face": protected, "job cue": core[:n], "rest": ~(protected | core[:n])}
    for lam in [0.0, *args.lambdas]:
        torch.manual_seed(args.seed)
        model = SmallCNN(num_classes=2)
        mitigation = (
            MitigationConfig("right_reasons", rrr_lambda=lam) if lam else MitigationConfig()
        )
        config = TrainConfig(epochs=args.epochs, seed=args.seed, mitigation=mitigation)
        started = time.process_time()
        train_model(model, train, config, val=val, progress=False)
        seconds = time.process_time() - started
        energy = gradient_energy(model, test.images[:n], regions)
        result = evaluate(model, test, core, (classes, groups))
        name = "plain" if lam == 0.0 else f"RRR lambda {lam:g}"
        shown = ", ".join(f"{k} {v:.2e}" for k, v in energy.items())
        ratio = energy["job cue"] / energy["hair + face"]
        print(
            f"{name} (seed {args.seed}, {seconds:.0f} CPU s): accuracy {result['accuracy']:.3f}, "
            f"worst {result['worst_cell']} {result['worst_cell_accuracy']:.3f}; mean squared "
            f"input gradient per pixel: {shown} (job cue / hair + face {ratio:.1f}); "
            f"hair + face occlusion effect {result['occlusion_effect']:+.3f}; Grad-CAM share on "
            f"hair + face {result['protected_share']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
