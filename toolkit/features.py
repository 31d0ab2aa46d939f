"""The encoder's feature cache on disk, and lazy views of it.

`FeatureCache` is append-only float16 rows with a key index, read
memory-mapped and safe against crashes and full disks; `FeatureView` reads
rows of it only when indexed, so a split (or a folder's grids) bigger than
memory still trains and captions. Keys are `image_key`: a digest of the
image's bytes, so renames and copies hit the cache.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

from toolkit.errors import CapkitError

FEATURES_FILE = "features.f16"
FEATURES_INDEX_FILE = "features.idx"


class CacheWriteError(CapkitError):
    """The feature cache could not be written; `errno` says why (ENOSPC, EACCES, ...)."""

    def __init__(self, message: str, hint: str | None = None, error_number: int | None = None):
        super().__init__(message, hint)
        self.errno = error_number


def image_key(data: bytes) -> str:
    """Cache key of an image: its content, not its name (renames and copies still hit)."""
    return hashlib.sha256(data).hexdigest()[:32]


class FeatureCache:
    """Append-only float16 feature rows with a key index, read memory-mapped.

    Rows are written first and their keys after, both flushed to disk, so a
    crash or a full disk leaves at worst rows without keys or a cut-off key
    line; a failed writer cuts both files back, and every writer first cuts
    them to the rows that have keys. `get` returns float32 rows divided by `scale`.
    """

    def __init__(self, root: Path, dim: int, scale: float = 1.0):
        self.root, self.dim, self.scale = Path(root), dim, scale
        self.rows = self.root / FEATURES_FILE
        self.index = self.root / FEATURES_INDEX_FILE
        self._keys: dict[str, int] = {}
        self._mmap = None
        self.refresh()

    def refresh(self) -> None:
        keys: list[str] = []
        if self.index.exists():
            # One char per byte (ascii, errors replaced), so lengths below are byte offsets.
            text = self.index.read_text(encoding="ascii", errors="replace")
            keys = text.split("\n")[:-1]  # a last line without "\n" was cut short
        n_rows = self.rows.stat().st_size // (2 * self.dim) if self.rows.exists() else 0
        keys = keys[:n_rows]
        self._keys = {k: i for i, k in enumerate(keys)}
        self._n = len(keys)
        self._index_bytes = sum(len(k) + 1 for k in keys)
        self._mmap = None

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return self._n

    def get(self, keys: list[str]) -> np.ndarray:
        if self._mmap is None and self._n:
            self._mmap = np.memmap(self.rows, dtype=np.float16, mode="r", shape=(self._n, self.dim))
        idx = [self._keys[k] for k in keys]
        if not idx:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self._mmap[idx], dtype=np.float32) / self.scale

    def add(self, keys: list[str], feats: np.ndarray) -> None:
        import fcntl

        rows = np.asarray(feats * self.scale, dtype=np.float16)
        if not np.isfinite(rows).all():
            raise CapkitError("encoder features overflow float16; the encoder's feature scale is wrong")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # several processes may extract into one cache
                self.refresh()
                n_rows, n_index = self._n * 2 * self.dim, self._index_bytes
                try:
                    # Each write first cuts its file to the keyed rows: what a crashed writer left goes.
                    _append(self.rows, rows.tobytes(), n_rows)
                    _append(self.index, "".join(k + "\n" for k in keys).encode("ascii"), n_index)
                except BaseException:  # a full disk or Ctrl-C mid-write: back to the last whole state
                    for path, size in ((self.index, n_index), (self.rows, n_rows)):
                        try:
                            os.truncate(path, size)
                        except OSError:
                            pass  # the next writer cuts it
                    raise
                finally:
                    self.refresh()
        except OSError as e:
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise CacheWriteError(
                f"{self.root}: cannot write features ({e.strerror or e}); the {self._n} already cached are kept",
                hint="free some disk space and run the same command again; it resumes" if full
                else "run the same command again once the folder is writable; it resumes",
                error_number=e.errno,
            ) from None


def _append(path: Path, data: bytes, keep: int) -> None:
    """Cut `path` to `keep` bytes, append `data` and flush it to disk."""
    with open(path, "ab") as f:
        f.truncate(keep)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class FeatureView:
    """Features of some images, read from the cache's memory map only when indexed.

    `view[[3, 0, 7]]` (or `view[0:64]`) gives those rows as float32; nothing
    is loaded up front, so a train split whose features exceed RAM (COCO's
    grids) still trains, and a search over a big folder holds one chunk of
    grids at a time. `decoder.train_decoder` and
    `generate.beam_search_batched` accept it wherever they take an array.
    """

    def __init__(self, read: Callable[[list[str]], np.ndarray], keys: list[str], row_shape: tuple[int, ...]):
        self.keys = list(keys)
        self._read = read
        self.shape = (len(self.keys), *row_shape)
        self.dtype = np.dtype(np.float32)
        self.nbytes = int(np.prod(self.shape)) * 4

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        return self._read([self.keys[i] for i in idx]).reshape(len(idx), *self.shape[1:])

    def chunks(self, size: int = 512):
        """Consecutive blocks of rows, for statistics over all of them."""
        for i in range(0, len(self), size):
            yield self[np.arange(i, min(i + size, len(self)))]
