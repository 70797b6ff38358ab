"""Deep-image-prior reconstruction: the generator as specified, seeding, the frozen backbone,
the normalisation switch; tiny feature extractors and few steps (a ResNet-18 trunk for two)."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torchvision
from torch import nn

from medxfer.analysis import dip

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def imagenet(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN.to(x.device)) / STD.to(x.device)


class Tiny(nn.Module):
    """A small conv trunk (unpooled map) with BatchNorm, so eval mode matters."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def feature_map(self, x: torch.Tensor, stage: str) -> torch.Tensor:
        assert stage == "last"
        return self.body(x)


def seeded_tiny(seed: int = 0) -> Tiny:
    m = Tiny()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):  # non-trivial running statistics
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
    return m


def target(size: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, size // 8, size // 8, generator=g)
    return nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1)


def small_run(model: nn.Module | None = None, **kw: object) -> dip.Reconstruction:
    m = model if model is not None else seeded_tiny()
    args: dict[str, object] = {"normalize": imagenet, "seed": 0, "steps": 8, "lr": 1e-2, "noise_size": 128}
    args.update(kw)
    return dip.reconstruct(m, target(), **args)  # type: ignore[arg-type]


def expected_parameter_count() -> int:
    """Parameters of the skip network, transcribed from the protocol's description."""
    def conv(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k + cout

    def bn(c: int) -> int:
        return 2 * c

    down, up, skip, ks = [16, 32, 64, 128, 128, 128], [16, 32, 64, 128, 128, 128], [4] * 6, [7, 7, 5, 5, 3, 3]
    total, cin = 0, 32
    for i in range(6):
        deep = up[i + 1] if i < 5 else down[i]
        total += conv(cin, skip[i], 1) + bn(skip[i])                               # skip branch
        total += conv(cin, down[i], ks[i]) + bn(down[i]) + conv(down[i], down[i], ks[i]) + bn(down[i])
        total += bn(skip[i] + deep) + conv(skip[i] + deep, up[i], ks[i]) + bn(up[i])
        total += conv(up[i], up[i], 1) + bn(up[i])
        cin = down[i]
    return total + conv(16, 3, 1)


def test_generator_matches_the_protocol() -> None:
    g = dip.build_generator(0)
    assert sum(p.numel() for p in g.parameters()) == expected_parameter_count()
    convs = [m for m in g.modules() if isinstance(m, nn.Conv2d)]
    assert {m.padding_mode for m in convs} == {"zeros"}
    assert all(m.padding == ((m.kernel_size[0] - 1) // 2,) * 2 and m.stride == (1, 1) for m in convs)
    assert sorted({m.kernel_size[0] for m in convs}) == [1, 3, 5, 7]
    pools = [m for m in g.modules() if isinstance(m, nn.AvgPool2d)]
    ups = [m for m in g.modules() if isinstance(m, nn.Upsample)]
    assert len(pools) == 6 and len(ups) == 6 and {u.mode for u in ups} == {"nearest"}
    acts = [m for m in g.modules() if isinstance(m, nn.LeakyReLU)]
    assert acts and {a.negative_slope for a in acts} == {0.2}
    assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d, nn.ConvTranspose2d)) for m in g.modules())
    assert g.training
    z = dip.make_noise(0)
    assert z.shape == (1, 32, 256, 256)
    with torch.no_grad():
        y = g(z)
    assert y.shape == (1, 3, 256, 256)
    assert float(y.min()) > 0.0 and float(y.max()) < 1.0  # sigmoid output


def test_noise_and_init_are_seeded_locally() -> None:
    state = torch.random.get_rng_state()
    z0, z0b, z1 = dip.make_noise(3), dip.make_noise(3), dip.make_noise(4)
    assert torch.equal(z0, z0b) and not torch.equal(z0, z1)
    assert float(z0.min()) >= 0.0 and float(z0.max()) < 0.1
    assert abs(float(z0.mean()) - 0.05) < 1e-3
    a, b, c = dip.build_generator(3), dip.build_generator(3), dip.build_generator(4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG was not touched


def test_reconstruction_reduces_the_loss_and_keeps_the_backbone_frozen() -> None:
    m = seeded_tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    state = torch.random.get_rng_state()
    seen: list[tuple[int, float]] = []
    rec = small_run(m, progress=lambda s, loss: seen.append((s, loss)), progress_every=3)
    assert len(rec.losses) == 8 and rec.losses[-1] < rec.losses[0] and rec.final_loss < rec.losses[0]
    assert [s for s, _ in seen] == [3, 6, 8] and seen[0][1] == pytest.approx(rec.losses[2])
    assert rec.image.shape == (3, 64, 64) and rec.image.dtype == torch.float32
    assert float(rec.image.min()) >= 0.0 and float(rec.image.max()) <= 1.0
    assert all(p.grad is None for p in m.parameters())
    assert all(p.requires_grad for p in m.parameters()) and m.training  # restored afterwards
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # eval mode: BN stats untouched
    assert torch.equal(torch.random.get_rng_state(), state)


def test_backbone_module_found_behind_a_bound_method_or_partial() -> None:
    m = seeded_tiny()
    fn = functools.partial(m.feature_map, stage="last")
    assert dip._owning_module(fn) is m and dip._owning_module(m.feature_map) is m
    modes: list[bool] = []

    def spy(x: torch.Tensor) -> torch.Tensor:
        modes.append(m.training)
        return fn(x)

    small_run(m, steps=1, backbone=m)
    dip.reconstruct(functools.partial(m.feature_map, stage="last"), target(), normalize=imagenet,
                    seed=0, steps=1, noise_size=128)
    dip.reconstruct(spy, target(), normalize=imagenet, seed=0, steps=1, noise_size=128, backbone=m)
    assert modes and not any(modes)  # eval mode during the run
    assert m.training and all(p.grad is None for p in m.parameters())


def test_no_weight_gradients_even_through_an_opaque_callable() -> None:
    m = seeded_tiny().eval()
    rec = dip.reconstruct(lambda x: m(x), target(), normalize=imagenet, seed=0, steps=3, lr=1e-2,
                          noise_size=128)
    assert all(p.requires_grad and p.grad is None for p in m.parameters())
    assert rec.losses[-1] < rec.losses[0]


def test_existing_backbone_gradients_are_left_alone() -> None:
    m = seeded_tiny()
    m(torch.rand(1, 3, 32, 32)).sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    small_run(m, steps=2)
    assert all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), grads))


def test_deterministic_given_the_seed() -> None:
    a, b, c = small_run(steps=3), small_run(steps=3), small_run(steps=3, seed=1)
    assert a.losses == b.losses and torch.equal(a.image, b.image)
    assert a.losses != c.losses and not torch.equal(a.image, c.image)


def test_normalisation_applies_to_target_and_output_and_compat_differs() -> None:
    m = seeded_tiny()
    inputs: list[torch.Tensor] = []

    def spy(x: torch.Tensor) -> torch.Tensor:
        inputs.append(x.detach().clone())
        return m(x)

    t = target()
    dip.reconstruct(spy, t, normalize=imagenet, seed=0, steps=1, noise_size=128, backbone=m)
    assert torch.allclose(inputs[0], imagenet(t.unsqueeze(0)))          # the target, normalised
    assert float(inputs[1].min()) < 0.0 or float(inputs[1].max()) > 1.0  # a normalised output
    inputs.clear()
    dip.reconstruct(spy, t, normalize=None, seed=0, steps=1, noise_size=128, backbone=m)
    assert torch.equal(inputs[0], t.unsqueeze(0))                       # the raw target
    assert float(inputs[1].min()) >= 0.0 and float(inputs[1].max()) <= 1.0
    norm, raw = small_run(m, steps=2), small_run(m, steps=2, normalize=None)
    ident = small_run(m, steps=2, normalize=lambda x: x)
    assert norm.losses != raw.losses and not torch.equal(norm.image, raw.image)
    assert ident.losses == raw.losses and torch.equal(ident.image, raw.image)


def test_errors() -> None:
    m = seeded_tiny()

    def cut(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return m(x)

    with pytest.raises(RuntimeError, match="cut the graph"):
        dip.reconstruct(cut, target(), normalize=None, seed=0, steps=1, noise_size=128, backbone=m)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dip.reconstruct(m, target() * 2, normalize=None, seed=0, steps=1, noise_size=128)
    with pytest.raises(TypeError):
        dip.reconstruct(m, (target() * 255).to(torch.uint8), normalize=None, seed=0, steps=1, noise_size=128)
    with pytest.raises(ValueError, match="larger"):
        dip.reconstruct(m, target(160), normalize=None, seed=0, steps=1, noise_size=128)
    with pytest.raises(TypeError):
        dip.reconstruct(m, target(), seed=0, steps=1, noise_size=128)  # type: ignore[call-arg]  # normalize is required


def resnet18_trunk(seed: int = 0) -> nn.Module:
    """torchvision ResNet-18 up to layer4, conv weights Kaiming-normal from a local generator."""
    resnet = torchvision.models.resnet18(weights=None)
    g = torch.Generator().manual_seed(seed)
    for mod in resnet.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu", generator=g)
    return nn.Sequential(*list(resnet.children())[:-2])


def test_resnet18_layer4_at_protocol_size() -> None:
    trunk = resnet18_trunk()
    t = target(224, seed=5)
    with torch.no_grad():
        assert trunk.eval()(imagenet(t.unsqueeze(0))).shape == (1, 512, 7, 7)
    rec = dip.reconstruct(trunk, t, normalize=imagenet, seed=0, steps=1)
    assert rec.image.shape == (3, 224, 224) and len(rec.losses) == 1
    assert math.isfinite(rec.final_loss) and rec.final_loss != rec.losses[0]
    assert all(p.grad is None for p in trunk.parameters())


@pytest.mark.slow
def test_resnet18_loss_decreases_at_protocol_size() -> None:
    rec = dip.reconstruct(resnet18_trunk(), target(224, seed=5), normalize=imagenet, seed=0, steps=6)
    assert rec.final_loss < 0.9 * rec.losses[0]  # Adam at 1e-3 is bumpy over the first steps


def test_autocast_and_channels_last_options_run_on_cpu() -> None:
    """The CUDA defaults (autocast, channels-last) forced on the CPU: bf16 autocast, same first loss
    to bf16 accuracy, a float32 image."""
    exact = small_run(steps=1)
    fast = small_run(steps=1, amp=True, channels_last=True)
    assert fast.image.dtype == torch.float32 and fast.image.is_contiguous()
    assert fast.losses[0] == pytest.approx(exact.losses[0], rel=5e-2)
    assert all(math.isfinite(v) for v in fast.losses) and fast.losses != exact.losses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixed_precision_channels_last() -> None:
    m = seeded_tiny().cuda()
    rec = small_run(m, steps=8, device="cuda")  # amp and channels-last default on for CUDA
    assert rec.losses[-1] < rec.losses[0] and rec.image.device.type == "cpu"
    exact = small_run(m, steps=8, device="cuda", amp=False, channels_last=False)
    assert exact.losses[0] == pytest.approx(rec.losses[0], rel=5e-2)
