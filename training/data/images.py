"""Image folders: PNG, JPEG, WebP or BMP files, one subfolder per label (or a flat folder), local or at a URL.

The resize and colour rule is ``models/images.py``'s, the one serving applies. A folder is decoded once into memory or
lazily (ImageFiles) as training draws each batch, in DataLoader worker processes (``parallel.py``).
"""
from __future__ import annotations

import hashlib
import io
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from aeserve.models.images import IMAGE_FORMATS, IMAGE_SUFFIXES, image_input_shape, is_gray, open_image, to_pixels
from aeserve.models.preprocessing import Preprocessing
from aeserve.training.data.config import DataConfig
from aeserve.training.data.dataset import DataError, Dataset, RowsOnDemand, split_off_test
from aeserve.training.data.locations import Found, RemoteFile, child, location, required
from aeserve.training.data.parallel import decoding_workers, in_parallel

# Images per task of a decoding pass: what one worker process decodes at a time (training: one batch per task), and
# from a URL the files fetched together (concurrently, where the store allows).
IMAGE_BATCH = 64
# data.decode = "auto": a folder whose pixels take at most this many bytes (uint8, counted as three channels unless
# data.channels is 1) is decoded once into memory, a bigger one lazily, each batch as training draws it.
IMAGE_MEMORY_BYTES = 2**28


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _listing(folder: Path | RemoteFile) -> tuple[list[str], list[str]]:
    """(every file under ``folder`` as a path relative to it, the names of its visible subfolders)."""
    if isinstance(folder, Path):
        subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and _visible(p.name))
        return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()], subfolders
    root = folder.path + "/"
    try:
        files = [p[len(root):] for p in folder.fs.find(folder.path) if p.startswith(root)]  # one listing, however deep
    except OSError as e:
        raise DataError(f"{folder}: cannot be listed ({e})") from None
    # Object storage has no folders, only names with slashes: a subfolder is the first part of a longer name.
    return files, sorted({f.split("/", 1)[0] for f in files if "/" in f and _visible(f.split("/", 1)[0])})


def _image_files(folder: Path | RemoteFile) -> tuple[list[str], list[int] | None, list[str]]:
    """(image files relative to the folder, label index per file or None, label names): one subfolder per label, or a
    flat folder without labels.

    Hidden files and files whose suffix is not an image's are left out; a label subfolder is searched to any depth.
    """
    files, subfolders = _listing(folder)
    images = sorted((f for f in files if PurePosixPath(f).suffix.lower() in IMAGE_SUFFIXES and all(_visible(part) for part in f.split("/"))),
                    key=lambda f: f.split("/"))  # folder by folder, as paths sort
    loose = [f for f in images if "/" not in f]
    if not subfolders:
        return loose, None, []
    if loose:
        raise DataError(f"{folder}: holds both image files ({loose[0]}, ...) and subfolders ({subfolders[0]}, ...); "
                        "put every image in a subfolder named after its label, or use a flat folder without subfolders")
    files, labels = [], []
    for index, subfolder in enumerate(subfolders):
        found = [f for f in images if f.startswith(subfolder + "/")]
        if not found:
            raise DataError(f"{child(folder, subfolder)}: the label folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [index] * len(found)
    return files, labels, subfolders


def _image_sources(folder: Path | RemoteFile, files: list[str]) -> Iterator[Path | bytes]:
    """What to decode for each file, in order: a local file's path, or a URL's bytes, fetched IMAGE_BATCH files at a
    time (concurrently where the store allows) as decoding reaches them."""
    if isinstance(folder, Path):
        yield from (folder / f for f in files)
        return
    for start in range(0, len(files), IMAGE_BATCH):
        batch = [folder.child(f) for f in files[start:start + IMAGE_BATCH]]
        fetched = folder.fs.cat([file.path for file in batch], on_error="return")
        for file in batch:
            content = fetched.get(file.path)
            if not isinstance(content, bytes):
                raise DataError(f"{file}: cannot be read ({content})")
            yield content


@dataclass(frozen=True)
class _ImageReader:
    """What decoding a folder's files takes, picklable for worker processes: a URL's filesystem is made again in each
    process (fsspec's async filesystems do not survive a fork)."""

    path: str  # data.path
    files: tuple[str, ...]  # relative to the folder, in the folder's order
    size: tuple[int, int]
    config_channels: int  # data.channels (0: by the images)
    channels: int  # of the arrays: 1 or 3 (the lazy path; the in-memory one decides once every image is decoded)
    skip_bad: bool

    def folder(self) -> Path | RemoteFile:
        return location(self.path)

    def unreadable(self, file: str, reason: Exception | str) -> DataError:
        advice = ("it was readable before training, so it changed since" if self.skip_bad else
                  "set data.skip_bad = true to skip such files")
        return DataError(f"{child(self.folder(), file)}: not a readable image ({reason}); {advice}")

    def pixels(self, image) -> np.ndarray:
        """The rule's pixels: (H, W) for one channel, (3, H, W) for three. With data.channels = 0 a gray image is
        converted to one channel (and a colour one too where the arrays have one)."""
        gray = self.channels == 1 or is_gray(image)
        return to_pixels(image, self.size, self.config_channels or (1 if gray else 3))

    def _sources(self, files: list[str]) -> Iterator[tuple[str, Path | bytes]]:
        return zip(files, _image_sources(self.folder(), files), strict=True)

    def decode(self, numbers: np.ndarray) -> torch.Tensor:
        """uint8 pixels (k, *input_shape) of files ``numbers``, as a tensor: from a worker through shared memory."""
        files = [self.files[n] for n in numbers]
        out = np.empty((len(files), *image_input_shape(self.size, self.channels)), np.uint8)
        for row, (file, source) in enumerate(self._sources(files)):
            try:
                image = open_image(source)
            except (OSError, ValueError, SyntaxError) as e:
                raise self.unreadable(file, e) from None
            pixels = self.pixels(image)
            out[row] = pixels if pixels.ndim == out.ndim - 1 else pixels[None]  # a gray image among colour ones: repeated
        return torch.from_numpy(out)

    def decode_each(self, start: int) -> list[np.ndarray | str]:
        """Per file of files[start:start + IMAGE_BATCH] its pixels, each with its own channels (``channels = 3`` here:
        gray ones keep one), or with skip_bad the note of why it is skipped."""
        out = []
        for file, source in self._sources(list(self.files[start:start + IMAGE_BATCH])):
            try:
                out.append(self.pixels(open_image(source)))
            except (OSError, ValueError, SyntaxError) as e:
                if not self.skip_bad:
                    raise self.unreadable(file, e) from None
                out.append(f"{file} ({e})")
        return out

    def scan(self, start: int, decode: bool) -> list[tuple[str, bool] | str]:
        """Per file of files[start:start + IMAGE_BATCH]: (the sha256 of its bytes, whether its mode is gray), or with
        skip_bad the note of why it is skipped. Its header alone is parsed, or with ``decode`` the whole image decoded."""
        from PIL import Image

        out = []
        for file, source in self._sources(list(self.files[start:start + IMAGE_BATCH])):
            try:
                data = source if isinstance(source, bytes) else source.read_bytes()
                # Image.open parses the header; a palette is read with it (is_gray looks at its entries).
                image = open_image(data) if decode else Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
                gray = not self.config_channels and is_gray(image)
            except (OSError, ValueError, SyntaxError) as e:
                if not self.skip_bad:
                    raise self.unreadable(file, e) from None
                out.append(f"{file} ({e})")
                continue
            out.append((hashlib.sha256(data).hexdigest(), gray))
        return out


class ImageFiles(RowsOnDemand):
    """The images of a folder as an array (n, *input_shape) of uint8 pixels, decoded as they are indexed: what np.memmap
    is for an .npy. The rows are files; nothing of an image is held before it is indexed.

    ``x[i]``, ``x[a:b]`` and ``x[rows]`` decode those files by the rule of ``models/images.py``, IMAGE_BATCH per task
    in DataLoader worker processes when there are more. ``x.rows(index)`` is a view that decodes nothing (the split,
    data.limit). ``x.batches(lists)`` gives the pixels of each list of rows in turn, one batch per task, the workers
    decoding ahead of the consumer: how training draws its batches.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, reader: _ImageReader, digests: dict[int, str], workers: int, numbers: np.ndarray) -> None:
        self.reader, self.digests, self.workers = reader, digests, workers
        self.numbers = np.asarray(numbers, dtype=np.int64)  # row -> file number (of reader.files)

    def __len__(self) -> int:
        return len(self.numbers)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *image_input_shape(self.reader.size, self.reader.channels))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape)

    @property
    def files(self) -> list[str]:
        """The rows' files, relative to the folder."""
        return [self.reader.files[n] for n in self.numbers]

    def rows(self, key) -> ImageFiles:
        """The rows ``key`` (a slice or row numbers) of these, decoding nothing."""
        return ImageFiles(self.reader, self.digests, self.workers, self.numbers[key])

    def take(self, rows: slice | np.ndarray) -> ImageFiles:
        """Any rows the split and data.limit keep, as a view that decodes nothing."""
        return self.rows(rows)

    def identity(self) -> str:
        """Names these rows for the data fingerprint: each file's path in the folder and the sha256 of its bytes, read
        before training (hashing the pixels would decode every image once more)."""
        h = hashlib.sha256()
        for n in self.numbers:
            h.update(f"{self.reader.files[n]}\0{self.digests[n]}\n".encode())
        return h.hexdigest()

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, int | np.integer):
            return self[np.array([key])][0]
        numbers = self.numbers[key.numpy() if isinstance(key, torch.Tensor) else key]
        tasks = [numbers[start:start + IMAGE_BATCH] for start in range(0, len(numbers), IMAGE_BATCH)]
        out = np.empty((len(numbers), *self.shape[1:]), np.uint8)
        with closing(in_parallel(self.reader.decode, tasks, self.workers)) as decoded:
            for start, pixels in zip(range(0, len(numbers), IMAGE_BATCH), decoded, strict=True):
                out[start:start + len(pixels)] = pixels.numpy()
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = self[:]
        return x if dtype is None else x.astype(dtype)

    def batches(self, row_lists: list[np.ndarray]) -> Iterator[np.ndarray]:
        """self[rows] for each of ``row_lists`` in turn, each decoded whole by one worker, the workers ahead of the consumer."""
        numbers = [self.numbers[np.asarray(rows)] for rows in row_lists]
        with closing(in_parallel(self.reader.decode, numbers, self.workers)) as decoded:
            for pixels in decoded:
                yield pixels.numpy()


def _first_size(folder: Path | RemoteFile, files: list[str], skip_bad: bool) -> tuple[int, int]:
    """(height, width) of the first readable image in the folder's order: the default data.image_size."""
    for file, source in zip(files, _image_sources(folder, files), strict=True):
        try:
            image = open_image(source)
        except (OSError, ValueError, SyntaxError) as e:
            if not skip_bad:
                raise DataError(f"{child(folder, file)}: not a readable image ({e}); set data.skip_bad = true to skip such files") from None
            continue  # found again, and counted, by the pass over every file
        return image.height, image.width
    raise DataError(f"{folder}: 0 readable image(s); at least 2 are needed")


def _each_file(work: Callable[[int], list], reader: _ImageReader, workers: int) -> tuple[list[tuple[int, Any]], list[str]]:
    """``work`` over the reader's files, IMAGE_BATCH files from each start, in worker processes: (file number, result)
    of each readable file in order, and the notes (strings) of the unreadable ones skipped."""
    starts = list(range(0, len(reader.files), IMAGE_BATCH))
    with closing(in_parallel(work, starts, workers)) as done:
        batches = list(zip(starts, done, strict=True))
    read, skipped = [], []
    for start, results in batches:
        for number, result in enumerate(results, start):
            if isinstance(result, str):
                skipped.append(result)
            else:
                read.append((number, result))
    return read, skipped


def _decoded(reader: _ImageReader, workers: int) -> tuple[np.ndarray, list[int], list[str]]:
    """(every readable image's pixels in one array, their file numbers, notes of the unreadable ones skipped).

    Gray images stay one channel until a colour one shows up; then they are repeated to three.
    """
    read, skipped = _each_file(reader.decode_each, reader, workers)
    kept, pixels = [number for number, _ in read], [p for _, p in read]
    channels = reader.config_channels or (3 if any(p.ndim == 3 for p in pixels) else 1)
    x = np.empty((len(pixels), *image_input_shape(reader.size, channels)), dtype=np.uint8)
    for row, p in enumerate(pixels):
        x[row] = p if p.ndim == x.ndim - 1 else p[None]  # a gray image among colour ones: its one channel three times
    return x, kept, skipped


def _scanned(reader: _ImageReader, workers: int) -> tuple[ImageFiles, list[int], list[str]]:
    """(the readable images as an ImageFiles, their file numbers, notes of the unreadable ones skipped), from one pass
    over the files: each read and hashed, its header parsed (decoded whole with skip_bad)."""
    read, skipped = _each_file(partial(reader.scan, decode=reader.skip_bad), reader, workers)
    kept = [number for number, _ in read]
    digests = {number: digest for number, (digest, _) in read}
    grays = [gray for _, (_, gray) in read]
    channels = reader.config_channels or (1 if all(grays) else 3)
    reader = replace(reader, channels=channels)
    return ImageFiles(reader, digests, workers, np.asarray(kept, dtype=np.int64)), kept, skipped


def load_images(config: DataConfig) -> Dataset:
    """A folder of PNG, JPEG, WebP or BMP files (``models/images.py`` has the resize and colour rule).

    Arrays are uint8 (n, H, W) for one channel and (n, 3, H, W) for three; pixels 0..255 scaled by 1/255 unless
    ``data.scaling`` says otherwise. The folder may be a URL: listed once, each file's bytes read when it is needed.

    ``data.decode``: ``memory`` decodes every image once, before training, into one array. ``lazy`` reads every file
    once before training (its bytes hashed for the fingerprint and its header parsed for its colour mode; with
    ``data.skip_bad`` decoded whole, so that the unreadable ones are known and counted before training) and gives
    training an ImageFiles, whose batches are decoded as they are drawn. ``auto``: memory up to IMAGE_MEMORY_BYTES of
    pixels. Either pass is spread over ``data.workers`` DataLoader worker processes; the rows, their order, the split
    and the pixels are the same whichever way and however many workers.
    """
    folder = required(config, Found.FOLDER, "a folder of images", " (one subfolder per label, or flat)")
    files, labels, names = _image_files(folder)
    if not files:
        raise DataError(f"{folder}: no images found (files ending {', '.join(IMAGE_SUFFIXES)}, in the folder or in label subfolders)")
    workers = decoding_workers(config.workers)
    size = tuple(config.image_size) or _first_size(folder, files, config.skip_bad)
    reader = _ImageReader(config.path, tuple(files), size, config.channels, config.channels or 3, config.skip_bad)
    pixels_bound = len(files) * size[0] * size[1] * (config.channels or 3)
    if config.decode == "lazy" or (config.decode == "auto" and pixels_bound > IMAGE_MEMORY_BYTES):
        x, kept, skipped = _scanned(reader, workers)
    else:
        x, kept, skipped = _decoded(reader, workers)
    if skipped:
        print(f"note: skipped {len(skipped)} unreadable image(s) of {len(files)} in {folder} (data.skip_bad): "
              f"{'; '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}", file=sys.stderr)
    if len(x) < 2:
        raise DataError(f"{folder}: {len(x)} readable image(s); at least 2 are needed")
    y = None if labels is None else np.asarray(labels, dtype=np.int64)[kept]
    # Split at random (seeded) whichever way the images are held: a folder's files are in label order.
    dataset = split_off_test(folder.name, x, y, config, Preprocessing(input_shape=x.shape[1:], offset=0.0, scale=1 / 255), contiguous=False)
    dataset.facts = {**({"labels": names} if names else {}), "image_size": list(size), "channels": x.shape[1] if x.ndim == 4 else 1,
                     "files": len(x), "skipped_files": len(skipped)}
    return dataset
