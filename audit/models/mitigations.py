"""Bias mitigations trained from the biased data: the config, the samplers' weights and the losses.

Each mitigation changes one thing of plain training (`audit.models.train.train_model` wires them in):

- ``"none"``: plain empirical risk minimisation (cross-entropy, shuffled batches).
- ``"group_balanced"``: the sampler draws every class x group cell equally often (weights
  1 / count(cell), with replacement, one epoch = as many draws as training images).
- ``"group_dro"``: Group DRO (Sagawa et al., ICLR 2020, Algorithm 1) over the class x group cells:
  online weights q_g <- q_g exp(eta (loss_g + C / sqrt(n_g))), renormalised (C: the
  generalisation adjustment `dro_adjustment`), loss = sum_g q_g loss_g, with strong weight decay,
  over batches drawn like group_balanced's, as in the authors' released runs
  (`--robust --reweight_groups`: the sampler only makes each cell's loss a mean over enough images).
- ``"jtt"``: Just Train Twice (Liu et al., ICML 2021): a short plain model flags the training images
  it gets wrong; the final model (from the same initial weights) samples them `jtt_upweight` times
  as often. It needs no group labels.
- ``"right_reasons"``: Right for the Right Reasons (Ross et al., IJCAI 2017): cross-entropy plus
  rrr_lambda * sum_pixels (mask * d/dx sum_k log p_k)^2, averaged over the batch, where the mask is
  the union of the protected regions (input gradients kept in the graph, `create_graph=True`).
- ``"attention_penalty"``: the Grad-CAM variant of Right for the Right Reasons (its own name, so each
  mitigation has one strength key): cross-entropy plus attention_lambda * the share of the Grad-CAM
  mass (for the true class, at `attention_layer`) that falls on the protected regions, computed
  differentiably during training.
- ``"dfr"``: Deep Feature Reweighting (Kirichenko et al., ICLR 2023): plain training (or a given
  model), then the last layer refitted on the validation split (`audit.models.dfr`).

Everything here is batched torch; the hand-checkable pieces (`balanced_weights`, `jtt_weights`,
`GroupDRO`, `rrr_penalty`, `gradcam_share_penalty`) are public so tests can check them directly.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MITIGATIONS = (
    "none",
    "group_balanced",
    "group_dro",
    "jtt",
    "right_reasons",
    "attention_penalty",
    "dfr",
)
NEEDS_GROUPS = ("group_balanced", "group_dro")
NEEDS_MASKS = ("right_reasons", "attention_penalty")
SELECT_MODES = ("auto", "on", "off")
# Each mitigation's own hyperparameters (what resolved() reports and a grid may vary).
OWN_KEYS: dict[str, tuple[str, ...]] = {
    "none": (),
    "group_balanced": (),
    "group_dro": ("dro_eta", "dro_weight_decay", "dro_adjustment"),
    "jtt": ("jtt_epochs", "jtt_upweight"),
    "right_reasons": ("rrr_lambda",),
    "attention_penalty": ("attention_lambda", "attention_layer"),
    "dfr": (),
}
TRAINING_KEYS = ("lr", "weight_decay")  # TrainConfig values a grid may vary too
# The strength of each penalty mitigation: at 0 the penalty is off and the model trains plainly.
PENALTY_STRENGTH = {"right_reasons": "rrr_lambda", "attention_penalty": "attention_lambda"}
# The grids tried when a model gives none: two or three values per mitigation, from the papers'
# own searches, small enough for a CPU (each point is one training run).
DEFAULT_GRIDS: dict[str, dict[str, list[Any]]] = {
    "group_dro": {"dro_adjustment": [0.0, 2.0]},
    "jtt": {"jtt_upweight": [6.0, 20.0]},
    # 0 switches the penalty off: measured harmful at every strength from 0.01 to 100 on
    # doctor/nurse (docs/mitigations.md), so selection may hand back plain training, and says so.
    "right_reasons": {"rrr_lambda": [0.0, 1.0]},
    "attention_penalty": {"attention_lambda": [0.1, 1.0]},
}


class MitigationError(ValueError):
    """A mitigation the training split cannot support, an unknown name or a value out of range."""


@dataclass
class MitigationConfig:
    """Which mitigation to train with, its hyperparameters (only the chosen one's keys matter)
    and how it is selected on validation (`select`, `grid`, `patience`: audit.models.selection).

    The defaults are the papers' settings where they carry over (Group DRO's eta 0.01 and strong
    weight decay; DFR's C grid in audit.models.dfr); the rest are searched over DEFAULT_GRIDS by
    validation worst-group accuracy. docs/mitigations.md has the measured results
    (benchmarks/bench_mitigations.py) and what was changed in Group DRO and Right for the Right
    Reasons after reading the authors' released code.
    """

    name: str = "none"
    # Group DRO: step size of the exponentiated-gradient update of the group weights q. The paper
    # uses 0.01 over ~10^4-10^5 steps; a 20-epoch run on 1,600 images has ~500 steps.
    dro_eta: float = 0.01
    # Group DRO: AdamW's (decoupled) weight decay, replacing TrainConfig.weight_decay. The paper
    # finds strong L2 (1.0 with SGD, its Waterbirds and CelebA setting) essential for
    # worst-group generalisation; 1.0 here too (AdamW shrinks by lr * 1.0 per step).
    dro_weight_decay: float = 1.0
    # JTT: epochs of the first (identification) model, and how much more often its errors are
    # drawn (chosen on val, see above).
    jtt_epochs: int = 5
    jtt_upweight: float = 6.0
    # Right for the Right Reasons: strength of the masked input-gradient penalty.
    rrr_lambda: float = 10.0
    # Grad-CAM penalty: strength, and the layer it is computed at (None: the last conv feature map).
    attention_lambda: float = 0.1
    attention_layer: str | None = None
    # Group DRO: the generalisation adjustment C of Sagawa et al. (section 3.3 and their
    # released loss.py): C / sqrt(n_g) is added to each group's loss in the update of q, so
    # small groups, whose training loss understates their test loss, get more weight.
    dro_adjustment: float = 0.0
    # Model selection (audit.models.selection): "auto" selects for every mitigation but plain
    # training when the validation split has group labels, "on" always (an error without
    # them), "off" never. `grid` maps hyperparameter names (the mitigation's own keys, "lr",
    # "weight_decay") to the values tried; empty: DEFAULT_GRIDS. `patience`: stop a run after
    # that many epochs without a better validation worst-group accuracy (0: train every epoch).
    select: str = "auto"
    grid: dict[str, list[Any]] = field(default_factory=dict)
    patience: int = 0

    def check(self, has_groups: bool, has_masks: bool) -> None:
        """Raise a one-line MitigationError for an unknown name, a value out of range, or a
        training split without the group labels or masks the mitigation needs."""
        if self.name not in MITIGATIONS:
            raise MitigationError(
                f"unknown mitigation {self.name!r}; choose from {', '.join(MITIGATIONS)}"
            )
        _positive("dro_eta", self.dro_eta)
        _non_negative("dro_weight_decay", self.dro_weight_decay)
        if (
            isinstance(self.jtt_epochs, bool)
            or not isinstance(self.jtt_epochs, int)
            or self.jtt_epochs < 1
        ):
            raise MitigationError(f"jtt_epochs must be an integer >= 1, got {self.jtt_epochs!r}")
        _number("jtt_upweight", self.jtt_upweight)
        if self.jtt_upweight < 1:
            raise MitigationError(f"jtt_upweight must be >= 1, got {self.jtt_upweight!r}")
        _non_negative("rrr_lambda", self.rrr_lambda)
        _non_negative("attention_lambda", self.attention_lambda)
        if self.attention_layer is not None and not isinstance(self.attention_layer, str):
            raise MitigationError(
                f"attention_layer must be a layer name, got {self.attention_layer!r}"
            )
        _non_negative("dro_adjustment", self.dro_adjustment)
        self._check_selection()
        if self.name in NEEDS_GROUPS and not has_groups:
            raise MitigationError(
                f"mitigation {self.name!r} needs a group label for every image of the training split"
            )
        if self.name in NEEDS_MASKS and not has_masks:
            raise MitigationError(
                f"mitigation {self.name!r} needs the protected regions' masks in the training split"
            )

    def penalty_off(self) -> bool:
        """True for a penalty mitigation at strength 0 (a grid point that lets selection switch
        the penalty off): plain training, no input gradients, no penalty recorded."""
        key = PENALTY_STRENGTH.get(self.name)
        return key is not None and getattr(self, key) == 0

    def resolved(self) -> dict[str, Any]:
        """The chosen mitigation and only its own hyperparameters (for config.json and the report)."""
        keys = OWN_KEYS[self.name]
        return {"mitigation": self.name} | {key: getattr(self, key) for key in keys}

    def with_values(self, values: dict[str, Any]) -> MitigationConfig:
        """A copy with some of the mitigation's own hyperparameters replaced (one grid point)."""
        own = {k: v for k, v in values.items() if k in OWN_KEYS[self.name]}
        return dataclasses.replace(self, **own)

    def search_grid(self) -> dict[str, list[Any]]:
        """The grid this mitigation is selected over: the configured one, else DEFAULT_GRIDS."""
        return dict(self.grid) if self.grid else dict(DEFAULT_GRIDS.get(self.name, {}))

    def _check_selection(self) -> None:
        if self.select not in SELECT_MODES:
            raise MitigationError(
                f"select must be one of {', '.join(SELECT_MODES)}, got {self.select!r}"
            )
        if isinstance(self.patience, bool) or not isinstance(self.patience, int):
            raise MitigationError(f"patience must be an integer >= 0, got {self.patience!r}")
        if self.patience < 0:
            raise MitigationError(f"patience must be an integer >= 0, got {self.patience!r}")
        if not isinstance(self.grid, dict):
            raise MitigationError(f"grid must be a table of lists, got {self.grid!r}")
        allowed = (*OWN_KEYS[self.name], *TRAINING_KEYS)
        for key, values in self.grid.items():
            if key not in allowed or (self.name == "group_dro" and key == "weight_decay"):
                raise MitigationError(
                    f"grid key {key!r} is not a hyperparameter of mitigation {self.name!r}; "
                    f"choose from {', '.join(k for k in allowed if k != 'weight_decay' or self.name != 'group_dro')}"
                )
            if not isinstance(values, list) or not values:
                raise MitigationError(f"grid.{key} must be a non-empty list, got {values!r}")
            for value in values:
                if key == "lr":
                    _positive("grid.lr", value)
                elif key == "weight_decay":
                    _non_negative("grid.weight_decay", value)
                else:
                    dataclasses.replace(self, grid={}, **{key: value}).check(True, True)


def _number(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MitigationError(f"{key} must be a finite number, got {value!r}")


def _positive(key: str, value: Any) -> None:
    _number(key, value)
    if value <= 0:
        raise MitigationError(f"{key} must be > 0, got {value!r}")


def _non_negative(key: str, value: Any) -> None:
    _number(key, value)
    if value < 0:
        raise MitigationError(f"{key} must be >= 0, got {value!r}")


# -- groups and samplers --------------------------------------------------------------------------
def cell_index(labels: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """The class x group cell of each image: label * num_groups + group."""
    return labels.long() * num_groups + groups.long()


def compact_cells(labels: Tensor, groups: Tensor) -> tuple[Tensor, int]:
    """Cells numbered 0..C-1 over the cells that occur (so an empty cell gets no DRO weight).

    Returns (per-image cell in 0..C-1, C). Groups must all be known (>= 0).
    """
    cells = cell_index(labels, groups, int(groups.max()) + 1)
    _, compact = torch.unique(cells, return_inverse=True)
    return compact, int(compact.max()) + 1


def balanced_weights(cells: Tensor) -> Tensor:
    """Sampling weight 1 / count(cell) per image, so each cell is drawn equally often."""
    counts = torch.bincount(cells)
    return 1.0 / counts[cells].double()


def jtt_weights(predictions: Tensor, labels: Tensor, upweight: float) -> Tensor:
    """JTT's upsampling weights: `upweight` for an image the first model got wrong, 1 otherwise."""
    wrong = predictions != labels
    return torch.where(wrong, float(upweight), 1.0).double()


# -- Group DRO ------------------------------------------------------------------------------------
class GroupDRO:
    """The online group weights of Group DRO (Sagawa et al. 2020, Algorithm 1, with the
    generalisation adjustment of their section 3.3 and released `loss.py`).

    Per batch: loss_g = mean loss of the batch's images in group g (0 for a group absent from the
    batch, as in the authors' code, which leaves its weight to shrink only by renormalisation);
    q <- q * exp(eta * (loss_g + C / sqrt(n_g))), q <- q / sum(q), where n_g is the group's
    number of training images and C the adjustment (0: none); the training loss is
    sum_g q_g loss_g (the adjustment is a constant, so it only steers q).
    """

    def __init__(
        self,
        num_groups: int,
        eta: float,
        device: torch.device | None = None,
        adjustment: Tensor | None = None,
    ) -> None:
        self.eta = eta
        self.num_groups = num_groups
        self.q = torch.full((num_groups,), 1.0 / num_groups, device=device)
        self.adjustment = adjustment  # (num_groups,) C / sqrt(n_g), or None

    @staticmethod
    def adjustments(counts: Tensor, c: float) -> Tensor | None:
        """C / sqrt(n_g) per group from the training counts; None when C is 0."""
        return None if c == 0 else c / counts.double().sqrt()

    def group_losses(self, losses: Tensor, groups: Tensor) -> Tensor:
        """Mean of the per-image losses within each group; 0 where the batch has none."""
        sums = torch.zeros(self.num_groups, device=losses.device, dtype=losses.dtype)
        sums = sums.index_add(0, groups, losses)
        counts = torch.bincount(groups, minlength=self.num_groups).to(losses.dtype)
        return sums / counts.clamp(min=1)

    def loss(self, losses: Tensor, groups: Tensor) -> Tensor:
        """Update q from this batch's (adjusted) group losses and return the q-weighted loss."""
        group_loss = self.group_losses(losses, groups)
        steer = group_loss.detach()
        if self.adjustment is not None:
            steer = steer + self.adjustment.to(steer.device, steer.dtype)
        q = self.q.to(losses.device) * torch.exp(self.eta * steer)
        self.q = q / q.sum()
        return (self.q * group_loss).sum()


# -- Right for the Right Reasons ------------------------------------------------------------------
def rrr_penalty(log_probs: Tensor, images: Tensor, masks: Tensor) -> Tensor:
    """Ross et al.'s right-reasons term: mean over the batch of sum_pixels (A * d sum_k log p_k/dx)^2.

    `images` must require grad and `log_probs` (N, K) come from them; `masks` are (N, H, W) or
    (N, C, H, W), 1 where the input must not matter. The gradient stays in the graph, so the
    penalty can be minimised.
    """
    (grads,) = torch.autograd.grad(log_probs.sum(), images, create_graph=True)
    if masks.dim() == 3:
        masks = masks[:, None]
    return (masks.to(grads.dtype) * grads).pow(2).flatten(1).sum(1).mean()


# -- differentiable Grad-CAM ----------------------------------------------------------------------
@contextmanager
def capture_layer(module: nn.Module):  # noqa: ANN201
    """Record `module`'s output during a forward pass, kept in the graph (unlike the audit engine,
    which cuts it out so that explaining never trains)."""
    store: dict[str, Tensor] = {}

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if not isinstance(output, Tensor) or output.dim() != 4:
            raise ValueError("the attention_penalty layer must output a (N, C, h, w) map")
        store["activation"] = output

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def differentiable_gradcam(activation: Tensor, scores: Tensor, size: tuple[int, int]) -> Tensor:
    """Grad-CAM maps (N, H, W) that stay differentiable with respect to the model's weights.

    ReLU(sum_k mean_ij(d score / d A^k_ij) A^k), upsampled bilinearly to `size` as in the audit
    engine. `scores` (N,) are the class scores computed from `activation`.
    """
    (grads,) = torch.autograd.grad(scores.sum(), activation, create_graph=True)
    cam = torch.einsum("nk,nkhw->nhw", grads.mean(dim=(2, 3)), activation).clamp(min=0)
    return F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def gradcam_share_penalty(maps: Tensor, masks: Tensor) -> Tensor:
    """Mean over the batch of the share of each Grad-CAM map's mass inside its mask (0 for a zero
    map); differentiable, 0 for empty masks, up to 1 when all the mass is inside."""
    masks = masks.to(maps.dtype)
    total = maps.flatten(1).sum(1)
    inside = (maps * masks).flatten(1).sum(1)
    share = inside / total.clamp(min=torch.finfo(maps.dtype).tiny)
    return torch.where(total > 0, share, torch.zeros_like(share)).mean()
