"""Training through a DataLoader: the dict Dataset, predictions, determinism and learning a toy set."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from audit.models.inference import channels_last_for_training
from audit.models.train import (
    TensorDictDataset,
    TrainConfig,
    dataset_targets,
    predict_logits,
    train_model,
    worst_group_accuracy,
)
from audit.models.zoo import SmallCNN


def toy(n: int = 96, size: int = 16, seed: int = 0) -> TensorDictDataset:
    """Trivially separable: class 1 images are bright in the top half, class 0 in the bottom half."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.rand(n, 3, size, size, generator=g) * 0.3
    top = labels == 1
    images[top, :, : size // 2] += 0.6
    images[~top, :, size // 2 :] += 0.6
    groups = (torch.arange(n) // 2) % 2
    protected = torch.zeros(n, size, size, dtype=torch.bool)
    protected[:, :, :3] = True
    return TensorDictDataset(images, labels, groups, protected)


def tiny_model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(num_classes=2, width=8)


class PlainDataset(Dataset):
    """A dataset without the `labels`/`groups` attributes: targets must be read by iterating."""

    def __init__(self, inner: TensorDictDataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict:
        return self.inner[i]


def test_dataset_items() -> None:
    data = toy(8)
    item = data[3]
    assert set(item) == {"image", "label", "group", "index", "protected"}
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 1
    assert int(item["group"]) == 1 and int(item["index"]) == 3
    assert item["protected"].shape == (16, 16) and item["protected"].dtype == torch.bool
    bare = TensorDictDataset(data.images, data.labels)
    assert "protected" not in bare[0] and int(bare[0]["group"]) == -1 and not bare.has_masks
    with pytest.raises(ValueError, match="groups must have shape"):
        TensorDictDataset(data.images, data.labels, torch.zeros(3))


def test_dataset_targets_by_attributes_and_by_iteration() -> None:
    data = toy(20)
    labels, groups = dataset_targets(PlainDataset(data), batch_size=6)
    assert torch.equal(labels, data.labels) and torch.equal(groups, data.groups)


def test_predict_logits_tensor_and_dataset_agree() -> None:
    data, model = toy(40), tiny_model()
    model.train()
    by_tensor = predict_logits(model, data.images, batch_size=7)
    by_dataset = predict_logits(model, PlainDataset(data), batch_size=9)
    assert model.training  # mode restored
    assert by_tensor.shape == (40, 2)
    torch.testing.assert_close(by_tensor, by_dataset)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(by_tensor, model(data.images))


def test_worst_group_accuracy_by_hand() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    groups = torch.tensor([0, 0, 1, 0, 1, 1, -1])
    correct = torch.tensor([True, False, True, True, True, False, False])
    # cells: (0,0) 1/2, (0,1) 1/1, (1,0) 1/1, (1,1) 1/2; the image without a group is ignored
    assert worst_group_accuracy(correct, labels, groups) == 0.5
    assert torch.isnan(torch.tensor(worst_group_accuracy(correct, labels, torch.full((7,), -1))))


@pytest.mark.slow
def test_default_training_learns_a_separable_toy_set() -> None:
    data, model = toy(), tiny_model()
    history = train_model(
        model, data, TrainConfig(epochs=6, batch_size=16, lr=1e-2), val=data, progress=False
    )
    assert len(history.loss) == 6 and history.loss[-1] < history.loss[0]
    assert history.val_accuracy[-1] == 1.0
    assert history.val_worst_group_accuracy[-1] == 1.0
    assert not model.training


@pytest.mark.slow
def test_training_is_deterministic_for_a_seed_and_any_workers() -> None:
    data = toy(48)
    config = TrainConfig(epochs=2, batch_size=16, seed=5)
    states = []
    for workers in (0, 0, 2):
        model = tiny_model()
        train_model(model, data, config, progress=False, workers=workers)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
        assert torch.equal(states[0][key], states[2][key]), key
    other = tiny_model()
    train_model(other, data, TrainConfig(epochs=2, batch_size=16, seed=6), progress=False)
    assert not torch.equal(other.fc.weight, states[0]["fc.weight"])


def test_channels_last_training_matches_the_usual_layout_and_leaves_a_plain_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Training runs on NHWC batches where the model takes them (faster convolutions); the weights
    it reaches are those of training in the usual layout to float rounding, and the trained model
    is handed back in the usual layout (checkpoints, safetensors)."""
    data = toy(48)
    config = TrainConfig(epochs=2, batch_size=16, seed=3)
    fast = tiny_model()
    fast_history = train_model(fast, data, config, progress=False)
    for name, tensor in fast.state_dict().items():
        assert tensor.is_contiguous(), name
    monkeypatch.setattr("audit.models.train.channels_last_for_training", lambda *_: False)
    plain = tiny_model()
    plain_history = train_model(plain, data, config, progress=False)
    torch.testing.assert_close(fast_history.loss, plain_history.loss, rtol=1e-4, atol=1e-5)
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[name], tensor, rtol=1e-3, atol=1e-4)


def test_the_channels_last_probe_leaves_batch_norm_statistics_and_the_mode_alone() -> None:
    model = tiny_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert channels_last_for_training(model, toy(4).images)
    assert model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_a_last_batch_of_one_is_dropped_not_fed_to_batchnorm() -> None:
    data = toy(17)
    history = train_model(tiny_model(), data, TrainConfig(epochs=1, batch_size=8), progress=False)
    assert len(history.loss) == 1


class FlakyDataset(PlainDataset):
    """Every third image "failed to decode": ok False and a label no model has (5), so including
    it in the loss would raise; labels and groups as Python lists, like FrameDataset's."""

    def __init__(self, inner: TensorDictDataset) -> None:
        super().__init__(inner)
        self.labels = [5 if i % 3 == 0 else int(v) for i, v in enumerate(inner.labels)]
        self.groups = inner.groups.tolist()

    def __getitem__(self, i: int) -> dict:
        item = dict(self.inner[i], ok=torch.tensor(i % 3 != 0))
        item["label"] = torch.tensor(self.labels[i])
        return item


def test_images_that_failed_to_decode_are_left_out_and_list_targets_are_read() -> None:
    data = FlakyDataset(toy(24))
    labels, groups = dataset_targets(data)
    assert labels.tolist() == data.labels and groups.tolist() == data.groups
    history = train_model(tiny_model(), data, TrainConfig(epochs=1, batch_size=8), progress=False)
    assert len(history.loss) == 1
