"""Occlusion saliency and attentive diffusion: known answers, the definition transcribed as a
batch-1 loop, exactness of incremental inference, locality rules and input errors."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from torch import nn

from medxfer.analysis.saliency import (
    IMAGENET_MEAN_PIXEL,
    Locality,
    NotLocalError,
    SaliencyError,
    StagedTrunk,
    accumulate_scores,
    attentive_diffusion,
    locality,
    occlusion_map,
    occlusion_scores,
    prepare_trunk,
    window_starts,
)
from medxfer.models.backbone import build_trunk
from medxfer.models.normalize import get_normalizer

IMAGENET = get_normalizer("imagenet")
RAW = get_normalizer("none")


def random_image(size: int, seed: int = 0, channels: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, size, size), generator=gen, dtype=torch.uint8)


def trunk(arch: str) -> nn.Module:
    return build_trunk(arch, seed=0).eval().double()


def crops_only(staged: StagedTrunk) -> StagedTrunk:
    """The same trunk without node-by-node graphs: incremental stages run on one crop each."""
    return dataclasses.replace(staged, delta_stages=())


#: how to make every stage of a ResNet-18 run incrementally, and what the log then says
ALL_STAGES = {
    "crops": (crops_only, {"max_crop_fraction": 1.0}, "9 stage(s) on crops, 0 node by node"),
    "nodes": (lambda staged: staged, {"max_node_fraction": 1.0}, "0 stage(s) on crops, 9 node by node"),
}


def direct_map(net: nn.Module, normalize, image: torch.Tensor, window: int, occluder: str) -> np.ndarray:
    """The definition, transcribed: one occluded image per forward pass, scores added to the
    covered pixels, divided by window**2, cropped where every pixel was covered window**2 times."""
    _, h, w = image.shape
    with torch.no_grad():
        f0 = net(normalize(image[None]).double())[0]
        acc = np.zeros((h, w))
        for i in range(h - window + 1):
            for j in range(w - window + 1):
                if occluder == "paper":
                    x = normalize(image[None]).double()
                    x[:, :, i:i + window, j:j + window] = 0.0
                else:
                    occ = image.clone()
                    occ[:, i:i + window, j:j + window] = torch.tensor(IMAGENET_MEAN_PIXEL).view(3, 1, 1)
                    x = normalize(occ[None]).double()
                f = net(x)[0]
                acc[i:i + window, j:j + window] += float((f - f0).norm() / f0.norm())
    return (acc / window ** 2)[window - 1:h - window + 1, window - 1:w - window + 1]


# --------------------------------------------------------------------------- maps and attentive diffusion

def test_accumulate_stride1_is_the_papers_sum_over_100_and_crop() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((233, 233))
    out = accumulate_scores(scores, 242, 10)
    assert out.shape == (224, 224)
    acc = np.zeros((242, 242))
    for i in range(233):
        for j in range(233):
            acc[i:i + 10, j:j + 10] += scores[i, j]
    np.testing.assert_allclose(out, (acc / 100)[9:233, 9:233], rtol=1e-12)


@pytest.mark.parametrize("size,window,stride", [(30, 4, 2), (31, 5, 3), (24, 6, 6)])
def test_accumulate_stride_is_mean_of_covering_windows(size: int, window: int, stride: int) -> None:
    starts = window_starts(size, window, stride)
    scores = np.random.default_rng(1).random((len(starts), len(starts)))
    total, count = np.zeros((size, size)), np.zeros((size, size))
    for a, y in enumerate(starts):
        for b, x in enumerate(starts):
            total[y:y + window, x:x + window] += scores[a, b]
            count[y:y + window, x:x + window] += 1
    crop = slice(window - 1, size - window + 1)
    assert (count[crop, crop] > 0).all()
    np.testing.assert_allclose(accumulate_scores(scores, size, window, stride), total[crop, crop] / count[crop, crop],
                               rtol=1e-12)


def test_attentive_diffusion_known_value_and_positive_rescaling() -> None:
    assert attentive_diffusion(np.array([[0.0, 1.0], [1.0, 1.0]])) == 75.0
    assert attentive_diffusion(np.full((5, 5), 2.0)) == 0.0  # nothing strictly above the mean
    m = np.random.default_rng(2).gamma(2.0, size=(224, 224))
    ad = attentive_diffusion(m)
    assert 0 < ad < 100
    for c in (1e-6, 0.37, 3.0, 1e5):
        assert attentive_diffusion(c * m) == ad
    assert attentive_diffusion(-m) == pytest.approx(100 - ad, abs=1e-9)  # a negative scale is not invariant


@pytest.mark.parametrize("bad", [np.zeros(4), np.zeros((0, 3)), np.array([[1.0, np.nan]])])
def test_attentive_diffusion_rejects_bad_maps(bad: np.ndarray) -> None:
    with pytest.raises(SaliencyError):
        attentive_diffusion(bad)


# --------------------------------------------------------------------------- known answers

def test_model_that_sees_one_region_gives_zero_elsewhere() -> None:
    rows, cols, window, size = slice(10, 16), slice(12, 18), 4, 40

    def region_trunk(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, rows, cols].mean(dim=(2, 3)) + 3.0

    image = random_image(size)
    for occluder in ("imagenet-mean", "paper"):
        full = occlusion_map(region_trunk, image, normalize=IMAGENET, window=window, occluder=occluder, crop=False)
        reach = np.zeros((size, size), dtype=bool)  # pixels covered by some window that overlaps the region
        reach[rows.start - window + 1:rows.stop + window - 1, cols.start - window + 1:cols.stop + window - 1] = True
        assert np.all(full[~reach] == 0.0)
        assert np.all(full[rows, cols] > 0)
        cropped = occlusion_map(region_trunk, image, normalize=IMAGENET, window=window, occluder=occluder)
        np.testing.assert_array_equal(cropped, full[window - 1:size - window + 1, window - 1:size - window + 1])


@pytest.mark.parametrize("occluder", ["imagenet-mean", "paper"])
def test_batched_map_equals_direct_loop_tiny_model(occluder: str) -> None:
    net = trunk("tinycnn")
    image = random_image(40, seed=3)
    ours = occlusion_map(prepare_trunk(net, dtype=torch.float64), image, normalize=IMAGENET, window=4,
                         occluder=occluder, pointwise_normalize=True, batch_size=100)
    ref = direct_map(net, IMAGENET, image, 4, occluder)
    assert ours.shape == (34, 34)
    assert ref.min() > 0
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


@pytest.mark.parametrize("mode", ["crops", "nodes"])
@pytest.mark.parametrize("occluder,size", [
    ("imagenet-mean", 16), ("paper", 16),
    pytest.param("imagenet-mean", 24, marks=pytest.mark.slow), pytest.param("paper", 24, marks=pytest.mark.slow),
])
def test_batched_incremental_map_equals_direct_loop_resnet18(occluder: str, size: int, mode: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    net = trunk("resnet18")
    image = random_image(size, seed=4)
    variant, kw, said = ALL_STAGES[mode]
    with caplog.at_level(logging.INFO, logger="medxfer.analysis.saliency"):
        ours = occlusion_map(variant(prepare_trunk(net, dtype=torch.float64)), image, normalize=IMAGENET, window=3,
                             occluder=occluder, pointwise_normalize=True, batch_size=128, **kw)
    assert said in caplog.text  # every stage ran on changed blocks
    np.testing.assert_allclose(ours, direct_map(net, IMAGENET, image, 3, occluder), rtol=1e-6)


@pytest.mark.parametrize("size,stride,mode", [(28, 1, "crops"), (28, 1, "nodes"), (40, 2, "defaults")])
def test_fp32_fast_path_matches_float64_definition(size: int, stride: int, mode: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    model = build_trunk("resnet18", seed=0).eval()
    image = random_image(size, seed=5)
    staged = prepare_trunk(model)
    assert "convolutions packed for oneDNN" in staged.description
    variant, kw, said = ALL_STAGES.get(mode, (lambda t: t, {}, "0 stage(s) on crops, 2 node by node"))
    with caplog.at_level(logging.INFO, logger="medxfer.analysis.saliency"):
        fast = occlusion_map(variant(staged), image, normalize=IMAGENET, window=3, stride=stride,
                             pointwise_normalize=True, **kw)
    assert said in caplog.text
    exact = occlusion_map(prepare_trunk(model, dtype=torch.float64, fold_bn=False, split=False), image,
                          normalize=IMAGENET, window=3, stride=stride)
    np.testing.assert_allclose(fast, exact, rtol=1e-4)


@pytest.mark.parametrize("first_on_a_crop", [False, True])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_partly_changed_stages_run_node_by_node_exactly(arch: str, first_on_a_crop: bool,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A stage whose output changes only in part runs each convolution on the crop its changed
    outputs need, residual sums on the union of blocks; after a stage on a crop too."""
    staged = prepare_trunk(trunk(arch), dtype=torch.float64)
    if first_on_a_crop:
        staged = dataclasses.replace(staged, delta_stages=(None, *staged.delta_stages[1:]))
    image = random_image(40, seed=40)
    kw = {"normalize": IMAGENET, "window": 3, "stride": 3, "pointwise_normalize": True}
    with caplog.at_level(logging.INFO, logger="medxfer.analysis.saliency"):
        inc = occlusion_scores(staged, image, **kw)
    said = caplog.text.split(";")[-1]
    assert f"{int(first_on_a_crop)} stage(s) on crops" in said and " 0 node by node" not in said
    np.testing.assert_allclose(inc, occlusion_scores(staged, image, incremental=False, **kw), rtol=1e-10)


def test_automatic_batch_size_keeps_a_batch_of_maps_within_budget() -> None:
    from medxfer.analysis.saliency import CPU_MAP_BUDGET, OCCLUSION_BATCH, auto_batch_size

    cpu = torch.device("cpu")
    assert auto_batch_size(cpu, 0) == auto_batch_size(cpu, 1000) == OCCLUSION_BATCH["cpu"]
    r50_layer1_242 = 61 * 61 * 256 * 4
    assert auto_batch_size(cpu, r50_layer1_242) == CPU_MAP_BUDGET // r50_layer1_242 < OCCLUSION_BATCH["cpu"]
    assert auto_batch_size(cpu, CPU_MAP_BUDGET) == 16
    assert auto_batch_size(torch.device("cuda"), r50_layer1_242) == OCCLUSION_BATCH["cuda"]


def test_compose_writes_only_the_overlap_of_a_block() -> None:
    from medxfer.analysis.saliency import _compose

    clean = torch.arange(8 * 9 * 2, dtype=torch.float64).reshape(8, 9, 2)
    patch = -torch.arange(1, 2 * 3 * 3 * 2 + 1, dtype=torch.float64).reshape(2, 3, 3, 2)
    p_y0, p_x0 = torch.tensor([0, 5]), torch.tensor([6, 1])  # element 1's block reaches past the crop
    c_y0, c_x0 = torch.tensor([1, 2]), torch.tensor([4, 0])
    out = _compose(clean, patch, p_y0, p_x0, c_y0, c_x0, 4, 5)
    for b in range(2):
        for i in range(4):
            for j in range(5):
                y, x = int(c_y0[b]) + i, int(c_x0[b]) + j
                py, px = y - int(p_y0[b]), x - int(p_x0[b])
                want = patch[b, py, px] if 0 <= py < 3 and 0 <= px < 3 else clean[y, x]
                assert torch.equal(out[b, i, j], want), (b, i, j)


@pytest.mark.parametrize("size,window,stride", [(37, 4, 2), (25, 3, 1), (33, 5, 3)])
def test_incremental_equals_full_forward_all_stages(size: int, window: int, stride: int,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    staged = prepare_trunk(trunk("resnet18"), dtype=torch.float64)
    image = random_image(size, seed=size)
    kw = {"normalize": IMAGENET, "window": window, "stride": stride, "pointwise_normalize": True}
    full = occlusion_scores(staged, image, incremental=False, **kw)
    for variant, extra, said in ALL_STAGES.values():
        with caplog.at_level(logging.INFO, logger="medxfer.analysis.saliency"):
            inc = occlusion_scores(variant(staged), image, **extra, **kw)
        assert said in caplog.text  # every stage on changed blocks, edges included
        caplog.clear()
        np.testing.assert_allclose(inc, full, rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet50", "densenet121"])
def test_incremental_equals_full_forward_other_archs(arch: str) -> None:
    staged = prepare_trunk(trunk(arch), dtype=torch.float64)
    image = random_image(33, seed=7)
    kw = {"normalize": IMAGENET, "window": 5, "stride": 3, "occluder": "paper"}
    full = occlusion_scores(staged, image, incremental=False, **kw)
    for variant, extra in ((crops_only, {"max_crop_fraction": 1.0}), (lambda t: t, {"max_node_fraction": 1.0})):
        inc = occlusion_scores(variant(staged), image, **extra, **kw)
        np.testing.assert_allclose(inc, full, rtol=1e-10)


def test_non_pointwise_normalisation_runs_full_images(caplog: pytest.LogCaptureFixture) -> None:
    net = trunk("tinycnn")
    histeq = get_normalizer("histeq")
    image = random_image(16, seed=8)
    with caplog.at_level(logging.INFO, logger="medxfer.analysis.saliency"):
        ours = occlusion_map(prepare_trunk(net, dtype=torch.float64), image, normalize=histeq, window=3)
    assert "0 stage(s) on crops" in caplog.text
    np.testing.assert_allclose(ours, direct_map(net, histeq, image, 3, "imagenet-mean"), rtol=1e-6)


def test_every_model_sees_the_same_pixel_space_occluder() -> None:
    seen: list[torch.Tensor] = []

    def recorder(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return x.mean(dim=(2, 3)) + 1.0

    image = random_image(12, seed=9)
    occlusion_scores(recorder, image, normalize=RAW, window=3, batch_size=4)
    first = seen[1][0]  # seen[0] is the clean image; then the window at (0, 0)
    expect = image.clone()
    expect[:, :3, :3] = torch.tensor(IMAGENET_MEAN_PIXEL, dtype=torch.uint8).view(3, 1, 1)
    torch.testing.assert_close(first, expect.float().div(255))
    seen.clear()
    occlusion_scores(recorder, image, normalize=IMAGENET, window=3, batch_size=4, occluder="paper")
    assert torch.all(seen[1][0, :, :3, :3] == 0)
    torch.testing.assert_close(seen[1][0, :, 3:, :], IMAGENET(image[None])[0, :, 3:, :])


def test_greyscale_image_equals_its_rgb_copy_and_custom_occluder() -> None:
    staged = prepare_trunk(trunk("tinycnn"), dtype=torch.float64)
    grey = random_image(20, seed=10, channels=1)
    a = occlusion_scores(staged, grey, normalize=IMAGENET, window=3)
    b = occlusion_scores(staged, grey.expand(3, -1, -1), normalize=IMAGENET, window=3)
    np.testing.assert_array_equal(a, b)
    # a fill image equal to the clean image changes nothing
    same = occlusion_scores(staged, grey, normalize=IMAGENET, window=3, occluder=lambda img: img.clone())
    assert same.max() < 1e-12


def test_rows_progress_and_shapes() -> None:
    staged = prepare_trunk(trunk("tinycnn"), dtype=torch.float64)
    image = random_image(20, seed=11)
    calls: list[tuple[int, int]] = []
    full = occlusion_scores(staged, image, normalize=IMAGENET, window=3, batch_size=50,
                            progress=lambda d, t: calls.append((d, t)))
    assert full.shape == (18, 18)
    assert calls[-1] == (324, 324) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    part = occlusion_scores(staged, image, normalize=IMAGENET, window=3, rows=(5, 9))
    np.testing.assert_allclose(part, full[5:9], rtol=1e-12)


# --------------------------------------------------------------------------- locality and the prepared trunk

def test_locality_rules() -> None:
    assert locality(nn.Conv2d(3, 8, 7, stride=2, padding=3)) == Locality(2, 3, 3)
    assert locality(nn.MaxPool2d(3, 2, 1)) == Locality(2, 1, 1)
    net = build_trunk("resnet18", seed=0).eval()
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    assert locality(stem) == Locality(4, 5, 5)
    assert locality(net.layer2[0]) == Locality(2, 3, 3)  # 3x3/2 then 3x3, joined with the 1x1/2 shortcut
    assert locality(net.layer1[0]) == Locality(1, 2, 2)
    for bad in (nn.Sequential(nn.Conv2d(3, 3, 3), nn.AdaptiveAvgPool2d(1)), nn.GroupNorm(1, 3),
                nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")):
        with pytest.raises(NotLocalError):
            locality(bad)


def test_prepare_trunk_is_exact_and_leaves_the_model_alone() -> None:
    net = build_trunk("resnet18", seed=0).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    staged = prepare_trunk(net)
    assert len(staged.stages) == 9 and all(loc is not None for loc in staged.localities)
    x = IMAGENET(random_image(64, seed=12)[None].expand(2, -1, -1, -1))
    with torch.inference_mode():
        torch.testing.assert_close(staged(x), net(x), rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype
    plain = StagedTrunk.wrap(net)
    assert plain.localities == (None,)


def test_bf16_trunk_runs() -> None:
    staged = prepare_trunk(build_trunk("tinycnn", seed=0).eval(), dtype=torch.bfloat16)
    scores = occlusion_scores(staged, random_image(16, seed=13), normalize=IMAGENET, window=3)
    assert np.isfinite(scores).all() and scores.max() > 0


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,match", [
    ({"window": 0}, "window"),
    ({"window": 11}, "too small"),
    ({"stride": 5, "window": 4}, "stride"),
    ({"occluder": "grey"}, "occluder"),
    ({"occluder": (1, 2)}, "occluder colour"),
    ({"occluder": lambda img: img.float()}, "occluder callable"),
    ({"batch_size": 0}, "batch_size"),
    ({"rows": (3, 99)}, "rows"),
    ({"max_crop_fraction": 0.0}, "max_crop_fraction"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    net = build_trunk("tinycnn", seed=0).eval()
    with pytest.raises(SaliencyError, match=match):
        occlusion_scores(net, random_image(20), normalize=IMAGENET, **{"window": 3, **kwargs})


def test_bad_images_and_training_mode() -> None:
    net = build_trunk("tinycnn", seed=0).eval()
    with pytest.raises(SaliencyError, match="uint8"):
        occlusion_scores(net, torch.zeros(3, 20, 20), normalize=IMAGENET, window=3)
    with pytest.raises(SaliencyError, match="C x H x W"):
        occlusion_scores(net, torch.zeros(20, 20, 3, dtype=torch.uint8), normalize=IMAGENET, window=3)
    with pytest.raises(SaliencyError, match="eval mode"):
        occlusion_scores(build_trunk("tinycnn", seed=0).train(), random_image(20), normalize=IMAGENET, window=3)
    with pytest.raises(SaliencyError, match="eval mode"):
        prepare_trunk(build_trunk("tinycnn", seed=0).train())
    with pytest.raises(SaliencyError, match="norm"):
        occlusion_scores(lambda x: torch.zeros(len(x), 4), random_image(20), normalize=IMAGENET, window=3)
    assert issubclass(SaliencyError, ValueError)
