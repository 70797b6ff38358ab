"""Prepare stage: transform fidelity, channels, caching, resume, bad input, real JPEGs."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import CenterCrop, InterpolationMode, Resize

from medxfer.data.images import ImageReadError, open_image
from medxfer.data.records import Dataset, DatasetInfo, Record
from medxfer.prepare import PreparedImages, is_prepared, prepare, prepared_artifact, prepared_key
from medxfer.testing import random_image_dataset

REPO = Path(__file__).resolve().parents[1]


def make_dataset(root: Path, n: int = 8, grey: bool = False, sizes: list[tuple[int, int]] | None = None,
                 fmt: str = "png", seed: int = 0) -> Dataset:
    return random_image_dataset(root, n, grey, sizes, fmt, seed)


def reference(path: str, size: int, resize: str) -> np.ndarray:
    """torchvision's evaluation transform on a full decode (the authors' pipeline)."""
    img = Image.open(path)
    img.load()
    img = img.convert("RGB")
    side = size if resize == "aspect" else (round(size * 257 / 224),) * 2
    mode = InterpolationMode.BICUBIC if resize == "aspect" else InterpolationMode.BILINEAR  # the authors' squash
    img = CenterCrop(size)(Resize(side, interpolation=mode)(img))
    return np.asarray(img)


@pytest.mark.parametrize("resize", ["aspect", "squash"])
def test_transform_matches_torchvision(tmp_path: Path, resize: str) -> None:
    ds = make_dataset(tmp_path / "imgs", n=4, sizes=[(50, 31), (31, 50), (64, 64), (90, 40)])
    p = prepare(ds, size=24, resize=resize, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert p.array.shape == (4, 24, 24, 3) and p.array.dtype == np.uint8
    for i, r in enumerate(ds.records):
        np.testing.assert_array_equal(p.array[i], reference(r.path, 24, resize))


def test_metadata_and_alignment(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "imgs", n=6)
    p = prepare(ds, size=16, cache_dir=tmp_path / "c", workers=2, progress=False)
    assert isinstance(p, PreparedImages)
    assert p.records == ds.records and p.dataset == "toy" and p.class_names == ("neg", "pos")
    assert p.headline_metric == "auroc" and p.meta["channels"] == 3 and p.built
    np.testing.assert_array_equal(p.labels, [0, 1, 0, 1, 0, 1])
    assert list(p.splits) == ["test", "train", "train", "train", "test", "train"]
    assert p.path is not None and p.path.parent.name == "prepared" and p.path.name == p.key


def test_greyscale_kept_single_channel(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "g", n=3, grey=True)
    p = prepare(ds, size=16, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert p.channels == 1
    np.testing.assert_array_equal(p.array[0, :, :, 0], reference(ds.records[0].path, 16, "aspect")[:, :, 0])


def test_greyscale_in_rgb_dataset_is_stacked(tmp_path: Path) -> None:
    grey = make_dataset(tmp_path / "g", n=2, grey=True)
    rgb = make_dataset(tmp_path / "c3", n=2, seed=1)
    ds = Dataset(info=grey.info, records=grey.records + rgb.records, root=str(tmp_path))
    p = prepare(ds, size=16, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert p.channels == 3
    g = p.array[0]
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    np.testing.assert_array_equal(g, reference(grey.records[0].path, 16, "aspect"))
    assert not (p.array[2][..., 0] == p.array[2][..., 1]).all()


def test_sixteen_bit_png_is_greyscale(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    path = tmp_path / "xray.png"
    Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16)).save(path)
    ds = Dataset(DatasetInfo("x", "binary", ("a", "b")), [Record(str(path), 0)], str(tmp_path))
    p = prepare(ds, size=16, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert p.channels == 1 and p.array.max() > 200  # random values over the full 16-bit range


def test_sixteen_bit_images_share_one_scale(tmp_path: Path) -> None:
    """Two 16-bit images with the same raw values but different maxima: a raw value gives the
    same grey level in both (the format's range, not each image's own maximum)."""
    a = np.full((40, 40), 1000, np.uint16)
    b = a.copy()
    a[0, 0], b[0, 0] = 2000, 60000
    recs = []
    for name, arr in (("a", a), ("b", b)):
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
        recs.append(Record(str(tmp_path / f"{name}.png"), 0))
    ds = Dataset(DatasetInfo("x", "binary", ("a", "b")), recs, str(tmp_path))
    p = prepare(ds, size=16, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert p.array[0, 8, 8, 0] == p.array[1, 8, 8, 0] == round(1000 * 255 / 65535)
    from dataclasses import replace

    twelve = Dataset(replace(ds.info, high_range=4095), recs, str(tmp_path))
    q = prepare(twelve, size=16, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert q.key != p.key and q.array[0, 8, 8, 0] == q.array[1, 8, 8, 0] == round(1000 * 255 / 4095)


def test_large_jpeg_reduced_decoding_close_to_full(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:1200, 0:1600]
    smooth = np.stack([(xx / 7) % 256, (yy / 5) % 256, ((xx + yy) / 11) % 256], -1).astype(np.uint8)
    path = tmp_path / "big.jpeg"
    Image.fromarray(smooth).save(path, quality=95)
    assert open_image(str(path), draft_size=64).size[1] < 1200 // 2  # decoded at reduced size
    ds = Dataset(DatasetInfo("j", "binary", ("a", "b")), [Record(str(path), 0)], str(tmp_path))
    p = prepare(ds, size=64, cache_dir=tmp_path / "c", workers=1, progress=False)
    full = reference(str(path), 64, "aspect").astype(np.int16)
    assert np.abs(p.array[0].astype(np.int16) - full).mean() < 4.0


def test_cache_reused_and_invalidated(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "imgs", n=5)
    assert not is_prepared(ds, 16, cache_dir=tmp_path / "c")
    p1 = prepare(ds, size=16, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert p1.built and p1.meta["images_decoded"] == 5 and is_prepared(ds, 16, cache_dir=tmp_path / "c")
    p2 = prepare(ds, size=16, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert not p2.built and p2.key == p1.key  # served from the cache
    np.testing.assert_array_equal(p1.array, p2.array)
    assert prepared_key(ds, 24) != p1.key and prepared_key(ds, 16, "squash") != p1.key
    # a replaced image changes the files' fingerprint, hence the key, and is decoded again
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(ds.records[0].path)
    os.utime(ds.records[0].path, ns=(1, 1))
    ds = Dataset(ds.info, ds.records, ds.root)  # a fresh load (fingerprints are computed once per Dataset)
    p3 = prepare(ds, size=16, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert p3.key != p1.key and p3.built and p3.meta["images_decoded"] == 5 and p3.array[0].max() == 0


def test_label_only_changes_reuse_the_decoded_images(tmp_path: Path) -> None:
    from dataclasses import replace

    ds = make_dataset(tmp_path / "imgs", n=4)
    p1 = prepare(ds, size=16, cache_dir=tmp_path / "c", workers=1, progress=False)
    relabelled = Dataset(replace(ds.info, class_names=("a", "b")), [replace(r, label=1 - r.label) for r in ds.records],
                         ds.root, options={"uncertain": "u_zeros"})
    assert relabelled.fingerprint() != ds.fingerprint() and relabelled.files_fingerprint() == ds.files_fingerprint()
    p2 = prepare(relabelled, size=16, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert not p2.built and p2.key == p1.key
    assert p2.labels.tolist() == [1 - x for x in p1.labels.tolist()] and p2.class_names == ("a", "b")


class Stop(Exception):
    pass


def test_interrupted_prepare_resumes(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "imgs", n=10)
    whole = prepare(ds, size=16, cache_dir=tmp_path / "ref", workers=1, progress=False)

    def stop_at(done: int, total: int) -> None:
        if done == 7:
            raise Stop

    with pytest.raises(Stop):
        prepare(ds, size=16, cache_dir=tmp_path / "c", workers=1, progress=False, checkpoint_every=3, on_progress=stop_at)
    art = prepared_artifact(ds, 16, cache_dir=tmp_path / "c")
    assert not art.complete and art.progress() == (7, 10)  # the interrupted image's batch was flushed on the way out
    seen: list[int] = []
    p = prepare(ds, size=16, cache_dir=tmp_path / "c", workers=1, progress=False, on_progress=lambda d, t: seen.append(d))
    assert seen == [8, 9, 10] and p.meta["images_decoded"] == 3  # the 7 finished ones are not redone
    np.testing.assert_array_equal(p.array, whole.array)


def test_killed_prepare_resumes_from_last_flush(tmp_path: Path) -> None:
    """A hard kill (no cleanup runs) loses at most the images since the last periodic flush."""
    ds = make_dataset(tmp_path / "imgs", n=10)
    paths = [r.path for r in ds.records]
    script = textwrap.dedent(f"""
        import os
        from medxfer.data.records import Dataset, DatasetInfo, Record
        from medxfer.prepare import prepare
        recs = [Record(p, i % 2, "train" if i % 4 else "test") for i, p in enumerate({paths!r})]
        ds = Dataset(DatasetInfo("toy", "binary", ("neg", "pos")), recs, "x")
        def die(done, total):
            if done == 7:
                os._exit(3)
        prepare(ds, size=16, cache_dir={str(tmp_path / "c")!r}, workers=1, progress=False, checkpoint_every=4,
                on_progress=die)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert res.returncode == 3, res.stderr
    art = prepared_artifact(ds, 16, cache_dir=tmp_path / "c")
    assert art.progress() == (4, 10) and not art.complete
    seen: list[int] = []
    p = prepare(ds, size=16, cache_dir=tmp_path / "c", workers=1, progress=False, on_progress=lambda d, t: seen.append(d))
    assert seen == list(range(5, 11))  # images 4..9 decoded again, 0..3 kept
    whole = prepare(ds, size=16, cache_dir=tmp_path / "ref", workers=1, progress=False)
    np.testing.assert_array_equal(p.array, whole.array)


def test_truncated_or_overwritten_cache_is_detected_and_rebuilt(tmp_path: Path, caplog) -> None:
    ds = make_dataset(tmp_path / "imgs", n=6)
    p = prepare(ds, size=16, cache_dir=tmp_path / "c", workers=1, progress=False)
    good = np.array(p.array)
    art = prepared_artifact(ds, 16, cache_dir=tmp_path / "c")
    del p
    with open(art.array_path, "r+b") as f:  # zero-fill the pixels, same size
        f.seek(200)
        f.write(b"\0" * 400)
    with caplog.at_level("WARNING"):
        again = prepare(ds, size=16, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert "does not match its SHA-256" in caplog.text and again.built
    np.testing.assert_array_equal(again.array, good)
    del again
    with open(art.array_path, "r+b") as f:
        f.truncate(art.array_path.stat().st_size - 100)
    caplog.clear()
    with caplog.at_level("WARNING"):
        third = prepare(ds, size=16, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert "truncated" in caplog.text and third.built
    np.testing.assert_array_equal(third.array, good)


def test_bad_image_error_names_file_and_record(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "imgs", n=4)
    Path(ds.records[2].path).write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match=r"record 2 .*img2\.png"):
        prepare(ds, size=16, cache_dir=tmp_path / "c", workers=2, progress=False)


def test_missing_file_error(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "imgs", n=3)
    os.remove(ds.records[1].path)
    with pytest.raises(ImageReadError, match=r"img1\.png.*not found"):
        prepare(ds, size=16, cache_dir=tmp_path / "c", workers=1, progress=False)


def test_skip_bad_records_problems(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "imgs", n=5)
    Path(ds.records[3].path).write_bytes(b"\xff\xd8\xff garbage")
    p = prepare(ds, size=16, cache_dir=tmp_path / "c", workers=2, skip_bad=True, progress=False)
    assert p.bad == [3] and len(p.meta["problems"]) == 1
    assert "img3.png" in p.meta["problems"][0] and p.array[3].max() == 0 and p.array[2].max() > 0
    # the cached set still refuses to be used silently without skip_bad
    with pytest.raises(ImageReadError, match="img3.png"):
        prepare(ds, size=16, cache_dir=tmp_path / "c", workers=1, progress=False)


def test_thread_and_process_executors_agree(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "imgs", n=6)
    a = prepare(ds, size=16, cache_dir=tmp_path / "a", workers=2, executor="thread", progress=False)
    b = prepare(ds, size=16, cache_dir=tmp_path / "b", workers=2, executor="process", progress=False)
    np.testing.assert_array_equal(a.array, b.array)
    with pytest.raises(ValueError, match="executor"):
        prepare(ds, size=16, cache_dir=tmp_path / "d", executor="gpu", progress=False)


def test_bad_arguments(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "imgs", n=2)
    with pytest.raises(KeyError, match="resize"):
        prepare(ds, size=16, resize="stretch", cache_dir=tmp_path / "c", progress=False)
    empty = Dataset(ds.info, [], str(tmp_path))
    with pytest.raises(ValueError, match="no records"):
        prepare(empty, cache_dir=tmp_path / "c", progress=False)


def test_real_eyepacs_jpegs(shared_data: Path, tmp_path: Path) -> None:
    files = sorted((shared_data / "eyepacs-sample" / "sample").glob("*.jpeg"))[:3]
    recs = [Record(str(f), 0) for f in files]
    ds = Dataset(DatasetInfo("eyepacs-sample", "multiclass", tuple("01234")), recs, str(shared_data))
    p = prepare(ds, cache_dir=tmp_path / "c", workers=2, progress=False)
    assert p.array.shape == (3, 224, 224, 3)
    full = reference(str(files[0]), 224, "aspect").astype(np.int16)
    assert np.abs(p.array[0].astype(np.int16) - full).mean() < 3.0  # draft decode ~ full decode


def test_keep_store_holds_whole_images_with_their_extents(tmp_path: Path) -> None:
    """The finetuning store: the whole image, shorter side to the size (never enlarged), aspect
    preserved, top-left in a canvas; extents say where each image ends."""
    ds = make_dataset(tmp_path / "imgs", n=3, sizes=[(80, 40), (40, 100), (20, 20)])
    p = prepare(ds, size=32, resize="keep", cache_dir=tmp_path / "c", workers=1, progress=False)
    assert p.extents.tolist() == [[32, 64], [80, 32], [20, 20]]  # (height, width); the small one not enlarged
    assert p.array.shape[1:3] == (81, 65)
    for i, r in enumerate(ds.records):
        h, w = p.extents[i]
        ref = np.asarray(Image.open(r.path).convert("RGB").resize((w, h), Image.BICUBIC)) if i < 2 else \
            np.asarray(Image.open(r.path).convert("RGB"))
        np.testing.assert_array_equal(p.array[i, :h, :w], ref)
        assert p.array[i, h:].max(initial=0) == 0 and p.array[i, :, w:].max(initial=0) == 0
    again = prepare(ds, size=32, resize="keep", cache_dir=tmp_path / "c", workers=1, progress=False)
    assert not again.built and again.extents.tolist() == p.extents.tolist()
