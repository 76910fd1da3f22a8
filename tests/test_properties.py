"""Property-based tests (hypothesis) for the IDX reader and the override parser."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.config import MAX_IMAGE_SIZE, SCHEMA_KEYS, ConfigError, load_config
from finetune.data.idx import DataError, parse_idx

shapes = st.lists(st.integers(0, 6), min_size=1, max_size=3)


def _idx_bytes(array: np.ndarray) -> bytes:
    return (bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
            + array.tobytes())


@settings(max_examples=200, deadline=None)
@given(shape=shapes, data=st.data())
def test_idx_round_trip(shape, data):
    values = data.draw(st.lists(st.integers(0, 255), min_size=int(np.prod(shape)),
                                max_size=int(np.prod(shape))))
    array = np.array(values, dtype=np.uint8).reshape(shape)
    np.testing.assert_array_equal(parse_idx(_idx_bytes(array)), array)


@settings(max_examples=200, deadline=None)
@given(shape=shapes.filter(lambda s: np.prod(s) > 0), cut=st.integers(1, 40))
def test_idx_truncated_anywhere_is_a_data_error(shape, cut):
    raw = _idx_bytes(np.zeros(shape, np.uint8))
    with pytest.raises(DataError):
        parse_idx(raw[:max(0, len(raw) - cut)])


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64))
def test_idx_arbitrary_bytes_parse_or_raise_data_error(raw):
    try:
        out = parse_idx(raw)
    except DataError:
        return
    assert out.size * out.dtype.itemsize == len(raw) - 4 - 4 * raw[3]


INT_KEYS = ["train.epochs", "train.batch_size", "train.eval_batch_size", "train.seed",
            "data.image_size", "data.train_limit", "data.eval_limit", "train.log_every"]


@settings(max_examples=100, deadline=None)
@given(key=st.sampled_from(INT_KEYS), value=st.integers(1, MAX_IMAGE_SIZE))
def test_valid_int_override_is_applied(key, value):
    cfg = load_config(["recipe=resnet18_scratch_fmnist", f"{key}={value}"])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value


@settings(max_examples=100, deadline=None)
@given(key=st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,10})?", fullmatch=True)
       .filter(lambda k: k not in SCHEMA_KEYS and k not in ("recipe",) and k.split(".")[0]
               not in ("model", "data", "train")),
       value=st.integers())
def test_unknown_key_is_always_a_config_error(key, value):
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config([f"{key}={value}"])


SIZE_KEYS = [k for k in INT_KEYS if k != "train.seed"]


@settings(max_examples=100, deadline=None)
@given(key=st.sampled_from(SIZE_KEYS), value=st.integers(-10_000, 0))
def test_non_positive_sizes_are_config_errors(key, value):
    with pytest.raises(ConfigError, match="must be"):
        load_config(["recipe=resnet18_scratch_fmnist", f"{key}={value}"])


@settings(max_examples=50, deadline=None)
@given(value=st.integers(-10_000, -1))
def test_negative_seed_is_a_config_error(value):  # numpy refuses negative seeds mid-run
    with pytest.raises(ConfigError, match="'train.seed' must be >= 0"):
        load_config([f"train.seed={value}"])
