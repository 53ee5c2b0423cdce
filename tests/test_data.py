import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_exp import data as data_module
from cifar_exp.config import DataConfig
from cifar_exp.data import (
    DeviceBatches,
    ImageSet,
    augment_batch,
    is_held_out_test_folder,
    load_splits,
    random_crop,
    stratified_split,
    stratified_split_indices,
)
from cifar_exp.errors import ConfigError, DataError
from conftest import CLASSES, TEST_PER_CLASS, TRAIN_PER_CLASS, write_image_folder

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg-dev"


def test_image_folder_loads_as_uint8_tensors(tiny_data, cache_dir):
    splits = load_splits(DataConfig(data_dir=str(tiny_data), val_size=50, cache_dir=cache_dir))
    assert splits.classes == CLASSES
    assert splits.train.images.dtype == torch.uint8
    assert splits.train.images.shape == (10 * TRAIN_PER_CLASS - 50, 3, 32, 32)
    assert len(splits.val) == 50 and len(splits.test) == 10 * TEST_PER_CLASS
    # Labels follow folder order, and the pixels decode to the right image.
    expected = np.asarray(Image.open(tiny_data / "test" / "bird" / "0000.png")).transpose(2, 0, 1)
    first_bird = int(np.flatnonzero(splits.test.labels.numpy() == 2)[0])
    np.testing.assert_array_equal(splits.test.images[first_bird].numpy(), expected)


def test_second_load_comes_from_the_cache(tiny_data, cache_dir, monkeypatch):
    cfg = DataConfig(data_dir=str(tiny_data), val_size=50, cache_dir=cache_dir)
    first = load_splits(cfg)
    assert len(list(Path(cache_dir).glob("*.pt"))) == 1

    def no_decoding(*args):
        raise AssertionError("decoded the images again instead of loading the cache")

    monkeypatch.setattr(data_module, "_decode_split", no_decoding)
    second = load_splits(cfg)
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)


@pytest.mark.parametrize("change", ["mtime", "size"])
def test_the_cache_key_follows_each_files_size_and_modification_time(tmp_path, cache_dir, change, monkeypatch):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    cfg = DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir)
    load_splits(cfg)
    target = root / "test" / "cat" / "0000.png"
    stat = target.stat()
    if change == "mtime":  # the same bytes, touched
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    else:  # one byte more (PNG readers ignore trailing bytes), the same modification time
        with open(target, "ab") as file:
            file.write(b"\0")
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    decoded = []
    decode = data_module._decode_split
    monkeypatch.setattr(data_module, "_decode_split", lambda *a: decoded.append(a[0]) or decode(*a))
    load_splits(cfg)
    assert decoded == ["train", "test"]


def test_an_unreadable_cache_is_decoded_again_and_other_folders_caches_stay(tmp_path, cache_dir):
    first = write_image_folder(tmp_path / "a", train_per_class=2, test_per_class=1)
    second = write_image_folder(tmp_path / "b", train_per_class=2, test_per_class=1, seed=1)
    load_splits(DataConfig(data_dir=str(first), val_on_test=True, cache_dir=cache_dir))
    images = load_splits(DataConfig(data_dir=str(second), val_on_test=True, cache_dir=cache_dir)).test.images
    caches = sorted(Path(cache_dir).glob("*.pt"))
    assert len(caches) == 2  # one per folder: a folder's new cache removes only its own old ones
    for cache in caches:
        cache.write_bytes(cache.read_bytes()[:100])  # truncated
    again = load_splits(DataConfig(data_dir=str(second), val_on_test=True, cache_dir=cache_dir)).test.images
    assert torch.equal(again, images)


def test_cache_is_invalidated_when_a_file_changes(tmp_path, cache_dir):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    cfg = DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir)
    before = load_splits(cfg).test.images.clone()
    target = root / "test" / "cat" / "0000.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(target)
    after = load_splits(cfg).test.images
    assert not torch.equal(before, after)
    assert int(after[3].sum()) == 0  # cat is class 3, one test image per class
    assert len(list(Path(cache_dir).glob("*.pt"))) == 1  # the outdated cache is gone


def test_the_cache_is_written_beside_its_name_and_then_renamed(tmp_path, monkeypatch):
    # Another process loading the folder meanwhile never reads a half-written cache.
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    cache = tmp_path / "cache"
    written = []
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, path: written.append(Path(path)) or save(obj, path))
    load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=str(cache)))
    [final] = list(cache.iterdir())
    assert final.suffix == ".pt" and written == [final.with_suffix(f".tmp{os.getpid()}")]


def test_an_interrupted_cache_write_leaves_no_file(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    cache = tmp_path / "cache"

    def interrupted(obj, path):  # Ctrl-C (or SIGTERM, as the CLI raises it) while the cache is written
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=str(cache)))
    assert list(cache.iterdir()) == []


def test_a_cache_write_killed_long_ago_is_cleaned_up_and_one_in_progress_is_not(tmp_path):
    # SIGKILL (or the OOM killer) while writing leaves the temporary file: no handler runs. The rerun
    # that follows writes the cache, and every later one only loads it: loading cleans up too.
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    cfg = DataConfig(data_dir=str(root), val_on_test=True, cache_dir=str(tmp_path / "cache"))
    load_splits(cfg)
    [cache] = list((tmp_path / "cache").iterdir())
    abandoned, in_progress = cache.with_suffix(".tmp4242"), cache.with_suffix(".tmp4343")
    abandoned.write_bytes(b"partial")
    long_ago = time.time() - data_module.ABANDONED_WRITE_SECONDS - 60
    os.utime(abandoned, (long_ago, long_ago))
    in_progress.write_bytes(b"being written by another process")
    load_splits(cfg)  # from the cache, which it finds beside them
    assert sorted((tmp_path / "cache").iterdir()) == [cache, in_progress]


def test_an_unwritable_cache_only_costs_speed(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    cache = tmp_path / "cache"

    def disk_full(obj, path):  # what torch.save raises when a write fails part-way
        Path(path).write_bytes(b"partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", disk_full)
    splits = load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=str(cache)))
    assert len(splits.train) == 20
    assert list(cache.iterdir()) == []  # no half-written file left behind


def test_hidden_files_and_folders_are_skipped(tmp_path, cache_dir):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    (root / "train" / "cat" / "._0000.png").write_bytes(b"macOS resource fork")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (32, 32)).save(root / "train" / ".ipynb_checkpoints" / "0000.png")
    splits = load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir))
    assert splits.classes == CLASSES and len(splits.train) == 20


def test_images_in_a_class_folders_subfolders_are_read_as_imagefolder_reads_them(tmp_path, cache_dir):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    (root / "train" / "cat" / "batch2" / "deeper").mkdir(parents=True)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(root / "train" / "cat" / "batch2" / "deeper" / "red.png")
    (root / "train" / "cat" / ".ipynb_checkpoints").mkdir()  # hidden: no images of the class
    Image.new("RGB", (32, 32)).save(root / "train" / "cat" / ".ipynb_checkpoints" / "0000.png")
    (root / "train" / "cat" / "loop").symlink_to(root / "train" / "cat")  # read once, not forever
    (root / "train" / "cat" / "twice").symlink_to(root / "train" / "cat" / "batch2")  # read once too
    (tmp_path / "more").mkdir()
    Image.new("RGB", (32, 32), (0, 0, 255)).save(tmp_path / "more" / "blue.png")
    (root / "train" / "cat" / "elsewhere").symlink_to(tmp_path / "more")  # outside the dataset: its images count
    splits = load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir))
    cat = CLASSES.index("cat")
    assert len(splits.train) == 22 and torch.bincount(splits.train.labels)[cat] == 4
    for colour in ((255, 0, 0), (0, 0, 255)):
        exact = (splits.train.images == torch.tensor(colour, dtype=torch.uint8)[:, None, None]).all((1, 2, 3))
        assert splits.train.labels[exact].tolist() == [cat]
    # A link to an ancestor or to another class's folder would label other classes' images "cat".
    for target in (root / "train", root / "train" / "dog"):
        link = root / "train" / "cat" / "up"
        link.symlink_to(target)
        with pytest.raises(DataError, match=f"^{link} links to {target}, which holds other classes' images: "
                                            "refusing to label them 'cat'$"):
            load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir))
        link.unlink()


@pytest.mark.parametrize(("make_link", "message"), [
    # A link into the test split: its images would be trained on (under "cat", too).
    (lambda root: (root / "train" / "cat" / "more").symlink_to(root / "test" / "dog"),
     "{root}/test/dog/0000.png is the same file as {root}/train/cat/more/0000.png: an image in both train/ and "
     "test/"),
    (lambda root: (root / "train" / "cat" / "more").symlink_to(root / "test" / "cat"),
     "{root}/test/cat/0000.png is the same file as {root}/train/cat/more/0000.png: an image in both train/ and "
     "test/ would leak the test split into training"),
    (lambda root: (root / "train" / "cat" / "copy.png").symlink_to(root / "test" / "cat" / "0001.jpg"),
     "{root}/test/cat/0001.jpg is the same file as {root}/train/cat/copy.png: an image in both train/ and test/"),
    # A class folder that is another class's: every image labelled twice.
    (lambda root: (shutil.rmtree(root / "train" / "dog"), (root / "train" / "dog").symlink_to(root / "train" / "cat")),
     "{root}/train/dog/0000.png is the same file as {root}/train/cat/0000.png: refusing to label one image both "
     "'cat' and 'dog'"),
    # A hard link is the same file too.
    (lambda root: os.link(root / "test" / "cat" / "0001.jpg", root / "train" / "cat" / "from-test.jpg"),
     "{root}/test/cat/0001.jpg is the same file as {root}/train/cat/from-test.jpg: an image in both train/ and "
     "test/"),
    # Twice in one class: carved into training and validation, it would be validated on what it trained on.
    (lambda root: (root / "train" / "cat" / "again.png").symlink_to(root / "train" / "cat" / "0000.png"),
     "{root}/train/cat/again.png is the same file as {root}/train/cat/0000.png: one image twice in train/cat "
     "could be both trained and validated on"),
    # A test class folder that is a training one.
    (lambda root: (shutil.rmtree(root / "test" / "cat"), (root / "test" / "cat").symlink_to(root / "train" / "cat")),
     "{root}/test/cat/0000.png is the same file as {root}/train/cat/0000.png: an image in both train/ and test/"),
])
def test_one_image_reached_from_two_places_is_refused(tmp_path, cache_dir, make_link, message):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=2)
    make_link(root)
    with pytest.raises(DataError, match="^" + re.escape(message.format(root=root))):
        load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir))
    assert not any(Path(cache_dir).glob("*"))  # refused before anything was decoded or cached


def test_a_flat_folders_cache_key_is_what_it_was_before_subfolders_counted(tmp_path, cache_dir):
    # Keyed by (split, class, file name, size, mtime) as before: the caches already written stay valid.
    import hashlib

    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1).resolve()
    listing = [(split, c, entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
               for split in ("train", "test") for c in CLASSES
               for entry in sorted(os.scandir(root / split / c), key=lambda e: e.name)]
    digest = hashlib.sha256(repr((data_module.CACHE_FORMAT, str(root), listing)).encode()).hexdigest()[:20]
    folder_key = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir))
    assert [p.name for p in Path(cache_dir).iterdir()] == [f"imagefolder-{folder_key}-{digest}.pt"]


def test_a_dataset_of_one_class_is_refused(tmp_path, cache_dir):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    for split in ("train", "test"):
        for folder in (root / split).iterdir():
            if folder.name != "cat":
                shutil.rmtree(folder)
    with pytest.raises(DataError, match=f"^{root / 'train'} holds one class folder, 'cat': a classifier needs at "
                                        "least 2$"):
        load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir))


def test_a_broken_symlink_is_named(tmp_path, cache_dir):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    link = root / "train" / "dog" / "0009.png"
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(DataError, match=f"cannot read image {link}"):
        load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir))


def test_stratified_split_keeps_class_proportions_and_is_seeded():
    labels = torch.arange(10).repeat_interleave(100)  # 1000 images, 100 per class
    index = torch.arange(1000)
    # Each image carries its index (high byte in channel 0, low byte in channel 1), to follow it.
    images = torch.stack([index // 256, index % 256, index * 0], 1).view(-1, 3, 1, 1).expand(-1, 3, 32, 32)
    data = ImageSet("train", images.to(torch.uint8), labels)
    train, val = stratified_split(data, 200, seed=1)
    assert len(train) == 800 and len(val) == 200
    assert torch.bincount(val.labels).tolist() == [20] * 10

    def indices(part):
        return (part.images[:, 0, 0, 0].long() * 256 + part.images[:, 1, 0, 0].long()).tolist()

    # Every image lands in exactly one part, with its own label.
    assert sorted(indices(train) + indices(val)) == list(range(1000))
    for part in (train, val):
        assert [i // 100 for i in indices(part)] == part.labels.tolist()
    again_train, again_val = stratified_split(data, 200, seed=1)
    assert torch.equal(val.labels, again_val.labels) and torch.equal(val.images, again_val.images)
    _, other_val = stratified_split(data, 200, seed=2)
    assert not torch.equal(val.images, other_val.images)


def test_a_split_that_would_leave_a_class_out_of_either_side_is_refused_by_name():
    labels = torch.tensor([0] * 2 + [1] * 19 + [2] * 19)  # a rare class: 2 of 40 images
    names = ("cat", "dog", "frog")
    # Proportional rounding hands both cats to validation (36 images), or both to training (3).
    with pytest.raises(ConfigError, match=r"^val-size 36 leaves class 'cat' \(2 images\) no training image: "):
        stratified_split_indices(labels, 36, 0, names)
    with pytest.raises(ConfigError, match=r"^val-size 3 leaves class 'cat' \(2 images\) no validation image: "):
        stratified_split_indices(labels, 3, 0, names)
    train, val = stratified_split_indices(labels, 20, 0, names)
    assert set(labels[train].tolist()) == set(labels[val].tolist()) == {0, 1, 2}
    with pytest.raises(ConfigError, match="^class 'frog' has a single training image: a stratified split needs at "
                                          "least 2 of each, one to train on and one to validate$"):
        stratified_split_indices(torch.tensor([0] * 5 + [1] * 5 + [2]), 4, 0, names)


def test_val_on_test_uses_the_test_split(tiny_data, cache_dir):
    splits = load_splits(DataConfig(data_dir=str(tiny_data), val_on_test=True, cache_dir=cache_dir))
    assert splits.val_is_test and splits.val is splits.test
    assert len(splits.train) == 10 * TRAIN_PER_CLASS


# -- bad input -------------------------------------------------------------------------------------

def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match=f"data dir {tmp_path / 'nope'} does not exist"):
        load_splits(DataConfig(data_dir=str(tmp_path / "nope")))


def test_empty_data_dir(tmp_path):
    with pytest.raises(DataError, match=f"no CIFAR-10 dataset in {tmp_path}"):
        load_splits(DataConfig(data_dir=str(tmp_path)))


def test_test_split_missing_a_class(tmp_path, cache_dir):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    shutil.rmtree(root / "test" / "frog")
    with pytest.raises(DataError, match="has no folder for class 'frog' that train has"):
        load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir))


def test_data_dir_that_cannot_be_looked_into(tmp_path):
    too_long = tmp_path / ("a" * 300)  # (as root no permission is ever missing; a name too long fails alike)
    for load in (lambda: load_splits(DataConfig(data_dir=str(too_long))),
                 lambda: is_held_out_test_folder(str(too_long))):
        with pytest.raises(DataError, match=f"^cannot read data dir {too_long}: File name too long$"):
            load()


def test_a_class_folder_linked_to_nothing_is_named_not_dropped(tmp_path, cache_dir):
    # e.g. a link to a drive not mounted: silently, the model would train on nine classes.
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    for split in ("train", "test"):
        shutil.rmtree(root / split / "cat")
        (root / split / "cat").symlink_to(tmp_path / "unmounted" / split / "cat")
    with pytest.raises(DataError, match=f"^{root / 'train' / 'cat'} is a link to {tmp_path / 'unmounted'}/train/cat, "
                                        "which does not exist$"):
        load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir))


def test_an_image_name_on_a_fifo_is_refused_not_waited_on(tmp_path, cache_dir):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    os.mkfifo(tmp_path / "fifo")  # opening it would block until someone writes to it
    for name in ("fifo.png", "link-to-a-fifo.png"):
        image = root / "train" / "cat" / name
        if name == "fifo.png":
            os.mkfifo(image)
        else:
            image.symlink_to(tmp_path / "fifo")
        with pytest.raises(DataError, match=f"^{image} is not a regular file"):
            load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir))
        image.unlink()


def test_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(DataError, match=f"data dir {tmp_path / 'data'} is not a folder"):
        load_splits(DataConfig(data_dir=str(tmp_path / "data")))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda root: shutil.rmtree(root / "train"), "train is missing: an image folder dataset needs both"),
    (lambda root: (root / "test" / "unicorn").mkdir() or shutil.copy(root / "test" / "cat" / "0000.png",
                                                                     root / "test" / "unicorn"),
     "has class folder 'unicorn' that train lacks"),
    (lambda root: [f.unlink() for f in (root / "train" / "dog").iterdir()], "class folder .*dog holds no"),
    (lambda root: [shutil.rmtree(c) for c in (root / "test").iterdir()], "test holds no class folders"),
])
def test_a_malformed_image_folder_is_named(tmp_path, cache_dir, damage, message):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    damage(root)
    with pytest.raises(DataError, match=message):
        load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir))


def test_wrong_size_image_is_named(tmp_path, cache_dir):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    bad = root / "train" / "dog" / "0001.jpg"
    Image.new("RGB", (28, 28)).save(bad)
    with pytest.raises(DataError, match=f"{bad} is a 28x28 RGB image; expected 32x32 RGB"):
        load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir))


def test_grayscale_image_is_named(tmp_path, cache_dir):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    bad = root / "test" / "ship" / "0000.png"
    Image.new("L", (32, 32)).save(bad)
    with pytest.raises(DataError, match=f"{bad} is a 32x32 L image"):
        load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir))


def test_undecodable_image_is_named(tmp_path, cache_dir):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    bad = root / "train" / "horse" / "0000.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir))


def test_val_size_not_smaller_than_train(tiny_data, cache_dir):
    with pytest.raises(ConfigError, match="val-size 400 must be smaller than the 400 training images"):
        load_splits(DataConfig(data_dir=str(tiny_data), val_size=400, cache_dir=cache_dir))


def test_val_size_below_the_class_count_is_refused_in_the_projects_words(tiny_data, cache_dir):
    with pytest.raises(ConfigError, match=r"^val-size 5 must be at least the number of classes \(10\): a stratified "
                                          r"split holds an image of each$"):
        load_splits(DataConfig(data_dir=str(tiny_data), val_size=5, cache_dir=cache_dir))


# -- batches on the device ------------------------------------------------------------------------

def _indexed_set(n: int) -> ImageSet:
    """Image i is filled with the value i (mod 256), and its label is i mod 10."""
    values = torch.arange(n)
    images = (values % 256).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 32, 32).contiguous()
    return ImageSet("train", images, values % 10)


@pytest.mark.parametrize("augment", ["none", "flip-crop"])
def test_every_image_once_per_epoch_with_labels_aligned(augment):
    data = _indexed_set(250)
    batches = DeviceBatches(data, 64, device=torch.device("cpu"), shuffle=True, seed=3, augment=augment)
    assert len(batches) == 4
    orders = []
    for _ in range(2):
        seen = []
        for images, labels in batches:
            # A flat image stays flat under flips and reflect-padded crops: it still names its index.
            assert torch.equal(images, images[:, :1, :1, :1].expand_as(images))
            ids = (images[:, 0, 0, 0] * 255).round().long()
            assert torch.equal(ids % 10, labels)
            seen.append(ids)
        order = torch.cat(seen)
        assert sorted(order.tolist()) == list(range(250))
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])  # reshuffled every epoch


@pytest.mark.parametrize("augment", ["none", "flip-crop"])
def test_batches_follow_their_seed(augment):
    data = ImageSet("train", (torch.rand(64, 3, 32, 32) * 255).to(torch.uint8), torch.arange(64) % 10)

    def first_epoch(seed):
        batches = DeviceBatches(data, 16, device=torch.device("cpu"), shuffle=True, seed=seed, augment=augment)
        return torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches])

    (images, labels), (again, again_labels), (other, other_labels) = first_epoch(3), first_epoch(3), first_epoch(4)
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    assert not torch.equal(labels, other_labels) and not torch.equal(images, other)  # another order


def test_batches_are_floats_in_unit_range_and_channels_last():
    data = ImageSet("x", torch.full((8, 3, 32, 32), 255, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64))
    images, _ = next(iter(DeviceBatches(data, 8, device=torch.device("cpu"), channels_last=True)))
    assert images.dtype == torch.float32 and float(images.max()) == 1.0
    assert images.is_contiguous(memory_format=torch.channels_last)


def test_flip_flips_some_images_and_keeps_the_rest():
    images = torch.rand(200, 3, 32, 32)
    out = augment_batch(images, "flip", torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert bool((flipped | kept).all())
    assert 60 < int(flipped.sum()) < 140


def test_crop_is_a_window_of_the_reflect_padded_image():
    images = torch.rand(200, 3, 32, 32)
    out = random_crop(images, 4, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4), mode="reflect")
    shifts = set()
    for k in range(len(images)):
        matches = [(dy, dx) for dy in range(9) for dx in range(9)
                   if torch.equal(out[k], padded[k, :, dy:dy + 32, dx:dx + 32])]
        assert matches, f"image {k} is not a window of its padded self"
        shifts.add(matches[0])
    # Every shift from -4 to +4 pixels occurs, in both directions, each drawn on its own.
    assert {dy for dy, _ in shifts} == set(range(9)) and {dx for _, dx in shifts} == set(range(9))
    assert len(shifts) > 40 and any(dy != dx for dy, dx in shifts)


def test_flip_crop_batches_are_mirrored_or_not_windows_of_the_padded_images():
    # What training with --augment flip-crop gets: DeviceBatches -> augment_batch -> random_crop.
    images = (torch.rand(128, 3, 32, 32) * 255).to(torch.uint8)
    data = ImageSet("train", images, torch.arange(128))
    batches = DeviceBatches(data, 128, device=torch.device("cpu"), shuffle=False, seed=0, augment="flip-crop")
    (out, labels), = list(batches)
    original = images.float() / 255  # DeviceBatches hands out [0, 1] floats
    shifted = mirrored = 0
    for k, label in enumerate(labels.tolist()):
        windows = {}
        for name, source in (("kept", original[label]), ("mirrored", original[label].flip(-1))):
            padded = torch.nn.functional.pad(source[None], (4, 4, 4, 4), mode="reflect")[0]
            windows.update({(name, dy, dx): padded[:, dy:dy + 32, dx:dx + 32]
                            for dy in range(9) for dx in range(9)})
        match = next(key for key, window in windows.items() if torch.allclose(out[k], window))
        shifted += match[1:] != (4, 4)
        mirrored += match[0] == "mirrored"
    assert shifted > 100 and 30 < mirrored < 98  # most images moved (1 in 81 stays put); about half mirrored


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/cifar10-jpeg-dev is not here")
@pytest.mark.slow
def test_real_cifar10_dev_folder(tmp_path):
    cfg = DataConfig(data_dir=str(SHARED_DATA))
    splits = load_splits(cfg)
    assert splits.classes == CLASSES
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40_000, 5_000, 5_000)
    assert torch.bincount(splits.val.labels).tolist() == [500] * 10
    start = time.perf_counter()
    load_splits(cfg)
    assert time.perf_counter() - start < 10  # generous: the cached load takes ~1 s


def test_torchvision_python_batches_are_read(tmp_path, monkeypatch):
    """The official pickled batches (cifar-10-batches-py/) load as the same uint8 (N, 3, 32, 32) layout."""
    import pickle

    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    # The official format: rows of 3072 bytes, all red, then green, then blue planes of 32x32.
    batches = {name: rng.integers(0, 256, size=(20, 3072), dtype=np.uint8)
               for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    for name, data in batches.items():
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [i % 10 for i in range(20)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CLASSES)}, f)
    # Our batches have other md5 sums than the official files.
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda path, md5=None: True)

    splits = load_splits(DataConfig(data_dir=str(tmp_path), val_size=10))
    assert splits.classes == CLASSES and splits.source.startswith("cifar10-batches:")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)
    expected_test = torch.from_numpy(batches["test_batch"].reshape(20, 3, 32, 32))
    assert torch.equal(splits.test.images, expected_test)
    assert splits.test.labels.tolist() == [i % 10 for i in range(20)]


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda folder: (folder / "data_batch_3").unlink(), "{folder} lacks data_batch_3"),
    (lambda folder: (folder / "batches.meta").unlink(), "{folder} lacks batches.meta"),
    (lambda folder: None, "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch, "
                          "batches.meta in {folder} are not the official file (checksum mismatch)"),
])
def test_damaged_cifar_batches_are_named_with_our_download_option(tmp_path, damage, problem):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"not the official file")
    damage(folder)
    with pytest.raises(DataError) as raised:
        load_splits(DataConfig(data_dir=str(tmp_path)))
    assert str(raised.value) == (f"cannot load CIFAR-10 from {tmp_path}: {problem.format(folder=folder)}; "
                                 "pass --download to fetch CIFAR-10 again")


def test_a_failed_download_leaves_no_folder_behind(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(self, root, train=True, download=False):
        Path(root).mkdir(parents=True, exist_ok=True)  # as torchvision does before fetching
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "__init__", offline)
    typo = tmp_path / "dtaa" / "cifar"
    with pytest.raises(DataError, match=f"cannot load CIFAR-10 from {typo}: <urlopen error"):
        load_splits(DataConfig(data_dir=str(typo), download=True))
    assert list(tmp_path.iterdir()) == []  # "dtaa" was created by the download: gone again
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(DataError):
        load_splits(DataConfig(data_dir=str(kept), download=True))
    assert kept.is_dir()  # a folder that was there before stays

    def partly_downloaded(self, root, train=True, download=False):
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"partial")  # perhaps another worker's
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "__init__", partly_downloaded)
    with pytest.raises(DataError):
        load_splits(DataConfig(data_dir=str(tmp_path / "shared" / "data"), download=True))
    assert (tmp_path / "shared" / "data" / "cifar-10-python.tar.gz").is_file()  # only empty folders go


# -- from a mutation audit of the listing, split and CIFAR checks ----------------------------------

# D6: the first lacking class (in label order) is named.
def test_a_split_leaving_two_classes_out_names_the_first():
    labels = torch.tensor([0] * 2 + [1] * 2 + [2] * 40)  # val-size 40 leaves both rare classes no training image
    with pytest.raises(ConfigError, match=r"^val-size 40 leaves class 'cat' \(2 images\) no training image"):
        stratified_split_indices(labels, 40, 0, ("cat", "dog", "frog"))


# D11: one corrupted batch reads "is", not "are".
def test_a_single_corrupted_cifar_batch_is_named_in_the_singular(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"not the official file")
    monkeypatch.setattr(torchvision.datasets.utils, "check_integrity", lambda path, md5=None: path.name != "data_batch_3")
    with pytest.raises(DataError) as raised:
        load_splits(DataConfig(data_dir=str(tmp_path)))
    assert str(raised.value) == (f"cannot load CIFAR-10 from {tmp_path}: data_batch_3 in {folder} is not the official "
                                 "file (checksum mismatch); pass --download to fetch CIFAR-10 again")


# D8: with --download the download's own error is kept, not "pass --download".
def test_a_failed_download_over_damaged_batches_keeps_the_download_error(tmp_path, monkeypatch):
    import torchvision.datasets

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"not the official file")

    def offline(self, root, train=True, download=False):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "__init__", offline)
    with pytest.raises(DataError) as raised:
        load_splits(DataConfig(data_dir=str(tmp_path), download=True))
    assert "<urlopen error" in str(raised.value) and "pass --download" not in str(raised.value)


# D21: images of the same file name in two subfolders are both read.
def test_same_file_name_in_two_subfolders_counts_twice(tmp_path, cache_dir):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    for sub in ("a", "b"):
        (root / "train" / "cat" / sub).mkdir()
        Image.new("RGB", (32, 32), (255, 0, 0)).save(root / "train" / "cat" / sub / "0000.png")
    splits = load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir))
    assert torch.bincount(splits.train.labels)[CLASSES.index("cat")] == 4


# D22: upper-case suffixes (.PNG, .JPG from cameras / Windows tools) are images too.
def test_upper_case_suffixes_are_images(tmp_path, cache_dir):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    Image.new("RGB", (32, 32)).save(root / "train" / "cat" / "EXTRA.PNG", format="PNG")
    splits = load_splits(DataConfig(data_dir=str(root), val_on_test=True, cache_dir=cache_dir))
    assert len(splits.train) == 21
