"""Output storage through fsspec: a local folder by default, S3 (s3fs) or another fsspec URL
when set.

Writes are atomic: on a local folder a file goes up under a temporary name and is moved into
place, so a reader never sees half a video; on S3 an object only appears once its upload
(single or multipart) completes, so it is written in place (a copy + delete would double the
traffic). Every stored file's sha256 is computed on the way in; it is recorded and checked
again only by the integrity sweep (farm/jobs/integrity.py), never per download.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timedelta, timezone
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


def s3_options(settings) -> dict:
    """s3fs arguments from FARM_S3_*; listings are never cached (another process writes)."""
    options = {"use_listings_cache": False,
               "client_kwargs": {"region_name": settings.s3_region}}
    if settings.s3_endpoint_url:
        options["endpoint_url"] = settings.s3_endpoint_url
    if settings.s3_key:
        options["key"] = settings.s3_key
        options["secret"] = settings.s3_secret.get_secret_value()
    return options


class Storage:
    """``options``: fsspec arguments; for s3:// URLs FARM_S3_* when not given.
    ``part_bytes``: on S3, files of at least two parts go up as a multipart upload in parts
    of this size (s3fs's rule; FARM_S3_PART_BYTES when not given)."""

    def __init__(self, url: str, options: dict | None = None, part_bytes: int | None = None):
        self.url = url.rstrip("/")
        self.is_s3 = self.url.startswith(("s3://", "s3a://"))
        if self.is_s3 and (options is None or part_bytes is None):
            from farm.settings import get_settings

            settings = get_settings()
            options = s3_options(settings) if options is None else options
            part_bytes = part_bytes or settings.s3_part_bytes
        self.part_bytes = part_bytes or 32 * 1024**2
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(options or {}))
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
        if self.is_s3:
            # s3fs: one PUT below 2 x chunksize (multipart_threshold), else parts of chunksize.
            self.fs.put_file(str(local), full, chunksize=self.part_bytes)
            return digest, size
        self.fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
        temp = f"{full}.part-{uuid.uuid4().hex[:8]}"
        self.fs.put_file(str(local), temp)
        self.fs.mv(temp, full)
        return digest, size

    @property
    def multipart_threshold(self) -> int:
        """Bytes from which a file goes up to S3 as a multipart upload."""
        return 2 * self.part_bytes

    def get_file(self, key: str, local: str | Path) -> Path:
        self.fs.get_file(self._full(key), str(local))
        return Path(local)

    def remove(self, key: str) -> None:
        if self.exists(key):
            self.fs.rm(self._full(key))

    def remove_many(self, keys: list[str]) -> None:
        """Remove files (one batched request on S3); missing ones are no error."""
        present = [self._full(k) for k in keys if self.exists(k)]
        if present:
            self.fs.rm(present)

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._full(key))

    def list_keys(self, prefix: str = "") -> list[str]:
        """Every file's key under ``prefix`` (a folder), recursively."""
        base = self._full(prefix).rstrip("/") if prefix else self.root
        if not self.fs.exists(base):
            return []
        start = len(self.root.rstrip("/")) + 1
        found = self.fs.find(base, detail=True)  # an S3 server may list empty "folders"
        return sorted(path[start:] for path, info in found.items() if info["type"] == "file")

    def local_path(self, key: str) -> Path | None:
        """The file's path when storage is a local folder, else None."""
        return Path(self._full(key)) if self.is_local else None

    def signed_url(self, key: str, expires_s: int) -> tuple[str, datetime]:
        """A URL anyone holding it may GET the file from for ``expires_s`` seconds (S3 only),
        and when it stops working."""
        if not self.is_s3:
            raise ValueError(f"{self.url} is not S3: its files have no signed URLs")
        url = self.fs.sign(self._full(key), expiration=expires_s)
        return url, datetime.now(timezone.utc) + timedelta(seconds=expires_s)

    def open(self, key: str):
        return self.fs.open(self._full(key), "rb")

    def sha256(self, key: str) -> str:
        with self.open(key) as fh:
            return _sha256_stream(fh)
