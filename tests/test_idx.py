import gzip

import numpy as np
import pytest
from conftest import write_fake_fmnist, write_idx

from finetune.data.idx import DataError, parse_idx, read_idx
from finetune.data.sources import FASHION_MNIST_CLASSES, find_idx_dir, load_idx


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = write_idx(tmp_path / "x-idx3-ubyte", array, gz=gz)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 5)
    np.testing.assert_array_equal(out, array)


def test_wrong_magic_number():
    with pytest.raises(DataError, match="wrong magic number 00000703"):
        parse_idx(bytes([0, 0, 7, 3]) + bytes(12), "f")
    with pytest.raises(DataError, match="wrong magic number 89504e47"):  # a PNG
        parse_idx(b"\x89PNG\r\n\x1a\n", "f")


def test_truncated_payload(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((4, 2, 2), np.uint8), gz=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated.*needs 16 payload bytes, found 13"):
        read_idx(path)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05abcde")[:-6])
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_idx(path)


def test_fake_fmnist_loads_with_class_names(tmp_path):
    folder = write_fake_fmnist(tmp_path / "f", n_train=30, n_test=12)
    train, test = load_idx(folder)
    assert train.images.shape == (30, 1, 28, 28) and test.images.shape == (12, 1, 28, 28)
    assert train.classes == FASHION_MNIST_CLASSES
    assert train.labels.dtype.is_floating_point is False and int(train.labels.max()) <= 9


def test_torchvision_layout_and_raw_files_are_found(tmp_path):
    raw = write_fake_fmnist(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert find_idx_dir(tmp_path) == raw
    assert find_idx_dir(tmp_path / "FashionMNIST") == raw  # root/raw
    assert find_idx_dir(tmp_path / "elsewhere") is None


def test_image_label_count_mismatch(tmp_path):
    folder = write_fake_fmnist(tmp_path / "f", n_train=20, n_test=10)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(9, np.uint8))
    with pytest.raises(DataError, match="10 images but 9 labels"):
        load_idx(folder)
