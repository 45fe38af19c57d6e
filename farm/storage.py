"""Output storage through fsspec: a local folder by default, S3 or another fsspec URL when set.

Writes are atomic: a file goes up under a temporary name and is moved into place, so a
reader never sees half a video. Every stored file's sha256 is computed on the way in.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import fsspec


def _sha256_stream(fh) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: fh.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def sha256_of(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return _sha256_stream(fh)


class Storage:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple)
                                   else (self.fs.protocol,))
        if self.is_local:
            self.fs.makedirs(self.root, exist_ok=True)

    def _full(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"storage key must be relative without '..', got {key!r}")
        return f"{self.root}/{key}"

    def put_file(self, local: str | Path, key: str) -> tuple[str, int]:
        """Upload atomically; returns (sha256, bytes)."""
        digest, size = sha256_of(local), Path(local).stat().st_size
        full = self._full(key)
        self.fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
        temp = f"{full}.part-{uuid.uuid4().hex[:8]}"
        self.fs.put_file(str(local), temp)
        self.fs.mv(temp, full)
        return digest, size

    def get_file(self, key: str, local: str | Path) -> Path:
        self.fs.get_file(self._full(key), str(local))
        return Path(local)

    def remove(self, key: str) -> None:
        if self.exists(key):
            self.fs.rm(self._full(key))

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._full(key))

    def local_path(self, key: str) -> Path | None:
        """The file's path when storage is a local folder, else None."""
        return Path(self._full(key)) if self.is_local else None

    def open(self, key: str):
        return self.fs.open(self._full(key), "rb")

    def sha256(self, key: str) -> str:
        with self.open(key) as fh:
            return _sha256_stream(fh)
