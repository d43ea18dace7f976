"""RunStore: one directory per training run holding everything the recorders write.

Layout (a local path or an fsspec URL)::

    <root>/manifest.json              schema version, run name, fingerprints, records, checkpoints
    <root>/arrays/                    one zarr v3 group
        margins/<split>               [n_records, n_examples]   (row axis 1)
        grads/<split>/<ckpt>          [n_examples, k]           (row axis 0)
    <root>/checkpoints/<tag>.safetensors

Every array is written in *row blocks* along its row axis (the example axis for recordings, the
model axis for sweeps), and a row block (at one leading index) is exactly one zarr chunk. Zarr
stores replace a chunk atomically (locally a temporary file renamed over the chunk's file; object
stores put whole objects), so the completion mask of an array is the set of chunks that exist: a
block is complete once its chunk is there, and never before all its values are. A writer killed at
any moment therefore leaves a store that opens, reports exactly which blocks are incomplete, and
is finished by a resume that writes only those blocks. (Schema 1 kept a separate flag array per
array; one file per block instead of two halves the files a record creates.) Nothing is
unpickled: JSON, zarr and safetensors only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import fsspec

try:
    import fcntl
except ImportError:  # Windows: manifest updates are serialised within a process only
    fcntl = None  # type: ignore[assignment]
import numpy as np
import torch
import zarr
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from zarr.core.sync import sync as zarr_sync

from lightning_tda import schema
from lightning_tda.chunk_io import read_chunk_rows, write_chunk
from lightning_tda.schema import join_name, validate_name  # noqa: F401 (re-exported: store.join_name)

SCHEMA_VERSION = 2
# Every chunk is written, even one equal to the fill value: a chunk's presence is its block's
# completion flag.
_ARRAY_CONFIG = {"write_empty_chunks": True}
# What a store's directory holds (a store being created by another process may hold only some).
_OWN_ENTRIES = frozenset({"manifest.json", "arrays", "checkpoints", ".manifest.lock"})
_OWN_TEMPORARY_PREFIXES = (".write_probe.", "manifest.json.")


class StoreError(RuntimeError):
    """A RunStore cannot be opened, written or read as asked."""


class SchemaVersionError(StoreError):
    """The store was written by a newer lightning-tda."""


class FingerprintMismatchError(StoreError):
    """The store was written for a different dataset."""


class StoreNotFoundError(StoreError):
    """There is no RunStore at the path given (opening never creates one)."""


class StoreExistsError(StoreError):
    """A RunStore is already at the path given to :meth:`RunStore.create`."""


_MANIFEST_LOCKS: dict[str, threading.Lock] = {}
_MANIFEST_LOCKS_GUARD = threading.Lock()


def _manifest_lock(path: str) -> threading.Lock:
    """One lock per store path in this process: recorders open their own RunStore on one path,
    and a background checkpoint write updates the manifest while the main thread may too."""
    with _MANIFEST_LOCKS_GUARD:
        return _MANIFEST_LOCKS.setdefault(path, threading.Lock())


def _header_metadata(blob: bytes) -> dict[str, Any]:
    """Our metadata from a safetensors file's header (``blob`` holds at least the header)."""
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_len])
    return json.loads(header.get("__metadata__", {}).get("lightning_tda", "{}"))


@dataclass(frozen=True)
class ArrayLayout:
    """How an array is written: its shape, the axis cut into row blocks, and the block size."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    row_axis: int
    block_rows: int
    block_cols: int | None = None  # a tiled 2-D array: chunks of block_rows x block_cols

    @property
    def n_rows(self) -> int:
        return self.shape[self.row_axis]

    @property
    def n_col_blocks(self) -> int:
        """Column blocks of a tiled array (1 for the others: a chunk spans the trailing axes)."""
        return 1 if self.block_cols is None else max(1, math.ceil(self.shape[1] / self.block_cols))

    def col_range(self, block: int) -> tuple[int, int]:
        """Columns of column block ``block`` of a tiled array."""
        if self.block_cols is None:
            return 0, self.shape[-1]
        start = block * self.block_cols
        return start, min(start + self.block_cols, self.shape[1])

    @property
    def n_blocks(self) -> int:
        return max(1, math.ceil(self.n_rows / self.block_rows))

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.n_rows)


def rank_blocks(n_blocks: int, rank: int, world_size: int) -> range:
    """The contiguous range of block indices that ``rank`` of ``world_size`` writes."""
    lo = (n_blocks * rank) // world_size
    hi = (n_blocks * (rank + 1)) // world_size
    return range(lo, hi)


def _damaged_checkpoint(path: str, err: BaseException) -> StoreError:
    return StoreError(
        f"checkpoint file {path} cannot be read ({type(err).__name__}: {err}); it is damaged or not a "
        "safetensors file. Delete it and resume the run to save it again, or use another checkpoint"
    )


def new_run_id() -> str:
    """A fresh run id (a store belongs to one training run; recorders keep its id)."""
    return uuid.uuid4().hex


def _manifest_problem(manifest: Mapping[str, Any]) -> str | None:
    """What is wrong with a manifest's structure, or None (checked on every open)."""
    kinds = {schema.FINGERPRINTS: dict, schema.RECORDS: dict, schema.CHECKPOINTS: dict}
    for key, kind in kinds.items():
        if not isinstance(manifest.get(key), kind):
            return f"field {key!r} should be a JSON object, found {type(manifest.get(key)).__name__}"
    for split, fp in manifest[schema.FINGERPRINTS].items():
        if not isinstance(fp, dict) or not isinstance(fp.get(schema.FINGERPRINT_SIZE), int):
            return f"fingerprint of split {split!r} should be an object with an integer 'size'"
    for key, records in manifest[schema.RECORDS].items():
        if not isinstance(records, list):
            return f"records[{key!r}] should be a list, found {type(records).__name__}"
        for i, record in enumerate(records):
            if not isinstance(record, dict) or not isinstance(record.get(schema.TAG), str) or not isinstance(
                record.get(schema.GLOBAL_STEP), int
            ):
                return f"records[{key!r}][{i}] should be an object with a string 'tag' and an integer 'global_step'"
    for tag, meta in manifest[schema.CHECKPOINTS].items():
        if not isinstance(meta, dict):
            return f"checkpoints[{tag!r}] should be an object, found {type(meta).__name__}"
    return None


class RunStore:
    """The record of one training run: manifest, zarr arrays in row blocks, safetensors checkpoints.

    Args:
        path: a directory path or an fsspec URL (``memory://...``, ``s3://...``) of an existing
            store: opening never creates one (a mistyped path raises :class:`StoreNotFoundError`);
            :meth:`create` makes a new store, and the recorders create theirs.
        durable: also ``fsync`` the manifest and checkpoint files before renaming them into place,
            so they survive a power loss or an OS crash too. Off by default: the rename already
            makes every write all-or-nothing when the writing process crashes or is killed, as
            zarr (which never syncs chunks) and Lightning's own checkpoints do; syncing costs
            about 0.7 ms a checkpoint on a small model (measured on digits).

    Example:
        >>> import tempfile, numpy as np
        >>> store = RunStore.create(tempfile.mkdtemp() + "/run")
        >>> layout = store.ensure_array("preds/val", shape=(1, 5), dtype="int64", row_axis=1, block_rows=2)
        >>> store.write_block("preds/val", 0, np.array([3, 1]), lead=(0,))
        >>> store.incomplete_blocks("preds/val", lead=(0,))
        [(2, 4), (4, 5)]
    """

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = False) -> None:
        self._attach(path, durable)
        if not self._fs.exists(self._join("manifest.json")):
            raise StoreNotFoundError(
                f"no RunStore at {self.path} (no manifest.json there); check the path, or make one: "
                "the recorders (MarginRecorder, CheckpointRecorder, GradientRecorder) and SubsetSweep "
                "create their store, and RunStore.create(path) makes an empty one"
            )
        self._check_schema(self.manifest)

    def _attach(self, path: str | os.PathLike[str], durable: bool) -> None:
        self.path = str(path)
        self.durable = durable
        self._fs, self._root = fsspec.core.url_to_fs(self.path)
        self._is_local = "://" not in self.path or self.path.startswith("file://")
        self._group_handle: zarr.Group | None = None  # opened on first use: checkpoints need no zarr
        self._handles: dict[str, zarr.Array] = {}
        self._writer: ThreadPoolExecutor | None = None  # background block writes (write_blocks)
        self._pending: list[Future[None]] = []
        self._unlisted: dict[str, dict[str, Any]] = {}  # saved checkpoints flush() lists

    @classmethod
    def exists(cls, path: str | os.PathLike[str]) -> bool:
        """Whether a RunStore (a ``manifest.json``) is at ``path``."""
        fs, root = fsspec.core.url_to_fs(str(path))
        return bool(fs.exists(root.rstrip("/") + "/manifest.json"))

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        run_name: str | None = None,
        algorithm: str | None = None,
        seed: int | None = None,
        durable: bool = False,
        exist_ok: bool = False,
    ) -> "RunStore":
        """Create a new, empty RunStore at ``path`` and open it.

        Refused when ``path`` is a non-empty directory that is not a store (nothing is written
        into it), and when a store is there already unless ``exist_ok`` (then it is opened).
        Several processes may create one store at once (shards, DDP ranks): one manifest wins.
        """
        store = cls.__new__(cls)
        store._attach(path, durable)
        if store._fs.exists(store._join("manifest.json")):
            if not exist_ok:
                raise StoreExistsError(
                    f"a RunStore already exists at {store.path}; open it with RunStore(path), or "
                    "pass exist_ok=True to create-or-open"
                )
        else:
            foreign = store._foreign_entries()
            if foreign:
                raise StoreError(
                    f"cannot create a RunStore at {store.path}: the directory is not empty and is "
                    f"not a RunStore (it holds {foreign[:5]}); use a new or empty directory"
                )
            store._create(run_name, algorithm, seed)
        return cls(path, durable=durable)

    def _foreign_entries(self) -> list[str]:
        """Entries of the store's directory that a store (or one being created by another process
        at this moment) would not hold."""
        if not self._fs.exists(self._root):
            return []
        if not self._fs.isdir(self._root):
            return [self._root]
        names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in self._fs.ls(self._root, detail=False)]
        return sorted(n for n in names if n not in _OWN_ENTRIES and not n.startswith(_OWN_TEMPORARY_PREFIXES))

    # ------------------------------------------------------------------ paths and manifest
    def _join(self, *parts: str) -> str:
        return "/".join([self._root.rstrip("/"), *parts])

    @property
    def _group(self) -> zarr.Group:
        if self._group_handle is None:
            self._group_handle = zarr.open_group(self._zarr_url(), mode="a")
        return self._group_handle

    def _zarr_url(self) -> str:
        return str(Path(self._root) / "arrays") if self._is_local else self.path.rstrip("/") + "/arrays"

    def _create(self, run_name: str | None, algorithm: str | None, seed: int | None) -> None:
        try:
            self._fs.makedirs(self._join("checkpoints"), exist_ok=True)
            probe = self._join(f".write_probe.{os.getpid()}.{threading.get_ident()}")
            with self._fs.open(probe, "wb") as f:
                f.write(b"ok")
            self._fs.rm(probe)
        except OSError as err:
            raise StoreError(
                f"cannot create a RunStore at {self.path}: {err}; pass a writable directory "
                "(or an fsspec URL you can write to)"
            ) from err
        from lightning_tda import __version__

        # Another process (a shard) may create the store at the same moment: the first manifest
        # wins, and no later update of it is overwritten by a fresh one.
        manifest = {
            schema.SCHEMA_VERSION: SCHEMA_VERSION,
            schema.LIBRARY_VERSION: __version__,
            schema.RUN_ID: new_run_id(),
            schema.RUN_NAME: validate_name(run_name, "run name") if run_name else None,
            schema.ALGORITHM: algorithm,
            schema.SEED: seed,
            schema.FINGERPRINTS: {},
            schema.MODEL: None,
            schema.PROJECTION: None,
            schema.RECORDS: {},
            schema.CHECKPOINTS: {},
        }
        self._write_manifest(manifest, replace=False)

    def _check_schema(self, manifest: Mapping[str, Any]) -> None:
        where = self._join("manifest.json")
        version = manifest.get(schema.SCHEMA_VERSION)
        if not isinstance(version, int):
            raise StoreError(f"{where} has no integer schema_version; this is not a RunStore")
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"store written with schema version {version}, newer than this lightning-tda "
                f"reads ({SCHEMA_VERSION}); upgrade lightning-tda to read it"
            )
        if version < SCHEMA_VERSION:
            raise SchemaVersionError(
                f"store written with schema version {version} by an earlier lightning-tda, whose "
                f"completion masks this version ({SCHEMA_VERSION}) does not read; record the run "
                "again into a new store path"
            )
        problem = _manifest_problem(manifest)
        if problem:
            raise StoreError(
                f"{where} is damaged or was edited by hand: {problem}. Restore it from a backup, or "
                "record the run again into a new store path"
            )

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as a fresh dict (read from storage every time)."""
        path = self._join("manifest.json")
        try:
            with self._fs.open(path, "r") as f:
                manifest = json.load(f)
        except FileNotFoundError as err:
            raise StoreNotFoundError(f"{path} has disappeared; was the store at {self.path} deleted?") from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(
                f"{path} is damaged ({err}): it is not valid JSON. Restore it from a backup, or "
                "record the run again into a new store path"
            ) from err
        if not isinstance(manifest, dict):
            raise StoreError(f"{path} is damaged: it holds a {type(manifest).__name__}, not a JSON object")
        return manifest

    def _write_atomically(self, target: str, data: bytes, *, replace: bool = True) -> None:
        """Write a whole file so a reader (or a crash) sees the old or the new file, never half:
        locally a temporary file (synced if ``durable``) renamed over the target; remote stores
        write whole objects.
        With ``replace=False`` an existing target is kept (locally an atomic no-clobber link, so
        of two processes creating a store at once exactly one writes)."""
        if self._is_local:
            tmp = f"{target}.{os.getpid()}.{threading.get_ident()}.partial"
            with open(tmp, "wb") as f:
                f.write(data)
                if self.durable:
                    f.flush()
                    os.fsync(f.fileno())
            if replace:
                os.replace(tmp, target)
                return
            try:
                os.link(tmp, target)
            except FileExistsError:
                pass  # another process created it first: keep theirs
            finally:
                os.remove(tmp)
            return
        if replace or not self._fs.exists(target):
            with self._fs.open(target, "wb") as f:
                f.write(data)

    def _write_manifest(self, manifest: Mapping[str, Any], *, replace: bool = True) -> None:
        text = json.dumps(manifest, indent=2, sort_keys=True)
        self._write_atomically(self._join("manifest.json"), text.encode(), replace=replace)

    def update_manifest(self, update: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Read, modify in place with ``update(manifest)``, and atomically write the manifest.

        Updates are serialised across threads and, on a local store, across processes; on a
        remote store only one process may update the manifest (rank 0 under DDP).
        """
        with _manifest_lock(self.path), self._manifest_file_lock():
            manifest = self.manifest
            update(manifest)
            self._write_manifest(manifest)
        return manifest

    @contextlib.contextmanager
    def _manifest_file_lock(self) -> Iterator[None]:
        """Across processes (shards, DDP ranks) on a local store: an advisory lock on
        ``.manifest.lock`` around each read-modify-write of the manifest."""
        if not self._is_local or fcntl is None:
            yield  # remote stores: one process writes the manifest (rank 0), as documented
            return
        with open(self._join(".manifest.lock"), "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def set_fingerprint(self, split: str, fingerprint: Mapping[str, Any], write: bool = True) -> None:
        """Record ``split``'s dataset fingerprint, or check it equals the one recorded.

        Raises :class:`FingerprintMismatchError` naming both datasets when they differ.
        """
        validate_name(split, "split name")
        recorded = self.manifest[schema.FINGERPRINTS].get(split)
        if recorded is not None:
            if dict(recorded) != dict(fingerprint):
                raise FingerprintMismatchError(
                    f"the RunStore at {self.path} was recorded for another '{split}' dataset "
                    f"(size {recorded.get(schema.FINGERPRINT_SIZE)}, labels sha256 {str(recorded.get(schema.FINGERPRINT_LABELS))[:12]}...) "
                    f"than the one given (size {fingerprint.get(schema.FINGERPRINT_SIZE)}, labels sha256 "
                    f"{str(fingerprint.get(schema.FINGERPRINT_LABELS))[:12]}...); use a new store path for this "
                    "dataset, or the dataset the store was recorded on"
                )
            return
        if write:
            self.update_manifest(lambda m: m[schema.FINGERPRINTS].__setitem__(split, dict(fingerprint)))

    # ------------------------------------------------------------------ arrays
    def has_array(self, name: str) -> bool:
        if name in self._handles:
            return True
        if not self._has_group():
            return False
        try:
            return isinstance(self._group.get(name), zarr.Array)
        except (KeyError, ValueError):
            return False

    def array_names(self) -> list[str]:
        """Names of every array, sorted."""
        names: list[str] = []

        def walk(group: zarr.Group, prefix: str) -> None:
            for key, member in group.members():
                full = f"{prefix}{key}"
                if isinstance(member, zarr.Array):
                    names.append(full)
                else:
                    walk(member, full + "/")

        if self._has_group():
            walk(self._group, "")
        return sorted(names)

    def _has_group(self) -> bool:
        """Whether the arrays group exists (readers never create it; a first array does)."""
        return self._group_handle is not None or bool(self._fs.exists(self._join("arrays", "zarr.json")))

    def refresh(self) -> None:
        """Forget cached array handles, so shapes grown by another process are seen.

        Recorders call it after every barrier; single-process users never need it."""
        self.flush()
        self._handles.clear()

    def layout(self, name: str) -> ArrayLayout:
        """The layout of array ``name``."""
        arr = self._array(name)
        attrs = arr.attrs
        return ArrayLayout(
            name, tuple(arr.shape), str(arr.dtype), attrs["row_axis"], attrs["block_rows"], attrs.get("block_cols")
        )

    def _array(self, name: str) -> zarr.Array:
        if name in self._handles:
            return self._handles[name]
        try:
            arr = zarr.open_array(self._zarr_url(), path=name, mode="r+").with_config(_ARRAY_CONFIG)
        except (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError, zarr.errors.ArrayNotFoundError) as err:  # type: ignore[attr-defined]
            raise StoreError(
                f"the RunStore at {self.path} has no array {name!r} (no {self._join('arrays', *name.split('/'))}); "
                f"it has {self.array_names()}. If the manifest lists it, the array was deleted: resume "
                "the recording run to write it again, or record into a new store"
            ) from err
        self._handles[name] = arr
        return arr

    def ensure_array(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: str | np.dtype,
        *,
        row_axis: int = 0,
        block_rows: int = 1024,
        block_cols: int | None = None,
    ) -> ArrayLayout:
        """Create array ``name`` (filled with NaN/0, no block complete), or check the existing one
        has this shape (the row axis's leading axes may have grown) and dtype.

        ``block_cols`` makes a 2-D array *tiled*: chunks of ``block_rows x block_cols``, each
        written whole by :meth:`write_tile` (for results too wide to hold a row block in memory);
        a row block is complete when all its tiles are."""
        self.flush()
        dtype = np.dtype(dtype)
        if any(int(s) < 0 for s in shape) or not 0 <= row_axis < len(shape):
            raise ValueError(f"bad shape {shape} / row_axis {row_axis} for array {name!r}")
        if block_cols is not None and (len(shape) != 2 or row_axis != 0 or block_cols < 1):
            raise ValueError(f"block_cols (tiles) needs a 2-D array with row_axis 0 and block_cols >= 1, got {shape}")
        if shape[row_axis] == 0:
            raise ValueError(f"array {name!r} would have no rows (shape {shape}); is the dataset empty?")
        for part in name.split("/"):
            validate_name(part, "array name part")
        if self.has_array(name):
            layout = self.layout(name)
            if layout.dtype != str(dtype) or layout.shape[row_axis:] != tuple(shape[row_axis:]):
                raise StoreError(
                    f"array {name!r} in {self.path} has shape {layout.shape} and dtype {layout.dtype}, "
                    f"but {tuple(shape)} / {dtype} was asked for; record into a new store"
                )
            return layout
        block_rows = int(max(1, min(block_rows, shape[row_axis])))
        chunks = tuple(
            block_rows if axis == row_axis else (1 if axis < row_axis else max(1, s))
            for axis, s in enumerate(shape)
        )
        attributes: dict[str, Any] = {"row_axis": row_axis, "block_rows": block_rows}
        if block_cols is not None:
            block_cols = int(min(block_cols, max(1, shape[1])))
            chunks = (block_rows, block_cols)
            attributes["block_cols"] = block_cols
        # Another process (a shard) may create the array at the same moment: finding it there is
        # fine, and its layout is checked below. No compression: recorded floats (margins,
        # projected gradients) do not compress, skipping the codec makes each chunk write about
        # a third cheaper, and chunk_io writes such chunks straight to their files. Chunk keys
        # "c.<record>.<block>": flat files, no new directory per record (a gathered write of six
        # new records' blocks: 4.1 -> 2.9 ms).
        try:
            self._handles[name] = self._group.create_array(
                name, shape=shape, chunks=chunks, dtype=dtype, fill_value=np.nan if dtype.kind == "f" else 0,
                attributes=attributes, compressors=None,
                chunk_key_encoding={"name": "default", "separator": "."}, config=_ARRAY_CONFIG,
            )
        except zarr.errors.ContainsArrayError:
            pass
        layout = self.layout(name)
        if layout.shape != tuple(shape) or layout.dtype != str(dtype):
            raise StoreError(f"array {name!r} was created concurrently with another shape/dtype: {layout}")
        return layout

    def grow(self, names: str | Sequence[str], n_leading: int) -> None:
        """Grow axis 0 of arrays whose row axis is 1 (a new record of margins) to ``n_leading``;
        several arrays at once when ``names`` is a list (their resizes run concurrently)."""
        self._resize_leading(names, n_leading, grow=True)

    def trim(self, names: str | Sequence[str], n_leading: int) -> None:
        """Cut axis 0 of arrays whose row axis is 1 back to ``n_leading`` (a recorder reserves
        rows for the records it plans and gives back the ones it did not take)."""
        self._resize_leading(names, n_leading, grow=False)

    def _resize_leading(self, names: str | Sequence[str], n_leading: int, grow: bool) -> None:
        handles: list[zarr.Array] = []
        for name in [names] if isinstance(names, str) else names:
            layout = self.layout(name)
            if layout.row_axis == 0:
                raise StoreError(f"array {name!r} has its rows on axis 0; only leading axes are resized")
            if (n_leading > layout.shape[0]) if grow else (n_leading < layout.shape[0]):
                handles.append(self._array(name))
        if not handles:
            return
        self.flush()

        async def resize_all() -> None:
            # zarr updates each handle's metadata in place, so the cached handles stay valid; a
            # shrink deletes the chunks (completed blocks) beyond the new shape.
            await asyncio.gather(*(h.async_array.resize((n_leading, *h.shape[1:])) for h in handles))

        zarr_sync(resize_all())

    def write_block(self, name: str, start: int, values: np.ndarray | torch.Tensor, lead: tuple[int, ...] = ()) -> None:
        """Write rows ``[start, start + len(values))`` (at leading index ``lead``), then mark the
        block complete. ``start`` must be a block boundary and the rows a whole block."""
        self.write_blocks([(name, start, values, lead)])

    def write_blocks(
        self,
        writes: Sequence[tuple[str, int, np.ndarray | torch.Tensor, tuple[int, ...]]],
        *,
        wait: bool = True,
    ) -> None:
        """Write several row blocks ``(name, start, values, lead)`` at once, concurrently, as
        :meth:`write_block` does one. Each block is one chunk, replaced atomically, so a crash
        leaves every block either complete or not written.

        With ``wait=False`` the writes run in a background thread while the caller goes on (a
        recorder overlaps them with training); every other method of this store, and
        :meth:`flush`, first waits for them and re-raises their error, if any.
        """
        data: list[tuple[zarr.Array, tuple[Any, ...], np.ndarray]] = []
        for name, start, values, lead in writes:
            layout = self.layout(name)
            if isinstance(values, torch.Tensor):
                values = values.detach().cpu().numpy()
            values = np.asarray(values)
            if start % layout.block_rows:
                raise StoreError(f"write to {name!r} starts at row {start}, not a block boundary")
            block = start // layout.block_rows
            lo, hi = layout.block_range(block)
            if len(lead) != layout.row_axis or values.shape[0] != hi - lo:
                raise StoreError(
                    f"write to {name!r} block {block} needs {hi - lo} rows at a leading index of "
                    f"{layout.row_axis} axes, got {values.shape[0]} rows at {lead}"
                )
            # A private copy when the write outlives this call: the caller may reuse its buffer.
            values = values.astype(layout.dtype, copy=not wait)
            data.append((self._array(name), tuple(lead) + (slice(lo, hi),), values))
        self._run(lambda: self._store_values(data), wait)

    def _run(self, work: Callable[[], None], wait: bool) -> None:
        """Run ``work`` now (after earlier background work) or queue it on the writer thread."""
        if wait:
            self._wait_for_writes()
            work()
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runstore-writer")
        self._pending.append(self._writer.submit(work))

    @staticmethod
    def _store_values(data: Sequence[tuple[zarr.Array, tuple[Any, ...], np.ndarray]]) -> None:
        # Local uncompressed chunks go straight to their files (see chunk_io); the rest via zarr.
        rest = [(arr, index, v) for arr, index, v in data if not write_chunk(arr, index, v)]
        if not rest:
            return

        async def write_all() -> None:
            await asyncio.gather(*(arr.async_array.setitem(index, v) for arr, index, v in rest))

        zarr_sync(write_all())

    def flush(self) -> None:
        """Wait for background writes (``write_blocks(wait=False)``), re-raising the first error,
        and list checkpoints saved with ``list_now=False`` in the manifest."""
        self._wait_for_writes()
        if self._unlisted:
            unlisted, self._unlisted = self._unlisted, {}
            self.update_manifest(lambda m: m[schema.CHECKPOINTS].update(unlisted))

    def _wait_for_writes(self) -> None:
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise StoreError(f"a background write to {self.path} failed: {first}") from first

    def completed_blocks(self, name: str, lead: tuple[int, ...] = ()) -> np.ndarray:
        """Completion flags of every block (at leading index ``lead``): ``[*leading axes after
        lead, n_blocks]``. A block is complete when its chunk exists."""
        self.flush()
        layout = self.layout(name)
        if layout.block_cols is not None:
            return self.completed_tiles(name).all(axis=1)
        arr = self._array(name)
        present = self._chunk_keys(arr)
        trailing = (0,) * (len(layout.shape) - layout.row_axis - 1)  # one chunk spans them
        done = np.zeros((*layout.shape[len(lead) : layout.row_axis], layout.n_blocks), dtype=bool)
        for index in np.ndindex(done.shape):
            done[index] = arr.metadata.encode_chunk_key((*lead, *index, *trailing)) in present
        return done

    def completed_tiles(self, name: str) -> np.ndarray:
        """Completion flags ``[n_row_blocks, n_col_blocks]`` of a tiled array's tiles."""
        self.flush()
        layout = self.layout(name)
        arr = self._array(name)
        present = self._chunk_keys(arr)
        done = np.zeros((layout.n_blocks, layout.n_col_blocks), dtype=bool)
        for index in np.ndindex(done.shape):
            done[index] = arr.metadata.encode_chunk_key(index) in present
        return done

    def write_tile(self, name: str, row_start: int, col_start: int, values: np.ndarray | torch.Tensor) -> None:
        """Write one whole tile of a tiled array (see ``ensure_array(block_cols=...)``) at
        ``(row_start, col_start)``, atomically: the tile is complete once this returns."""
        layout = self.layout(name)
        if layout.block_cols is None:
            raise StoreError(f"array {name!r} is not tiled; write it with write_block")
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        if row_start % layout.block_rows or col_start % layout.block_cols:
            raise StoreError(f"tile of {name!r} at ({row_start}, {col_start}) is not on a tile boundary")
        rows = layout.block_range(row_start // layout.block_rows)
        cols = layout.col_range(col_start // layout.block_cols)
        if np.shape(values) != (rows[1] - rows[0], cols[1] - cols[0]):
            raise StoreError(f"tile of {name!r} at ({row_start}, {col_start}) needs shape "
                             f"{(rows[1] - rows[0], cols[1] - cols[0])}, got {np.shape(values)}")
        index = (slice(*rows), slice(*cols))
        self._run(lambda: self._store_values([(self._array(name), index, np.asarray(values, dtype=layout.dtype))]), True)

    def remove_array(self, name: str) -> None:
        """Delete array ``name`` and its chunks (a scoring's work arrays once it is complete)."""
        self.flush()
        if not self.has_array(name):
            return
        self._handles.pop(name, None)
        self._group_handle = None  # a fresh group handle: zarr caches members
        parent, _, leaf = name.rpartition("/")
        group = self._group[parent] if parent else self._group
        del group[leaf]

    @staticmethod
    def _chunk_keys(arr: zarr.Array) -> set[str]:
        """The keys (relative to the array) of every chunk stored for ``arr``."""
        prefix = arr.store_path.path.rstrip("/") + "/"

        async def listing() -> set[str]:
            return {key[len(prefix) :] async for key in arr.store_path.store.list_prefix(prefix)}

        return zarr_sync(listing())

    def incomplete_blocks(self, name: str, lead: tuple[int, ...] = ()) -> list[tuple[int, int]]:
        """Row ranges ``(start, stop)`` not yet written (at leading index ``lead``)."""
        layout = self.layout(name)
        done = self.completed_blocks(name, lead).reshape(-1, layout.n_blocks)
        todo = ~done.all(axis=0) if done.ndim > 1 else ~done
        return [layout.block_range(int(b)) for b in np.flatnonzero(todo)]

    def is_complete(self, name: str) -> bool:
        """Whether every block of ``name`` (at every leading index) has been written."""
        return bool(self.completed_blocks(name).all())

    def read(self, name: str, rows: slice | None = None, lead: tuple[int, ...] = ()) -> np.ndarray:
        """Read ``name`` (rows along the row axis, at leading index ``lead``) as a numpy array.

        Incomplete blocks read as NaN (float) or 0; check :meth:`is_complete` first when it matters.
        """
        self.flush()
        layout = self.layout(name)
        if not lead and layout.row_axis == 0 and layout.block_cols is None:  # only the rows' bytes
            direct = read_chunk_rows(self._array(name), rows or slice(None))
            if direct is not None:
                return direct
        index = tuple(lead) + (slice(None),) * (layout.row_axis - len(lead)) + (rows or slice(None),)
        try:
            return np.asarray(self._array(name)[index])
        except (ValueError, TypeError, OSError) as err:
            bad = self._damaged_chunks(name)
            if not bad:
                raise
            raise StoreError(
                f"array {name!r} of the RunStore at {self.path} has damaged chunk files ({', '.join(bad[:5])}): "
                "their size is not a whole block. Delete them and resume the recording run to write "
                "those blocks again (they count as incomplete once deleted)"
            ) from err

    def _damaged_chunks(self, name: str) -> list[str]:
        """Chunk files of ``name`` whose size is not that of a whole uncompressed block."""
        arr = self._array(name)
        if arr.metadata.codecs and any(type(c).__name__ not in ("BytesCodec",) for c in arr.metadata.codecs):
            return []  # compressed chunks vary in size
        expected = int(np.prod(arr.chunks)) * np.dtype(arr.dtype).itemsize
        folder = self._join("arrays", *name.split("/"))
        bad = []
        for key in sorted(self._chunk_keys(arr)):
            if key == "zarr.json":
                continue
            path = f"{folder}/{key}"
            if self._fs.size(path) != expected:
                bad.append(path)
        return bad

    def iter_row_blocks(self, name: str, block_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, rows)`` blocks along the row axis so arrays larger than memory stream."""
        layout = self.layout(name)
        step = block_rows or layout.block_rows
        for start in range(0, layout.n_rows, step):
            yield start, self.read(name, slice(start, min(start + step, layout.n_rows)))

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_path(self, tag: str) -> str:
        return self._join("checkpoints", validate_name(tag, "checkpoint tag") + ".safetensors")

    def save_checkpoint(
        self,
        tag: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any] | None = None,
        *,
        wait: bool = True,
        list_now: bool = True,
    ) -> None:
        """Save tensors as safetensors (pickle-free), with ``metadata`` in the file's header, and
        list the checkpoint in the manifest once the file is complete.

        With ``list_now=False`` the manifest listing waits for the next :meth:`flush` and is
        written together with others (a recorder saving every epoch rewrites the manifest once,
        not once a checkpoint: 3.0% -> 0.5% overhead on digits). The file is complete either way,
        and :meth:`checkpoints` finds a saved checkpoint the manifest does not list yet. With
        ``wait=False`` the tensors are copied now and the rest happens in the background, as
        :meth:`write_blocks` does."""
        metadata = dict(metadata or {})
        path = self._checkpoint_path(tag)
        flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        if not wait:  # the caller's tensors may change (training goes on) before the write
            flat = {k: v.clone() for k, v in flat.items()}

        def run() -> None:
            blob = save_safetensors(flat, metadata={"lightning_tda": json.dumps(metadata, sort_keys=True)})
            self._write_atomically(path, blob)
            if list_now:
                self.update_manifest(lambda m: m[schema.CHECKPOINTS].__setitem__(tag, metadata))
            else:
                self._unlisted[tag] = metadata

        self._run(run, wait)

    def load_checkpoint(self, tag: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Load checkpoint ``tag``: ``(tensors, metadata)``. Never unpickles."""
        self.flush()
        path = self._checkpoint_path(tag)
        if not self._fs.exists(path):
            raise StoreError(
                f"no checkpoint {tag!r} in {self.path}; it has {self.checkpoint_tags()}"
            )
        with self._fs.open(path, "rb") as f:
            blob = f.read()
        try:
            return load_safetensors(blob), _header_metadata(blob)
        except Exception as err:  # safetensors raises its own error types for torn or foreign files
            raise _damaged_checkpoint(path, err) from err

    def checkpoints(self, *, list_found: bool = False) -> dict[str, dict[str, Any]]:
        """Every saved checkpoint, ``{tag: metadata}``: the manifest's, and any complete file the
        manifest does not list yet (saved with ``list_now=False`` by a process that has not
        flushed, or was killed). ``list_found=True`` writes those into the manifest."""
        self.flush()
        listed = dict(self.manifest[schema.CHECKPOINTS])
        found: dict[str, dict[str, Any]] = {}
        suffix = ".safetensors"
        for path in self._fs.glob(self._join("checkpoints", f"*{suffix}")):
            tag = str(path).rsplit("/", 1)[-1][: -len(suffix)]
            if tag not in listed:
                with self._fs.open(path, "rb") as f:
                    head = f.read(8)
                    try:
                        found[tag] = _header_metadata(head + f.read(int.from_bytes(head, "little")))
                    except (ValueError, UnicodeDecodeError, OverflowError, MemoryError) as err:
                        raise _damaged_checkpoint(str(path), err) from err
        if found and list_found:
            self.update_manifest(lambda m: m[schema.CHECKPOINTS].update(found))
        return {**listed, **found}

    def checkpoint_tags(self) -> list[str]:
        """Checkpoint tags in the order they were recorded (by global step)."""
        ckpts = self.checkpoints()
        return sorted(ckpts, key=lambda t: (ckpts[t].get(schema.GLOBAL_STEP, 0), t))

    # ------------------------------------------------------------------ run identity
    @property
    def run_id(self) -> str | None:
        """The id of the training run this store belongs to (None for stores made before run ids)."""
        return self.manifest.get(schema.RUN_ID)

    def holds_records(self) -> bool:
        """Whether anything of a run is in the store: records, checkpoints, a sweep or arrays."""
        manifest = self.manifest
        if any(manifest[schema.RECORDS].values()) or manifest[schema.CHECKPOINTS] or manifest.get(schema.SWEEP):
            return True
        suffix = ".safetensors"
        return bool(self._fs.glob(self._join("checkpoints", f"*{suffix}"))) or bool(self.array_names())

    def describe_records(self) -> str:
        """One line on what the store holds, for errors about it."""
        manifest = self.manifest
        counts = [f"{len(v)} {k} records" for k, v in sorted(manifest[schema.RECORDS].items()) if v]
        n_ckpt = len(self.checkpoints())
        if n_ckpt:
            counts.append(f"{n_ckpt} checkpoints")
        if manifest.get(schema.SWEEP):
            counts.append("a subset sweep")
        what = ", ".join(counts) or f"arrays {self.array_names()[:4]}"
        return f"run id {manifest.get(schema.RUN_ID)}, {what}"

    def clear_records(self) -> str:
        """Delete every record, checkpoint, sweep and array, and give the store a new run id;
        returns what was cleared. Files go first and the manifest last, so a crash midway leaves a
        manifest whose arrays are gone (a clear error on reading; clearing again finishes it),
        never stale blocks that would count as complete."""
        self.flush()
        cleared = self.describe_records()
        for folder in ("arrays", "checkpoints"):
            path = self._join(folder)
            if self._fs.exists(path):
                self._fs.rm(path, recursive=True)
        self._fs.makedirs(self._join("checkpoints"), exist_ok=True)
        self._group_handle = None
        self._handles.clear()

        def reset(manifest: dict[str, Any]) -> None:
            manifest.update({
                schema.RUN_ID: new_run_id(), schema.FINGERPRINTS: {}, schema.MODEL: None, schema.PROJECTION: None,
                schema.RECORDS: {}, schema.CHECKPOINTS: {},
            })
            manifest.pop(schema.SWEEP, None)

        self.update_manifest(reset)
        return cleared

    # ------------------------------------------------------------------ summary
    def summary(self) -> str:
        """A few readable lines: what was recorded, its shape and completeness."""
        self.flush()
        m = self.manifest
        lines = [f"RunStore {self.path} (schema {m[schema.SCHEMA_VERSION]}, run {m.get(schema.RUN_NAME)})"]
        for split, fp in sorted(m[schema.FINGERPRINTS].items()):
            lines.append(f"  dataset {split}: {fp[schema.FINGERPRINT_SIZE]} examples")
        for name in self.array_names():
            layout = self.layout(name)
            state = "complete" if self.is_complete(name) else "INCOMPLETE"
            lines.append(f"  {name}: {layout.shape} {layout.dtype} [{state}]")
        tags = self.checkpoint_tags()
        if tags:
            lines.append(f"  checkpoints: {len(tags)} ({', '.join(tags[:4])}{', ...' if len(tags) > 4 else ''})")
        return "\n".join(lines)


def fingerprint_of(store: RunStore, split: str) -> dict[str, Any] | None:
    """The fingerprint of ``split`` recorded in ``store`` (None when it has none)."""
    return store.manifest[schema.FINGERPRINTS].get(split)


def check_same_dataset(
    entries: Sequence[tuple[str, Mapping[str, Any] | None]],
    role: str,
    why: str = "scores are averaged and compared only over runs of the same dataset: pass stores recorded on one dataset",
) -> dict[str, Any] | None:
    """Check that every ``(where, fingerprint)`` describes one dataset (its ``role``, e.g. "train
    split 'train'"); return the fingerprint. Raises :class:`FingerprintMismatchError` naming both
    places and ending with ``why`` (what the caller needs one dataset for) when two differ, and
    :class:`StoreError` when several are given and one has none (nothing could be checked)."""
    known = [(where, dict(fp)) for where, fp in entries if fp is not None]
    missing = [where for where, fp in entries if fp is None]
    if len(entries) > 1 and missing:
        other = next(where for where, _ in entries if where != missing[0])
        raise StoreError(
            f"cannot check that {missing[0]} holds the same {role} as {other}: it records no dataset "
            "fingerprint for it (the recorders and SubsetSweep write one); record it again with them"
        )
    for where, fp in known[1:]:
        if fp != known[0][1]:
            first, reference = known[0]
            raise FingerprintMismatchError(
                f"{first} and {where} were recorded on different datasets for the {role} (sizes "
                f"{reference.get(schema.FINGERPRINT_SIZE)} and {fp.get(schema.FINGERPRINT_SIZE)}, labels sha256 "
                f"{str(reference.get(schema.FINGERPRINT_LABELS))[:12]}... and {str(fp.get(schema.FINGERPRINT_LABELS))[:12]}...); {why}"
            )
    return known[0][1] if known else None


def check_stores_share_datasets(stores: Sequence[RunStore], splits: Sequence[str], why: str) -> dict[str, dict[str, Any]]:
    """Raise unless every store recorded each of ``splits`` on one dataset (equal fingerprints);
    return each split's fingerprint. The one check behind every analysis that reads several
    stores: a store without the split raises :class:`StoreError` listing the splits it has, two
    that differ raise :class:`FingerprintMismatchError` naming both and ending with ``why``."""
    if not stores:
        raise ValueError("no stores given: pass at least one RunStore")
    found: dict[str, dict[str, Any]] = {}
    for split in splits:
        recorded = [(store, fingerprint_of(store, split)) for store in stores]
        for store, fp in recorded:
            if fp is None:
                raise StoreError(
                    f"the RunStore at {store.path} has no {split!r} dataset recorded (it has "
                    f"{sorted(store.manifest[schema.FINGERPRINTS])}); record that split or pass the split names it has"
                )
        fingerprint = check_same_dataset([(f"the RunStore at {s.path}", fp) for s, fp in recorded], f"{split!r} split", why)
        assert fingerprint is not None  # every store has one, checked above
        found[split] = fingerprint
    return found
