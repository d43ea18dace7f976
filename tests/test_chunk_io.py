"""Direct chunk writes produce the bytes zarr itself writes, and defer to zarr otherwise."""

import numpy as np
import pytest
import zarr

from lightning_tda.chunk_io import chunk_directory, write_chunk


def make(group, name, shape, chunks, dtype, **kwargs):
    fill = np.nan if np.dtype(dtype).kind == "f" else 0
    options = dict(compressors=None, chunk_key_encoding={"name": "default", "separator": "."}, fill_value=fill)
    options.update(kwargs)
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, config={"write_empty_chunks": True}, **options)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "bool"])
@pytest.mark.parametrize(
    "shape, chunks, index, rows",
    [
        ((10,), (4,), (slice(4, 8),), 4),  # rows on axis 0
        ((10,), (4,), (slice(8, 10),), 2),  # the edge chunk, padded with the fill value
        ((3, 10), (1, 4), (2, slice(8, 10)), 2),  # a record's block (row axis 1)
        ((3, 10, 5), (1, 4, 5), (1, slice(0, 4)), 4),  # trailing axes (embeddings, copies)
    ],
)
def test_bytes_equal_zarrs_own(tmp_path, dtype, shape, chunks, index, rows):
    group = zarr.open_group(tmp_path / "arrays", mode="a")
    ours, theirs = make(group, "ours", shape, chunks, dtype), make(group, "theirs", shape, chunks, dtype)
    rng = np.random.default_rng(0)
    values = (rng.normal(size=(rows, *shape[len(index):])) * 100).astype(dtype)
    assert write_chunk(ours, index, values)
    theirs[index] = values
    files = sorted(p.name for p in (tmp_path / "arrays" / "theirs").iterdir() if p.name != "zarr.json")
    assert files == sorted(p.name for p in (tmp_path / "arrays" / "ours").iterdir() if p.name != "zarr.json")
    assert len(files) == 1
    assert (tmp_path / "arrays" / "ours" / files[0]).read_bytes() == (tmp_path / "arrays" / "theirs" / files[0]).read_bytes()
    np.testing.assert_array_equal(ours[...], theirs[...])


def test_what_is_not_one_whole_chunk_is_left_to_zarr(tmp_path):
    group = zarr.open_group(tmp_path / "arrays", mode="a")
    arr = make(group, "a", (3, 10), (1, 4), "float32")
    assert not write_chunk(arr, (0, slice(2, 6)), np.zeros(4))  # not on a chunk boundary
    assert not write_chunk(arr, (0, slice(0, 8)), np.zeros(8))  # two chunks
    compressed = group.create_array("z", shape=(10,), chunks=(4,), dtype="float32")  # zstd by default
    assert chunk_directory(compressed) is None and not write_chunk(compressed, (slice(0, 4),), np.zeros(4))
    in_memory = zarr.open_group("memory://chunk-io-test", mode="a").create_array("m", shape=(4,), chunks=(4,), dtype="float32", compressors=None)
    assert chunk_directory(in_memory) is None
    assert not list((tmp_path / "arrays" / "a").glob("c*"))  # nothing written by the refusals
