"""Per-model input normalisation on prepared uint8 crops (batched, on the input's device)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medxfer.models import MODELS, load_model
from medxfer.models.normalize import (
    CHEXPERT_MEAN,
    CHEXPERT_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATIONS,
    get_normalizer,
    histogram_equalize,
    histogram_equalize_covidprognosis,
)


def _images(seed: int, shape: tuple[int, ...] = (3, 1, 24, 24)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a skewed distribution (like an X-ray): most pixels dark, a few bright
    x = (torch.rand(shape, generator=g) ** 3 * 200 + 20).round()
    return x.to(torch.uint8)


def test_histeq_range_and_monotonicity() -> None:
    x = _images(0)
    out = histogram_equalize(x)
    assert out.shape == (3, 3, 24, 24) and out.dtype == torch.float32
    for i in range(x.shape[0]):
        v, o = x[i, 0].flatten().float(), out[i, 0].flatten()
        assert o.min() == 0.0 and o.max() == 255.0
        order = torch.argsort(v)
        assert (torch.diff(o[order]) >= 0).all()  # monotone non-decreasing in the input
        assert torch.equal(out[i, 0], out[i, 1]) and torch.equal(out[i, 0], out[i, 2])  # grey -> 3 channels
    assert torch.allclose(histogram_equalize(x[1:2]), out[1:2])  # per image, independent of the batch


def test_histeq_flattens_the_histogram() -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.rand((1, 1, 64, 64), generator=g) ** 2 * 255).round().to(torch.uint8)  # skewed dark
    quartiles = torch.tensor([0.25, 0.5, 0.75])
    uniform = torch.tensor([63.75, 127.5, 191.25])
    q_in = torch.quantile(x[0, 0].float().flatten(), quartiles)
    q_out = torch.quantile(histogram_equalize(x)[0, 0].flatten(), quartiles)
    assert (q_in - uniform).abs().max() > 40  # the input is far from uniform
    assert torch.allclose(q_out, uniform, atol=10)  # the output is close to it


def test_histeq_constant_image() -> None:
    x = torch.full((1, 1, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(histogram_equalize(x), torch.zeros(1, 3, 8, 8))


def _covidprognosis_reference(img: np.ndarray) -> np.ndarray:
    """The CovidPrognosis HistogramNormalize formula, written with numpy."""
    hist, bins = np.histogram(img.flatten(), 256, density=True)
    cdf = hist.cumsum()
    cdf = 255 * cdf / cdf[-1]
    return np.interp(img.flatten(), bins[:-1], cdf).reshape(img.shape)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_covidprognosis_variant_matches_numpy(seed: int) -> None:
    x = _images(seed, (2, 1, 20, 20))
    x[1, 0, :3, :3] = 255  # full range in one image
    out = histogram_equalize_covidprognosis(x)
    for i in range(2):
        ref = _covidprognosis_reference(x[i, 0].numpy().astype(np.float64))
        np.testing.assert_allclose(out[i, 0].numpy(), ref, rtol=1e-5, atol=1e-3)
    const = torch.full((1, 1, 4, 4), 9, dtype=torch.uint8)
    np.testing.assert_allclose(histogram_equalize_covidprognosis(const)[0, 0].numpy(),
                               _covidprognosis_reference(np.full((4, 4), 9.0)), atol=1e-4)


def test_covidprognosis_uses_one_histogram_over_all_channels() -> None:
    """A colour image is equalised with one histogram of all its pixels (their code flattens
    the whole image), not channel by channel."""
    x = _images(5, (1, 3, 16, 16))
    x[0, 0] //= 4  # a dark red channel: per-channel equalisation would brighten it
    out = histogram_equalize_covidprognosis(x)[0].numpy()
    ref = _covidprognosis_reference(x[0].numpy().astype(np.float64))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-3)
    assert out[0].mean() < out[1].mean() - 20  # the dark channel stays dark


def _real_crops(shared: Path) -> list[np.ndarray]:
    from medxfer.prepare import decode_record

    files = [sorted((shared / "eyepacs-sample" / "sample").glob("*.jpeg"))[0],
             sorted((shared / "ichallenge-pm" / "PALM-Training400").glob("*.jpg"))[0],
             sorted((shared / "bach-sample" / "dataset" / "normal_jpg").glob("*.jpeg"))[0]]
    crops = [decode_record(str(f), 224, "aspect", 3) for f in files]
    grey = np.asarray(Image.open(files[1]).convert("L").resize((224, 224)), dtype=np.uint8)[:, :, None]
    return crops + [grey]


def test_covidprognosis_matches_their_numpy_function_on_real_images(shared_data: Path) -> None:
    """Colour (EyePACS, iChallenge-PM, BACH) and greyscale crops: within 0.01 grey levels of an
    independent numpy transcription of CovidPrognosis's HistogramNormalize."""
    for crop in _real_crops(shared_data):
        x = torch.from_numpy(np.array(crop)).permute(2, 0, 1)[None]
        out = histogram_equalize_covidprognosis(x)[0].numpy()
        ref = _covidprognosis_reference(crop.transpose(2, 0, 1).astype(np.float64))
        if crop.shape[2] == 1:
            ref = np.repeat(ref, 3, axis=0)
        assert np.abs(out - ref).max() < 0.01
        textbook = histogram_equalize(x)[0].numpy()
        assert np.abs(textbook - out).mean() > 1.0  # the formula the zoo used before differs


def test_simclr_is_unnormalised_and_imagenet_is_mean_std() -> None:
    x = _images(3, (2, 3, 8, 8))
    simclr = load_model("simclr-v1", "random")
    assert torch.equal(simclr.normalize(x), x.float() / 255.0)
    sup = load_model("supervised-r18", "random")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(sup.normalize(x), (x.float() / 255.0 - mean) / std, atol=1e-6)
    native = get_normalizer("chexpert")(x)
    assert torch.allclose(native, (x.float() / 255.0 - CHEXPERT_MEAN) / CHEXPERT_STD, atol=1e-5)


def test_every_spec_names_a_registered_normalisation() -> None:
    for name, spec in MODELS.items():
        assert spec.normalization in NORMALIZATIONS, name
    assert all(MODELS.get(f"mimic-chexpert-lr{lr}").normalization == "histeq-covidprognosis"
               for lr in ("0.01", "0.1", "1.0"))
    assert MODELS.get("simclr-v1").normalization == "none"


def test_normalisers_reject_float_input() -> None:
    for _name, fn in NORMALIZATIONS.items():
        with pytest.raises(TypeError, match="uint8"):
            fn(torch.zeros(1, 3, 4, 4))


def test_features_apply_the_model_normalisation() -> None:
    x = _images(4, (2, 1, 32, 32))
    model = load_model("supervised-r18", "random")
    expected = model.trunk(model.normalize(x))
    assert torch.allclose(model.features(x), expected, atol=1e-5)
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        model.features(x)
