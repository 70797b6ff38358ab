"""Occlusion saliency and attentive diffusion (PROTOCOL.md, "Occlusion saliency and attentive
diffusion"; Figures 7-9 and Table A7 of Anton et al. 2022).

Definition (stride 1, the paper's setting): a uint8 image of side 242 (resize 242 bicubic +
centre crop, done by the caller); a 10 x 10 window at every one of the 233 x 233 positions;
score = ||f(x) - f(x_occ)||_2 / ||f(x)||_2 on pooled features; each score is added to every
pixel its window covers; the sum is divided by 100 and cropped to [9:233], where every pixel
was covered exactly 100 times. Sizes and windows are parameters (tests use small ones).

Occluders: by default a patch of the ImageNet mean colour in *pixel* space (uint8
124, 116, 104), applied before the model's own normalisation, so every model sees the same
occluded image. ``occluder="zero-after-normalize"`` (alias ``"paper"``) reproduces the
authors: the window is set to 0 after normalisation (the ImageNet mean for mean/std models,
black for un-normalised and histogram-equalised ones).

Speed, all exact: occluded images are built by broadcasting a window mask over a batch of
positions and run in batches; :func:`prepare_trunk` folds BatchNorm into the convolutions,
packs them for oneDNN with their ReLU / residual sum fused (:mod:`medxfer.packed`, CPU), uses
channels-last memory, and splits torchvision ResNets and DenseNets into stages whose spatial
locality is derived from their layers (:func:`locality`). The occluded images differ from the
clean one only near the window, so the leading stages run on the *changed blocks* only
(incremental inference): node by node where the stage has a graph for it
(:attr:`StagedTrunk.delta_stages`: each convolution on the crop its changed outputs need,
pointwise layers on the block, residual sums and concatenations on the union of their
operands' blocks, pasted into the clean maps), else on one crop per stage; the first stage
whose whole output changes, and every stage after it, runs in full on the pasted maps.
Results equal the full forward up to float rounding (checked by the tests).
"""
from __future__ import annotations

import copy
import logging
import math
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.fx
import torchvision
from torch import Tensor, nn

from medxfer.analysis._select import choose_rows
from medxfer.errors import UsageError
from medxfer.packed import PackedConv2d
from medxfer.progress import bar
from medxfer.protocols.base import EvalResult, Headline, Needs, Params, Protocol, register_protocol
from medxfer.typed import positive, setting

log = logging.getLogger(__name__)

#: The ImageNet mean colour (0.485, 0.456, 0.406) in uint8 pixel space, rounded.
IMAGENET_MEAN_PIXEL = (124, 116, 104)
#: Normalisations (medxfer.models.normalize names) that act on each pixel independently.
POINTWISE_NORMALIZATIONS = frozenset({"imagenet", "none", "raw", "chexpert"})
#: occluded images per forward pass by device type (128 measured fastest on the project's CPU
#: for ResNet-18), and the CPU budget for one batch's largest stage map
OCCLUSION_BATCH = {"cpu": 128, "cuda": 512}
CPU_MAP_BUDGET = 256 * 2**20
PAPER_OCCLUDERS = frozenset({"zero-after-normalize", "paper"})

Normalize = Callable[[Tensor], Tensor]  # uint8 B x C x H x W -> float B x 3 x H x W
Trunk = Callable[[Tensor], Tensor]  # normalised float B x 3 x H x W -> features B x D
FillFn = Callable[[Tensor], Tensor]  # uint8 3 x H x W clean image -> uint8 3 x H x W fill
Occluder = str | int | Sequence[int] | FillFn
Progress = Callable[[int, int], None]  # (positions done, total)


class SaliencyError(UsageError):
    """Invalid input to the occlusion analysis (the message names what is wrong)."""


class NotLocalError(SaliencyError):
    """A module whose outputs cannot be proven to depend on a bounded input window."""


# --------------------------------------------------------------------------- positions and maps

def window_starts(size: int, window: int, stride: int = 1) -> np.ndarray:
    """Top (or left) coordinates of the window positions along one axis: 0, stride, ... <= size - window."""
    _check_geometry(size, size, window, stride)
    return np.arange(0, size - window + 1, stride, dtype=np.int64)


def _check_geometry(height: int, width: int, window: int, stride: int) -> None:
    if window < 1:
        raise SaliencyError(f"window must be >= 1, got {window}")
    if not 1 <= stride <= window:
        raise SaliencyError(f"stride must be between 1 and the window ({window}), got {stride}")
    if min(height, width) < 2 * window - 1:
        raise SaliencyError(f"image {height} x {width} too small for window {window}: "
                            f"each side must be >= 2 * window - 1 = {2 * window - 1}")


def is_exact(stride: int) -> bool:
    """Whether the map is the paper's definition (stride 1) rather than its stride-s approximation."""
    return stride == 1


def accumulate_scores(scores: np.ndarray, image_size: int | tuple[int, int], window: int, stride: int = 1,
                      *, crop: bool = True) -> np.ndarray:
    """Scores of the window positions -> pixel map (float64).

    Each pixel gets the mean score of the windows covering it. At stride 1 that is the
    paper's sum divided by window**2 wherever the crop applies (every cropped pixel is covered
    exactly window**2 times); at stride > 1 it is an approximation of that map (pixels are
    covered (window / stride)**2 times or a little more or fewer). ``crop``: keep rows and
    columns ``window - 1 : side - window + 1`` (242 -> 224 at the defaults); without it the
    full map, 0 where no window reached.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    _check_geometry(h, w, window, stride)
    ys, xs = np.arange(0, h - window + 1, stride), np.arange(0, w - window + 1, stride)
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (len(ys), len(xs)):
        raise SaliencyError(f"scores have shape {s.shape}, expected {(len(ys), len(xs))} for a "
                            f"{h} x {w} image, window {window}, stride {stride}")
    if not np.isfinite(s).all():
        raise SaliencyError("scores contain NaN or infinity")
    # box sums of the scores placed at their windows' corners: window shifted adds per axis,
    # so a pixel that no scored window covers stays exactly 0
    grid, hits = np.zeros((h - window + 1, w - window + 1)), np.zeros((h - window + 1, w - window + 1))
    grid[np.ix_(ys, xs)] = s
    hits[np.ix_(ys, xs)] = 1.0
    total, count = _box_sum(grid, window), _box_sum(hits, window)
    out = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return out[window - 1:h - window + 1, window - 1:w - window + 1] if crop else out


def _box_sum(grid: np.ndarray, window: int) -> np.ndarray:
    """Pixel (i, j) of the result = sum of grid[a, b] over the windows [a, a + window) x
    [b, b + window) that contain it."""
    gh, gw = grid.shape
    rows = np.zeros((gh + window - 1, gw))
    for k in range(window):
        rows[k:k + gh] += grid
    out = np.zeros((gh + window - 1, gw + window - 1))
    for k in range(window):
        out[:, k:k + gw] += rows
    return out


def attentive_diffusion(saliency: np.ndarray) -> float:
    """Percentage of map pixels strictly above the map's mean (invariant to positive rescaling)."""
    m = np.asarray(saliency, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise SaliencyError(f"saliency map must be a non-empty 2-D array, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise SaliencyError("saliency map contains NaN or infinity")
    return float(100.0 * np.count_nonzero(m > m.mean()) / m.size)


# --------------------------------------------------------------------------- locality of modules

@dataclass(frozen=True)
class Locality:
    """Along each spatial axis, output index j depends only on inputs
    ``[stride * j - before, stride * j + after]`` (an over-approximation is allowed)."""

    stride: int = 1
    before: int = 0
    after: int = 0

    def then(self, outer: Locality) -> Locality:
        """This module followed by ``outer``."""
        s = self.stride
        return Locality(s * outer.stride, s * outer.before + self.before, s * outer.after + self.after)

    def union(self, other: Locality) -> Locality:
        if self.stride != other.stride:
            raise NotLocalError(f"branches with strides {self.stride} and {other.stride} are combined")
        return Locality(self.stride, max(self.before, other.before), max(self.after, other.after))


_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Identity, nn.Dropout, nn.Dropout2d,
)
_POINTWISE_FUNCTIONS = {operator.add, operator.iadd, operator.mul, torch.add, torch.mul, torch.relu,
                        torch.nn.functional.relu, torch.sigmoid}
_POINTWISE_METHODS = {"relu", "relu_", "add", "add_", "mul", "mul_", "contiguous", "sigmoid"}


def _same(value: int | tuple[int, ...], what: str, module: nn.Module) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, tuple) and len(set(value)) == 1 and isinstance(value[0], int):
        return value[0]
    raise NotLocalError(f"{type(module).__name__}: {what} {value!r} differs between axes")


def _leaf_locality(module: nn.Module) -> Locality:
    if isinstance(module, _POINTWISE_MODULES):
        return Locality()
    if isinstance(module, PackedConv2d):
        (k, _), (s, _), (p, _), (d, _) = module.kernel_size, module.stride, module.padding, module.dilation
        return Locality(s, max(p, 0), max(d * (k - 1) - p, 0))
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise NotLocalError(f"Conv2d with padding {module.padding!r} / mode {module.padding_mode!r}")
        k, s, p, d = (_same(v, n, module) for v, n in ((module.kernel_size, "kernel"), (module.stride, "stride"),
                                                        (module.padding, "padding"), (module.dilation, "dilation")))
        return Locality(s, max(p, 0), max(d * (k - 1) - p, 0))
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        if module.ceil_mode:
            raise NotLocalError(f"{type(module).__name__} with ceil_mode")
        k = _same(module.kernel_size, "kernel", module)
        s = _same(module.stride if module.stride is not None else k, "stride", module)
        p = _same(module.padding, "padding", module)
        d = _same(module.dilation, "dilation", module) if isinstance(module, nn.MaxPool2d) else 1
        return Locality(s, max(p, 0), max(d * (k - 1) - p, 0))
    raise NotLocalError(f"no locality rule for {type(module).__name__}")


def locality(module: nn.Module) -> Locality:
    """The spatial :class:`Locality` of a module, from its layers (``torch.fx`` trace).

    Known: convolutions and max/avg pooling (zero padding, same parameters on both axes, no
    ceil mode), pointwise layers (BatchNorm in eval mode, activations, identity, dropout in
    eval mode), residual additions of branches with the same stride and channel concatenation.
    Anything else (global pooling, normalisation over space, attention, constants) raises
    :class:`NotLocalError`.
    """
    if not list(module.children()) or isinstance(module, _POINTWISE_MODULES + (nn.Conv2d, nn.MaxPool2d,
                                                                                  nn.AvgPool2d)):
        return _leaf_locality(module)
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception as exc:  # untraceable forward: no proof of locality
        raise NotLocalError(f"{type(module).__name__}: cannot trace ({type(exc).__name__}: {exc})") from exc
    modules = dict(module.named_modules())
    geo: dict[torch.fx.Node, Locality] = {}
    out: Locality | None = None
    for node in graph.nodes:
        inputs = [geo[a] for a in node.all_input_nodes]
        if node.op == "placeholder":
            if geo:
                raise NotLocalError(f"{type(module).__name__}: more than one input")
            geo[node] = Locality()
            continue
        if node.op == "output":
            if len(inputs) != 1:
                raise NotLocalError(f"{type(module).__name__}: not a single tensor output")
            out = inputs[0]
            continue
        if not inputs:
            raise NotLocalError(f"{type(module).__name__}: node {node.name} ({node.op}) uses no input")
        if node.op == "call_module":
            g = _leaf_locality(modules[str(node.target)])
            if len(inputs) != 1:
                raise NotLocalError(f"{node.target}: several inputs")
            geo[node] = inputs[0].then(g)
            continue
        if node.op == "call_function" and node.target is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim != 1:
                raise NotLocalError(f"{type(module).__name__}: torch.cat over dim {dim}")
        elif not ((node.op == "call_function" and node.target in _POINTWISE_FUNCTIONS)
                  or (node.op == "call_method" and node.target in _POINTWISE_METHODS)):
            raise NotLocalError(f"{type(module).__name__}: no locality rule for {node.op} {node.target}")
        g = inputs[0]
        for other in inputs[1:]:
            g = g.union(other)
        geo[node] = g
    if out is None:
        raise NotLocalError(f"{type(module).__name__}: no output")
    return out


# --------------------------------------------------------------------------- prepared trunk

@dataclass
class StagedTrunk:
    """A trunk as ``head(stage_n(... stage_1(x)))`` for many forward passes.

    ``localities[k]`` is the :class:`Locality` of stage k, or None where none is known (such
    stages, and all after them, always run on full maps). ``dtype``: the input is cast to it
    (None: left as the normaliser made it); ``device``: where the modules are (None: where the
    image is). Calling it runs the full forward on normalised float input B x 3 x H x W and
    returns B x D features. ``description`` states dtype, layout, stages and folding (and
    TF32 on CUDA): record it with the results.
    """

    stages: tuple[Trunk, ...]
    localities: tuple[Locality | None, ...]
    head: Trunk
    dtype: torch.dtype | None = torch.float32
    description: str = ""
    device: torch.device | None = None
    #: per stage, the same computation as a graph whose every node :func:`_run_delta` can run on
    #: the changed block only (None where there is none); used for stages whose output changes
    #: only in part, for the clean and the occluded images alike
    delta_stages: tuple[torch.fx.GraphModule | None, ...] = ()

    def cast(self, x: Tensor) -> Tensor:
        x = x if self.dtype is None else x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x

    def __call__(self, x: Tensor) -> Tensor:
        x = self.cast(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    @classmethod
    def wrap(cls, trunk: Trunk) -> StagedTrunk:
        """A plain callable as one non-local stage (no incremental inference, no cast)."""
        if isinstance(trunk, cls):
            return trunk
        return cls((trunk,), (None,), nn.Identity(), None, "callable as given")


def _split(trunk: nn.Module) -> tuple[list[nn.Module], nn.Module] | None:
    """torchvision ResNet / DenseNet trunks as (stages, head); None for other architectures."""
    if isinstance(trunk, torchvision.models.ResNet):
        stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        blocks = [b for layer in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4) for b in layer]
        return [stem, *blocks], nn.Sequential(trunk.avgpool, nn.Flatten(1), trunk.fc)
    if isinstance(trunk, torchvision.models.DenseNet):
        feats = list(trunk.features.children())
        return ([nn.Sequential(*feats[:4]), *feats[4:]],
                nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), trunk.classifier))
    return None


def _check_eval(module: nn.Module) -> None:
    training = [name or "<root>" for name, m in module.named_modules() if m.training]
    if training:
        raise SaliencyError(f"the trunk must be in eval mode (BatchNorm in training mode at batch 1 was a bug "
                            f"of the authors' code); modules in training mode: {training[:5]}")


def prepare_trunk(trunk: nn.Module, *, dtype: torch.dtype = torch.float32, fold_bn: bool = True,
                  split: bool = True, pack: bool = True, device: str | torch.device = "cpu") -> StagedTrunk:
    """A fast exact copy of an eval-mode trunk for occlusion (the caller's module is untouched).

    ``fold_bn``: fold BatchNorm into the preceding convolutions (exact in eval mode up to
    rounding). ``split``: torchvision ResNets and DenseNets become stages with their
    :func:`locality`, which enables incremental inference; the split is checked against the
    trunk's own forward on a random input. ``dtype``: weights and input in this dtype
    (float32; float64 for reference checks). bfloat16 is a fast switch, not a result: on this
    project's AVX512-BF16 CPU it took 0.57x the fp32 CPU time, but on ResNet-18 (random
    weights, 114 px, window 5, 22 window rows) its map differed from fp32 by a median 23%
    (max 138%, correlation 0.996; attentive diffusion 44.3 vs 47.2%), because bf16 rounding
    is as large as the feature changes the scores measure (``benchmarks/saliency.py --bf16``).
    ``device``: where the copy runs (on CUDA, PyTorch's TF32 setting for convolutions applies
    and is stated in the description). ``pack``: on a CPU, convolutions pre-packed for oneDNN
    with ReLU and residual sums fused (:func:`medxfer.packed.pack_convolutions`; about 5% faster
    occlusion for ResNet-18, same outputs to float rounding); each local stage also gets a
    graph for node-by-node incremental inference (:attr:`StagedTrunk.delta_stages`).
    """
    from medxfer.packed import pack_convolutions
    from medxfer.runtime import fold_batchnorm

    if not isinstance(trunk, nn.Module):
        raise SaliencyError(f"prepare_trunk needs an nn.Module, got {type(trunk).__name__}")
    _check_eval(trunk)
    parts = _split(trunk) if split else None
    stages, head = parts if parts is not None else ([trunk], nn.Identity())
    locs: list[Locality | None] = []
    for st in stages:
        try:
            locs.append(locality(st))
        except NotLocalError as exc:
            log.debug("stage %s not local: %s", type(st).__name__, exc)
            locs.append(None)
    if parts is not None:
        gen = torch.Generator().manual_seed(0)
        param = next(trunk.parameters(), None)
        probe = torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float32 if param is None else param.dtype)
        with torch.inference_mode():
            ref, y = trunk(probe), probe
            for st in stages:
                y = st(y)
            y = head(y)
        if y.shape != ref.shape or not torch.allclose(y, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max())):
            log.warning("%s: stage split does not reproduce the forward; using the whole trunk",
                        type(trunk).__name__)
            stages, head, locs = [trunk], nn.Identity(), [None]
    runtime: list[nn.Module] = []
    folded = packed = 0
    deltas: list[torch.fx.GraphModule | None] = []
    dev = torch.device(device)
    y = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    for st in [*stages, head]:
        f = fold_batchnorm(st) if fold_bn and any(isinstance(m, nn.BatchNorm2d) for m in st.modules()) else None
        folded += f is not None
        m = (f if f is not None else copy.deepcopy(st)).to(dtype).eval()
        m = m.to(device, memory_format=torch.channels_last)
        if pack and dev.type == "cpu" and y.ndim == 4:
            m, n = pack_convolutions(m, tuple(y.shape))
            packed += n
        if len(runtime) < len(stages):
            local = locs[len(runtime)] is not None and y.ndim == 4
            deltas.append(_delta_variant(f if f is not None else st, dtype, dev, pack, tuple(y.shape))
                          if local else None)
        if y.ndim == 4:
            with torch.inference_mode():
                y = m(y.to(dev).contiguous(memory_format=torch.channels_last))
        runtime.append(m)
    tf32 = ""
    if dev.type == "cuda" and dtype == torch.float32:
        tf32 = f", TF32 convolutions {'on' if torch.backends.cudnn.allow_tf32 else 'off'}"
    desc = (f"{str(dtype).replace('torch.', '')}{tf32}, channels-last, on {dev}, {len(stages)} stage(s) "
            f"({len(_leading_local(locs))} leading local), BatchNorm folded in {folded}"
            + (f", {packed} convolutions packed for oneDNN" if packed else ""))
    return StagedTrunk(tuple(runtime[:-1]), tuple(locs), runtime[-1], dtype, desc, dev, tuple(deltas))


def _delta_variant(stage: nn.Module, dtype: torch.dtype, device: torch.device, pack: bool,
                   probe_shape: tuple[int, ...]) -> torch.fx.GraphModule | None:
    """``stage`` (BatchNorm already folded) as a graph :func:`_run_delta` supports, its
    convolutions packed without residual fusion (a fused ``conv + residual`` hides the clean
    convolution output that a changed block is pasted into); None where unsupported."""
    from medxfer.packed import pack_convolutions

    try:
        gm = torch.fx.symbolic_trace(copy.deepcopy(stage).to(dtype).eval())
    except Exception as exc:  # untraceable: the stage always runs on full maps
        log.debug("stage %s has no delta variant: %s", type(stage).__name__, exc)
        return None
    gm = gm.to(device, memory_format=torch.channels_last)
    if pack and device.type == "cpu":
        packed, _ = pack_convolutions(gm, probe_shape, residual=False)
        gm = packed if isinstance(packed, torch.fx.GraphModule) else gm
    return gm if _delta_supported(gm) else None


def _leading_local(locs: Sequence[Locality | None]) -> list[Locality]:
    out = []
    for loc in locs:
        if loc is None:
            break
        out.append(loc)
    return out


# --------------------------------------------------------------------------- crop geometry

@dataclass(frozen=True)
class _Axis:
    """One axis of one incremental stage for a batch: outputs ``[out0, out0 + out_len)`` change;
    they are computed from the input crop ``[crop0, crop0 + crop_len)`` and sit at ``offset``
    in the crop's output."""

    out0: Tensor
    out_len: int
    crop0: Tensor
    crop_len: int
    offset: Tensor


def _axis_plan(lo: Tensor, length: int, n_in: int, n_out: int, loc: Locality) -> _Axis:
    """Changed inputs ``[lo, lo + length)`` (per batch element) of a stage with locality ``loc``."""
    s, a, b = loc.stride, loc.before, loc.after
    r = min((length - 1 + a + b) // s + 1, n_out)
    jlo = torch.div(lo - b + s - 1, s, rounding_mode="floor")  # ceil((lo - b) / s)
    out0 = jlo.clamp(0, n_out - r)
    ka = -(-a // s)
    crop_len = s * (r - 1 + ka) + b + 1
    crop_len += (n_in - crop_len) % s  # so that a crop ending at the edge starts on the stride grid
    if crop_len >= n_in:
        crop_len, crop0 = n_in, torch.zeros_like(lo)
    else:
        crop0 = (s * (out0 - ka)).clamp(0, n_in - crop_len)
    return _Axis(out0, r, crop0, crop_len, out0 - torch.div(crop0, s, rounding_mode="floor"))


def _block_rows(y0: Tensor, x0: Tensor, len_y: int, len_x: int, width: int) -> Tensor:
    """Flat indices (``row * width + col``) of the pixels of per-element blocks
    ``[y0, y0 + len_y) x [x0, x0 + len_x)``, element by element, in row-major order."""
    rows = y0[:, None] + torch.arange(len_y, device=y0.device)
    cols = x0[:, None] + torch.arange(len_x, device=x0.device)
    return (rows[:, :, None] * width + cols[:, None, :]).reshape(-1)


def _compose(clean: Tensor, patch: Tensor | None, p_y0: Tensor, p_x0: Tensor, c_y0: Tensor, c_x0: Tensor,
             len_y: int, len_x: int) -> Tensor:
    """Per batch element, the crop ``[c_y0, c_y0 + len_y) x [c_x0, c_x0 + len_x)`` of ``clean``
    (H x W x C) with ``patch`` (B x R_y x R_x x C, whose corner is at p_y0, p_x0 in clean's
    coordinates) written over it where they overlap. Returns B x len_y x len_x x C.

    Pixels are C-float rows here, so both steps are row copies (``index_select`` from the clean
    map, ``index_copy_`` of the patch), not element-wise gathers."""
    h, w, c = clean.shape
    out = clean.reshape(h * w, c).index_select(0, _block_rows(c_y0, c_x0, len_y, len_x, w))
    if patch is not None:
        b, ry, rx, _ = patch.shape
        dev = clean.device
        dy = p_y0[:, None] + torch.arange(ry, device=dev) - c_y0[:, None]  # patch rows in crop coordinates
        dx = p_x0[:, None] + torch.arange(rx, device=dev) - c_x0[:, None]
        inside = (((dy >= 0) & (dy < len_y))[:, :, None] & ((dx >= 0) & (dx < len_x))[:, None, :]).reshape(-1)
        dst = ((torch.arange(b, device=dev)[:, None, None] * len_y + dy[:, :, None]) * len_x
               + dx[:, None, :]).reshape(-1)
        src = patch.reshape(-1, c)
        if bool(inside.all()):
            out.index_copy_(0, dst, src)
        else:
            out.index_copy_(0, dst[inside], src[inside])
    return out.reshape(len(c_y0), len_y, len_x, c)


def _paste(clean: Tensor, patch: Tensor, p_y0: Tensor, p_x0: Tensor) -> Tensor:
    """B copies of ``clean`` (H x W x C) with each element's ``patch`` (B x R_y x R_x x C, inside
    the map) written at (p_y0, p_x0). Returns B x H x W x C."""
    b, ry, rx, c = patch.shape
    h, w, _ = clean.shape
    out = clean.expand(b, h, w, c).clone()
    offsets = torch.arange(b, device=clean.device).repeat_interleave(ry * rx) * (h * w)
    out.view(b * h * w, c).index_copy_(0, _block_rows(p_y0, p_x0, ry, rx, w) + offsets, patch.reshape(-1, c))
    return out


def _take(y: Tensor, off_y: Tensor, len_y: int, off_x: Tensor, len_x: int) -> Tensor:
    """Per-element windows of a channels-last batch y (B x C x h x w) -> B x len_y x len_x x C."""
    b, c, h, w = y.shape
    hwc = y.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view for channels-last y
    offsets = torch.arange(b, device=y.device).repeat_interleave(len_y * len_x) * (h * w)
    return hwc.index_select(0, _block_rows(off_y, off_x, len_y, len_x, w) + offsets).reshape(b, len_y, len_x, c)


# --------------------------------------------------------------------------- changed blocks inside a stage

@dataclass(frozen=True)
class _Delta:
    """Per batch element, the changed block of a map: ``patch`` (B x R_y x R_x x C) whose corner
    is at (y0, x0); everywhere else the map equals the clean image's."""

    patch: Tensor
    y0: Tensor
    x0: Tensor


_DELTA_METHODS = {"relu", "relu_", "contiguous", "sigmoid"}
_DELTA_COMBINE = {operator.add, operator.iadd, torch.add, operator.mul, torch.mul}


def _delta_supported(gm: torch.fx.GraphModule) -> bool:
    """Whether :func:`_run_delta` can run every node of ``gm`` (one input, one tensor output;
    local modules, pointwise functions, sums and products of two maps, channel concatenation)."""
    modules = dict(gm.named_modules())
    placeholders = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            placeholders += 1
        elif node.op == "output":
            if not isinstance(node.args[0], torch.fx.Node):
                return False
        elif node.op == "call_module":
            mod = modules[str(node.target)]
            if len(node.args) != 1 or node.kwargs:
                return False
            try:
                _leaf_locality(mod)
            except NotLocalError:
                return False
        elif node.op == "call_function" and node.target in _DELTA_COMBINE:
            if node.kwargs or len(node.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in node.args):
                return False
        elif node.op == "call_function" and node.target in (torch.relu, torch.nn.functional.relu, torch.sigmoid):
            if len(node.args) != 1 or any(v not in (False, None) for v in node.kwargs.values()):
                return False
        elif node.op == "call_function" and node.target is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim != 1 or not all(isinstance(a, torch.fx.Node) for a in node.args[0]):
                return False
        elif node.op == "call_method" and node.target in _DELTA_METHODS:
            if len(node.args) != 1 or node.kwargs:
                return False
        else:
            return False
    return placeholders == 1


class _Capture(torch.fx.Interpreter):
    """Runs a graph and keeps every node's value (the clean maps a changed block is pasted into)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[torch.fx.Node, Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, Tensor):
            self.values[n] = out.clone()  # a later in-place node (``out += identity``) must not change it
        return out


def _clean_nodes(gm: torch.fx.GraphModule, x: Tensor) -> tuple[Tensor, dict[torch.fx.Node, Tensor]]:
    """The stage's clean output (1 x C x H x W) and every node's clean map as an H x W x C view."""
    cap = _Capture(gm)
    out = cap.run(x)
    return out, {n: v[0].permute(1, 2, 0) for n, v in cap.values.items()}


def _union(deltas: Sequence[_Delta], shape: tuple[int, int]) -> tuple[Tensor, Tensor, int, int]:
    """The smallest common block (per element corner, common size) holding every delta's block."""
    corners, sizes = [], []
    for axis in (0, 1):
        lo = torch.stack([d.y0 if axis == 0 else d.x0 for d in deltas]).amin(0)
        hi = torch.stack([(d.y0 if axis == 0 else d.x0) + d.patch.shape[1 + axis] for d in deltas]).amax(0)
        size = int((hi - lo).max())
        corners.append(lo.clamp(max=shape[axis] - size))
        sizes.append(size)
    return corners[0], corners[1], sizes[0], sizes[1]


def _block_over(clean: Tensor, d: _Delta, y0: Tensor, x0: Tensor, len_y: int, len_x: int) -> Tensor:
    """The block ``[y0, y0 + len_y) x [x0, x0 + len_x)`` of the map ``clean`` changed by ``d``:
    ``d``'s own patch where it is that very block (a 1 x 1 convolution's input, the larger
    operand of a residual sum), else :func:`_compose`."""
    if d.patch.shape[1:3] == (len_y, len_x) and torch.equal(d.y0, y0) and torch.equal(d.x0, x0):
        return d.patch
    return _compose(clean, d.patch, d.y0, d.x0, y0, x0, len_y, len_x)


def _run_delta(gm: torch.fx.GraphModule, clean: dict[torch.fx.Node, Tensor], d_in: _Delta) -> _Delta:
    """The changed block of ``gm``'s output, given the changed block of its input: every local
    module runs on the crop its changed outputs need (:func:`_axis_plan`), pointwise nodes on the
    block, sums and concatenations on the union of their inputs' blocks."""
    modules = dict(gm.named_modules())
    env: dict[torch.fx.Node, _Delta] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = d_in
            continue
        if node.op == "output":
            return env[node.args[0]]
        if node.op == "call_module":
            mod, src = modules[str(node.target)], node.args[0]
            d = env[src]
            if isinstance(mod, _POINTWISE_MODULES):
                block = d.patch.clone() if getattr(mod, "inplace", False) and len(src.users) > 1 else d.patch
                env[node] = _Delta(mod(block.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), d.y0, d.x0)
                continue
            loc, cin, cout = _leaf_locality(mod), clean[src], clean[node]
            ay = _axis_plan(d.y0, d.patch.shape[1], cin.shape[0], cout.shape[0], loc)
            ax = _axis_plan(d.x0, d.patch.shape[2], cin.shape[1], cout.shape[1], loc)
            crop = _block_over(cin, d, ay.crop0, ax.crop0, ay.crop_len, ax.crop_len)
            out = mod(crop.permute(0, 3, 1, 2))
            env[node] = _Delta(_take(out, ay.offset, ay.out_len, ax.offset, ax.out_len), ay.out0, ax.out0)
            continue
        if node.op == "call_method":
            d = env[node.args[0]]
            name = str(node.target).rstrip("_")
            env[node] = _Delta(getattr(d.patch, name)(), d.y0, d.x0)
            continue
        if node.target is torch.cat or node.target in _DELTA_COMBINE:
            srcs = list(node.args[0]) if node.target is torch.cat else list(node.args)
            shape = tuple(clean[node].shape[:2])
            uy, ux, ly, lx = _union([env[a] for a in srcs], shape)
            parts = [_block_over(clean[a], env[a], uy, ux, ly, lx) for a in srcs]
            if node.target is torch.cat:
                block = torch.cat(parts, dim=-1)
            elif node.target in (operator.mul, torch.mul):
                block = parts[0] * parts[1]
            else:
                block = parts[0] + parts[1]
            env[node] = _Delta(block, uy, ux)
            continue
        d = env[node.args[0]]  # relu / sigmoid functions
        env[node] = _Delta(node.target(d.patch), d.y0, d.x0)
    raise SaliencyError("stage graph has no output")


# --------------------------------------------------------------------------- occlusion

def _fill_image(occluder: Occluder, image: Tensor) -> Tensor | None:
    """The uint8 3 x H x W image whose pixels replace the window (None for the paper's compat)."""
    if isinstance(occluder, str):
        if occluder in PAPER_OCCLUDERS:
            return None
        if occluder != "imagenet-mean":
            raise SaliencyError(f"occluder must be 'imagenet-mean', 'zero-after-normalize' (alias 'paper'), "
                                f"a uint8 grey level or RGB triple, or a callable; got {occluder!r}")
        colour: Sequence[int] = IMAGENET_MEAN_PIXEL
    elif callable(occluder):
        fill = occluder(image)
        if not isinstance(fill, Tensor) or fill.dtype != torch.uint8 or fill.shape != image.shape:
            raise SaliencyError(f"occluder callable must return a uint8 tensor of shape {tuple(image.shape)}, got "
                                f"{getattr(fill, 'dtype', type(fill))} {tuple(getattr(fill, 'shape', ()))}")
        return fill.to(image.device)
    else:
        colour = (occluder,) * 3 if isinstance(occluder, int) else tuple(occluder)
        if len(colour) != 3 or not all(isinstance(c, (int, np.integer)) and 0 <= c <= 255 for c in colour):
            raise SaliencyError(f"occluder colour must be 3 integers in 0..255, got {occluder!r}")
    return torch.tensor([int(c) for c in colour], dtype=torch.uint8, device=image.device).view(3, 1, 1).expand_as(image)


def _as_rgb_uint8(image: Tensor | np.ndarray) -> Tensor:
    x = image if isinstance(image, Tensor) else torch.from_numpy(np.array(image))
    if x.dtype != torch.uint8:
        raise SaliencyError(f"image must be uint8, got {x.dtype}")
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise SaliencyError(f"image must be C x H x W with C = 1 or 3, got shape {tuple(x.shape)}")
    return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x.contiguous()


def _plan_stages(staged: StagedTrunk, shapes: Sequence[tuple[int, ...] | None], window: int,
                 max_crop_fraction: float, max_node_fraction: float) -> tuple[list[Locality], list[int]]:
    """Which leading stages run on changed blocks: (the localities of the stages on one crop
    each, then the indices of the stages run node by node). Node by node where the stage has a
    graph for it (:func:`_run_delta`) while its changed output is at most ``max_node_fraction`` of
    its map; stages before the first such graph on crops while a crop is at most
    ``max_crop_fraction`` of the stage's input. ``shapes[k]``: the spatial size of stage k's input
    (None: not a map)."""
    def axes(k: int, length_y: int, length_x: int, loc: Locality) -> tuple[_Axis, _Axis]:
        (hi, wi), (ho, wo) = shapes[k], shapes[k + 1]
        zero = torch.zeros(1, dtype=torch.long)
        return _axis_plan(zero, length_y, hi, ho, loc), _axis_plan(zero, length_x, wi, wo, loc)

    plan_locs: list[Locality] = []
    node_stages: list[int] = []
    length_y = length_x = window
    deltas = staged.delta_stages
    nodes_from_start = bool(deltas) and deltas[0] is not None
    if not nodes_from_start:
        for k, loc in enumerate(_leading_local(staged.localities)):
            if shapes[k + 1] is None:
                break
            ay, ax = axes(k, length_y, length_x, loc)
            if ay.crop_len * ax.crop_len > max_crop_fraction * shapes[k][0] * shapes[k][1]:
                break
            plan_locs.append(loc)
            length_y, length_x = ay.out_len, ax.out_len
    k = len(plan_locs)
    while (plan_locs or nodes_from_start) and k < min(len(staged.stages), len(deltas)) \
            and deltas[k] is not None and staged.localities[k] is not None and shapes[k + 1] is not None:
        ay, ax = axes(k, length_y, length_x, staged.localities[k])
        if ay.out_len * ax.out_len > max_node_fraction * shapes[k + 1][0] * shapes[k + 1][1]:
            break
        node_stages.append(k)
        length_y, length_x = ay.out_len, ax.out_len
        k += 1
    return plan_locs, node_stages


def auto_batch_size(device: torch.device, map_bytes: int) -> int:
    """Occluded images per pass: :data:`OCCLUSION_BATCH` for the device type; on a CPU fewer
    (at least 16) where one image's largest stage map times the batch would exceed
    :data:`CPU_MAP_BUDGET` (ResNet-50 at 242 px: 64, measured 12% faster than 128 there)."""
    batch = OCCLUSION_BATCH.get(device.type, OCCLUSION_BATCH["cpu"])
    if device.type == "cpu" and map_bytes > 0:
        batch = min(batch, max(16, CPU_MAP_BUDGET // map_bytes))
    return batch


def occlusion_scores(
    trunk: Trunk | StagedTrunk,
    image: Tensor | np.ndarray,
    *,
    normalize: Normalize,
    window: int = 10,
    stride: int = 1,
    occluder: Occluder = "imagenet-mean",
    pointwise_normalize: bool = False,
    incremental: bool = True,
    max_crop_fraction: float = 0.5,
    max_node_fraction: float = 0.99,
    batch_size: int | None = None,
    progress: Progress | None = None,
    rows: tuple[int, int] | None = None,
) -> np.ndarray:
    """Relative feature change ||f(x) - f(x_occ)|| / ||f(x)|| for every window position.

    ``trunk``: normalised float B x 3 x H x W -> B x D (a :func:`prepare_trunk` result for
    speed, or any callable); ``normalize``: the model's own uint8 -> float normalisation.
    ``image``: uint8 C x H x W (greyscale is stacked to RGB first, so a coloured occluder
    stays coloured). ``occluder``: see the module docstring; a callable gets the clean uint8
    3 x H x W image and returns the uint8 image whose pixels fill the window (e.g. a blur).
    ``pointwise_normalize``: the caller's promise that ``normalize`` treats each pixel on its
    own (see :data:`POINTWISE_NORMALIZATIONS`), which lets the pixel-space occluder use
    incremental inference; the paper's occluder always can. ``incremental``: leading local
    stages run on the changed blocks only: node by node where the stage has a graph for it
    (:attr:`StagedTrunk.delta_stages`) while its changed output is at most ``max_node_fraction``
    of its map, else on one crop per stage while the crop is at most ``max_crop_fraction`` of
    the stage's input; the rest on full maps.
    Clean and occluded features go through the same modules in the same dtype.
    ``batch_size``: occluded images per pass; None: :func:`auto_batch_size`.
    ``rows``: only window rows ``[first, last)`` of ``window_starts(H)`` (to split the work).
    Returns float64 ``len(window_starts(H)) x len(window_starts(W))`` (or those rows).
    """
    x = _as_rgb_uint8(image)
    _, h, w = x.shape
    _check_geometry(h, w, window, stride)
    if batch_size is not None and batch_size < 1:
        raise SaliencyError(f"batch_size must be >= 1, got {batch_size}")
    for name, value in (("max_crop_fraction", max_crop_fraction), ("max_node_fraction", max_node_fraction)):
        if not 0 < value <= 1:
            raise SaliencyError(f"{name} must be in (0, 1], got {value}")
    if isinstance(trunk, nn.Module):
        _check_eval(trunk)
    staged = StagedTrunk.wrap(trunk)
    if staged.device is not None:
        x = x.to(staged.device)
    fill = _fill_image(occluder, x)
    paper = fill is None
    t0 = time.perf_counter()
    with torch.inference_mode():
        clean_norm = normalize(x[None])
        if clean_norm.ndim != 4 or clean_norm.shape[0] != 1 or tuple(clean_norm.shape[2:]) != (h, w):
            raise SaliencyError(f"normalize must map 1 x 3 x {h} x {w} uint8 to 1 x 3 x {h} x {w} float, "
                                f"got {tuple(clean_norm.shape)}")
        # clean forward through the stages, keeping every stage's output (H x W x C views)
        maps, shapes = [], [(h, w)]
        y = staged.cast(clean_norm)
        for stage in staged.stages:
            y = stage(y)
            maps.append(y[0].permute(1, 2, 0) if y.ndim == 4 else None)
            shapes.append(tuple(y.shape[2:]) if y.ndim == 4 else None)
        f0 = staged.head(y).double().reshape(1, -1)
        norm0 = float(f0.norm())
        if not math.isfinite(norm0) or norm0 == 0.0:
            raise SaliencyError(f"the clean image's features have norm {norm0}: relative scores are undefined")

        local = (paper or pointwise_normalize) and incremental
        plan_locs, node_stages = _plan_stages(staged, shapes, window, max_crop_fraction,
                                              max_node_fraction) if local else ([], [])
        node_maps: dict[int, dict[torch.fx.Node, Tensor]] = {}
        if node_stages:  # clean maps (and so f0) through the very graphs the occluded images take
            y = maps[node_stages[0] - 1].permute(2, 0, 1)[None] if node_stages[0] else staged.cast(clean_norm)
            for k in range(node_stages[0], len(staged.stages)):
                if k in node_stages:
                    y, node_maps[k] = _clean_nodes(staged.delta_stages[k], y)
                else:
                    y = staged.stages[k](y)
                maps[k] = y[0].permute(1, 2, 0) if y.ndim == 4 else None
            f0 = staged.head(y).double().reshape(1, -1)
            norm0 = float(f0.norm())

        if batch_size is None:
            biggest = max(m.numel() * m.element_size() for m in maps if m is not None) if any(
                m is not None for m in maps) else 0
            batch_size = auto_batch_size(x.device, biggest)
        src = (clean_norm[0] if paper else x).permute(1, 2, 0)  # H x W x C
        fill_hwc = None if paper else fill.permute(1, 2, 0)
        ys, xs = window_starts(h, window, stride), window_starts(w, window, stride)
        if rows is not None:
            if not 0 <= rows[0] < rows[1] <= len(ys):
                raise SaliencyError(f"rows must satisfy 0 <= first < last <= {len(ys)}, got {rows}")
            ys = ys[rows[0]:rows[1]]
        qy_all = torch.from_numpy(np.repeat(ys, len(xs))).to(x.device)
        qx_all = torch.from_numpy(np.tile(xs, len(ys))).to(x.device)
        total = len(qy_all)
        ar = torch.arange(max(h, w), device=x.device)

        def window_delta(qy: Tensor, qx: Tensor) -> _Delta:
            """The occluded windows as the changed blocks of the (cast) normalised input."""
            if paper:
                block = torch.zeros(len(qy), window, window, 3, device=x.device)
            else:
                filled = _compose(fill_hwc, None, qy, qx, qy, qx, window, window).permute(0, 3, 1, 2)
                block = normalize(filled).permute(0, 2, 3, 1)
            return _Delta(block if staged.dtype is None else block.to(staged.dtype), qy, qx)

        def features(qy: Tensor, qx: Tensor) -> Tensor:
            """Features (float64 B x D) of the images occluded at (qy, qx)."""
            if node_stages and not plan_locs:
                delta = window_delta(qy, qx)
                for j in node_stages:
                    delta = _run_delta(staged.delta_stages[j], node_maps[j], delta)
                y = _paste(maps[node_stages[-1]], delta.patch, delta.y0, delta.x0).permute(0, 3, 1, 2)
                for stage in staged.stages[len(node_stages):]:
                    y = stage(y)
                return staged.head(y).double().reshape(len(qy), -1)
            if plan_locs:
                py = _axis_plan(qy, window, h, shapes[1][0], plan_locs[0])
                px = _axis_plan(qx, window, w, shapes[1][1], plan_locs[0])
                cy, cx, ly, lx = py.crop0, px.crop0, py.crop_len, px.crop_len
            else:
                cy, cx, ly, lx = torch.zeros_like(qy), torch.zeros_like(qx), h, w
            # occluded input crops: a window mask broadcast over the batch of positions
            base = _compose(src, None, qy, qx, cy, cx, ly, lx)
            dy = cy[:, None] + ar[:ly] - qy[:, None]
            dx = cx[:, None] + ar[:lx] - qx[:, None]
            mask = (((dy >= 0) & (dy < window))[:, :, None] & ((dx >= 0) & (dx < window))[:, None, :])[..., None]
            if paper:
                crop = torch.where(mask, 0.0, base).permute(0, 3, 1, 2)
            else:
                fill_crop = _compose(fill_hwc, None, qy, qx, cy, cx, ly, lx)
                crop = normalize(torch.where(mask, fill_crop, base).permute(0, 3, 1, 2))
            y = staged.cast(crop)
            for k in range(len(plan_locs)):
                y = staged.stages[k](y)
                patch = _take(y, py.offset, py.out_len, px.offset, px.out_len)
                hi, wi = shapes[k + 1]
                if k + 1 < len(plan_locs):
                    ho, wo = shapes[k + 2]
                    ny = _axis_plan(py.out0, py.out_len, hi, ho, plan_locs[k + 1])
                    nx = _axis_plan(px.out0, px.out_len, wi, wo, plan_locs[k + 1])
                    y = _compose(maps[k], patch, py.out0, px.out0, ny.crop0, nx.crop0, ny.crop_len, nx.crop_len)
                    py, px = ny, nx
                elif node_stages:
                    delta = _Delta(patch, py.out0, px.out0)
                    for j in node_stages:
                        delta = _run_delta(staged.delta_stages[j], node_maps[j], delta)
                    y = _paste(maps[node_stages[-1]], delta.patch, delta.y0, delta.x0)
                else:
                    y = _paste(maps[k], patch, py.out0, px.out0)
                y = y.permute(0, 3, 1, 2)
            for stage in staged.stages[len(plan_locs) + len(node_stages):]:
                y = stage(y)
            return staged.head(y).double().reshape(len(qy), -1)

        scores = np.empty(total)
        for start in range(0, total, batch_size):
            qy, qx = qy_all[start:start + batch_size], qx_all[start:start + batch_size]
            f = features(qy, qx)
            scores[start:start + len(qy)] = ((f - f0).norm(dim=1) / norm0).cpu().numpy()
            if progress is not None:
                progress(start + len(qy), total)
    if not np.isfinite(scores).all():
        raise SaliencyError("occluded features contain NaN or infinity")
    log.info("occlusion: %d positions (window %d, stride %d, occluder %s, batch %d) in %.1fs; trunk %s; "
             "%d stage(s) on crops, %d node by node", total, window, stride, "zero-after-normalize" if paper else
             (occluder if isinstance(occluder, str) else "custom"), batch_size, time.perf_counter() - t0,
             staged.description, len(plan_locs), len(node_stages))
    return scores.reshape(len(ys), len(xs))


def occlusion_map(
    trunk: Trunk | StagedTrunk,
    image: Tensor | np.ndarray,
    *,
    normalize: Normalize,
    window: int = 10,
    stride: int = 1,
    occluder: Occluder = "imagenet-mean",
    pointwise_normalize: bool = False,
    incremental: bool = True,
    max_crop_fraction: float = 0.5,
    max_node_fraction: float = 0.99,
    batch_size: int | None = None,
    progress: Progress | None = None,
    crop: bool = True,
) -> np.ndarray:
    """The occlusion saliency map (float64; 224 x 224 for a 242 x 242 image at the defaults).

    :func:`occlusion_scores` followed by :func:`accumulate_scores`; exact at stride 1,
    an approximation of the stride-1 map otherwise (:func:`is_exact`).
    """
    x = _as_rgb_uint8(image)
    scores = occlusion_scores(trunk, x, normalize=normalize, window=window, stride=stride, occluder=occluder,
                              pointwise_normalize=pointwise_normalize, incremental=incremental,
                              max_crop_fraction=max_crop_fraction, max_node_fraction=max_node_fraction,
                              batch_size=batch_size, progress=progress)
    if not is_exact(stride):
        log.info("occlusion map at stride %d: an approximation of the stride-1 map", stride)
    return accumulate_scores(scores, (x.shape[1], x.shape[2]), window, stride, crop=crop)


# --------------------------------------------------------------------------- the protocol

def _save_maps(out_dir: Any, stem: str, saliency: np.ndarray, crop: np.ndarray) -> list[str]:
    """``<stem>_saliency.npy`` (the float map), a heatmap PNG and an overlay PNG on the crop."""
    from PIL import Image

    from medxfer.cache import atomic_path, save_npy_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}_saliency.npy", out_dir / f"{stem}_saliency_heatmap.png",
             out_dir / f"{stem}_saliency_overlay.png"]
    save_npy_atomic(paths[0], saliency.astype(np.float32))
    lo, hi = float(saliency.min()), float(saliency.max())
    scaled = (saliency - lo) / (hi - lo) if hi > lo else np.zeros_like(saliency)
    heat = _inferno(scaled)
    rgb = crop if crop.shape[-1] == 3 else np.repeat(crop, 3, axis=-1)
    overlay = (0.5 * rgb.astype(np.float32) + 0.5 * heat.astype(np.float32)).round().astype(np.uint8)
    for path, arr in ((paths[1], heat), (paths[2], overlay)):
        with atomic_path(path) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
    return [str(p) for p in paths]


def _inferno(x: np.ndarray) -> np.ndarray:
    """A [0, 1] map through matplotlib's perceptually uniform 'inferno' colour map, uint8 RGB."""
    from matplotlib import colormaps

    return (colormaps["inferno"](x)[..., :3] * 255).round().astype(np.uint8)


@dataclass(frozen=True)
class SaliencyParams(Params):
    """PROTOCOL.md: 242 bicubic resize and crop, 10 x 10 window at stride 1, relative L2 change of
    the pooled feature, the map cropped to 224; attentive diffusion = % of pixels above the mean."""

    images: int = setting(10, check=positive, help="seeded images per dataset (the same for every model)")
    splits: tuple[str, ...] | None = setting(None, help="splits the images are drawn from (None: all)")
    image_size: int = setting(242, check=positive, help="resize and centre crop before occluding")
    window: int = setting(10, check=positive, help="occluding window (pixels)")
    stride: int = setting(1, check=positive, help="window stride; above 1 the map is an approximation")
    occluder: Literal["imagenet-mean", "paper"] = setting(
        "imagenet-mean", help="imagenet-mean: the ImageNet mean colour in pixel space before the model's "
        "normalisation (the same occluded image for every model); paper: zero after normalisation")
    precision: Literal["fp32", "bf16"] = setting("fp32", help="bf16 moves maps by a median 23% (measured): "
                                                 "quick looks only")
    batch_size: int | None = setting(None, check=positive, execution=True,
                                     help="occluded images per forward pass (None: 128 on a CPU, fewer for "
                                          "large maps; 512 on CUDA)")


def _run(ctx: Any, p: SaliencyParams, seed: int) -> EvalResult:
    model = ctx.model
    prepared = ctx.prepared(size=p.image_size)
    rows = choose_rows(prepared.records, p.images, seed, splits=p.splits)
    if len(rows) == 0:
        raise SaliencyError(f"saliency: no images in splits {p.splits} (--set saliency.splits=null)")
    dtype = torch.bfloat16 if p.precision == "bf16" else torch.float32
    trunk = prepare_trunk(model.trunk, dtype=dtype, device=ctx.device)
    pointwise = model.normalization.name in POINTWISE_NORMALIZATIONS
    offset = (p.window - 1) if is_exact(p.stride) else 0
    out_dir, files, per_image = ctx.artifact_dir(), [], []
    for row in rows:
        image = torch.from_numpy(np.array(prepared.array[row])).permute(2, 0, 1)
        n_pos = len(window_starts(p.image_size, p.window, p.stride)) ** 2
        steps = bar(total=n_pos, desc=f"saliency {model.name} image {int(row)}", unit="pos")
        smap = occlusion_map(trunk, image, normalize=model.normalize, window=p.window, stride=p.stride,
                             occluder="zero-after-normalize" if p.occluder == "paper" else p.occluder,
                             pointwise_normalize=pointwise, batch_size=p.batch_size,
                             progress=lambda done, total: steps.update(done - steps.n))
        steps.close()
        diffusion = attentive_diffusion(smap)
        crop = np.array(prepared.array[row])[offset:offset + smap.shape[0], offset:offset + smap.shape[1]]
        if out_dir is not None:
            files += _save_maps(out_dir, f"{int(row):06d}", smap, crop)
        per_image.append({"row": int(row), "path": prepared.records[row].path, "attentive_diffusion": diffusion})
    values = np.array([d["attentive_diffusion"] for d in per_image])
    ci = float(1.96 * values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
    return EvalResult(
        protocol="saliency", metrics={"attentive_diffusion": float(values.mean()), "images": float(len(values))},
        headline=Headline("attentive_diffusion", float(values.mean()), ci, higher_is_better=False),
        params=p.to_dict(), files=files,
        details={"images": per_image, "trunk": trunk.description, "exact": is_exact(p.stride),
                 "occluder": p.occluder, "ci": "1.96 * std / sqrt(images)",
                 "direction": "lower attentive diffusion = saliency concentrated on fewer pixels"})


register_protocol(Protocol(
    name="saliency", version="1", params=SaliencyParams, run=_run, analysis=True,
    needs=Needs(images=True, model=True, accelerator="gpu"), compat={"paper": {"occluder": "paper"}},
    description="occlusion saliency (10 x 10 window, stride 1, 242 crop) and attentive diffusion "
                "(paper Figures 6-9, Table A7)",
), aliases=("occlusion",))

