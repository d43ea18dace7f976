"""Whole-chunk writes straight to a local zarr v3 array's files.

A recorder writes one row block, exactly one chunk, of a few arrays per record. Through zarr each
write goes to zarr's event-loop thread and from there to a file-I/O thread; on two cores those
handoffs cost more than the writes (measured on digits: a MarginRecorder fit went from +31% to +22%
over plain training with the same chunks written here instead). An uncompressed chunk of a zarr v3
array whose only codec is ``bytes`` is the chunk's values in C order, little-endian, padded with the
fill value past the array's edge: this module writes exactly those bytes, to a temporary file
renamed over the chunk's file, as zarr's local store does. Anything else (compression, another
codec, a remote store) is left to zarr: :func:`write_chunk` returns False.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.storage import LocalStore


def chunk_directory(arr: zarr.Array) -> str | None:
    """The directory of ``arr``'s chunk files when its chunks can be written directly, else None."""
    store = arr.store_path.store
    meta = arr.metadata
    if (
        not isinstance(store, LocalStore)
        or store.read_only
        or meta.zarr_format != 3
        or not isinstance(meta.chunk_grid, RegularChunkGrid)
        or len(meta.codecs) != 1
        or not isinstance(meta.codecs[0], BytesCodec)
        or getattr(meta.codecs[0].endian, "value", "little") != "little"
    ):
        return None
    return os.path.join(str(store.root), arr.store_path.path)


def write_chunk(arr: zarr.Array, index: tuple[Any, ...], values: np.ndarray) -> bool:
    """Write ``values`` at ``index`` (integers on the leading axes, then slices, then whole axes)
    when that is exactly one chunk and the array allows direct writes; return whether it was
    written (False: use zarr)."""
    directory = chunk_directory(arr)
    if directory is None:
        return False
    chunks = arr.metadata.chunk_grid.chunk_shape
    coords: list[int] = []
    for axis, item in enumerate(index):
        if isinstance(item, slice):
            start, size = item.start or 0, chunks[axis]
            if start % size or item.stop - start > size or item.stop > arr.shape[axis]:
                return False
            coords.append(start // size)
        elif chunks[axis] == 1:
            coords.append(int(item))
        else:
            return False
    trailing = arr.shape[len(index) :]
    if trailing != chunks[len(index) :]:
        return False  # a chunk would not span the trailing axes whole
    coords += [0] * len(trailing)
    leading = sum(not isinstance(item, slice) for item in index)
    block = np.asarray(values).reshape((1,) * leading + np.shape(values))
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
    if block.shape == tuple(chunks):  # no copy of a whole block (a block of gradients is large)
        chunk = np.ascontiguousarray(block, dtype=dtype)
    else:  # the edge chunk: padded with the fill value, as zarr stores it
        chunk = np.full(chunks, arr.metadata.fill_value, dtype=dtype)
        chunk[tuple(slice(0, n) for n in block.shape)] = block
    path = os.path.join(directory, arr.metadata.encode_chunk_key(tuple(coords)))
    tmp = f"{path}.{uuid.uuid4().hex}.partial"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(memoryview(chunk).cast("B"))  # C-contiguous: its bytes, without a copy
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return True


def read_chunk_rows(arr: zarr.Array, rows: slice) -> np.ndarray | None:
    """Rows ``rows`` of ``arr`` (chunked along axis 0 only, each chunk spanning the other axes)
    read straight from the chunk files, only the bytes of those rows (zarr reads and decodes every
    chunk the rows touch whole: a 4,096-row slice of 65,536-row gradient chunks would read 16x its
    bytes); missing chunks read as the fill value. None when the array does not allow it."""
    directory = chunk_directory(arr)
    chunks = arr.metadata.chunk_grid.chunk_shape if directory is not None else ()
    if directory is None or tuple(chunks[1:]) != tuple(arr.shape[1:]) or rows.step not in (None, 1):
        return None
    start, stop, _ = rows.indices(arr.shape[0])
    stop = max(start, stop)
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
    row_items = int(np.prod(arr.shape[1:], dtype=np.int64))
    out = np.empty((stop - start, *arr.shape[1:]), dtype=arr.dtype)
    flat = out.reshape(stop - start, row_items)
    size = chunks[0]
    for chunk in range(start // size, -(-stop // size) if stop > start else start // size):
        lo, hi = max(start, chunk * size), min(stop, (chunk + 1) * size)
        path = os.path.join(directory, arr.metadata.encode_chunk_key((chunk,) + (0,) * (arr.ndim - 1)))
        target = flat[lo - start : hi - start]
        try:
            with open(path, "rb") as f:
                f.seek((lo - chunk * size) * row_items * dtype.itemsize)
                f.readinto(memoryview(target).cast("B"))  # type: ignore[arg-type]
        except FileNotFoundError:
            target[...] = arr.metadata.fill_value
    return out
