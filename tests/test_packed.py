"""Pre-packed oneDNN convolutions (medxfer.packed): the same outputs as eager PyTorch, the
right patterns fused, and the module left alone wherever packing does not apply."""
from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from torch import nn

from medxfer.analysis.saliency import _delta_supported, _leaf_locality
from medxfer.packed import PackedConv2d, pack_convolutions
from medxfer.runtime import fold_batchnorm

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def blocks() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    r18 = torchvision.models.resnet18().eval()
    r50 = torchvision.models.resnet50().eval()
    d121 = torchvision.models.densenet121().eval()
    return {
        "basic": (r18.layer1[0], (2, 64, 19, 19)),
        "basic-downsample": (r18.layer2[0], (2, 64, 19, 19)),
        "bottleneck": (r50.layer1[0], (2, 64, 13, 13)),
        "dense-block": (d121.features.denseblock1, (2, 64, 11, 11)),
        "stem": (nn.Sequential(r18.conv1, r18.bn1, r18.relu, r18.maxpool), (2, 3, 33, 33)),
    }


@pytest.mark.parametrize("name", ["basic", "basic-downsample", "bottleneck", "dense-block", "stem"])
@pytest.mark.parametrize("residual", [True, False])
def test_packed_module_equals_eager(name: str, residual: bool) -> None:
    block, shape = blocks()[name]
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    module = fold_batchnorm(block) or block
    module = module.to(memory_format=torch.channels_last)
    convs = sum(isinstance(m, nn.Conv2d) for m in module.modules())
    packed, count = pack_convolutions(module, shape, residual=residual)
    assert count == convs and packed is not module
    x = torch.randn(*shape[:1], *shape[1:], generator=torch.Generator().manual_seed(3))
    for size in (shape[2], shape[2] - 4):  # other input sizes than the probe's
        xs = x[:, :, :size, :size].contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            want, got = block(xs), packed(xs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    two_input = [n for n in packed.graph.nodes if n.op == "call_module" and len(n.args) == 2]
    assert bool(two_input) == (residual and name.startswith(("basic", "bottleneck")))
    if not residual:
        assert _delta_supported(packed)


def test_caller_module_is_untouched() -> None:
    block, shape = blocks()["basic"]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    pack_convolutions(block, shape)
    assert all(torch.equal(v, before[k]) for k, v in block.state_dict().items())
    assert not any(isinstance(m, PackedConv2d) for m in block.modules())


def test_float64_and_conv_free_modules_are_left_alone() -> None:
    block, shape = blocks()["basic"]
    double = block.double()
    assert pack_convolutions(double, shape) == (double, 0)
    plain = nn.Sequential(nn.ReLU(), nn.Flatten())
    assert pack_convolutions(plain, (2, 3, 4, 4)) == (plain, 0)


def test_a_probe_that_disagrees_keeps_the_eager_module(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    block, shape = blocks()["basic"]
    real = PackedConv2d.forward
    monkeypatch.setattr(PackedConv2d, "forward", lambda self, x, residual=None: 1.01 * real(self, x, residual))
    with caplog.at_level(logging.INFO, logger="medxfer.packed"):
        assert pack_convolutions(block, shape) == (block, 0)
    assert "disagree" in caplog.text


def test_an_untraceable_module_keeps_the_eager_module(caplog: pytest.LogCaptureFixture) -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else x  # data-dependent control flow

    module = Branchy().eval()
    with caplog.at_level(logging.INFO, logger="medxfer.packed"):
        assert pack_convolutions(module, (1, 3, 8, 8)) == (module, 0)
    assert "not applied" in caplog.text


def test_packed_convolution_keeps_the_locality_of_its_convolution() -> None:
    for conv in (nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 8, 7, stride=2, padding=3), nn.Conv2d(4, 4, 1, stride=2),
                 nn.Conv2d(4, 4, 3, padding=2, dilation=2)):
        assert _leaf_locality(PackedConv2d(conv.eval())) == _leaf_locality(conv)
    with pytest.raises(ValueError, match="zero padding"):
        PackedConv2d(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="both axes"):
        PackedConv2d(nn.Conv2d(4, 4, (3, 1), padding=(1, 0)))
