"""Result stores that outlive the process: `FileResultStore` (`--results file://DIR`, one host)
and `S3ResultStore` (`--results s3://BUCKET/PREFIX`, any S3-compatible store several hosts share).

Both keep an image `ttl_s` after it was stored. The expiry time travels with the object (file
mtime, S3 object metadata) and is checked on every read, so an expired image reads as absent at
once; the disk is reclaimed by a sweep (files) or a bucket lifecycle rule (S3, whole days).
Every blocking call runs in a thread (`asyncio.to_thread`), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import botocore.exceptions
from botocore.config import Config

from .protocol import BackendUnavailable

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

# Job ids are URL-safe tokens; anything else never reaches a path or an object key.
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_EXPIRES = "expires-at"  # S3 user metadata: unix time after which the object reads as absent
_TMP_PREFIX = ".batchserve-tmp-"
# What this server writes into a result directory: images and input pixels under job ids
# (`job_` + 22 URL-safe characters, `-input` for the inputs) and its temporary files. The
# sweep deletes nothing else: `--results file:///srv` must not touch the rest of /srv.
_OWN_FILE = re.compile(r"job_[A-Za-z0-9_-]{22}(?:-input)?|" + re.escape(_TMP_PREFIX) + r"\w+")
_OLD_RULE_ID = "batchserve-expire-all"  # an earlier version's rule for an empty prefix


def _safe(job_id: str) -> bool:
    return _SAFE_ID.fullmatch(job_id) is not None


class FileResultStore:
    """One file per image in `directory` (written to a temporary name, then renamed, so a
    reader never sees half an image). The file's mtime is when it was stored."""

    def __init__(self, directory: Path, *, ttl_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._dir = Path(directory)
        self._ttl_s = ttl_s
        self._clock = clock
        self._last_sweep = -math.inf

    async def put(self, job_id: str, data: bytes, media_type: str) -> None:
        if not _safe(job_id):
            raise ValueError(f"unsafe job id {job_id!r}")
        await self._run(self._put, job_id, data)

    async def get(self, job_id: str) -> bytes | None:
        return await self._run(self._get, job_id) if _safe(job_id) else None

    async def delete(self, job_id: str) -> None:
        if _safe(job_id):
            await self._run(self._unlink, self._dir / job_id)

    async def presigned_url(self, job_id: str, expires_s: int) -> str | None:
        return None

    async def ping(self) -> None:
        await self._run(self._check_writable)

    async def close(self) -> None:
        return None

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as exc:
            raise BackendUnavailable(f"result directory {self._dir}: {exc}") from exc

    def _put(self, job_id: str, data: bytes) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=_TMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            now = self._clock()
            os.utime(tmp, (now, now))
            os.replace(tmp, self._dir / job_id)
        except BaseException:
            self._unlink(Path(tmp))
            raise
        if self._clock() - self._last_sweep > self._ttl_s / 10:
            self._sweep()

    def _get(self, job_id: str) -> bytes | None:
        path = self._dir / job_id
        try:
            if self._expired(path.stat().st_mtime):
                self._unlink(path)
                return None
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def _expired(self, stored_at: float) -> bool:
        return self._clock() - stored_at >= self._ttl_s

    def _sweep(self) -> None:
        """Deletes expired images nobody read (reads delete the ones they find expired): only
        files with this server's names (`_OWN_FILE`), whatever else shares the directory."""
        self._last_sweep = self._clock()
        for entry in os.scandir(self._dir):
            if not _OWN_FILE.fullmatch(entry.name):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file(follow_symlinks=False) and self._expired(entry.stat().st_mtime):
                    self._unlink(Path(entry.path))

    def _check_writable(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        if not os.access(self._dir, os.W_OK):
            raise PermissionError(f"{self._dir} is not writable")

    @staticmethod
    def _unlink(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class S3ResultStore:
    """Images as objects `PREFIX/JOB_ID` in `bucket` (created at the first call if missing).

    Credentials come the standard boto3 way (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY env
    vars, a profile, an instance role); `endpoint_url` points at MinIO, SeaweedFS, Ceph...
    Expiry: each object carries `x-amz-meta-expires-at`, checked on every read; and, with a
    prefix, the bucket gets a lifecycle rule on `PREFIX/` expiring objects after ceil(ttl in
    days) so storage is reclaimed without us (skipped with a log line where the store refuses
    lifecycle rules). Without a prefix no rule is installed (one would expire the whole bucket,
    objects we never wrote included) and an earlier version's whole-bucket rule is removed.
    """

    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None, ttl_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self._ttl_s = ttl_s
        self._clock = clock
        config = Config(
            connect_timeout=3, read_timeout=20, retries={"max_attempts": 3, "mode": "standard"},
            # Path-style addressing: S3-compatible stores rarely have wildcard DNS for buckets.
            s3={"addressing_style": "path" if endpoint_url else "auto"})
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self._s3: S3Client = boto3.client("s3", endpoint_url=endpoint_url, config=config,
                                          region_name=region or "us-east-1")
        self._ready = False
        self._ready_lock = threading.Lock()

    async def put(self, job_id: str, data: bytes, media_type: str) -> None:
        if not _safe(job_id):
            raise ValueError(f"unsafe job id {job_id!r}")
        expires = f"{self._clock() + self._ttl_s:.3f}"
        await self._run(lambda: self._s3.put_object(
            Bucket=self._bucket, Key=self._key(job_id), Body=data, ContentType=media_type,
            Metadata={_EXPIRES: expires}))

    async def get(self, job_id: str) -> bytes | None:
        if not _safe(job_id):
            return None

        def read() -> bytes | None:
            with _absent_is_none():
                obj = self._s3.get_object(Bucket=self._bucket, Key=self._key(job_id))
                with obj["Body"] as body:
                    data = body.read()
                if self._expired(obj.get("Metadata", {})):
                    self._s3.delete_object(Bucket=self._bucket, Key=self._key(job_id))
                    return None
                return data
            return None

        result: bytes | None = await self._run(read)
        return result

    async def delete(self, job_id: str) -> None:
        if _safe(job_id):
            await self._run(lambda: self._s3.delete_object(Bucket=self._bucket,
                                                           Key=self._key(job_id)))

    async def presigned_url(self, job_id: str, expires_s: int) -> str | None:
        """A GET URL valid for `expires_s` (never past the image's own expiry), or None when
        the image is absent or expired. Signing is local; the HEAD makes sure it exists."""
        if not _safe(job_id):
            return None

        def sign() -> str | None:
            with _absent_is_none():
                head = self._s3.head_object(Bucket=self._bucket, Key=self._key(job_id))
                left = _expires_at(head.get("Metadata", {})) - self._clock()
                if left <= 0:
                    return None
                return self._s3.generate_presigned_url(
                    "get_object", Params={"Bucket": self._bucket, "Key": self._key(job_id)},
                    ExpiresIn=max(1, min(expires_s, int(left))))
            return None

        url: str | None = await self._run(sign)
        return url

    async def ping(self) -> None:
        await self._run(lambda: None)

    async def close(self) -> None:
        await asyncio.to_thread(self._s3.close)

    def _key(self, job_id: str) -> str:
        return f"{self._prefix}/{job_id}" if self._prefix else job_id

    def _expired(self, metadata: dict[str, str]) -> bool:
        return self._clock() >= _expires_at(metadata)

    async def _run(self, fn: Callable[[], Any]) -> Any:
        def call() -> Any:
            self._ensure_bucket()
            return fn()

        try:
            return await asyncio.to_thread(call)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise BackendUnavailable(f"result store s3://{self._bucket}: {exc}") from exc

    def _ensure_bucket(self) -> None:
        """Creates the bucket (and its lifecycle rule) once, at the first call."""
        if self._ready:
            return
        with self._ready_lock:
            if self._ready:
                return
            try:
                self._s3.head_bucket(Bucket=self._bucket)
            except botocore.exceptions.ClientError as exc:
                if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                with contextlib.suppress(self._s3.exceptions.BucketAlreadyOwnedByYou):
                    self._s3.create_bucket(Bucket=self._bucket)
                log.info("created bucket %s", self._bucket)
            self._add_lifecycle_rule()
            self._ready = True

    def _add_lifecycle_rule(self) -> None:
        days = max(1, math.ceil(self._ttl_s / 86400))
        rule_id = f"batchserve-expire-{self._prefix}" if self._prefix else None
        if rule_id is None:
            log.warning("bucket %s: no prefix in --results, so no lifecycle rule (it would "
                        "expire the whole bucket); expired images are only hidden. Use "
                        "s3://%s/PREFIX to have them reclaimed", self._bucket, self._bucket)
        try:
            try:
                rules = self._s3.get_bucket_lifecycle_configuration(Bucket=self._bucket)["Rules"]
            except botocore.exceptions.ClientError as exc:
                if _code(exc) != "NoSuchLifecycleConfiguration":
                    raise
                rules = []
            kept = [r for r in rules if r.get("ID") not in (rule_id, _OLD_RULE_ID)]
            if rule_id is not None:
                kept.append({"ID": rule_id, "Status": "Enabled", "Expiration": {"Days": days},
                             "Filter": {"Prefix": f"{self._prefix}/"}})
            if kept:
                self._s3.put_bucket_lifecycle_configuration(
                    Bucket=self._bucket, LifecycleConfiguration={"Rules": kept})
            elif rules:  # only the old whole-bucket rule was there
                self._s3.delete_bucket_lifecycle(Bucket=self._bucket)
        except botocore.exceptions.ClientError as exc:
            # Some stores (or a key without the permission) refuse it; reads still expire.
            log.warning("bucket %s: no lifecycle rule (%s); expired images are only hidden",
                        self._bucket, _code(exc))


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _expires_at(metadata: dict[str, str]) -> float:
    try:
        return float(metadata[_EXPIRES])
    except (KeyError, ValueError):
        return math.inf  # written by someone else: the lifecycle rule is its only expiry


@contextlib.contextmanager
def _absent_is_none() -> Iterator[None]:
    """Lets a missing object fall through to the caller's `return None`."""
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        if _code(exc) not in ("404", "NoSuchKey", "NotFound"):
            raise
