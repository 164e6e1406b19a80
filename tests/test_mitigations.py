"""Mitigations against hand-computed cases: Group DRO's update, the samplers' weights, JTT, the
right-reasons penalty on a linear softmax model, the Grad-CAM penalty and the config checks."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import WeightedRandomSampler

from audit.explain import explain
from audit.models.mitigations import (
    MITIGATIONS,
    GroupDRO,
    MitigationConfig,
    MitigationError,
    balanced_weights,
    capture_layer,
    compact_cells,
    differentiable_gradcam,
    gradcam_share_penalty,
    jtt_weights,
    rrr_penalty,
)
from audit.models.train import TensorDictDataset, TrainConfig, predict_logits, train_model
from tests.test_train import tiny_model, toy


# -- Group DRO ------------------------------------------------------------------------------------
def test_group_dro_update_on_two_groups_matches_the_formula() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0, 0.5], requires_grad=True)
    groups = torch.tensor([0, 0, 1, 1])
    dro = GroupDRO(2, eta=0.1)
    loss = dro.loss(losses, groups)
    l0, l1 = 1.5, 1.75  # group means
    e0, e1 = 0.5 * math.exp(0.1 * l0), 0.5 * math.exp(0.1 * l1)
    q = [e0 / (e0 + e1), e1 / (e0 + e1)]
    assert dro.q.tolist() == pytest.approx(q, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(q[0] * l0 + q[1] * l1, rel=1e-6)
    loss.backward()  # d loss / d loss_i = q_g / n_g; q itself is not differentiated
    assert losses.grad.tolist() == pytest.approx([q[0] / 2, q[0] / 2, q[1] / 2, q[1] / 2])
    # second step: q multiplies on; a group absent from the batch has loss 0
    dro.loss(torch.tensor([2.0]), torch.tensor([1]))
    f0, f1 = q[0], q[1] * math.exp(0.1 * 2.0)
    assert dro.q.tolist() == pytest.approx([f0 / (f0 + f1), f1 / (f0 + f1)], rel=1e-6)


def test_compact_cells_number_only_the_cells_that_occur() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1])
    groups = torch.tensor([0, 1, 1, 1, 1])
    cells, count = compact_cells(labels, groups)
    assert cells.tolist() == [0, 1, 2, 2, 2] and count == 3  # cell (1, 0) is empty


# -- samplers ------------------------------------------------------------------------------------
def test_balanced_weights_are_inverse_cell_counts_and_balance_the_draws() -> None:
    cells = torch.tensor([0, 0, 0, 1, 2, 2])
    weights = balanced_weights(cells)
    assert weights.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0, 0.5, 0.5])
    sampler = WeightedRandomSampler(weights, 30000, generator=torch.Generator().manual_seed(0))
    drawn = torch.bincount(cells[torch.tensor(list(sampler))], minlength=3) / 30000
    assert drawn.tolist() == pytest.approx([1 / 3] * 3, abs=0.02)


def test_jtt_upweights_the_errors() -> None:
    weights = jtt_weights(torch.tensor([0, 1, 1, 0, 1]), torch.tensor([0, 0, 1, 1, 1]), 20)
    assert weights.tolist() == [1.0, 20.0, 1.0, 20.0, 1.0]


@pytest.mark.slow
def test_jtt_flags_the_first_models_errors_and_restarts_from_the_same_weights() -> None:
    data = toy(64)
    data.labels[::5] = 1 - data.labels[::5]  # label noise, so the first model makes errors
    model = tiny_model()
    initial = copy.deepcopy(model)
    mitigation = MitigationConfig("jtt", jtt_epochs=1, jtt_upweight=30)
    config = TrainConfig(epochs=1, batch_size=16, seed=1, mitigation=mitigation)
    history = train_model(model, data, config, progress=False)
    first = copy.deepcopy(initial)  # the identification model, recomputed independently
    train_model(first, data, TrainConfig(epochs=1, batch_size=16, seed=1), progress=False)
    errors = predict_logits(first, data.images).argmax(1) != data.labels
    assert history.jtt_errors == int(errors.sum()) > 0
    assert history.jtt_first is not None and len(history.jtt_first.loss) == 1
    # the final model started again from the initial weights, trained differently from `first`
    assert not torch.equal(model.fc.weight, first.fc.weight)


# -- Right for the Right Reasons -----------------------------------------------------------------
def test_rrr_penalty_on_a_linear_softmax_model_matches_the_hand_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    n, d, k = 3, 6, 4
    weight = torch.randn(k, d, generator=g, dtype=torch.float64)
    bias = torch.randn(k, generator=g, dtype=torch.float64)
    x = torch.randn(n, 1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    masks = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool).expand(n, 2, 3).clone()
    masks[2] = False
    log_probs = F.log_softmax(x.flatten(1) @ weight.T + bias, dim=1)
    penalty = rrr_penalty(log_probs, x, masks)
    # by hand: d/dx sum_k log p_k = sum_k W_k - K * sum_j p_j W_j
    W, b, X = weight.numpy(), bias.numpy(), x.detach().flatten(1).numpy()
    z = X @ W.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = W.sum(0)[None] - k * p @ W
    m = masks.flatten(1).numpy()
    expected = ((m * grad) ** 2).sum(1).mean()
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-10)
    assert float(penalty.detach()) > 0


def test_rrr_penalty_is_differentiable_in_the_weights() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, generator=g, dtype=torch.float64)
    masks = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)

    def penalty(weight: torch.Tensor) -> torch.Tensor:
        inputs = x.clone().requires_grad_(True)
        return rrr_penalty(F.log_softmax(inputs @ weight.T, dim=1), inputs, masks)

    weight = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(penalty, (weight,))


# -- the Grad-CAM penalty ------------------------------------------------------------------------
def test_gradcam_share_penalty_by_hand() -> None:
    maps = torch.tensor([[[1.0, 3.0], [0.0, 4.0]], [[2.0, 2.0], [0.0, 0.0]]])
    inside = torch.tensor([[[1, 0], [0, 1]], [[0, 0], [1, 1]]], dtype=torch.bool)
    assert float(gradcam_share_penalty(maps, inside)) == pytest.approx((5 / 8 + 0) / 2)
    assert float(gradcam_share_penalty(maps, torch.zeros_like(inside))) == 0.0
    assert float(gradcam_share_penalty(torch.zeros_like(maps), inside)) == 0.0  # zero map: no NaN


def test_differentiable_gradcam_equals_the_audit_engine_and_trains() -> None:
    data, model = toy(6), tiny_model()
    model.eval()
    x, y = data.images, data.labels
    with capture_layer(model.features) as store:
        logits = model(x)
    maps = differentiable_gradcam(store["activation"], logits.gather(1, y[:, None])[:, 0], (16, 16))
    reference = explain(model, x, "gradcam", layer="features", targets=y)
    torch.testing.assert_close(maps.detach(), reference, rtol=1e-4, atol=1e-6)
    # the penalty is 0 with empty masks, positive where the mass sits in the mask, and has gradients
    empty = torch.zeros(6, 16, 16, dtype=torch.bool)
    assert float(gradcam_share_penalty(maps, empty).detach()) == 0.0
    hot = maps.detach() > 0
    assert bool(hot.any())
    share = gradcam_share_penalty(maps, hot).detach()
    assert float(share) == pytest.approx(float((maps.flatten(1).sum(1) > 0).float().mean()))
    partial = gradcam_share_penalty(maps, data.protected)
    assert 0 < float(partial.detach()) < 1
    partial.backward()
    assert model.features[0].weight.grad is not None
    assert float(model.features[0].weight.grad.abs().sum()) > 0


# -- config checks and the training loop ---------------------------------------------------------
def test_check_rejects_bad_values_with_one_line_naming_the_key() -> None:
    cases = {
        "dro_eta": ({"dro_eta": 0.0}, "dro_eta must be > 0"),
        "dro_weight_decay": ({"dro_weight_decay": -1}, "dro_weight_decay must be >= 0"),
        "jtt_epochs": ({"jtt_epochs": 0}, "jtt_epochs must be an integer >= 1"),
        "jtt_epochs float": ({"jtt_epochs": 1.5}, "jtt_epochs must be an integer"),
        "jtt_upweight": ({"jtt_upweight": 0.5}, "jtt_upweight must be >= 1"),
        "rrr_lambda": ({"rrr_lambda": float("nan")}, "rrr_lambda must be a finite number"),
        "attention_lambda": ({"attention_lambda": "big"}, "attention_lambda must be a finite"),
    }
    for key, (values, message) in cases.items():
        with pytest.raises(MitigationError, match=message) as info:
            MitigationConfig("none", **values).check(True, True)
        assert "\n" not in str(info.value), key
    with pytest.raises(MitigationError) as info:
        MitigationConfig("dro").check(True, True)
    assert str(info.value) == f"unknown mitigation 'dro'; choose from {', '.join(MITIGATIONS)}"
    for name in ("group_balanced", "group_dro"):
        with pytest.raises(MitigationError, match=f"{name}' needs a group label"):
            MitigationConfig(name).check(has_groups=False, has_masks=True)
    for name in ("right_reasons", "attention_penalty"):
        with pytest.raises(MitigationError, match=f"{name}' needs the protected regions' masks"):
            MitigationConfig(name).check(has_groups=True, has_masks=False)
    MitigationConfig("jtt").check(has_groups=False, has_masks=False)  # JTT needs neither


def test_resolved_lists_only_the_chosen_mitigations_keys() -> None:
    assert MitigationConfig("jtt", jtt_epochs=3, jtt_upweight=4.0).resolved() == {
        "mitigation": "jtt",
        "jtt_epochs": 3,
        "jtt_upweight": 4.0,
    }
    assert MitigationConfig().resolved() == {"mitigation": "none"}


def test_the_audit_configs_defaults_are_the_mitigation_defaults() -> None:
    """ModelConfig repeats MitigationConfig's tuned defaults; the two must not drift apart."""
    from audit.config import ModelConfig

    names = [f.name for f in dataclasses.fields(MitigationConfig) if f.name != "name"]
    model = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(ModelConfig)
        if f.name in names
    }
    defaults = MitigationConfig()
    assert model == {
        key: "" if key == "attention_layer" else getattr(defaults, key) for key in names
    }


def test_train_model_refuses_a_split_without_groups_or_masks() -> None:
    data = toy(16)
    partial = TensorDictDataset(data.images, data.labels, torch.where(data.labels == 0, 0, -1))
    with pytest.raises(MitigationError, match="'group_dro' needs a group label"):
        train_model(tiny_model(), partial, TrainConfig(mitigation=MitigationConfig("group_dro")))
    with pytest.raises(MitigationError, match="'right_reasons' needs the protected"):
        train_model(
            tiny_model(), partial, TrainConfig(mitigation=MitigationConfig("right_reasons"))
        )
    with pytest.raises(MitigationError, match="attention_layer: unknown layer 'feature'"):
        mitigation = MitigationConfig("attention_penalty", attention_layer="feature")
        train_model(tiny_model(), data, TrainConfig(mitigation=mitigation), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", MITIGATIONS)
def test_every_mitigation_trains_deterministically_and_learns_the_toy_set(name: str) -> None:
    data = toy(64)
    # JTT's first model must learn something for its errors to mean anything: 4 of 8 epochs
    mitigation = MitigationConfig(name, jtt_epochs=4, jtt_upweight=5)
    config = TrainConfig(epochs=8, batch_size=16, lr=1e-2, mitigation=mitigation)
    model = tiny_model()
    history = train_model(model, data, config, val=data, progress=False)
    assert history.val_accuracy[-1] >= 0.95, history
    again = tiny_model()
    train_model(again, data, config, progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    if name in ("right_reasons", "attention_penalty"):
        assert len(history.penalty) == 8 and all(math.isfinite(v) for v in history.penalty)
    if name == "group_dro":
        assert len(history.group_weights) == 4 and sum(history.group_weights) == pytest.approx(1)


def test_group_dro_uses_its_own_weight_decay() -> None:
    """One AdamW step (16 images, batch 16): the weights shrink by 1 - lr * dro_weight_decay and
    move by Adam's first step, at most lr per weight; lr is the one-cycle schedule's first."""
    probe = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3)
    torch.optim.lr_scheduler.OneCycleLR(probe, max_lr=1e-3, total_steps=1)
    lr = probe.param_groups[0]["lr"]
    decay = 1e6
    assert lr * decay > 1e-3  # visible
    data = toy(16)
    model = tiny_model()
    before = model.fc.weight.detach().clone()
    mitigation = MitigationConfig("group_dro", dro_weight_decay=decay)
    config = TrainConfig(epochs=1, batch_size=16, lr=1e-3, mitigation=mitigation)
    train_model(model, data, config, progress=False)
    after = model.fc.weight.detach()
    assert float((after - before * (1 - lr * decay)).abs().max()) <= lr * 1.001 + 1e-8
    assert float((after - before).abs().max()) > 100 * lr


class RecordingDataset(TensorDictDataset):
    """Records which rows train_model draws (in the main process: workers=0)."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.drawn: list[int] = []

    def __getitem__(self, i: int) -> dict:
        self.drawn.append(int(i))
        return super().__getitem__(i)


@pytest.mark.parametrize("name", ["group_balanced", "group_dro"])
def test_balanced_batches_draw_every_cell_equally_often_with_the_plain_number_of_steps(
    name: str,
) -> None:
    """Through train_model (not just balanced_weights): a 4-cell split with cells of 5, 15, 40 and
    60 images, over 5 epochs, draws each cell ~1/4 of the time (the rare cells far more often
    than their 4% and 12.5%), one epoch is as many draws as images, as in plain training, and the
    cells follow the labels and the groups the dataset gives. Group DRO draws its batches so too,
    as in the authors' released runs (`--robust --reweight_groups`), and still returns its online
    weights, one per cell, summing to 1."""
    counts = {(0, 0): 5, (0, 1): 15, (1, 0): 60, (1, 1): 40}
    labels = torch.cat([torch.full((n,), c) for (c, _), n in counts.items()])
    groups = torch.cat([torch.full((n,), g) for (_, g), n in counts.items()])
    n = len(labels)
    images = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    data = RecordingDataset(images, labels, groups)
    config = TrainConfig(epochs=5, batch_size=40, mitigation=MitigationConfig(name))
    history = train_model(tiny_model(), data, config, progress=False)
    drawn = torch.tensor(data.drawn)
    assert len(drawn) == 5 * n  # same steps per epoch (and one-cycle schedule) as plain training
    cells = labels[drawn] * 2 + groups[drawn]
    share = torch.bincount(cells, minlength=4).double() / len(drawn)
    # 600 draws: a cell's share has standard deviation sqrt(0.25 * 0.75 / 600) ~ 0.018
    assert torch.allclose(share, torch.full((4,), 0.25, dtype=torch.float64), atol=0.06), share
    plain = RecordingDataset(images, labels, groups)
    train_model(tiny_model(), plain, TrainConfig(epochs=5, batch_size=40), progress=False)
    plain_cells = labels[torch.tensor(plain.drawn)] * 2 + groups[torch.tensor(plain.drawn)]
    assert torch.bincount(plain_cells, minlength=4).tolist() == [25, 75, 300, 200]
    if name == "group_dro":
        assert len(history.group_weights) == 4
        assert abs(sum(history.group_weights) - 1) < 1e-6
