"""Group DRO's batches are drawn like group_balanced's, as in the authors' released runs
(`--robust --reweight_groups`), checked through train_model by counting the rows it draws."""

from __future__ import annotations

import torch

from audit.models.mitigations import MitigationConfig
from audit.models.train import TensorDictDataset, TrainConfig, train_model
from tests.test_train import tiny_model


class RecordingDataset(TensorDictDataset):
    """Records which rows train_model draws (in the main process: workers=0)."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.drawn: list[int] = []

    def __getitem__(self, i: int) -> dict:
        self.drawn.append(int(i))
        return super().__getitem__(i)


def test_group_dro_draws_every_cell_equally_often_with_the_plain_number_of_steps() -> None:
    """Cells of 5, 15, 60 and 40 images over 5 epochs: each cell ~1/4 of the draws (a shuffled
    plain epoch would give 4%, 12.5%, 50% and 33%), one epoch as many draws as images; and the
    online weights still come back, one per cell, summing to 1."""
    counts = {(0, 0): 5, (0, 1): 15, (1, 0): 60, (1, 1): 40}
    labels = torch.cat([torch.full((n,), c) for (c, _), n in counts.items()])
    groups = torch.cat([torch.full((n,), g) for (_, g), n in counts.items()])
    n = len(labels)
    images = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    data = RecordingDataset(images, labels, groups)
    config = TrainConfig(epochs=5, batch_size=40, mitigation=MitigationConfig("group_dro"))
    history = train_model(tiny_model(), data, config, progress=False)
    drawn = torch.tensor(data.drawn)
    assert len(drawn) == 5 * n
    cells = labels[drawn] * 2 + groups[drawn]
    share = torch.bincount(cells, minlength=4).double() / len(drawn)
    # 600 draws: a cell's share has standard deviation sqrt(0.25 * 0.75 / 600) ~ 0.018
    assert torch.allclose(share, torch.full((4,), 0.25, dtype=torch.float64), atol=0.06), share
    assert len(history.group_weights) == 4
    assert abs(sum(history.group_weights) - 1) < 1e-6
