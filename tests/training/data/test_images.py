"""Image folders: subfolders as labels or a flat folder; sizes and modes converted by one rule; unreadable files named
or skipped and counted; a conv model trained on a folder; big folders decoded lazily, batch by batch, by DataLoader
worker processes, with the pixels and order of the in-memory path."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from aeserve.training.config import build_run_config
from aeserve.training.data import images as image_folders
from aeserve.training.data.config import DataConfig
from aeserve.training.data.dataset import DataError
from aeserve.training.data.images import ImageFiles
from aeserve.training.data.rows import ModelRows
from aeserve.training.data.sources import load_dataset
from aeserve.training.trainer import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_folder(root, per_label: int = 4):
    """Two labels of mixed sizes and modes: RGB PNGs 10 high and 12 wide, gray JPEGs, a palette PNG, an RGBA PNG."""
    rng = np.random.default_rng(0)
    (root / "bright").mkdir(parents=True)
    (root / "dark").mkdir()
    for i in range(per_label):
        Image.fromarray(rng.integers(128, 256, (10, 12, 3), dtype=np.uint8)).save(root / "bright" / f"rgb{i}.png")
        Image.fromarray(rng.integers(0, 128, (8, 8), dtype=np.uint8)).save(root / "dark" / f"gray{i}.jpg", quality=95)
    Image.fromarray(rng.integers(0, 128, (8, 8, 3), dtype=np.uint8)).convert("P").save(root / "dark" / "palette.png")
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "bright" / "alpha.png")
    (root / "bright" / "notes.txt").write_text("not an image: left out")
    return root


def images(path, **data) -> DataConfig:
    return DataConfig.from_dict({"source": "images", "path": str(path), **data})


def all_rows(dataset):
    return np.concatenate([dataset.train_x, dataset.test_x]), np.concatenate([dataset.train_y, dataset.test_y])


def test_subfolders_are_labels_and_every_image_is_brought_to_the_size_and_channels(tmp_path):
    dataset = load_dataset(images(write_folder(tmp_path / "photos"), image_size=[8, 8]))
    x, y = all_rows(dataset)
    assert x.shape == (10, 3, 8, 8) and x.dtype == np.uint8  # a colour image among them: three channels, channels first
    assert dataset.facts == {"labels": ["bright", "dark"], "image_size": [8, 8], "channels": 3, "files": 10, "skipped_files": 0}
    assert np.bincount(y).tolist() == [5, 5]
    assert dataset.preprocessing.input_shape == (3, 8, 8)
    assert (dataset.preprocessing.offset, dataset.preprocessing.scale) == (0.0, pytest.approx(1 / 255))  # pixels 0..255
    dark = x[y == 1].astype(int)
    means = x.reshape(10, -1).mean(axis=1)
    assert means[y == 1].max() < 80 and means[y == 0].min() > 120  # labels follow the files (Lanczos and JPEG may ring a little)
    gray = dark[(dark[:, 0] == dark[:, 1]).all(axis=(1, 2)) & (dark[:, 1] == dark[:, 2]).all(axis=(1, 2))]
    assert len(gray) == 4  # the gray JPEGs: one channel repeated three times


def test_without_a_size_or_channels_the_first_image_sets_the_size_and_gray_folders_get_one_channel(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (6 + 2 * (i > 0), 8), dtype=np.uint8)).save(folder / f"{i}.png")
    gray_palette = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).convert("P")
    gray_palette.save(folder / "palette.png")
    dataset = load_dataset(images(folder))
    x = np.concatenate([dataset.train_x, dataset.test_x])
    assert x.shape == (6, 6, 8) and dataset.train_y is None  # 0.png is 6 high: every image is cropped and resized to it
    assert dataset.facts == {"image_size": [6, 8], "channels": 1, "files": 6, "skipped_files": 0}


def test_colour_to_one_channel_is_luma_and_other_sizes_are_centre_cropped_not_stretched(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    red = np.zeros((8, 12, 3), np.uint8)
    red[..., 0] = 255
    red[:, :2] = red[:, -2:] = 0  # 2 columns each side, outside the centred 8 x 8 crop
    Image.fromarray(red).save(folder / "a.png")
    transparent = np.zeros((8, 8, 4), np.uint8)  # fully transparent: laid on white
    Image.fromarray(transparent, "RGBA").save(folder / "b.png")
    dataset = load_dataset(images(folder, image_size=[8, 8], channels=1, test_fraction=0))
    by_mean = sorted(dataset.train_x, key=lambda image: image.mean())
    assert by_mean[0].tolist() == [[76] * 8] * 8  # 0.299 * 255, across the whole crop
    assert by_mean[1].tolist() == [[255] * 8] * 8


def test_a_corrupt_file_is_named_or_skipped_and_counted(tmp_path, capsys):
    folder = write_folder(tmp_path / "photos")
    bad = folder / "dark" / "broken.png"
    bad.write_bytes(PNG_MAGIC + b"not really a png")
    with pytest.raises(DataError, match=f"{bad}: not a readable image .*; set data.skip_bad = true to skip such files"):
        load_dataset(images(folder, image_size=[8, 8]))
    dataset = load_dataset(images(folder, image_size=[8, 8], skip_bad=True))
    assert dataset.facts["skipped_files"] == 1 and dataset.facts["files"] == 10
    assert "note: skipped 1 unreadable image(s) of 11" in capsys.readouterr().err


@pytest.mark.parametrize("layout,message", [
    ("empty", "no images found (files ending .png, .jpg, .jpeg, .webp, .bmp"),
    ("missing", "folder not found"),
    ("file", "is a file; data.source 'images' needs a folder"),
    ("mixed", "holds both image files (loose.png, ...) and subfolders (a, ...)"),
    ("empty label", "the label folder holds no images"),
])
def test_folders_without_usable_images_say_so(tmp_path, layout, message):
    folder = tmp_path / "photos"
    if layout != "missing":
        folder.mkdir()
    if layout == "file":
        folder.rmdir()
        folder.write_bytes(b"x")
    if layout in ("mixed", "empty label"):
        (folder / "a").mkdir()
        Image.new("L", (4, 4)).save(folder / "a" / "one.png")
        (folder / "b").mkdir()
    if layout == "mixed":
        Image.new("L", (4, 4)).save(folder / "b" / "two.png")
        Image.new("L", (4, 4)).save(folder / "loose.png")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_dataset(images(folder))


def test_image_size_and_channels_are_checked_when_the_config_is_built():
    with pytest.raises(ValueError, match=r"data.image_size must be \[height, width\], got \[8\]"):
        DataConfig.from_dict({"source": "images", "image_size": [8]})
    with pytest.raises(ValueError, match=r"data.channels 2 is not one of \[0, 1, 3\]"):
        DataConfig.from_dict({"source": "images", "channels": 2})


def test_an_image_folder_trains_a_conv_model_with_labels_and_a_colour_report(tmp_path, registry):
    folder = write_folder(tmp_path / "photos")
    config = build_run_config({"name": "photos", "data": {"source": "images", "path": str(folder), "image_size": [8, 8]},
                               "model": {"kind": "conv", "code_dim": 2, "channels": [4]}, "train": {"epochs": 1, "batch_size": 4}})
    assert train(config, registry, progress=False) == 1
    manifest = registry.manifest("photos")
    assert manifest["input_shape"] == [3, 8, 8] and manifest["training"]["data"]["source"] == "images"
    assert manifest["preprocessing"]["scale"] == pytest.approx(1 / 255)
    folder_out = registry.version_dir("photos", 1)
    assert (folder_out / "report" / "reconstructions.png").read_bytes().startswith(PNG_MAGIC)
    assert json.loads((folder_out / "map" / "sample.json").read_text())["input_shape"] == [3, 8, 8]


# --- lazy decoding: the files listed, each batch decoded as training draws it, by DataLoader worker processes ---------

def lazy_run(folder, name, **data):
    return build_run_config({"name": name, "data": {"source": "images", "path": str(folder), "image_size": [8, 8], **data},
                             "model": {"kind": "conv", "code_dim": 2, "channels": [4]}, "train": {"epochs": 2, "batch_size": 8, "report": False}})


@pytest.fixture
def small_tasks(monkeypatch):
    """Four images per decoding task, so that a small folder makes several tasks and worker processes start."""
    monkeypatch.setattr(image_folders, "IMAGE_BATCH", 4)


def test_a_folder_decoded_lazily_gives_the_pixels_split_and_batches_of_the_one_in_memory(tmp_path, small_tasks):
    folder = write_folder(tmp_path / "photos", per_label=12)
    memory = load_dataset(images(folder, image_size=[8, 8], decode="memory"))
    for workers in (0, 2):
        lazy = load_dataset(images(folder, image_size=[8, 8], decode="lazy", workers=workers))
        assert isinstance(lazy.train_x, ImageFiles) and isinstance(lazy.test_x, ImageFiles)
        assert lazy.facts == memory.facts and lazy.preprocessing.input_shape == memory.preprocessing.input_shape == (3, 8, 8)
        np.testing.assert_array_equal(np.asarray(lazy.train_x), memory.train_x)  # the same rows, in the same split and order
        np.testing.assert_array_equal(lazy.test_x[:], memory.test_x)
        np.testing.assert_array_equal(lazy.train_y, memory.train_y)
        rows, in_memory = ModelRows(lazy.train_x, lazy.preprocessing), ModelRows(memory.train_x, memory.preprocessing)
        draws = [torch.randperm(len(rows), generator=torch.Generator().manual_seed(i))[:7] for i in range(5)]
        batches = list(rows.batches(draws))
        assert len(batches) == 5 and all(torch.equal(a, in_memory[b]) for a, b in zip(batches, draws, strict=True))
        assert torch.equal(rows.subset(np.arange(len(rows))[::-1])[3:20], in_memory.subset(np.arange(len(rows))[::-1])[3:20])


def test_training_from_a_lazy_folder_equals_training_in_memory_whatever_the_number_of_workers(tmp_path, registry, small_tasks):
    folder = write_folder(tmp_path / "photos", per_label=12)
    assert train(lazy_run(folder, "memory", decode="memory"), registry, progress=False) == 1
    for workers in (0, 2):
        assert train(lazy_run(folder, f"lazy{workers}", decode="lazy", workers=workers), registry, progress=False) == 1
        manifest, expected = registry.manifest(f"lazy{workers}"), registry.manifest("memory")
        assert manifest["sha256"] == expected["sha256"]  # the same weights: the same batches, in the same order
        assert manifest["metrics"] == expected["metrics"]
        assert manifest["training"]["sample_rows"] == expected["training"]["sample_rows"] == manifest["training"]["n_train"]
    assert registry.manifest("lazy0")["training"]["data_fingerprint"] == registry.manifest("lazy2")["training"]["data_fingerprint"]


def truncated_png(path, rng):
    """A PNG whose header reads and whose pixel data stops half way: found only by decoding it."""
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    Image.open(path)  # the header is fine


@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_found_unreadable_mid_training_is_named(tmp_path, registry, small_tasks, workers):
    folder = write_folder(tmp_path / "photos", per_label=12)
    bad = folder / "dark" / "truncated.png"
    truncated_png(bad, np.random.default_rng(3))
    dataset = load_dataset(images(folder, image_size=[8, 8], decode="lazy", workers=workers))  # the header pass finds nothing
    assert dataset.facts["files"] == 27  # the truncated file too
    message = f"^{re.escape(str(bad))}: not a readable image .*; set data.skip_bad = true to skip such files$"
    with pytest.raises(DataError, match=message):
        train(lazy_run(folder, "photos", decode="lazy", workers=workers), registry, progress=False)
    with pytest.raises(DataError, match=message):  # in memory, the one pass decodes every file
        load_dataset(images(folder, image_size=[8, 8], decode="memory", workers=workers))


def test_with_skip_bad_a_lazy_folder_is_decoded_once_before_training_so_every_bad_file_is_counted(tmp_path, registry, small_tasks, capsys):
    folder = write_folder(tmp_path / "photos", per_label=12)
    truncated_png(folder / "dark" / "truncated.png", np.random.default_rng(3))
    (folder / "bright" / "broken.png").write_bytes(PNG_MAGIC + b"not really a png")
    for decode in ("lazy", "memory"):
        dataset = load_dataset(images(folder, image_size=[8, 8], decode=decode, workers=2, skip_bad=True))
        assert dataset.facts["files"] == 26 and dataset.facts["skipped_files"] == 2
        assert "note: skipped 2 unreadable image(s) of 28" in capsys.readouterr().err
    assert train(lazy_run(folder, "photos", decode="lazy", workers=2, skip_bad=True), registry, progress=False) == 1
    assert registry.manifest("photos")["training"]["skipped_files"] == 2


def test_a_lazy_folder_is_fingerprinted_by_its_files_bytes_and_auto_decodes_lazily_beyond_the_bound(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "photos")
    config = images(folder, image_size=[8, 8], decode="lazy")
    first = load_dataset(config).fingerprint
    assert load_dataset(config).fingerprint == first
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "bright" / "rgb0.png")
    assert load_dataset(config).fingerprint != first
    assert isinstance(load_dataset(images(folder, image_size=[8, 8])).train_x, np.ndarray)  # 10 x 3 x 8 x 8 bytes: in memory
    monkeypatch.setattr(image_folders, "IMAGE_MEMORY_BYTES", 10 * 3 * 8 * 8 - 1)
    assert isinstance(load_dataset(images(folder, image_size=[8, 8])).train_x, ImageFiles)
    assert isinstance(load_dataset(images(folder, image_size=[8, 8], channels=1)).train_x, np.ndarray)  # one channel: a third


def test_decode_and_workers_are_checked_when_the_config_is_built():
    with pytest.raises(ValueError, match=r"data.decode 'eager' is not one of \['auto', 'lazy', 'memory'\]"):
        DataConfig.from_dict({"source": "images", "decode": "eager"})
    with pytest.raises(ValueError, match=r"data.workers must be >= 0, got -1"):
        DataConfig.from_dict({"source": "images", "workers": -1})
