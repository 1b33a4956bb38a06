"""Datasets: Fashion-MNIST from local IDX files and scikit-learn's bundled 8x8 digits.

Nothing is downloaded. Fashion-MNIST is searched, in order, in ``$SIREN_DATA_DIR``,
``/usr/share/datasets/fashion-mnist/`` (Debian package ``dataset-fashion-mnist``) and
``~/.keras/datasets/fashion-mnist/``. Images are returned as float32 in [0, 1] with a trailing
channel axis (N, H, W, 1); labels as int64.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import CorruptDatasetError, DatasetNotFoundError

logger = logging.getLogger(__name__)

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_IDX_UBYTE = 0x08
_EXPECTED_COUNTS = {"train": 60_000, "test": 10_000}

DATASET_NAMES = ("fashion-mnist", "digits")
#: Shape of one image of each dataset (known without loading it).
INPUT_SHAPES: dict[str, tuple[int, ...]] = {"fashion-mnist": (28, 28, 1), "digits": (8, 8, 1)}
#: Training images of each dataset (digits: :func:`load_digits`'s default split), known without
#: loading it.
TRAIN_SIZES: dict[str, int] = {"fashion-mnist": 60_000, "digits": 1_438}


@dataclass(frozen=True)
class Dataset:
    """A labelled image dataset split into train and test parts.

    Attributes
    ----------
    name : str
        ``"fashion-mnist"`` or ``"digits"``.
    x_train, x_test : np.ndarray
        float32 images in [0, 1], shape (N, H, W, 1).
    y_train, y_test : np.ndarray
        int64 labels in ``range(num_classes)``.
    class_names : tuple[str, ...]
        Human-readable class names.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one image, e.g. (28, 28, 1)."""
        return tuple(int(s) for s in self.x_train.shape[1:])

    def subset(self, train: int | None = None, test: int | None = None) -> Dataset:
        """Return the first ``train`` training and ``test`` test samples (for fast runs)."""
        return Dataset(
            name=self.name,
            x_train=self.x_train[:train],
            y_train=self.y_train[:train],
            x_test=self.x_test[:test],
            y_test=self.y_test[:test],
            class_names=self.class_names,
        )


def fashion_mnist_search_paths() -> list[Path]:
    """The directories searched for Fashion-MNIST, in priority order."""
    paths: list[Path] = []
    env = os.environ.get("SIREN_DATA_DIR")
    if env:
        root = Path(env).expanduser()
        paths += [root / "fashion-mnist", root]
    paths.append(Path("/usr/share/datasets/fashion-mnist"))
    paths.append(Path.home() / ".keras" / "datasets" / "fashion-mnist")
    return paths


def data_dir_problem() -> str | None:
    """Why ``$SIREN_DATA_DIR`` is set but cannot be used, or ``None`` (unset, or usable).

    It is usable when it, or its ``fashion-mnist`` subfolder, holds all four Fashion-MNIST
    files; otherwise the search goes on to the other places without it, which is worth a
    warning: the user meant it to be used.
    """
    env = os.environ.get("SIREN_DATA_DIR")
    if not env:
        return None
    root = Path(env).expanduser()
    if not root.is_dir():
        return f"SIREN_DATA_DIR={env} is not a directory; it is ignored"
    for directory in (root / "fashion-mnist", root):
        if all((directory / f).is_file() for f in FASHION_MNIST_FILES.values()):
            return None
    found = [
        f
        for f in FASHION_MNIST_FILES.values()
        if (root / f).is_file() or (root / "fashion-mnist" / f).is_file()
    ]
    missing = [f for f in FASHION_MNIST_FILES.values() if f not in found]
    held = f"holds only {', '.join(found)}" if found else "holds none of the Fashion-MNIST files"
    return (
        f"SIREN_DATA_DIR={env} {held} (missing: {', '.join(missing)}, in it or in its "
        "fashion-mnist folder); it is ignored"
    )


def describe_dataset(name: str) -> str:
    """What ``name`` (``auto`` included) will load, and from where, without loading it:
    ``"fashion-mnist from /usr/share/datasets/fashion-mnist"``, ``"digits (auto: Fashion-MNIST
    is not installed; the bundled 8x8 digits)"``."""
    if name == "digits":
        return "digits (scikit-learn's bundled 8x8 digits)"
    try:
        directory = find_fashion_mnist()
    except DatasetNotFoundError:
        if name == "auto":
            return "digits (auto: Fashion-MNIST is not installed; the bundled 8x8 digits)"
        return "fashion-mnist (not found)"
    return f"fashion-mnist{' (auto)' if name == 'auto' else ''} from {directory}"


def find_fashion_mnist(search_paths: list[Path] | None = None) -> Path:
    """Return the first searched directory holding all four Fashion-MNIST files.

    ``search_paths`` defaults to :func:`fashion_mnist_search_paths`.

    Raises
    ------
    DatasetNotFoundError
        Naming every searched place and how to install the data.
    """
    searched = fashion_mnist_search_paths() if search_paths is None else search_paths
    for directory in searched:
        if all((directory / f).is_file() for f in FASHION_MNIST_FILES.values()):
            return directory
    places = "\n  ".join(str(p) for p in searched)
    raise DatasetNotFoundError(
        "Fashion-MNIST not found. Looked for "
        + ", ".join(FASHION_MNIST_FILES.values())
        + f" in:\n  {places}\n"
        "Install it with `sudo apt-get install dataset-fashion-mnist`, or put the four IDX .gz "
        "files in a directory and set SIREN_DATA_DIR to it. (Use --dataset digits for the small "
        "dataset that is always available.)"
    )


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read one gzip-compressed IDX file of unsigned bytes and validate its header.

    The IDX format: two zero bytes, a type byte (0x08 = unsigned byte), a byte with the number of
    dimensions, then one big-endian uint32 per dimension, then the data in C order.

    Raises
    ------
    CorruptDatasetError
        Bad gzip stream, wrong magic number, wrong number of dimensions or a size mismatch.
    """
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise CorruptDatasetError(f"{path}: not a readable gzip file ({exc})") from exc
    if len(raw) < 4:
        raise CorruptDatasetError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != _IDX_UBYTE:
        raise CorruptDatasetError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} "
            f"(expected 0x000008{expected_ndim:02x}, unsigned bytes)"
        )
    if ndim != expected_ndim:
        raise CorruptDatasetError(
            f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim}"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise CorruptDatasetError(f"{path}: truncated IDX header")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header_len])
    expected = int(np.prod(shape))
    actual = len(raw) - header_len
    if actual != expected:
        raise CorruptDatasetError(
            f"{path}: header announces shape {shape} ({expected} bytes) but the file holds "
            f"{actual} data bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def load_fashion_mnist(directory: Path | None = None) -> Dataset:
    """Load Fashion-MNIST (60,000 train / 10,000 test 28x28 grey images, 10 classes).

    Parameters
    ----------
    directory : Path, optional
        Where the IDX files are; searched with :func:`find_fashion_mnist` when omitted.
    """
    root = directory if directory is not None else find_fashion_mnist()
    parts: dict[str, np.ndarray] = {}
    for key, filename in FASHION_MNIST_FILES.items():
        path = root / filename
        if not path.is_file():
            raise DatasetNotFoundError(f"{path} is missing")
        parts[key] = read_idx(path, 3 if key.endswith("images") else 1)
    for split in ("train", "test"):
        images, labels = parts[f"{split}_images"], parts[f"{split}_labels"]
        if images.shape[1:] != (28, 28):
            raise CorruptDatasetError(f"{split} images are {images.shape[1:]}, expected (28, 28)")
        if images.shape[0] != labels.shape[0]:
            raise CorruptDatasetError(
                f"{split}: {images.shape[0]} images but {labels.shape[0]} labels"
            )
        if images.shape[0] != _EXPECTED_COUNTS[split]:
            raise CorruptDatasetError(
                f"{split}: {images.shape[0]} samples, expected {_EXPECTED_COUNTS[split]}"
            )
        if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise CorruptDatasetError(f"{split} labels contain {labels.max()}, expected 0..9")
    logger.debug(
        "Fashion-MNIST: %d training and %d test images from %s",
        len(parts["train_labels"]),
        len(parts["test_labels"]),
        root,
    )
    return Dataset(
        name="fashion-mnist",
        x_train=(parts["train_images"].astype(np.float32) / 255.0)[..., None],
        y_train=parts["train_labels"].astype(np.int64),
        x_test=(parts["test_images"].astype(np.float32) / 255.0)[..., None],
        y_test=parts["test_labels"].astype(np.int64),
        class_names=FASHION_MNIST_CLASSES,
    )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), split train/test.

    Pixel values 0..16 are scaled to [0, 1]. The split is stratified and seeded.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[..., None]
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx: list[int] = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        test_idx += idx[: round(len(idx) * test_fraction)].tolist()
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[test_idx] = True
    train_order = rng.permutation(np.flatnonzero(~test_mask))
    test_order = rng.permutation(np.flatnonzero(test_mask))
    return Dataset(
        name="digits",
        x_train=x[train_order],
        y_train=y[train_order],
        x_test=x[test_order],
        y_test=y[test_order],
        class_names=tuple(str(d) for d in range(10)),
    )


def resolve_dataset_name(name: str) -> str:
    """``auto`` becomes ``fashion-mnist`` when its files are installed, else ``digits``."""
    if name != "auto":
        return name
    try:
        find_fashion_mnist()
    except DatasetNotFoundError:
        return "digits"
    return "fashion-mnist"


def load_dataset(name: str) -> Dataset:
    """Load a dataset by name: ``"fashion-mnist"`` or ``"digits"``.

    ``"auto"`` picks Fashion-MNIST when its files are installed, digits otherwise.
    """
    if name == "auto":
        try:
            return load_fashion_mnist()
        except DatasetNotFoundError:
            return load_digits()
    if name == "fashion-mnist":
        return load_fashion_mnist()
    if name == "digits":
        return load_digits()
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}, auto")
