"""Deep-image-prior reconstruction of an image from a frozen backbone's last-stage feature map.

The generator is the DIP "skip" encoder-decoder (Ulyanov et al. 2018) with the hyper-parameters
of PROTOCOL.md ("Deep image prior reconstruction and LPIPS"): input depth 32, channels
[16, 32, 64, 128, 128, 128] down and up, 4 skip channels per scale, filter sizes
[7, 7, 5, 5, 3, 3] down and up, average-pool downsampling, nearest upsampling, zero padding,
LeakyReLU(0.2), BatchNorm, and a sigmoid on the output (``need_sigmoid=True``, the DIP code's
feature-inversion setting; the spec is silent, and the sigmoid keeps every generated image in
(0, 1), the range the backbone's normalisation and LPIPS expect). The input is fixed noise
32 x 256 x 256 ~ 0.1 * U(0, 1); the output is cropped top-left to the target's size (224).

Everything random (generator initialisation, noise) comes from local ``torch.Generator`` objects
seeded from ``seed``; the global RNG is neither seeded nor consumed.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

INPUT_DEPTH = 32
NOISE_SIZE = 256
NOISE_SCALE = 0.1
CHANNELS_DOWN = (16, 32, 64, 128, 128, 128)
CHANNELS_UP = (16, 32, 64, 128, 128, 128)
CHANNELS_SKIP = (4, 4, 4, 4, 4, 4)
FILTERS_DOWN = (7, 7, 5, 5, 3, 3)
FILTERS_UP = (7, 7, 5, 5, 3, 3)
LEAKY_SLOPE = 0.2
STEPS = 3000
LR = 1e-3

Images = Callable[[torch.Tensor], torch.Tensor]


def _conv_bn_act(cin: int, cout: int, k: int, *, pool: bool = False) -> nn.Sequential:
    """Conv k x k (zero 'same' padding) [-> 2x2 average pool] -> BatchNorm -> LeakyReLU(0.2)."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=(k - 1) // 2)]
    if pool:
        layers.append(nn.AvgPool2d(2, 2))
    layers += [nn.BatchNorm2d(cout), nn.LeakyReLU(LEAKY_SLOPE)]
    return nn.Sequential(*layers)


def _center_crop_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    dh, dw = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
    return x[:, :, dh:dh + h, dw:dw + w]


class _Scale(nn.Module):
    """One scale of the skip network: a skip branch and a deeper branch (down, inner scales,
    up), concatenated and merged.

    skip:  1x1 conv (cin -> s) -> BN -> act
    down:  k conv (cin -> d) -> avg-pool 2 -> BN -> act -> k conv (d -> d) -> BN -> act
    inner: the next scale (d -> its up channels), absent at the deepest scale
    up:    nearest 2x upsampling
    merge: BN(s + k') -> k conv (s + k' -> u) -> BN -> act -> 1x1 conv (u -> u) -> BN -> act
    """

    def __init__(self, cin: int, down: int, up: int, skip: int, k_down: int, k_up: int,
                 inner: _Scale | None) -> None:
        super().__init__()
        self.out_channels = up
        self.skip = _conv_bn_act(cin, skip, 1) if skip else None
        self.down = nn.Sequential(_conv_bn_act(cin, down, k_down, pool=True), _conv_bn_act(down, down, k_down))
        self.inner = inner
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        deep = inner.out_channels if inner is not None else down
        self.merge = nn.Sequential(
            nn.BatchNorm2d(skip + deep), _conv_bn_act(skip + deep, up, k_up), _conv_bn_act(up, up, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(x)
        if self.inner is not None:
            y = self.inner(y)
        y = self.up(y)
        if self.skip is not None:
            s = self.skip(x)
            h, w = min(s.shape[2], y.shape[2]), min(s.shape[3], y.shape[3])
            y = torch.cat([_center_crop_to(s, h, w), _center_crop_to(y, h, w)], dim=1)
        return self.merge(y)


class SkipGenerator(nn.Module):
    """The DIP "skip" encoder-decoder: noise B x input_depth x H x W -> image B x out x H x W.

    H and W should be divisible by 2 ** len(down) (256 with 6 scales); otherwise the skip and
    deep branches are centre-cropped to a common size before concatenation.
    """

    def __init__(self, input_depth: int = INPUT_DEPTH, out_channels: int = 3, *,
                 down: Sequence[int] = CHANNELS_DOWN, up: Sequence[int] = CHANNELS_UP,
                 skip: Sequence[int] = CHANNELS_SKIP, filters_down: Sequence[int] = FILTERS_DOWN,
                 filters_up: Sequence[int] = FILTERS_UP, sigmoid: bool = True) -> None:
        super().__init__()
        n = len(down)
        if not (len(up) == len(skip) == len(filters_down) == len(filters_up) == n) or n == 0:
            raise ValueError("down, up, skip and filter sizes need one entry per scale")
        ins = [input_depth, *down[:-1]]
        inner: _Scale | None = None
        for i in reversed(range(n)):
            inner = _Scale(ins[i], down[i], up[i], skip[i], filters_down[i], filters_up[i], inner)
        assert inner is not None
        self.body = inner
        self.head = nn.Conv2d(up[0], out_channels, 1)
        self.sigmoid = sigmoid
        self.input_depth = input_depth

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.head(self.body(z))
        return torch.sigmoid(y) if self.sigmoid else y


def _seeds(seed: int) -> tuple[int, int]:
    """Two independent 63-bit seeds (weights, noise) derived from ``seed``."""
    a, b = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64)
    return int(a) >> 1, int(b) >> 1


def init_generator_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Initialise in place with PyTorch's default layer initialisation, drawn from ``generator``:
    conv weights Kaiming-uniform (a = sqrt(5)), biases U(-1/sqrt(fan_in), 1/sqrt(fan_in));
    BatchNorm weight 1, bias 0, fresh running statistics."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            with torch.no_grad():
                w = torch.empty(m.weight.shape, dtype=m.weight.dtype)
                nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
                m.weight.copy_(w)
                if m.bias is not None:
                    fan_in = m.weight[0].numel()
                    bound = 1.0 / math.sqrt(fan_in)
                    m.bias.copy_(torch.empty(m.bias.shape, dtype=m.bias.dtype).uniform_(
                        -bound, bound, generator=generator))
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()  # weight 1, bias 0, running stats reset: nothing random
    return module


def build_generator(seed: int, device: str | torch.device = "cpu", **kwargs: object) -> SkipGenerator:
    """The skip generator (PROTOCOL.md hyper-parameters unless overridden by ``kwargs``, see
    :class:`SkipGenerator`), initialised from ``seed`` alone (built on the meta device, so the
    global RNG is not touched), in training mode (DIP optimises with batch statistics)."""
    with torch.device("meta"):
        gen = SkipGenerator(**kwargs)  # type: ignore[arg-type]
    gen = gen.to_empty(device="cpu")
    init_generator_(gen, torch.Generator(device="cpu").manual_seed(_seeds(seed)[0]))
    return gen.to(device).train()


def make_noise(seed: int, depth: int = INPUT_DEPTH, size: int = NOISE_SIZE,
               device: str | torch.device = "cpu") -> torch.Tensor:
    """The fixed generator input 1 x depth x size x size ~ NOISE_SCALE * U(0, 1), drawn on the CPU
    from ``seed`` (the same noise on every device)."""
    g = torch.Generator(device="cpu").manual_seed(_seeds(seed)[1])
    return (NOISE_SCALE * torch.rand(1, depth, size, size, generator=g)).to(device)


def _owning_module(fn: object) -> nn.Module | None:
    """The module behind ``fn``: itself, a bound method's instance, or a partial's function's."""
    if isinstance(fn, nn.Module):
        return fn
    if isinstance(fn, functools.partial):
        return _owning_module(fn.func)
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


@contextmanager
def frozen(module: nn.Module | None) -> Iterator[None]:
    """``module`` in eval mode with every parameter's ``requires_grad`` off; both restored on exit."""
    if module is None:
        yield
        return
    modes = {m: m.training for m in module.modules()}
    flags = {p: p.requires_grad for p in module.parameters()}
    module.eval()
    for p in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        for m, t in modes.items():
            m.train(t)


def _grad_snapshot(module: nn.Module | None) -> dict[str, torch.Tensor | None]:
    """Copies of the backbone's existing ``.grad`` tensors (``None`` where there is none)."""
    if module is None:
        return {}
    return {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in module.named_parameters()}


def _assert_no_weight_grads(module: nn.Module | None, before: dict[str, torch.Tensor | None]) -> None:
    """Raise if any backbone parameter's ``.grad`` changed since ``before`` (``None`` must stay ``None``)."""
    if module is None:
        return
    bad = []
    for n, p in module.named_parameters():
        old = before.get(n)
        if (p.grad is None) != (old is None) or (old is not None and not torch.equal(p.grad, old)):
            bad.append(n)
    if bad:
        raise AssertionError(f"backbone parameters received gradients: {bad[:5]}")


@dataclass(frozen=True)
class Reconstruction:
    """The result of :func:`reconstruct`.

    image: float32 3 x H x W on the CPU, in [0, 1] (the generator output after the last update,
      in the generator's training mode as in DIP).
    losses: the MSE before each of the ``steps`` updates.
    final_loss: the MSE of ``image``.
    seconds: wall time of the optimisation loop (excluding set-up and the target's features).
    """

    image: torch.Tensor
    losses: list[float]
    final_loss: float
    seconds: float


def _check_target(x: torch.Tensor) -> torch.Tensor:
    if not torch.is_floating_point(x):
        raise TypeError(f"target_image must be a float tensor in [0, 1], got {x.dtype}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError(f"target_image must be 3 x H x W or 1 x 3 x H x W, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise ValueError("target_image must be finite and in [0, 1]")
    return x.float()


def reconstruct(
    target_features: Images,
    target_image: torch.Tensor,
    *,
    normalize: Images | None,
    seed: int,
    steps: int = STEPS,
    lr: float = LR,
    backbone: nn.Module | None = None,
    progress: Callable[[int, float], None] | None = None,
    progress_every: int = 100,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
    noise_size: int = NOISE_SIZE,
) -> Reconstruction:
    """Invert ``target_features`` with a deep image prior: fit the skip generator so that the
    feature map of its output matches the target's, and return the generated image.

    target_features: the frozen backbone's last-stage unpooled map, B x 3 x H x W -> any tensor
      (e.g. layer4 of a ResNet, denseblock4 before norm5 of a DenseNet). It is called on
      ``normalize(image)``; gradients must flow through it to its input.
    target_image: the target crop, 3 x H x W (or 1 x 3 x H x W) float in [0, 1] (224 x 224 in
      the protocol; H, W <= ``noise_size``).
    normalize: the model's own input normalisation of float [0, 1] B x 3 x H x W images, applied
      to the target and to every generator output before ``target_features`` (the default of
      the protocol); ``None`` feeds raw [0, 1] images, the authors' behaviour (compat), and also
      right for a model without normalisation (SimCLR-v1). Required, so the choice is explicit.
    seed: seeds the generator initialisation and the noise (local generators only).
    steps, lr: Adam updates and learning rate (protocol: 3000, 1e-3; the authors ran 3001).
    backbone: the module behind ``target_features``, held in eval mode with ``requires_grad``
      off for the run (both restored afterwards); found automatically when ``target_features``
      is a module, a bound method of one, or a ``functools.partial`` of those. Whatever it is,
      gradients are only ever computed for the generator's parameters (``backward(inputs=...)``),
      which are the only ones the optimiser sees; after the first and the last step every
      backbone parameter's ``.grad`` is checked to be unchanged (``None`` stays ``None``).
    progress: called as ``progress(step, loss)`` every ``progress_every`` steps and at the end
      (each call synchronises the device).
    device: where to run (default: the backbone's device, else the target's); the backbone must
      already be there.
    amp: autocast (bf16 where supported, else fp16 with loss scaling); default on for CUDA only.
      The target's features are computed under the same precision as the generator's.
    channels_last: channels-last generator and inputs; default on for CUDA only.
    noise_size: side of the square noise input (protocol: 256).
    """
    target = _check_target(target_image)
    h, w = target.shape[2], target.shape[3]
    if h > noise_size or w > noise_size:
        raise ValueError(f"target {h}x{w} is larger than the generator output {noise_size}")
    if steps < 0:
        raise ValueError("steps must be >= 0")
    module = backbone if backbone is not None else _owning_module(target_features)
    if module is None:
        log.warning("reconstruct: no backbone module given or found behind target_features; "
                    "its eval mode cannot be enforced (pass backbone=)")
    if device is None:
        param = next(module.parameters(), None) if module is not None else None
        device = param.device if param is not None else target.device
    dev = torch.device(device)
    use_amp = (dev.type == "cuda") if amp is None else amp
    use_cl = (dev.type == "cuda") if channels_last is None else channels_last
    amp_dtype = torch.bfloat16
    if use_amp and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        amp_dtype = torch.float16
    scaler = None  # loss scaling for fp16 autocast only
    if use_amp and amp_dtype == torch.float16:
        scaler_cls = getattr(torch.amp, "GradScaler", None)  # torch >= 2.3; torch.cuda.amp's before
        scaler = scaler_cls(dev.type) if scaler_cls is not None else torch.cuda.amp.GradScaler()
    fmt = torch.channels_last if use_cl else torch.contiguous_format

    def autocast() -> AbstractContextManager[object]:
        return torch.autocast(dev.type, dtype=amp_dtype) if use_amp else nullcontext()

    def prep(x: torch.Tensor) -> torch.Tensor:
        return normalize(x) if normalize is not None else x

    gen = build_generator(seed, dev).to(memory_format=fmt)
    noise = make_noise(seed, gen.input_depth, noise_size, dev).contiguous(memory_format=fmt)
    params = list(gen.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    target = target.to(dev).contiguous(memory_format=fmt)
    log.info("DIP reconstruction: %d steps, lr %g, seed %d, device %s, amp %s, channels_last %s, "
             "normalised input %s", steps, lr, seed, dev, use_amp and str(amp_dtype), use_cl,
             normalize is not None)
    losses = torch.empty(steps, dtype=torch.float32, device=dev)
    grads_before = _grad_snapshot(module)
    with frozen(module):
        with torch.no_grad(), autocast():
            goal = target_features(prep(target)).float()
        t0 = time.perf_counter()
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            with autocast():
                out = gen(noise)[:, :, :h, :w]
                feats = target_features(prep(out))
            loss = F.mse_loss(feats.float(), goal)
            if step == 0 and not loss.requires_grad:
                raise RuntimeError("target_features cut the graph (no_grad / inference_mode / detach?): "
                                   "no gradient reaches the generator")
            if scaler is not None:
                scaler.scale(loss).backward(inputs=params)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward(inputs=params)
                opt.step()
            losses[step] = loss.detach()
            if step == 0:
                _assert_no_weight_grads(module, grads_before)
            if progress is not None and ((step + 1) % progress_every == 0 or step + 1 == steps):
                progress(step + 1, float(loss.detach()))
        seconds = time.perf_counter() - t0
        _assert_no_weight_grads(module, grads_before)
        with torch.no_grad(), autocast():
            out = gen(noise)[:, :, :h, :w]
            final = F.mse_loss(target_features(prep(out)).float(), goal)
    image = out[0].float().clamp(0.0, 1.0).contiguous().cpu()
    curve = losses.cpu().tolist()
    log.info("DIP reconstruction done: loss %.4g -> %.4g in %.1f s",
             curve[0] if curve else float(final), float(final), seconds)
    return Reconstruction(image=image, losses=curve, final_loss=float(final), seconds=seconds)
