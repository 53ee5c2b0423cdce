"""CIFAR-10 as uint8 tensors: loading, caching, splitting, and batches served on the training device.

Two sources, chosen by what the data folder holds:
- an ImageFolder tree ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (png/jpg), decoded once and
  cached as tensors;
- torchvision's ``CIFAR10`` python batches (``DIR/cifar-10-batches-py``), downloaded on request.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cifar_exp.config import DataConfig
from cifar_exp.errors import ConfigError, DataError, first_line

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SHAPE = (3, 32, 32)
CACHE_FORMAT = 1  # bump when the cached layout changes


@dataclass(frozen=True)
class ImageSet:
    """A labelled set of images: ``images`` (N, 3, 32, 32) uint8, ``labels`` (N,) int64."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def digest(self) -> str:
        """16 hex digits of a hash of every image and label: equal digests, the same set."""
        return self._digest

    @functools.cached_property
    def _digest(self) -> str:
        # Hashed once per set (0.2 s for 50k images): a run logs it, compares it and records it. The set
        # is frozen, and nothing writes into its tensors.
        digest = hashlib.sha256(self.images.numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet
    classes: tuple[str, ...]
    source: str  # where the images came from, e.g. "imagefolder:/abs/dir"
    val_is_test: bool  # the seed report's protocol: per-epoch validation on the test split


def load_splits(cfg: DataConfig) -> Splits:
    """Load the dataset named by ``cfg`` and carve the validation split from train."""
    train, test, classes, source = load_dataset(cfg)
    if cfg.val_on_test:
        return Splits(train, test, test, classes, source, val_is_test=True)
    train, val = stratified_split(train, cfg.val_size, cfg.split_seed, classes)
    return Splits(train, val, test, classes, source, val_is_test=False)


def load_dataset(cfg: DataConfig) -> tuple[ImageSet, ImageSet, tuple[str, ...], str]:
    root = Path(cfg.data_dir).expanduser()
    with _looking_into(root):
        if root.exists() and not root.is_dir():
            raise DataError(f"data dir {root} is not a folder")
        image_folders = (root / "train").is_dir() or (root / "test").is_dir()
        batches = (root / "cifar-10-batches-py").is_dir()
        exists = root.exists()
    if image_folders:
        return _load_image_folder(root.resolve(), _cache_dir(cfg))
    if batches or cfg.download:
        return _load_torchvision(root, cfg.download)
    if not exists:
        raise DataError(f"data dir {root} does not exist (pass --download to fetch CIFAR-10 there)")
    raise DataError(
        f"no CIFAR-10 dataset in {root}: expected train/<class>/ and test/<class>/ image folders "
        "or cifar-10-batches-py/ (pass --download to fetch it)"
    )


@contextlib.contextmanager
def _looking_into(root: Path) -> Iterator[None]:
    """A data folder that cannot be looked into (no permission, a name too long) is a one-line DataError."""
    try:
        yield
    except OSError as error:
        raise DataError(f"cannot read data dir {root}: {error.strerror or error}") from None


def is_held_out_test_folder(data_dir: str) -> bool:
    """An image folder with test/ but no train/: a test set shipped on its own."""
    root = Path(data_dir).expanduser()
    with _looking_into(root):
        return (root / "test").is_dir() and not (root / "train").exists()


def load_test_set(cfg: DataConfig) -> tuple[ImageSet, tuple[str, ...], str]:
    """The test split alone, for evaluation: a held-out test folder (``is_held_out_test_folder``) is
    enough, its classes then named by test/'s folders. Where train/ exists the whole dataset loads as
    ``load_dataset`` loads it (its classes are train's)."""
    root = Path(cfg.data_dir).expanduser()
    if is_held_out_test_folder(cfg.data_dir):
        sets, classes, source = _load_image_folder_splits(root.resolve(), _cache_dir(cfg), ("test",))
        return sets["test"], classes, source
    _, test, classes, source = load_dataset(cfg)
    return test, classes, source


def stratified_split(
    data: ImageSet, val_size: int, seed: int, classes: tuple[str, ...] = ()
) -> tuple[ImageSet, ImageSet]:
    """Split off ``val_size`` images with every class in the same proportion as in ``data``."""
    train_idx, val_idx = stratified_split_indices(data.labels, val_size, seed, classes)
    return (
        ImageSet("train", data.images[train_idx], data.labels[train_idx]),
        ImageSet("val", data.images[val_idx], data.labels[val_idx]),
    )


def stratified_split_indices(
    labels: torch.Tensor, val_size: int, seed: int, classes: tuple[str, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices into ``labels``, each sorted: what ``stratified_split`` keeps.

    Every class keeps at least one image on each side; ``classes`` names the labels in errors.
    """
    from sklearn.model_selection import train_test_split

    def name(label: int) -> str:
        return repr(classes[label]) if label < len(classes) else str(label)

    if val_size >= len(labels):
        raise ConfigError(f"val-size {val_size} must be smaller than the {len(labels)} training images")
    counts = torch.bincount(labels)
    present = counts.nonzero().flatten().tolist()
    if val_size < len(present):
        raise ConfigError(f"val-size {val_size} must be at least the number of classes ({len(present)}): "
                          "a stratified split holds an image of each")
    single = [label for label in present if counts[label] < 2]
    if single:
        raise ConfigError(f"class {name(single[0])} has a single training image: a stratified split needs "
                          "at least 2 of each, one to train on and one to validate")
    try:
        train_idx, val_idx = train_test_split(
            np.arange(len(labels)), test_size=val_size, stratify=labels.numpy(), random_state=seed,
        )
    except ValueError as error:  # e.g. fewer images left to train on than classes
        raise ConfigError(f"cannot carve a stratified val-size of {val_size}: {error}") from None
    # Proportional rounding can give a rare class all of one side (2 of 40 images with val-size 36).
    for side, indices in (("training", train_idx), ("validation", val_idx)):
        lacking = sorted(set(present) - set(labels[indices].tolist()))
        if lacking:
            label = lacking[0]
            raise ConfigError(f"val-size {val_size} leaves class {name(label)} ({int(counts[label])} images) no "
                              f"{side} image: choose a val-size that keeps each class on both sides")
    return torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(val_idx))


# --------------------------------------------------------------------------------------------------
# Sources


def _load_torchvision(root: Path, download: bool) -> tuple[ImageSet, ImageSet, tuple[str, ...], str]:
    from torchvision.datasets import CIFAR10

    # The folders a download would create, innermost first: the root and its missing parents.
    missing = [folder for folder in (root.absolute(), *root.absolute().parents) if not folder.exists()]
    try:
        sets = [CIFAR10(str(root), train=train, download=download) for train in (True, False)]
    except (RuntimeError, OSError) as error:
        # A failed download (offline, a typo in --data-dir) leaves no empty folders behind. Only empty
        # ones: another worker may be downloading into the same folder.
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:
                break
        problem = _cifar_batches_problem(root, download) or error
        raise DataError(f"cannot load CIFAR-10 from {root}: {problem}") from None
    train, test = (
        ImageSet(
            name,
            torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),  # (N, 32, 32, 3) -> (N, 3, 32, 32)
            torch.tensor(ds.targets, dtype=torch.int64),
        )
        for name, ds in zip(("train", "test"), sets)
    )
    return train, test, tuple(sets[0].classes), f"cifar10-batches:{root.resolve()}"


def _cifar_batches_problem(root: Path, download: bool) -> str | None:
    """What is wrong with an existing cifar-10-batches-py/ (torchvision says only "not found or
    corrupted", and names its own download=True); None where it is not the batches."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    folder = root / CIFAR10.base_folder
    if download or not folder.is_dir():
        return None
    expected = [*CIFAR10.train_list, *CIFAR10.test_list, (CIFAR10.meta["filename"], CIFAR10.meta["md5"])]
    missing = [name for name, _ in expected if not (folder / name).is_file()]
    try:
        corrupted = [name for name, md5 in expected if name not in missing and not check_integrity(folder / name, md5)]
    except OSError as error:  # e.g. unreadable
        return f"cannot read {error.filename}: {error.strerror or error}"
    if missing:
        problem = f"{folder} lacks {', '.join(missing)}"
    elif corrupted:
        problem = f"{', '.join(corrupted)} in {folder} {'is' if len(corrupted) == 1 else 'are'} not the official " \
            "file (checksum mismatch)"
    else:
        return None
    return f"{problem}; pass --download to fetch CIFAR-10 again"


def _load_image_folder(root: Path, cache_dir: Path) -> tuple[ImageSet, ImageSet, tuple[str, ...], str]:
    sets, classes, source = _load_image_folder_splits(root, cache_dir, ("train", "test"))
    return sets["train"], sets["test"], classes, source


def _load_image_folder_splits(root: Path, cache_dir: Path, splits: tuple[str, ...],
                              ) -> tuple[dict[str, ImageSet], tuple[str, ...], str]:
    """``splits`` of an image folder, decoded or from the cache; the classes are the first split's."""
    files = {split: _list_split(root, split) for split in splits}
    classes = tuple(files[splits[0]])
    if len(classes) < 2:
        raise DataError(f"{root / splits[0]} holds one class folder, {classes[0]!r}: a classifier needs at least 2")
    if "test" in files and "train" in files:
        missing = [c for c in classes if c not in files["test"]]
        if missing:
            raise DataError(f"{root / 'test'} has no folder for class {missing[0]!r} that train has")
        extra = [c for c in files["test"] if c not in files["train"]]
        if extra:
            raise DataError(f"{root / 'test'} has class folder {extra[0]!r} that train lacks")

    _check_each_image_once(files)
    listing = [(split, c, image.name, *_size_and_mtime(image.entry))
               for split in files for c in classes for image in files[split][c]]
    digest = hashlib.sha256(repr((CACHE_FORMAT, str(root), listing)).encode()).hexdigest()[:20]
    folder_key = hashlib.sha256(str(root).encode()).hexdigest()[:8]  # the same for every listing of root
    cache_file = cache_dir / f"imagefolder-{folder_key}-{digest}.pt"
    source = f"imagefolder:{root}"
    _remove_abandoned_writes(cache_dir, folder_key)
    if cache_file.is_file():
        try:
            cached = torch.load(cache_file, weights_only=True)
            log.info("loaded decoded images from cache %s", cache_file)
            sets = {split: ImageSet(split, cached[f"{split}_images"], cached[f"{split}_labels"]) for split in splits}
            return sets, tuple(cached["classes"]), source
        except Exception as error:  # a truncated or foreign file: decode again
            log.warning("ignoring unreadable cache %s: %s", cache_file, error)

    sets = {split: _decode_split(split, files[split], classes) for split in files}
    saved = _save_atomic(
        {"classes": list(classes), **{f"{s}_{k}": getattr(sets[s], k) for s in sets for k in ("images", "labels")}},
        cache_file,
    )
    if saved:  # the folder's earlier caches (its files have changed since) would only fill the disk
        for stale in cache_dir.glob(f"imagefolder-{folder_key}-*.pt"):
            if stale != cache_file:
                with contextlib.suppress(OSError):
                    stale.unlink()
                    log.info("removed the outdated cache %s", stale)
    return sets, classes, source


# A cache write takes seconds (tens for the full dataset on a slow disk) and keeps touching its file:
# one untouched for this long was left by a process killed while writing (SIGKILL, out of memory).
ABANDONED_WRITE_SECONDS = 15 * 60


def _remove_abandoned_writes(cache_dir: Path, folder_key: str) -> None:
    for partial in cache_dir.glob(f"imagefolder-{folder_key}-*.tmp*"):
        with contextlib.suppress(OSError):
            if time.time() - partial.stat().st_mtime > ABANDONED_WRITE_SECONDS:
                partial.unlink()
                log.info("removed %s, a cache write that never finished", partial)


def _check_each_image_once(files: dict[str, dict[str, list[ImageFile]]]) -> None:
    """Refuse one image file listed twice (through a symbolic or hard link): in train/ and test/ it
    would leak the test split into training, in two classes it would have two labels, and twice in
    train/ it could be both trained and validated on."""
    owner: dict[object, tuple[str, str, str]] = {}  # file identity -> (split, class, path as listed)
    for split, classes in files.items():
        for label, images in classes.items():
            for image in images:
                info = _stat(image.entry)
                # Device and inode name the file, however it is reached (0 where the platform has none).
                identity = (info.st_dev, info.st_ino) if info.st_ino else os.path.realpath(image.entry.path)
                first_split, first_label, first_path = owner.setdefault(identity, (split, label, image.entry.path))
                if first_path == image.entry.path:
                    continue
                same = f"{image.entry.path} is the same file as {first_path}"
                if first_split != split:
                    raise DataError(f"{same}: an image in both {first_split}/ and {split}/ would leak the test "
                                    "split into training")
                if first_label != label:
                    raise DataError(f"{same}: refusing to label one image both {first_label!r} and {label!r}")
                raise DataError(f"{same}: one image twice in {split}/{label} " + (
                    "could be both trained and validated on" if split == "train" else "would count twice"))


def _stat(entry: os.DirEntry) -> os.stat_result:
    try:
        return entry.stat()  # cached by the entry: one system call however often it is asked
    except OSError as error:  # e.g. a symlink to a file that is gone
        raise DataError(f"cannot read image {entry.path}: {error.strerror or error}") from None


def _size_and_mtime(entry: os.DirEntry) -> tuple[int, int]:
    info = _stat(entry)
    return info.st_size, info.st_mtime_ns


class ImageFile(NamedTuple):
    name: str  # its path inside the class folder, "/"-separated: the file name, for an image directly in it
    entry: os.DirEntry


def _list_split(root: Path, split: str) -> dict[str, list[ImageFile]]:
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{folder} is missing: an image folder dataset needs both train/ and test/")
    # Hidden entries (.ipynb_checkpoints/, macOS ._* files, ...) are no classes and no images.
    entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    for entry in entries:
        if entry.is_symlink() and not os.path.exists(entry.path):  # a class folder on a drive not mounted?
            raise DataError(f"{entry.path} is a link to {os.readlink(entry.path)}, which does not exist")
    class_dirs = sorted((e for e in entries if e.is_dir()), key=lambda e: e.name)
    if not class_dirs:
        raise DataError(f"{folder} holds no class folders")
    split_real = os.path.realpath(folder)
    files = {}
    for class_dir in class_dirs:
        class_real = os.path.realpath(class_dir.path)
        images = sorted(_image_files(class_dir.path, "", class_dir.name, class_real, split_real, {class_real}))
        if not images:
            raise DataError(f"class folder {class_dir.path} holds no .png/.jpg images")
        files[class_dir.name] = images
    return files


def _image_files(folder: str, prefix: str, label: str, class_real: str, split_real: str,
                 seen: set[str]) -> Iterator[ImageFile]:
    """The images in ``folder`` and its subfolders (images in subfolders count, as in torchvision's
    ImageFolder), hidden entries left out; a folder reached again through a link is read once."""
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            real = os.path.realpath(entry.path)
            inside_class = real == class_real or real.startswith(class_real + os.sep)
            if not inside_class and (class_real.startswith(real + os.sep) or real.startswith(split_real + os.sep)):
                # An ancestor, or another class's folder: its images would all be labelled ``label``.
                raise DataError(f"{entry.path} links to {real}, which holds other classes' images: refusing "
                                f"to label them {label!r}")
            if real not in seen:
                seen.add(real)
                yield from _image_files(entry.path, f"{prefix}{entry.name}/", label, class_real, split_real, seen)
        elif entry.name.lower().endswith(IMAGE_SUFFIXES):
            # A FIFO (or a link to one) would block its reader for good, past Ctrl-C: the decoding threads
            # wait on it. (A broken link is named when it fails to decode.)
            if not (entry.is_file() or entry.is_symlink() and not os.path.exists(entry.path)):
                raise DataError(f"{entry.path} is not a regular file (a FIFO, socket or device), so no image")
            yield ImageFile(prefix + entry.name, entry)


def _decode_split(split: str, files: dict[str, list[ImageFile]], classes: tuple[str, ...]) -> ImageSet:
    paths = [image.entry.path for c in classes for image in files[c]]
    labels = torch.tensor([i for i, c in enumerate(classes) for _ in files[c]], dtype=torch.int64)
    images = np.empty((len(paths), 32, 32, 3), dtype=np.uint8)

    def decode(index: int) -> None:
        images[index] = _decode_image(paths[index])

    # PIL releases the GIL while decoding, so threads overlap the JPEG work.
    pool = ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2))
    try:
        list(pool.map(decode, range(len(paths))))
    finally:  # a bad image or Ctrl-C: the images still queued are not decoded first
        pool.shutdown(wait=True, cancel_futures=True)
    log.info("decoded %d %s images", len(paths), split)
    return ImageSet(split, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels)


def _decode_image(path: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            if image.size != (32, 32) or image.mode != "RGB":
                raise DataError(
                    f"{path} is a {image.size[0]}x{image.size[1]} {image.mode} image; expected 32x32 RGB"
                )
            return np.asarray(image)
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"cannot decode image {path}: {error}") from None


def _cache_dir(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cifar-exp"


def _save_atomic(obj: dict, path: Path) -> bool:
    """Write ``obj`` to ``path`` through a temporary file; False where it cannot be written."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        os.replace(tmp, path)
        return True
    except BaseException as error:
        with contextlib.suppress(OSError):  # also on Ctrl-C: a half-written file is no cache
            tmp.unlink(missing_ok=True)
        if not isinstance(error, (OSError, RuntimeError)):
            raise
        # Read-only or full: a cache only costs speed (torch.save reports a failed write as RuntimeError).
        log.warning("cannot write cache %s: %s", path, first_line(error))
        return False


# --------------------------------------------------------------------------------------------------
# Batches on the training device


class DeviceBatches:
    """Serves an ``ImageSet`` in batches from tensors that live on ``device``.

    The uint8 images are copied to the device once; each epoch a seeded permutation picks the order,
    and augmentation runs on whole batches there (no per-sample PIL transforms, no DataLoader).
    Batches are float images in [0, 1]: normalisation is part of the model (``models.Classifier``).
    """

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        *,
        device: torch.device,
        shuffle: bool = False,
        augment: str = "none",
        cutout: int = 0,
        cutout_fill: float | None = None,
        seed: int = 0,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        pin = device.type == "cuda"
        images, labels = data.images, data.labels
        if pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        self.images = images.to(device, non_blocking=True)  # (N, 3, 32, 32) uint8
        self.labels = labels.to(device, non_blocking=True)  # (N,) int64
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.augment = augment
        if cutout and cutout_fill is None:
            raise ValueError("cutout needs cutout_fill: the normalisation mean, in [0, 1] pixels")
        self.cutout = cutout
        self.cutout_fill = cutout_fill  # which the model's normalisation turns into 0
        self.channels_last = channels_last
        self.dtype = dtype
        self.order_generator = torch.Generator().manual_seed(seed)
        self.augment_generator = torch.Generator(device=device).manual_seed(seed + 1)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=self.order_generator).to(self.device, non_blocking=True)
        for start in range(0, n, self.batch_size):
            if self.shuffle:
                index = order[start : start + self.batch_size]
                images, labels = self.images[index], self.labels[index]
            else:
                images = self.images[start : start + self.batch_size]
                labels = self.labels[start : start + self.batch_size]
            images = images.to(self.dtype).div_(255)  # (B, 3, 32, 32) in [0, 1]
            if self.augment != "none":
                images = augment_batch(images, self.augment, self.augment_generator)
            if self.cutout:
                images = cutout(images, self.cutout, self.augment_generator, fill=self.cutout_fill)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels


def augment_batch(images: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip (``flip``) and 32x32 crop of the 4-pixel reflect-padded image (``flip-crop``)."""
    batch = images.shape[0]
    flip = torch.rand(batch, device=images.device, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if kind == "flip-crop":
        images = random_crop(images, 4, generator)
    return images


def random_crop(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Each image becomes a random HxW window of itself reflect-padded by ``pad`` pixels."""
    batch, channels, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")  # (B, C, H + 2p, W + 2p)
    shifts = torch.randint(0, 2 * pad + 1, (2, batch), device=images.device, generator=generator)
    rows = shifts[0, :, None] + torch.arange(height, device=images.device)  # (B, H)
    cols = shifts[1, :, None] + torch.arange(width, device=images.device)  # (B, W)
    return padded[
        torch.arange(batch, device=images.device)[:, None, None, None],
        torch.arange(channels, device=images.device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def cutout(images: torch.Tensor, size: int, generator: torch.Generator, fill: float) -> torch.Tensor:
    """Each image gets a ``size`` x ``size`` square (clipped at the borders) set to ``fill``."""
    batch, _, height, width = images.shape
    device = images.device
    centres = torch.stack([
        torch.randint(0, height, (batch,), device=device, generator=generator),
        torch.randint(0, width, (batch,), device=device, generator=generator),
    ])
    starts = centres - size // 2  # (2, B)
    rows = torch.arange(height, device=device) - starts[0, :, None]  # (B, H)
    cols = torch.arange(width, device=device) - starts[1, :, None]  # (B, W)
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    return images.masked_fill(inside[:, None], fill)  # (B, C, H, W)
