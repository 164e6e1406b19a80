"""ReLUs with a switchable backward rule, so that plain gradients and guided backprop share a forward.

Guided backprop (Springenberg et al.) zeroes negative gradients at every ReLU on top of the usual
forward mask. Public libraries swap `nn.ReLU` modules and so miss functional ReLUs (`F.relu`,
`torch.relu`, as in torchvision's DenseNet forward). Here a TorchFunctionMode intercepts every ReLU
call, module or functional, in-place or not, and routes it through one autograd function whose backward
reads a flag: with `guided` False it is the exact ReLU gradient, with True the guided one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


class _SwitchableReLU(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, switch: ReluSwitch, upper: float | None, inplace: bool
    ) -> Tensor:
        if inplace:
            ctx.mark_dirty(x)
            out = x.clamp_(0.0, upper)
        else:
            out = x.clamp(0.0, upper)
        # The output alone gives the forward's pass-through mask: 0 < out (< upper for ReLU6).
        ctx.save_for_backward(out)
        ctx.upper = upper
        ctx.switch = switch
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        (out,) = ctx.saved_tensors
        if ctx.switch.guided:
            grad = grad.clamp(min=0)  # guided: only positive gradients pass back
        # The native fused kernels of ReLU's and ReLU6's own backward.
        if ctx.upper is None:
            grad_in = torch.ops.aten.threshold_backward(grad, out, 0.0)
        else:
            grad_in = torch.ops.aten.hardtanh_backward(grad, out, 0.0, ctx.upper)
        return grad_in, None, None, None


def _arg(args: tuple, kwargs: dict, position: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else default


def _inplace_arg(args: tuple, kwargs: dict, position: int) -> bool:
    if "inplace" in kwargs:
        return bool(kwargs["inplace"])
    return bool(args[position]) if len(args) > position else False


class ReluSwitch(TorchFunctionMode):
    """While active, every ReLU/ReLU6 call (module or functional, and hardtanh with a floor of 0)
    uses `_SwitchableReLU`; set `.guided` before a backward."""

    def __init__(self) -> None:
        super().__init__()
        self.guided = False
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in (F.relu, F.relu6):
            inplace = _inplace_arg(args, kwargs, 1)
            upper = 6.0 if func is F.relu6 else None
        elif func is F.hardtanh and _arg(args, kwargs, 1, "min_val", -1.0) == 0:
            # nn.ReLU6 calls F.hardtanh(x, 0, 6): a ReLU with a ceiling.
            inplace = _inplace_arg(args, kwargs, 3)
            upper = float(_arg(args, kwargs, 2, "max_val", 1.0))
        elif func in (torch.relu, Tensor.relu):
            inplace, upper = False, None
        elif func in (torch.relu_, Tensor.relu_, F.relu_):
            inplace, upper = True, None
        else:
            return func(*args, **kwargs)
        self.calls += 1
        return _SwitchableReLU.apply(args[0], self, upper, inplace)
