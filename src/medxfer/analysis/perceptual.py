"""LPIPS v0.1 perceptual distance (AlexNet, SqueezeNet, VGG-16 and their mean) via the ``lpips``
package, with its silent failure modes guarded.

The package builds its trunks from torchvision and, by default, downloads torchvision's ImageNet
weights; it loads its linear heads with ``strict=False`` (a key mismatch loads nothing and leaves
random heads). Here the trunk is built without weights (``pnet_rand=True``), the ImageNet weights
come from a file or state dict the caller provides (medxfer's weight cache), and after loading:

* the heads must equal the v0.1 files shipped in the lpips 0.1.4 wheel (pinned SHA-256), key for
  key, and be >= 0 (true of every v0.1 head weight);
* every trunk tensor must equal the provided one, and every provided ``features.*`` tensor must
  have been used.

torchvision >= 0.13 deprecates the ``pretrained=`` argument that ``lpips.pretrained_networks``
passes (two UserWarnings per trunk, and a break once it is removed). While an LPIPS model is
built, that module's reference to ``torchvision.models`` is swapped for a stand-in that builds
the same architectures with ``weights=None`` (restored straight afterwards, under a lock); the
package itself is not modified. The construction also runs under ``torch.random.fork_rng`` so the
trunk's throw-away random initialisation leaves the global RNG as it was.

Inputs: the reconstruction is clipped to [0, 1], the target must already be in [0, 1]; both are
scaled to [-1, 1] (LPIPS's convention) at 224 x 224.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

from medxfer.errors import UsageError

log = logging.getLogger(__name__)

NETS = ("alex", "squeeze", "vgg")
FETCH_COMMAND = "medxfer fetch lpips"
SIZE = 224


@dataclass(frozen=True)
class TorchvisionWeights:
    """The torchvision ImageNet file an LPIPS trunk needs (only its ``features.*`` keys are used)."""

    arch: str
    filename: str
    url: str
    sha256_prefix: str  # the hash prefix in torchvision's file name


def _torchvision_weights() -> dict[str, TorchvisionWeights]:
    from medxfer.models.auxiliary import AUXILIARY

    archs = {"alex": "alexnet", "squeeze": "squeezenet1_1", "vgg": "vgg16"}
    return {net: TorchvisionWeights(arch, (a := AUXILIARY.get(f"lpips-{net}")).filename, a.url, a.sha256_prefix)
            for net, arch in archs.items()}


# the facts of each file are declared once, with the other cached weights (medxfer.models.auxiliary)
TORCHVISION_WEIGHTS: dict[str, TorchvisionWeights] = _torchvision_weights()

# SHA-256 of the v0.1 linear heads in the lpips 0.1.4 wheel (lpips/weights/v0.1/<net>.pth).
HEAD_SHA256 = {
    "alex": "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
    "squeeze": "4a5350f23600cb79923ce65bb07cbf57dca461329894153e05a1346bd531cf76",
    "vgg": "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
}
# LPIPS v0.1's fixed input scaling (ScalingLayer): (x - shift) / scale.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

StateDict = Mapping[str, torch.Tensor]
WeightsSource = Union[str, "os.PathLike[str]", StateDict]


class PerceptualWeightsError(UsageError):
    """LPIPS weights that are wrong: hash mismatch, unexpected keys, heads or trunk not as loaded."""


class MissingPerceptualWeightsError(PerceptualWeightsError):
    """The torchvision ImageNet weights an LPIPS trunk needs are not available; the message names
    the file and the command that fetches it."""


def _missing(net: str, detail: str) -> MissingPerceptualWeightsError:
    tw = TORCHVISION_WEIGHTS[net]
    return MissingPerceptualWeightsError(
        f"LPIPS ({net}) needs torchvision's ImageNet {tw.arch} weights ({tw.filename}, {tw.url}): {detail}. "
        f"Run `{FETCH_COMMAND}` to fetch them into the weight cache.")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


_TV_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth?$")


def _check_digest(path: Path, expected: str | None, what: str) -> None:
    """``expected``: a full SHA-256 or a prefix of >= 8 hex digits; ``None``: the prefix in a
    torchvision-style file name (``name-<hex>.pth``) if there is one, else no check."""
    if expected is None:
        m = _TV_NAME.search(path.name)
        if m is None:
            log.info("%s: %s has no expected sha256 and no hash in its name; not verified", what, path)
            return
        expected = m.group(1)
    expected = expected.lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", expected):
        raise ValueError(f"{what}: expected sha256 must be 8-64 hex digits, got {expected!r}")
    digest = _sha256(path)
    if not digest.startswith(expected):
        raise PerceptualWeightsError(
            f"{what}: {path} has sha256 {digest}, expected {expected}{'...' if len(expected) < 64 else ''} "
            f"(wrong, truncated or corrupt file; `{FETCH_COMMAND}` fetches the right one)")


def _lpips():  # type: ignore[no-untyped-def]
    try:
        import lpips  # a runtime dependency of this analysis only, imported when used
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the perceptual analysis needs the `lpips` package (pip install lpips)") from e
    return lpips


def head_file(net: str) -> Path:
    """The v0.1 linear-head file shipped in the installed lpips package."""
    return Path(_lpips().__file__).resolve().parent / "weights" / "v0.1" / f"{net}.pth"


def shipped_heads(net: str) -> dict[str, torch.Tensor]:
    """The wheel's v0.1 heads for ``net`` (SHA-256 checked against lpips 0.1.4's)."""
    _check_net(net)
    path = head_file(net)
    if not path.is_file():
        raise PerceptualWeightsError(f"lpips head file missing: {path}")
    digest = _sha256(path)
    if digest != HEAD_SHA256[net]:
        raise PerceptualWeightsError(f"lpips head file {path} has sha256 {digest}, expected lpips 0.1.4's "
                                     f"{HEAD_SHA256[net]}")
    return dict(torch.load(path, map_location="cpu", weights_only=True))


def _check_net(net: str) -> None:
    if net not in TORCHVISION_WEIGHTS:
        raise ValueError(f"unknown LPIPS net {net!r}; expected one of {NETS}")


def backbone_keys(net: str) -> tuple[str, ...]:
    """The torchvision state-dict keys (``features.<i>.<param>``) the LPIPS ``net`` trunk uses:
    every parameter of torchvision's ``<arch>().features`` (alexnet: conv layers 0, 3, 6, 8, 10;
    vgg16: the 13 convs 0..28; squeezenet1_1: conv 0 and the Fire modules 3, 4, 6, 7, 9-12)."""
    _check_net(net)
    factory = getattr(torchvision.models, TORCHVISION_WEIGHTS[net].arch)
    with torch.device("meta"):
        features = factory(weights=None).features
    return tuple(f"features.{k}" for k in features.state_dict())


def load_backbone_state(net: str, source: WeightsSource, *, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The ``features.*`` tensors of torchvision's ImageNet ``net`` weights, from a file (a torchvision
    ``.pth`` state dict, read with ``weights_only=True``) or an in-memory state dict.

    A file is checked against ``sha256`` (full digest or a >= 8-digit prefix) or, without one,
    against the hash prefix in a torchvision-style name (``alexnet-owt-7be5be79.pth``). Keys
    ``classifier.*`` are ignored; every key of :func:`backbone_keys` must be present with
    floating-point values, and nothing else may be. Raises :class:`MissingPerceptualWeightsError`
    for a missing file, :class:`PerceptualWeightsError` for a mismatch.
    """
    _check_net(net)
    what = f"LPIPS {net} trunk weights"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise _missing(net, f"{path} does not exist")
        _check_digest(path, sha256, what)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a file torch cannot read safely
            raise PerceptualWeightsError(f"{what}: cannot read {path}: {e}") from e
        if not isinstance(state, Mapping):
            raise PerceptualWeightsError(f"{what}: {path} holds a {type(state).__name__}, not a state dict")
    elif isinstance(source, Mapping):
        if sha256 is not None:
            raise ValueError(f"{what}: sha256 verifies a file; pass the path, not a loaded state dict")
        state = source
    else:
        raise TypeError(f"{what}: expected a path or a state dict, got {type(source).__name__}")
    want = set(backbone_keys(net))
    have = {k for k in state if not k.startswith("classifier.")}
    if have != want:
        missing, extra = sorted(want - have), sorted(have - want)
        raise PerceptualWeightsError(f"{what}: keys do not match torchvision's {TORCHVISION_WEIGHTS[net].arch} "
                                     f"features (missing {missing[:6]}, unexpected {extra[:6]})")
    out: dict[str, torch.Tensor] = {}
    for k in sorted(want):
        v = state[k]
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise PerceptualWeightsError(f"{what}: {k} is not a floating-point tensor")
        out[k] = v.detach().to("cpu", torch.float32)
    return out


class _NoDownloadModels:
    """Stands in for ``torchvision.models`` inside ``lpips.pretrained_networks`` while a model is
    built: the same architectures with ``weights=None``; asking for pretrained weights is an error."""

    @staticmethod
    def _build(arch: str, pretrained: bool) -> nn.Module:
        if pretrained:
            raise RuntimeError("medxfer builds LPIPS trunks without weights and loads them itself")
        return getattr(torchvision.models, arch)(weights=None)

    def alexnet(self, pretrained: bool = False) -> nn.Module:
        return self._build("alexnet", pretrained)

    def vgg16(self, pretrained: bool = False) -> nn.Module:
        return self._build("vgg16", pretrained)

    def squeezenet1_1(self, pretrained: bool = False) -> nn.Module:
        return self._build("squeezenet1_1", pretrained)


_BUILD_LOCK = threading.Lock()


@contextmanager
def _weightless_torchvision() -> Iterator[None]:
    pn = _lpips().pretrained_networks
    with _BUILD_LOCK:
        saved = pn.tv
        pn.tv = _NoDownloadModels()
        try:
            with torch.random.fork_rng(devices=[]):
                yield
        finally:
            pn.tv = saved


def _trunk_key(model_key: str) -> str:
    """``net.slice<j>.<i>.<rest>`` (lpips) -> ``features.<i>.<rest>`` (torchvision)."""
    parts = model_key.split(".")
    if len(parts) < 4 or parts[0] != "net" or not parts[1].startswith("slice"):
        raise PerceptualWeightsError(f"unexpected LPIPS trunk key {model_key}")
    return "features." + ".".join(parts[2:])


def build_lpips(net: str, backbone_state: StateDict, device: str | torch.device = "cpu") -> nn.Module:
    """An ``lpips.LPIPS(net, version="0.1")`` with the wheel's heads and the given trunk weights
    (``features.*`` keys, see :func:`load_backbone_state`), verified by :func:`verify_lpips`, in
    eval mode with every parameter frozen, on ``device``."""
    _check_net(net)
    lp = _lpips()
    with _weightless_torchvision():
        model = lp.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    trunk = [k for k in model.state_dict() if k.startswith("net.")]
    absent = [_trunk_key(k) for k in trunk if _trunk_key(k) not in backbone_state]
    if absent:
        raise PerceptualWeightsError(f"LPIPS {net}: trunk weights missing {absent[:6]}")
    model.net.load_state_dict({k[len("net."):]: backbone_state[_trunk_key(k)] for k in trunk}, strict=True)
    verify_lpips(model, net, backbone_state)
    model.requires_grad_(False)
    return model.eval().to(device)


def verify_lpips(model: nn.Module, net: str, backbone_state: StateDict) -> None:
    """Raise :class:`PerceptualWeightsError` unless ``model`` is a v0.1, linear-head, non-spatial
    LPIPS of ``net`` whose heads equal the wheel's v0.1 heads (same keys, equal tensors, all >= 0),
    whose scaling layer is v0.1's, and whose every trunk tensor equals ``backbone_state``
    (torchvision ``features.*`` names) with none of it left unused."""
    flags = {a: getattr(model, a, None) for a in ("version", "lpips", "spatial", "pnet_type")}
    if flags != {"version": "0.1", "lpips": True, "spatial": False, "pnet_type": net}:
        raise PerceptualWeightsError(f"LPIPS {net}: not a v0.1 linear-head, non-spatial {net} model: {flags}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ref = shipped_heads(net)
    heads = {k: v for k, v in state.items() if re.match(r"lin\d+\.", k)}
    for k, v in state.items():  # lpips also lists the heads as lins.<i> (a ModuleList of the same modules)
        m = re.fullmatch(r"lins\.(\d+)\.(.+)", k)
        if m and not torch.equal(v, state.get(f"lin{m.group(1)}.{m.group(2)}", torch.empty(0))):
            raise PerceptualWeightsError(f"LPIPS {net}: {k} is not the same head as lin{m.group(1)}")
    if set(heads) != set(ref):
        raise PerceptualWeightsError(f"LPIPS {net}: head keys {sorted(heads)} do not match the shipped "
                                     f"{sorted(ref)} (strict=False loading skipped them)")
    for k, v in ref.items():
        if float(v.min()) < 0.0:
            raise PerceptualWeightsError(f"LPIPS {net}: shipped head {k} has negative weights (not v0.1)")
        if not torch.equal(heads[k], v):
            raise PerceptualWeightsError(f"LPIPS {net}: head {k} differs from the shipped v0.1 head")
    for name, want in (("shift", SHIFT), ("scale", SCALE)):
        got = state.get(f"scaling_layer.{name}")
        if got is None or not torch.allclose(got.flatten(), torch.tensor(want)):
            raise PerceptualWeightsError(f"LPIPS {net}: scaling layer {name} is not v0.1's {want}")
    used: set[str] = set()
    for k, v in state.items():
        if not k.startswith("net."):
            continue
        tv = _trunk_key(k)
        if tv not in backbone_state:
            raise PerceptualWeightsError(f"LPIPS {net}: trunk tensor {k} has no provided weight ({tv})")
        if not torch.equal(v, backbone_state[tv].detach().cpu().to(v.dtype)):
            raise PerceptualWeightsError(f"LPIPS {net}: trunk tensor {k} differs from the provided {tv}")
        used.add(tv)
    unused = sorted(set(backbone_state) - used)
    if unused:
        raise PerceptualWeightsError(f"LPIPS {net}: provided trunk weights not used: {unused[:6]}")


def _as_batch(x: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
        raise TypeError(f"{what} must be a float tensor in [0, 1]")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{what} must be (B x) C x H x W with C = 1 or 3, got {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} has non-finite values")
    return x.float()


class Perceptual:
    """LPIPS v0.1 distances between reconstructions and targets for a set of trunks.

    backbones: net name ('alex', 'squeeze', 'vgg') -> torchvision ImageNet weights of that
      architecture (a path to the torchvision ``.pth`` file, or its state dict; see
      :data:`TORCHVISION_WEIGHTS` and :func:`load_backbone_state`). A net in ``nets`` without an
      entry raises :class:`MissingPerceptualWeightsError` naming ``medxfer fetch lpips``.
    sha256: optional expected digests per net for file sources.
    nets: which distances to compute; 'mean' is their average (the paper's: all three).
    device: where to run (default CPU). On CUDA, PyTorch's TF32 convolution setting applies.
    size: required input side (224 in the protocol); ``None`` accepts any.
    """

    def __init__(self, backbones: Mapping[str, WeightsSource], *, sha256: Mapping[str, str] | None = None,
                 nets: Sequence[str] = NETS, device: str | torch.device = "cpu", size: int | None = SIZE) -> None:
        if not nets:
            raise ValueError("nets must name at least one LPIPS trunk")
        for net in nets:
            _check_net(net)
        self.nets = tuple(nets)
        self.device = torch.device(device)
        self.size = size
        self.models: dict[str, nn.Module] = {}
        for net in self.nets:
            if net not in backbones:
                raise _missing(net, "no weights were given")
            state = load_backbone_state(net, backbones[net], sha256=(sha256 or {}).get(net))
            self.models[net] = build_lpips(net, state, self.device)
            log.info("LPIPS %s ready on %s (heads and trunk verified)", net, self.device)

    def _prepare(self, reconstruction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = _as_batch(reconstruction, "reconstruction").clamp(0.0, 1.0)
        b = _as_batch(target, "target")
        if float(b.min()) < 0.0 or float(b.max()) > 1.0:
            raise ValueError("target must be in [0, 1]")
        if a.shape != b.shape:
            raise ValueError(f"reconstruction {tuple(a.shape)} and target {tuple(b.shape)} differ in shape")
        if self.size is not None and a.shape[2:] != (self.size, self.size):
            raise ValueError(f"LPIPS inputs must be {self.size} x {self.size}, got {tuple(a.shape[2:])}")
        return (a * 2 - 1).to(self.device), (b * 2 - 1).to(self.device)

    def distances(self, reconstruction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-pair distances, B-vectors on the CPU, for every net and 'mean'. The reconstruction is
        clipped to [0, 1]; the target must be in [0, 1]; both (B x) 3 x H x W float (1 channel is
        stacked to 3)."""
        a, b = self._prepare(reconstruction, target)
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for net, model in self.models.items():
                out[net] = model(a, b).reshape(-1).float().cpu()
        out["mean"] = torch.stack([out[n] for n in self.nets]).mean(0)
        return out

    def __call__(self, reconstruction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Distances for one pair: {'alex', 'squeeze', 'vgg', 'mean'} (for the nets in use) -> float."""
        d = self.distances(reconstruction, target)
        if d["mean"].numel() != 1:
            raise ValueError("__call__ takes one pair; use distances() for a batch")
        return {k: float(v[0]) for k, v in d.items()}


def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """Float (1 or 3) x H x W in [0, 1] (clipped) -> uint8 H x W x 3, rounded to nearest."""
    x = _as_batch(x, "image")
    if x.shape[0] != 1:
        raise ValueError("one image at a time")
    arr = (x[0].clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return arr.permute(1, 2, 0).contiguous().cpu().numpy()


def save_png_pair(reconstruction: torch.Tensor, target: torch.Tensor, directory: str | os.PathLike[str],
                  stem: str) -> tuple[Path, Path]:
    """Save ``<stem>_reconstruction.png`` and ``<stem>_original.png`` (the target crop) in
    ``directory``: lossless 8-bit RGB PNG, values rounded to the nearest of 256 levels. Compute
    distances on the float tensors, not on these files. Returns both paths."""
    if not re.fullmatch(r"[\w.-]+", stem):
        raise ValueError(f"stem must be a plain file-name stem, got {stem!r}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / f"{stem}_reconstruction.png", out / f"{stem}_original.png")
    for img, path in zip((reconstruction, target), paths):
        Image.fromarray(to_uint8_image(img)).save(path, format="PNG")  # uint8 H x W x 3: RGB
    return paths
