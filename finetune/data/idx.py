"""IDX files (the MNIST / Fashion-MNIST format), raw or gzipped.

Layout: a 4-byte magic ``0x00 0x00 <dtype code> <ndim>``, ``ndim`` big-endian int32 sizes,
then the payload in row-major order.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from finetune.errors import DataError

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of an IDX file into an array of its declared dtype and shape."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        magic = raw[:4].hex() if raw else "empty file"
        raise DataError(f"{name}: not an IDX file (wrong magic number {magic}; expected "
                        f"00 00 <type> <ndim>, e.g. 00000803 for images, 00000801 for labels).")
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated IDX header ({len(raw)} bytes for {ndim} dims).")
    dims = struct.unpack(f">{ndim}i", raw[4:header])
    if any(d < 0 for d in dims):
        raise DataError(f"{name}: negative size in IDX header {dims}.")
    expected = math.prod(dims) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise DataError(f"{name}: IDX file {what}: header {dims} needs {expected} payload bytes, "
                        f"found {got}. Re-download or re-install the file.")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file; a ``.gz`` suffix means gzip-compressed."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e}); the file is corrupt "
                        f"or truncated. Re-download or re-install it.") from None
    return parse_idx(raw, str(path))
