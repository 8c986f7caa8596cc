"""Data sets for the command line and the examples, all local (nothing is downloaded).

- ``"digits"`` (default): scikit-learn's bundled handwritten digits (1797 grey 8x8 images, 10 classes),
  upscaled bilinearly to ``image_size``, replicated to 3 channels and normalised. Small enough that a
  DSConv CNN trains on a laptop CPU in seconds, yet a real classification task.
- a folder in torchvision's CIFAR-10 format (``PATH/cifar-10-batches-py``).
- an ImageFolder tree: ``PATH/train/<class>/*`` and ``PATH/val/<class>/*`` (ImageNet layout; ``test``
  is accepted for ``val``), or a single ``PATH/<class>/*`` tree that is split here.

Every split is deterministic for a given ``seed``. Images of a folder are checked before use (the ones a
run will read, after ``limit``): unreadable files are left out and listed by :func:`skipped_images`, so
one corrupt file does not stop a run in the middle of training.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

DIGITS = "digits"
TEST_FRACTION = 0.2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_DIR = "cifar-10-batches-py"


def _check_positive(value: object, name: str, none_ok: bool = False) -> None:
    if none_ok and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int{' or None' if none_ok else ''}, got {value!r}")


def _split_indices(labels: Sequence[int], seed: int) -> tuple[list[int], list[int]]:
    """Stratified, seeded train/test split: every class keeps its share in both parts."""
    gen = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    train, test = [], []
    for y in sorted(by_class):
        idx = by_class[y]
        perm = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
        n_test = max(1, round(len(idx) * TEST_FRACTION)) if len(idx) > 1 else 0
        test.extend(perm[:n_test])
        train.extend(perm[n_test:])
    return sorted(train), sorted(test)


def _take(indices: list[int], limit: int | None, seed: int) -> list[int]:
    """At most ``limit`` of ``indices``, a seeded random choice (keeps classes mixed, unlike a prefix)."""
    if limit is None or len(indices) <= limit:
        return indices
    gen = torch.Generator().manual_seed(seed + 1)
    return sorted(indices[j] for j in torch.randperm(len(indices), generator=gen)[:limit].tolist())


def digits_tensors(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(images [N, 3, S, S] float32 in [0, 1], labels [N] int64)``."""
    from sklearn.datasets import load_digits  # ships inside scikit-learn: no download

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous(), torch.as_tensor(d.target, dtype=torch.int64)


def digits_datasets(image_size: int = 32, limit: int | None = None,
                    seed: int = 0) -> tuple[Dataset, Dataset, int]:
    """The embedded digits as ``(train, test, num_classes)`` tensor data sets, normalised with the
    training split's mean and standard deviation."""
    x, y = digits_tensors(image_size)
    train_idx, test_idx = _split_indices(y.tolist(), seed)
    train_idx, test_idx = _take(train_idx, limit, seed), _take(test_idx, limit, seed)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx]), 10


def _transform(image_size: int, mean: Sequence[float], std: Sequence[float]):
    from torchvision import transforms

    return transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


def _cifar_root(path: str) -> str | None:
    if os.path.isdir(os.path.join(path, CIFAR_DIR)):
        return path
    if os.path.basename(os.path.normpath(path)) == CIFAR_DIR:
        return os.path.dirname(os.path.normpath(path)) or "."
    return None


def _cifar_datasets(root: str, image_size: int) -> tuple[Dataset, Dataset, int]:
    from torchvision.datasets import CIFAR10

    tf = _transform(image_size, CIFAR_MEAN, CIFAR_STD)
    train = CIFAR10(root, train=True, download=False, transform=tf)
    test = CIFAR10(root, train=False, download=False, transform=tf)
    return train, test, len(train.classes)


def _folder_datasets(path: str, image_size: int, seed: int) -> tuple[Dataset, Dataset, int]:
    from torchvision.datasets import ImageFolder

    tf = _transform(image_size, IMAGENET_MEAN, IMAGENET_STD)
    train_dir = os.path.join(path, "train")
    val_dir = next((os.path.join(path, d) for d in ("val", "test") if os.path.isdir(os.path.join(path, d))), None)
    if os.path.isdir(train_dir) and val_dir is not None:
        train, test = ImageFolder(train_dir, transform=tf), ImageFolder(val_dir, transform=tf)
        if train.classes != test.classes:
            raise ValueError(f"data folder {path!r}: train/ and {os.path.basename(val_dir)}/ have different "
                             "class folders")
        return train, test, len(train.classes)
    full = ImageFolder(path, transform=tf)
    train_idx, test_idx = _split_indices(full.targets, seed)
    return Subset(full, train_idx), Subset(full, test_idx), len(full.classes)


def _image_source(ds: Dataset, i: int) -> tuple[Dataset, int]:
    """The ImageFolder-like data set (one with ``samples``) and index behind item ``i`` of ``ds``."""
    while isinstance(ds, Subset):
        ds, i = ds.dataset, ds.indices[i]
    return ds, i


def _readable(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # header and structure (PNG chunk checksums) without decoding every pixel
        return True
    except Exception:  # noqa: BLE001 - PIL raises many kinds for broken files
        return False


def _drop_unreadable(ds: Dataset, what: str) -> Dataset:
    """``ds`` without the items whose image file PIL cannot read; the skipped paths are recorded on the
    returned data set (see :func:`skipped_images`)."""
    base, _ = _image_source(ds, 0) if len(ds) else (ds, 0)
    if not hasattr(base, "samples"):
        return ds
    from tqdm.auto import tqdm

    keep, bad = [], []
    # disable=None: no bar unless stderr is a terminal (in a log, its \r updates pile up into one line)
    for i in tqdm(range(len(ds)), desc=f"checking {what} images", leave=False,
                  disable=True if len(ds) < 2000 else None):
        src, j = _image_source(ds, i)
        path = src.samples[j][0]
        if _readable(path):
            keep.append(i)
        else:
            bad.append(path)
    out = Subset(ds, keep) if bad else ds
    out.skipped_unreadable = bad  # type: ignore[attr-defined]
    return out


def skipped_images(data: Dataset | DataLoader) -> list[str]:
    """Paths of the unreadable image files left out of a data set (or a loader's data set)."""
    ds = data.dataset if isinstance(data, DataLoader) else data
    return list(getattr(ds, "skipped_unreadable", []))


def make_datasets(data: str = DIGITS, image_size: int = 32, limit: int | None = None,
                  seed: int = 0) -> tuple[Dataset, Dataset, int]:
    """``(train, test, num_classes)`` for ``data`` (``"digits"`` or a folder, see the module doc).

    Args:
        data: ``"digits"`` or a path to a CIFAR-10 or ImageFolder directory.
        image_size: side of the square images fed to the model.
        limit: use at most this many images of each split (quick runs); ``None`` = all.
        seed: seed of the split and of the ``limit`` subset.

    Raises:
        ValueError: bad argument, or a folder that is missing or unreadable (the message names the path).
    """
    _check_positive(image_size, "image_size")
    _check_positive(limit, "limit", none_ok=True)
    if data == DIGITS:
        return digits_datasets(image_size, limit, seed)
    path = os.fspath(data)
    if not os.path.isdir(path):
        raise ValueError(f"data folder {path!r} does not exist (use 'digits' for the built-in data set)")
    try:
        root = _cifar_root(path)
        train, test, n = _cifar_datasets(root, image_size) if root is not None else \
            _folder_datasets(path, image_size, seed)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - torchvision raises FileNotFoundError/RuntimeError/OSError alike
        raise ValueError(f"cannot read data folder {path!r}: {e}") from e
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"data folder {path!r} has no images in its train or test split")
    if n < 2:
        raise ValueError(f"data folder {path!r} has {n} class; a classifier needs at least 2")
    if limit is not None:
        train = Subset(train, _take(list(range(len(train))), limit, seed))
        test = Subset(test, _take(list(range(len(test))), limit, seed))
    train, test = _drop_unreadable(train, "training"), _drop_unreadable(test, "test")
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"data folder {path!r}: no readable image in its train or test split "
                         f"(e.g. {(skipped_images(train) + skipped_images(test))[0]!r})")
    return train, test, n


def make_loaders(data: str = DIGITS, image_size: int = 32, batch_size: int = 64, limit: int | None = None,
                 seed: int = 0, num_workers: int = 0) -> tuple[DataLoader, DataLoader, int]:
    """``(train_loader, test_loader, num_classes)``; the training loader reshuffles every epoch from a
    seeded generator, so runs are repeatable. Arguments as :func:`make_datasets`.

    Raises:
        ValueError: see :func:`make_datasets`.
    """
    _check_positive(batch_size, "batch_size")
    train, test, n = make_datasets(data, image_size, limit, seed)
    gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen, num_workers=num_workers)
    test_loader = DataLoader(test, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return train_loader, test_loader, n
