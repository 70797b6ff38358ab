"""Convolutions with pre-packed weights and fused activations for repeated CPU inference.

PyTorch's eager ``conv2d`` on a CPU re-lays-out the weights into oneDNN's blocked format on
every call and runs ReLU and residual additions as separate memory passes. For an analysis
that runs one frozen trunk tens of thousands of times (occlusion saliency), :func:`pack_convolutions`
rewrites a traced module so that every ``Conv2d`` holds its weights once in oneDNN's layout
and absorbs a following ReLU, or a following ``+ residual`` then ReLU (the ResNet block tail).
The arithmetic is oneDNN's convolution either way; outputs agree with eager to float rounding
(checked on a probe before the packed module is used, see :func:`pack_convolutions`).

The fused calls are PyTorch's ``torch.ops.mkldnn._convolution_pointwise`` operators, the ones
its own compiler emits for CPU inference; they are private, so every failure (missing
operator, unsupported dtype or device, a probe that disagrees) leaves the module as it was.
There is no public eager API for pre-packed oneDNN convolutions; ``torch.compile`` reaches the
same operators but compiles for tens of seconds per input shape, and occlusion uses several.
"""
from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Sequence

import torch
import torch.fx
from torch import Tensor, nn

log = logging.getLogger(__name__)

_RELUS = (torch.relu, torch.nn.functional.relu)
_ADDS = (operator.add, operator.iadd, torch.add)


class PackedConv2d(nn.Module):
    """A frozen ``Conv2d`` (zero padding, no string padding) with oneDNN-packed weights, then
    ``activation`` ("none" or "relu"); called with ``residual`` it computes
    ``activation(conv(x) + residual)`` in one pass."""

    def __init__(self, conv: nn.Conv2d, activation: str = "none") -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"PackedConv2d needs numeric zero padding, got {conv.padding!r} / {conv.padding_mode!r}")
        if len(set(conv.kernel_size)) != 1 or len(set(conv.stride)) != 1 or len(set(conv.padding)) != 1 \
                or len(set(conv.dilation)) != 1:
            raise ValueError("PackedConv2d needs the same kernel, stride, padding and dilation on both axes")
        self.kernel_size = [int(k) for k in conv.kernel_size]
        self.padding = [int(p) for p in conv.padding]
        self.stride = [int(s) for s in conv.stride]
        self.dilation = [int(d) for d in conv.dilation]
        self.groups = int(conv.groups)
        self.activation = activation
        weight = conv.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_convolution_weight(
            weight, self.padding, self.stride, self.dilation, self.groups, None)
        self.bias = None if conv.bias is None else conv.bias.detach().clone()
        self.out_channels = conv.out_channels

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.packed, self.bias, self.padding, self.stride, self.dilation, self.groups,
                self.activation, [], "")
        residual = residual.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, self.packed, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "add", None, None if self.activation == "none" else self.activation, [], None)

    def extra_repr(self) -> str:
        return (f"out={self.out_channels}, stride={self.stride}, padding={self.padding}, "
                f"groups={self.groups}, then {self.activation}")


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), nn.ReLU)
    return node.op == "call_function" and node.target in _RELUS and not node.kwargs


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _rewrite(gm: torch.fx.GraphModule, residual: bool) -> int:
    """Replace every Conv2d node of ``gm`` in place; returns how many were packed."""
    modules = dict(gm.named_modules())
    graph = gm.graph
    packed = 0
    for node in list(graph.nodes):
        conv = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            continue
        if any(len(set(v)) != 1 for v in (conv.kernel_size, conv.stride, conv.padding, conv.dilation)):
            continue
        name = f"{str(node.target).replace('.', '_')}_packed"
        user = _only_user(node)
        args: tuple = (node.args[0],)
        chain = [node]  # the nodes the packed call replaces, in order; the last one's value is its result
        activation = "none"
        if user is not None and _is_relu(user, modules):
            activation, chain = "relu", [node, user]
        elif (residual and user is not None and user.op == "call_function" and user.target in _ADDS and not user.kwargs
              and len(user.args) == 2 and user.args[0] is not user.args[1]):
            other = user.args[1] if user.args[0] is node else user.args[0]
            after = _only_user(user)
            if isinstance(other, torch.fx.Node):
                args, chain = (node.args[0], other), [node, user]
                if after is not None and _is_relu(after, modules):
                    activation, chain = "relu", [node, user, after]
        gm.add_submodule(name, PackedConv2d(conv, activation))
        with graph.inserting_after(chain[-1]):
            new = graph.call_module(name, args)
        chain[-1].replace_all_uses_with(new)
        for dead in reversed(chain):
            graph.erase_node(dead)
        packed += 1
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return packed


def pack_convolutions(module: nn.Module, probe_shape: Sequence[int], *, residual: bool = True) -> tuple[nn.Module, int]:
    """A copy of a frozen CPU module with its convolutions packed (:class:`PackedConv2d`), and
    how many were packed; ``(module, 0)`` unchanged where packing does not apply.

    ``probe_shape``: an input shape the module accepts; the packed copy must reproduce the
    module's output on a seeded random input of that shape (relative max difference <= 1e-4)
    or it is not used.
    """
    if not any(isinstance(m, nn.Conv2d) for m in module.modules()):
        return module, 0
    param = next(module.parameters(), None)
    if param is None or param.device.type != "cpu" or param.dtype not in (torch.float32, torch.bfloat16):
        return module, 0
    if not hasattr(torch.ops.mkldnn, "_convolution_pointwise") or not torch.backends.mkldnn.is_available():
        return module, 0
    try:
        gm = torch.fx.symbolic_trace(copy.deepcopy(module))
        count = _rewrite(gm, residual)
        probe = torch.randn(*probe_shape, generator=torch.Generator().manual_seed(0)).to(param.dtype)
        probe = probe.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            ref, out = module(probe), gm(probe)
        scale = float(ref.abs().max()) or 1.0
        tol = 1e-4 if param.dtype == torch.float32 else 2e-2
        if out.shape != ref.shape or float((out.float() - ref.float()).abs().max()) > tol * scale:
            log.info("packed convolutions disagree with %s on a probe; not used", type(module).__name__)
            return module, 0
    except Exception as exc:  # a private operator that changed, an untraceable module: stay eager
        log.info("convolution packing not applied to %s (%s: %s)", type(module).__name__, type(exc).__name__, exc)
        return module, 0
    return gm.eval(), count
