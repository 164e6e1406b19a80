"""Speed of the attribution engine against one forward pass and the public libraries.

Run: `.venv/bin/python benchmarks/bench_explain.py [--repeats N] [--quick]`. Methods are timed
interleaved (round-robin) so that machine noise hits each alike; medians are printed, with
images/second, the ratio to one inference forward (the floor), the ratio to each library, and the
per-image Pearson correlation of each library's Grad-CAM with this engine's.
Libraries (pytorch-grad-cam, captum, torchcam) are used when installed: `pip install -e '.[bench]'`.
The ViT and Swin rows (timm, random weights, 224 x 224) explain the engine's default layer, which
it finds and reads (tokens, prefix tokens, patch grid) by itself; pytorch-grad-cam is given the
reshape_transform its documentation prescribes. `--only transformers` runs just those rows.

`--boxes` times instead the CAM boxes' largest-component step (audit.explain.boxes) on the CPU:
the scipy labelling the audit uses there against the torch labelling it uses on a GPU, on 128
bilinearly upsampled random maps at 64 and 224 px thresholded at 20% of their max (CPU seconds,
medians).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision

from audit.explain import explain, explain_many
from audit.explain.boxes import _largest_component_scipy, _largest_component_torch
from audit.models.zoo import SmallCNN


def _per_image_correlation(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    norms = a.norm(dim=1) * b.norm(dim=1)
    corr = torch.where(norms > 0, (a * b).sum(1) / norms, torch.nan)  # NaN for an all-zero map
    valid = corr[~corr.isnan()]
    if valid.numel() == 0:  # every map constant (random weights can give all-zero Grad-CAMs)
        return float("nan"), float("nan")
    return float(valid.median()), float(valid.min())


def library_runners(  # noqa: ANN001
    model, layer, x, targets, reshape=None, maps_only=False
) -> dict[str, Callable[[], torch.Tensor]]:
    """Each installed library's Grad-CAM. `reshape` is the reshape_transform pytorch-grad-cam needs
    for tokens / channels-last layers; `maps_only` skips captum and torchcam, which take the
    layer output as (N, C, h, w) and have no such hook (on tokens their maps would be wrong)."""
    runners: dict[str, Callable[[], torch.Tensor]] = {}
    size = x.shape[2:]
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        def pgc() -> torch.Tensor:
            with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
                out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
            model.zero_grad(set_to_none=True)
            return torch.from_numpy(out)

        runners["pytorch-grad-cam GradCAM"] = pgc
    except ImportError:
        pass
    if maps_only:
        return runners
    try:
        from captum.attr import GuidedGradCam, LayerAttribution, LayerGradCam

        def captum_gc() -> torch.Tensor:
            attr = LayerGradCam(model, layer).attribute(x, target=targets, relu_attributions=True)
            return LayerAttribution.interpolate(attr, size, "bilinear")[:, 0].detach()

        def captum_ggc() -> torch.Tensor:
            return GuidedGradCam(model, layer).attribute(x, target=targets).detach()

        runners["captum LayerGradCam"] = captum_gc
        runners["captum GuidedGradCam"] = captum_ggc
    except ImportError:
        pass
    try:
        from torchcam.methods import GradCAM as TorchcamGradCAM

        def torchcam_gc() -> torch.Tensor:
            with TorchcamGradCAM(model, target_layer=layer) as extractor:
                scores = model(x)
                maps = extractor(targets.tolist(), scores)[0]
            return F.interpolate(maps[:, None], size=size, mode="bilinear")[:, 0].detach()

        runners["torchcam GradCAM"] = torchcam_gc
    except ImportError:
        pass
    return runners


def bench(
    name: str,
    model: torch.nn.Module,
    layer_name: str,
    x: torch.Tensor,
    repeats: int,
    gap: bool,
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Time the engine against one forward and the libraries; `reshape` is only for the libraries
    (the engine reads tokens and channels-last maps by itself)."""
    model.eval()
    layer = dict(model.named_modules())[layer_name]
    with torch.no_grad():
        preds = model(x).argmax(1)
    true = (preds + 1) % 2  # a second target set, as "true class" of misclassified images
    bundle_methods = ["gradcam", "gradcam++"] + (["cam"] if gap else [])

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def forward_backward() -> None:
        logits = model(x.clone().requires_grad_(True))
        logits.gather(1, preds[:, None]).sum().backward()
        model.zero_grad(set_to_none=True)

    ours = {
        "inference forward (floor)": forward,
        "forward + full backward": forward_backward,
        "audit gradcam": lambda: explain(model, x, "gradcam", layer=layer_name),
        "audit guided_gradcam": lambda: explain(model, x, "guided_gradcam", layer=layer_name),
        f"audit bundle ({'+'.join(bundle_methods)}) x (pred, true)": lambda: explain_many(
            model, x, bundle_methods, {"pred": None, "true": true}, layer=layer_name
        ),
    }
    libs = library_runners(model, layer, x, preds, reshape, maps_only=reshape is not None)
    runs = {**ours, **libs}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(repeats):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    floor = median["inference forward (floor)"]
    fb = median["forward + full backward"]
    print(
        f"\n## {name}: batch {x.shape[0]}, {x.shape[2]}x{x.shape[3]}, layer {layer_name}, {repeats} repeats, {torch.get_num_threads()} threads"
    )
    print("| what | median s | images/s | x floor | x fwd+bwd |")
    print("|---|---:|---:|---:|---:|")
    for key, value in median.items():
        print(
            f"| {key} | {value:.3f} | {x.shape[0] / value:.0f} | {value / floor:.2f} | {value / fb:.2f} |"
        )
    layout = explain_many(model, x[:1], ["gradcam"], layer=layer_name).layout
    print(f"- layer output read as: {layout.describe()}")
    if reshape is not None:
        print("- captum / torchcam: not run (no reshape of tokens or channels-last maps)")
    reference = explain(model, x, "gradcam", layer=layer_name, targets=preds)
    ggc_ref = explain(model, x, "guided_gradcam", layer=layer_name, targets=preds)
    for key, fn in libs.items():
        ours_key = "audit guided_gradcam" if "Guided" in key else "audit gradcam"
        other = fn()
        corr = _per_image_correlation(
            ggc_ref if "Guided" in key else reference, other.reshape(len(x), -1)
        )
        print(
            f"- {key}: audit is {median[key] / median[ours_key]:.2f}x faster; per-image Pearson "
            f"correlation with audit's map: median {corr[0]:.4f}, lowest {corr[1]:.4f}"
        )


def vit_reshape(prefix: int, height: int, width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """pytorch-grad-cam's documented ViT reshape_transform (drop prefix tokens, grid, NCHW)."""

    def transform(tensor: torch.Tensor) -> torch.Tensor:
        result = tensor[:, prefix:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    return transform


def bench_transformers(names: list[str], repeats: int, batch: int) -> None:
    """timm ViT and Swin rows (random weights, 224 x 224): the engine's default layer, found and
    read by itself; pytorch-grad-cam gets its documented reshape_transform."""
    import timm

    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
        x = torch.rand(batch, 3, 224, 224)
        layer = explain_many(model, x[:1], ["gradcam"]).layer
        if name.startswith("swin"):
            reshape = vit_reshape(0, 7, 7)  # = swinT_reshape_transform at 224
        else:
            reshape = vit_reshape(model.num_prefix_tokens, 14, 14)
        bench(name, model, layer, x, repeats, gap=False, reshape=reshape)


def bench_boxes(repeats: int) -> None:
    """CPU seconds of the two largest-component labellings on the same masks; they must agree."""
    for size in (64, 224):
        small = torch.rand(128, 1, size // 4, size // 4)
        maps = F.interpolate(small, size=(size, size), mode="bilinear")[:, 0]
        masks = maps >= 0.2 * maps.flatten(1).amax(1).view(-1, 1, 1)
        times: dict[str, list[float]] = {"scipy": [], "torch": []}
        for _ in range(repeats):
            for name, label in (
                ("scipy", _largest_component_scipy),
                ("torch", _largest_component_torch),
            ):
                started = time.process_time()
                kept = label(masks)
                times[name].append(time.process_time() - started)
            assert torch.equal(kept, _largest_component_scipy(masks))
        scipy_s, torch_s = (statistics.median(times[k]) for k in ("scipy", "torch"))
        print(
            f"{size} px, 128 masks: scipy {scipy_s:.4f} s, torch {torch_s:.4f} s ({torch_s / scipy_s:.0f}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small CNN only")
    parser.add_argument(
        "--only",
        choices=["cnn", "transformers"],
        help="only the CNN rows (small_cnn, resnet18) or only the ViT / Swin rows",
    )
    parser.add_argument("--batch", type=int, default=16, help="batch of the ViT / Swin rows")
    parser.add_argument("--boxes", action="store_true", help="only the CAM boxes' labelling")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.boxes:
        bench_boxes(args.repeats)
        return
    if args.only != "transformers":
        small = SmallCNN(num_classes=2)
        bench(
            "small_cnn (the audit's GAP CNN)",
            small,
            "features",
            torch.rand(64, 3, 64, 64),
            args.repeats * 4,
            gap=True,
        )
    if args.quick:
        return
    if args.only != "transformers":
        resnet = torchvision.models.resnet18(num_classes=1000)
        bench("resnet18", resnet, "layer4", torch.rand(32, 3, 224, 224), args.repeats, gap=True)
    if args.only != "cnn":
        bench_transformers(
            ["vit_tiny_patch16_224", "vit_small_patch16_224", "swin_tiny_patch4_window7_224"],
            args.repeats,
            args.batch,
        )


if __name__ == "__main__":
    main()
