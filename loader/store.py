"""Model storage under ``<data_dir>/models/``: aligned data files and an LMDB index.

Ingest writes the data file first (every tensor on a 4 KiB boundary, per-tensor
xxh3_64, and the xxh3_64 of every 4 MiB chunk of the file for fast verified loads),
fsyncs it, then registers the manifest in one LMDB transaction.  Any failure before
that commit deletes the data file: a model is either fully registered or not at all.  LMDB is safe across processes, so ``kvstore models add`` may run while the
daemon serves; the daemon reads manifests on demand.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import threading
import time
import uuid
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import xxhash

from kvstore.lmdb_space import reserve_lock_file
from loader.errors import ModelExistsError, ModelFormatError, ModelNotFoundError, ModelStoreError
from loader.manifest import ALIGN, CHUNK_BYTES, ChunkSums, Manifest, TensorEntry, align_up
from loader.paths import user_path
from loader.safetensors_format import SafetensorsFile, parse_file

INDEX_JSON = "model.safetensors.index.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,199}$")
_COPY_CHUNK = 8 << 20
_KEY_PREFIX = b"model:"

_envs: dict[str, tuple[lmdb.Environment, int]] = {}
_envs_lock = threading.Lock()


def _open_env(path: Path) -> lmdb.Environment:
    """One LMDB environment per path per process (LMDB forbids opening it twice)."""
    key = str(path.resolve())
    with _envs_lock:
        env, refs = _envs.get(key, (None, 0))
        if env is None:
            try:
                path.mkdir(parents=True, exist_ok=True)
                reserve_lock_file(path)  # a full disk: an error here, not SIGBUS in LMDB
                env = lmdb.open(key, map_size=1 << 30, max_dbs=0, subdir=True)
            except (OSError, lmdb.Error) as exc:
                raise ModelStoreError(
                    f"cannot open the model store's index in {path}: {exc}"
                ) from exc
        _envs[key] = (env, refs + 1)
        return env


def _close_env(path: Path) -> None:
    key = str(path.resolve())
    with _envs_lock:
        env, refs = _envs.get(key, (None, 0))
        if env is None:
            return
        if refs <= 1:
            del _envs[key]
            env.close()
        else:
            _envs[key] = (env, refs - 1)


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ModelFormatError(
            f"invalid model name {name!r}: use letters, digits and . _ : @ + / - "
            "(starting with a letter or digit, at most 200 characters)"
        )
    return name


def resolve_sources(path: str | os.PathLike[str]) -> list[SafetensorsFile]:
    """Parses the safetensors file(s) named by ``path``.

    ``path`` is one ``.safetensors`` file, a folder of shards, or a
    ``model.safetensors.index.json``.  Every header is validated; tensor names must be
    unique across shards.

    Raises:
        ModelFormatError: unreadable or invalid input (the message says which file).
    """
    p = user_path(path)
    if not p.exists():
        raise ModelFormatError(f"{p}: no such file or folder")
    if p.is_dir():
        index = p / INDEX_JSON
        if index.exists():
            return _from_index(index)
        shards = sorted(p.glob("*.safetensors"))
        if not shards:
            raise ModelFormatError(f"{p}: folder holds no *.safetensors file")
        files = [parse_file(s) for s in shards]
    elif p.name.endswith(".json"):
        return _from_index(p)
    else:
        files = [parse_file(p)]
    _check_unique(files)
    return files


def _check_unique(files: list[SafetensorsFile]) -> None:
    seen: dict[str, Path] = {}
    for f in files:
        for t in f.tensors:
            if t.name in seen:
                raise ModelFormatError(
                    f"tensor {t.name!r} appears in both {seen[t.name]} and {f.path}"
                )
            seen[t.name] = f.path


def _from_index(index: Path) -> list[SafetensorsFile]:
    try:
        doc = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{index}: not a readable JSON index: {exc}") from None
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise ModelFormatError(f"{index}: no 'weight_map' object")
    shards = sorted(set(wmap.values()))
    for s in shards:
        if not isinstance(s, str) or "/" in s or s in (".", ".."):
            raise ModelFormatError(f"{index}: bad shard file name {s!r}")
    files = [parse_file(index.parent / s) for s in shards]
    _check_unique(files)
    where = {t.name: f.path.name for f in files for t in f.tensors}
    for name, shard in wmap.items():
        if where.get(name) != shard:
            raise ModelFormatError(
                f"{index}: weight_map puts {name!r} in {shard} but it is "
                + (f"in {where[name]}" if name in where else "in no shard")
            )
    extra = sorted(set(where) - set(wmap))
    if extra:
        raise ModelFormatError(f"{index}: tensors not in the weight_map: {', '.join(extra[:5])}")
    return files


class ModelStore:
    """The on-disk model store of one data directory.

    Args:
        data_dir: the daemon's data directory; models live in ``data_dir/models``.
        chunk_bytes: size of the checksummed chunks recorded for models added from now
            on (a multiple of 4 KiB; loads verify per chunk when their read size is a
            multiple of it).
    """

    def __init__(self, data_dir: str | os.PathLike[str], chunk_bytes: int = CHUNK_BYTES) -> None:
        if chunk_bytes < ALIGN or chunk_bytes % ALIGN:
            raise ValueError(f"chunk_bytes must be a multiple of {ALIGN}, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self._parsed: dict[str, tuple[bytes, Manifest]] = {}  # see get()
        self.root = user_path(data_dir) / "models"
        self.data_dir = self.root / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._index_path = self.root / "index.lmdb"
        self._env: lmdb.Environment | None = _open_env(self._index_path)
        self._remove_dead_partials()

    # ------------------------------------------------------------------ queries
    @property
    def env(self) -> lmdb.Environment:
        if self._env is None:
            raise ModelStoreError("model store is closed")
        return self._env

    def get(self, name: str) -> Manifest:
        """The manifest of ``name``.  Raises ModelNotFoundError."""
        manifest = self.find(name)
        if manifest is None:
            known = ", ".join(m.name for m in self.list_models()) or "none"
            raise ModelNotFoundError(f"no model named {name!r} (registered: {known})")
        return manifest

    def find(self, name: str) -> Manifest | None:
        """The manifest of ``name``, or None when no model of that name is registered."""
        with self.env.begin() as txn:
            raw = txn.get(_KEY_PREFIX + name.encode())
        if raw is None:
            self._parsed.pop(name, None)
            return None
        # The daemon asks on every load and swap; a large model's manifest takes
        # milliseconds to parse, so the last parse is kept while the stored bytes
        # are the same (another process may remove and add the name meanwhile).
        hit = self._parsed.get(name)
        if hit is not None and hit[0] == raw:
            return hit[1]
        manifest = Manifest.from_json(raw)
        self._parsed[name] = (raw, manifest)
        return manifest

    def list_models(self) -> list[Manifest]:
        with self.env.begin() as txn:
            return [Manifest.from_json(v) for _, v in self._iter(txn)]

    def _iter(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, bytes]]:
        cur = txn.cursor()
        if not cur.set_range(_KEY_PREFIX):
            return
        for k, v in cur:
            if not bytes(k).startswith(_KEY_PREFIX):
                break
            yield bytes(k), bytes(v)

    def data_path(self, manifest: Manifest) -> Path:
        return self.data_dir / manifest.data_file

    # ------------------------------------------------------------------ ingest
    def add(
        self,
        name: str,
        source: str | os.PathLike[str] | list[SafetensorsFile],
        progress: Callable[[int], None] | None = None,
        label: str | None = None,
    ) -> Manifest:
        """Ingests safetensors into the store, all or nothing.

        Args:
            name: the model's name (must not be registered yet).
            source: a path (see :func:`resolve_sources`) or already parsed files.
            progress: called with the number of bytes copied after each chunk.
            label: what ``models ls`` shows as the source (default: the path, or for
                parsed files the one file or the folder of the shards).

        Raises:
            ModelFormatError: invalid input; ModelExistsError: the name is taken;
            ModelStoreError: I/O failure (nothing is left behind in any case).
        """
        check_name(name)
        self.check_absent(name)
        files = source if isinstance(source, list) else resolve_sources(source)
        _check_unique(files)
        total = sum(align_up(t.nbytes) for f in files for t in f.tensors) or ALIGN
        free = shutil.disk_usage(self.data_dir).free
        if total + (64 << 20) > free:
            raise ModelStoreError(
                f"not enough disk space for {name!r}: needs {total} bytes, {free} free "
                f"in {self.data_dir}"
            )
        uid = uuid.uuid4().hex
        final = self.data_dir / f"{uid}.bin"
        partial = self.data_dir / f"{uid}.pid{os.getpid()}.partial"
        try:
            entries, chunks = self._write_data(partial, files, total, progress)
            os.rename(partial, final)
            _fsync_dir(self.data_dir)
            if label is not None:
                src = label
            elif not isinstance(source, list):
                src = str(source)
            else:
                src = str(files[0].path if len(files) == 1 else files[0].path.parent)
            manifest = Manifest(
                name=name,
                uid=uid,
                data_file=final.name,
                nbytes=total,
                tensors=tuple(entries),
                created=time.time(),
                source=src,
                metadata={k: v for f in files for k, v in f.metadata.items()},
                chunks=chunks,
            )
            with self.env.begin(write=True) as txn:
                if not txn.put(_KEY_PREFIX + name.encode(), manifest.to_json(), overwrite=False):
                    raise ModelExistsError(f"a model named {name!r} is already registered")
            return manifest
        except BaseException:
            # All or nothing: whatever stopped us (bad bytes, full disk, ^C), the data
            # file goes and the index was never touched.
            for p in (partial, final):
                p.unlink(missing_ok=True)
            raise

    def check_absent(self, name: str) -> None:
        with self.env.begin() as txn:
            if txn.get(_KEY_PREFIX + name.encode()) is not None:
                raise ModelExistsError(
                    f"a model named {name!r} is already registered (remove it first: "
                    f"kvstore models rm {name})"
                )

    def _write_data(
        self,
        dest: Path,
        files: list[SafetensorsFile],
        total: int,
        progress: Callable[[int], None] | None,
    ) -> tuple[list[TensorEntry], ChunkSums]:
        entries: list[TensorEntry] = []
        chunker = _ChunkHasher(self.chunk_bytes)
        buf = bytearray(_COPY_CHUNK)
        mv = memoryview(buf)
        try:
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise ModelStoreError(f"cannot create {dest}: {exc.strerror}") from None
        try:
            cursor = 0
            for f in files:
                try:
                    src = os.open(f.path, os.O_RDONLY)
                except OSError as exc:
                    raise ModelFormatError(f"{f.path}: cannot open: {exc.strerror}") from None
                try:
                    if os.fstat(src).st_size != f.file_size:
                        raise ModelFormatError(f"{f.path}: changed size while being ingested")
                    for t in f.tensors:
                        h = xxhash.xxh3_64()
                        done = 0
                        while done < t.nbytes:
                            n = os.preadv(
                                src, [mv[: min(_COPY_CHUNK, t.nbytes - done)]], t.begin + done
                            )
                            if n <= 0:
                                raise ModelFormatError(f"{f.path}: truncated in tensor {t.name!r}")
                            h.update(mv[:n])
                            chunker.update(mv[:n])
                            _pwrite_all(out, mv[:n], cursor + done)
                            done += n
                            if progress is not None:
                                progress(n)
                        entries.append(
                            TensorEntry(t.name, t.dtype, t.shape, cursor, t.nbytes, h.intdigest())
                        )
                        end = cursor + t.nbytes
                        cursor = align_up(end)
                        chunker.zeros(cursor - end)  # the padding, as the file reads back
                finally:
                    os.close(src)
            chunker.zeros(total - cursor)
            os.ftruncate(out, total)
            os.fsync(out)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ModelStoreError(f"disk full while writing {dest}") from None
            raise ModelStoreError(f"writing {dest}: {exc.strerror}") from None
        finally:
            os.close(out)
        return entries, chunker.finish()

    # ------------------------------------------------------------------ removal
    def remove(self, name: str) -> Manifest:
        """Unregisters ``name`` and deletes its data file.  Raises ModelNotFoundError.

        A daemon that holds the model resident keeps its copy, unchanged, while
        clients pin it (the copy is in memory; an open read keeps the unlinked file
        alive), and frees it when the last pin goes; new loads of ``name`` fail.
        """
        with self.env.begin(write=True) as txn:
            raw = txn.pop(_KEY_PREFIX + name.encode())
        self._parsed.pop(name, None)
        if raw is None:
            raise ModelNotFoundError(f"no model named {name!r}")
        manifest = Manifest.from_json(raw)
        self.data_path(manifest).unlink(missing_ok=True)
        return manifest

    def _remove_dead_partials(self) -> None:
        """Deletes partial data files whose writer process is gone (killed mid-ingest)."""
        for p in self.data_dir.glob("*.partial"):
            m = re.search(r"\.pid(\d+)\.partial$", p.name)
            if m and not _pid_alive(int(m.group(1))):
                p.unlink(missing_ok=True)

    def close(self) -> None:
        if self._env is not None:
            self._env = None
            _close_env(self._index_path)

    def __enter__(self) -> ModelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ChunkHasher:
    """xxh3_64 of every ``size``-byte chunk of a stream fed in order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.h = xxhash.xxh3_64()
        self.fill = 0
        self.sums: list[int] = []

    def update(self, data: memoryview | bytes) -> None:
        while len(data):
            take = min(self.size - self.fill, len(data))
            self.h.update(data[:take])
            data = data[take:]
            self.fill += take
            if self.fill == self.size:
                self.sums.append(self.h.intdigest())
                self.h.reset()
                self.fill = 0

    def zeros(self, n: int) -> None:
        while n > 0:
            k = min(n, len(_ZEROS))
            self.update(_ZEROS[:k])
            n -= k

    def finish(self) -> ChunkSums:
        if self.fill:
            self.sums.append(self.h.intdigest())
        return ChunkSums(self.size, array("Q", self.sums))


_ZEROS = bytes(ALIGN)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
