"""The S3 backend of the storage root (`s3://bucket/prefix`), through boto3.

Endpoint from `HERD_S3_ENDPOINT` or `AWS_ENDPOINT_URL`, credentials from the usual AWS chain.
Large files go up in multipart through boto3's transfer manager; transient errors are retried
with backoff by botocore's standard retry mode. Every failure that reaches the user names the
object and the reason, never a bare traceback.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, ConnectionClosedError, ConnectTimeoutError,
                                 EndpointConnectionError, NoCredentialsError, ReadTimeoutError)

from cluster.storage import NotFound, Storage, StorageError, check_key

_DENIED = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken",
           "ExpiredToken", "403", "AllAccessDisabled"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                    "RequestTimeout", "RequestTimeTooSkewed"}
_TRANSIENT_ERRORS = (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError)
_TRANSFER = TransferConfig(multipart_threshold=16 * 2**20, multipart_chunksize=16 * 2**20, max_concurrency=4)


class S3Storage(Storage):
    def __init__(self, url: str, fail_fast: bool = False):
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"storage root {url!r}: expected s3://bucket/prefix")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint = os.environ.get("HERD_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        self._local = threading.local()
        # A server answering requests (adapters) gives up in seconds and says the storage is down,
        # rather than riding out an outage for a minute while its caller waits.
        self.fail_fast = fail_fast

    @property
    def client(self):
        # boto3 clients are thread-safe but sessions are not; one client per thread is simplest.
        client = getattr(self._local, "client", None)
        if client is None:
            config = Config(s3={"addressing_style": "path"},
                            retries={"max_attempts": 2 if self.fail_fast else 3, "mode": "standard"},
                            connect_timeout=2 if self.fail_fast else 5, read_timeout=10 if self.fail_fast else 60)
            client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint, config=config,
                region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
            self._local.client = client
        return client

    def _key(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, e: Exception, key: str, action: str) -> StorageError:
        where = self.describe(key)
        if isinstance(e, NoCredentialsError):
            return StorageError(f"no AWS credentials to {action} {where}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        if isinstance(e, EndpointConnectionError):
            return StorageError(f"cannot reach the S3 endpoint {self.endpoint or 'AWS'} to {action} {where}; "
                                "check HERD_S3_ENDPOINT/AWS_ENDPOINT_URL")
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in _DENIED:
                return StorageError(f"access denied for {where} ({code}), "
                                    "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
            if code in _MISSING:
                return NotFound(f"{where}: not found")
            if code == "NoSuchBucket":
                return StorageError(f"bucket {self.bucket!r} does not exist (needed to {action} {where}); create it first")
            return StorageError(f"S3 error {code} while trying to {action} {where}: {e}")
        return StorageError(f"S3 failure while trying to {action} {where}: {e}")

    def _call(self, action: str, key: str, fn, *args, **kwargs):
        """Run one S3 call; ride out transient failures (outages, 5xx) with exponential backoff.

        botocore retries quickly on its own (3 attempts); on top of that Herd waits 0.5, 1, 2, 4 s
        between rounds (HERD_S3_RETRIES rounds, default 5), enough for a server restart or a
        short network blip, and then names the object and the reason.
        """
        rounds = 1 if self.fail_fast else max(1, int(os.environ.get("HERD_S3_RETRIES", "5")))
        for attempt in range(rounds):
            try:
                return fn(*args, **kwargs)
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                if code not in _TRANSIENT_CODES or attempt == rounds - 1:
                    raise self._error(e, key, action) from None
            except _TRANSIENT_ERRORS as e:
                if attempt == rounds - 1:
                    raise self._error(e, key, action) from None
            except BotoCoreError as e:
                raise self._error(e, key, action) from None
            time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    def read_bytes(self, key: str) -> bytes:
        resp = self._call("read", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return resp["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("write", key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        try:
            self._call("create", key, self._put_new, key, data)
            return True
        except _Taken:
            return False

    def _put_new(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise _Taken() from None
            raise

    def upload_file(self, local: str | Path, key: str) -> None:
        self._call("upload", key, self.client.upload_file, str(local), self.bucket, self._key(key), Config=_TRANSFER)

    def download_file(self, key: str, local: str | Path) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{local}.part")
        self._call("download", key, self.client.download_file, self.bucket, self._key(key), str(tmp), Config=_TRANSFER)
        tmp.replace(local)

    @contextlib.contextmanager
    def open_write(self, key: str, part_size: int = _TRANSFER.multipart_chunksize) -> Iterator[BinaryIO]:
        """Multipart upload in `part_size` parts as the caller writes (one part in memory at a
        time); a single PUT if it all fits in one part; aborted if the block raises."""
        writer = _MultipartWriter(self, key, part_size)
        try:
            yield writer
            writer.finish()
        except BaseException:
            writer.abort()
            raise

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        head = self._call("read", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        with io.BufferedReader(_RangeReader(self, key, head["ContentLength"]), buffer_size=1 << 20) as f:
            yield f

    def exists(self, key: str) -> bool:
        try:
            self._call("check", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
            return True
        except NotFound:
            return bool(self.list_keys(key))  # a "folder"

    def modified(self, key: str) -> float | None:
        try:
            head = self._call("check", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except NotFound:
            return None
        return head["LastModified"].timestamp()

    def _list(self, prefix: str, delimiter: bool) -> tuple[str, list[dict]]:
        base = self._key(prefix) + "/" if prefix not in ("", "/") else (self.prefix + "/" if self.prefix else "")
        kwargs = {"Bucket": self.bucket, "Prefix": base}
        if delimiter:
            kwargs["Delimiter"] = "/"
        pages = self.client.get_paginator("list_objects_v2").paginate(**kwargs)
        return base, self._call("list", prefix or "", list, pages)

    def list_keys(self, prefix: str) -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        _, pages = self._list(prefix, False)
        return sorted(obj["Key"][strip:] for page in pages for obj in page.get("Contents", []))

    def list_children(self, prefix: str) -> list[str]:
        names = set()
        base, pages = self._list(prefix, True)
        for page in pages:
            names.update(o["Key"][len(base):] for o in page.get("Contents", []))
            names.update(p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", []))
        return sorted(n for n in names if n)

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        keys = [self._key(k) for k in self.list_keys(prefix)]
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
            self._call("delete", prefix, self.client.delete_objects, Bucket=self.bucket, Delete=batch)

    def local_path(self, prefix: str) -> Path | None:
        return None


class _MultipartWriter(io.RawIOBase):
    """The write side of `S3Storage.open_write`: buffers at most one part, uploads it when full."""

    def __init__(self, s3: S3Storage, key: str, part_size: int):
        super().__init__()
        self.s3, self.key, self.part_size = s3, key, max(part_size, 5 * 2**20)  # S3's smallest part
        self.buf = bytearray()
        self.parts: list[dict] = []
        self.upload_id: str | None = None
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n, pos = len(view), 0
        while pos < n:
            take = min(n - pos, self.part_size - len(self.buf))
            self.buf += view[pos:pos + take]
            pos += take
            if len(self.buf) >= self.part_size:
                self._upload_part()
        self.written += n
        return n

    def tell(self) -> int:
        return self.written

    def _upload_part(self) -> None:
        s3, key = self.s3, self.s3._key(self.key)
        if self.upload_id is None:
            self.upload_id = s3._call("upload", self.key, s3.client.create_multipart_upload,
                                      Bucket=s3.bucket, Key=key)["UploadId"]
        number = len(self.parts) + 1
        resp = s3._call("upload", self.key, s3.client.upload_part, Bucket=s3.bucket, Key=key,
                        UploadId=self.upload_id, PartNumber=number, Body=bytes(self.buf))
        self.parts.append({"ETag": resp["ETag"], "PartNumber": number})
        self.buf = bytearray()

    def finish(self) -> None:
        s3, key = self.s3, self.s3._key(self.key)
        if self.upload_id is None:
            s3._call("write", self.key, s3.client.put_object, Bucket=s3.bucket, Key=key, Body=bytes(self.buf))
        else:
            if self.buf:
                self._upload_part()
            s3._call("upload", self.key, s3.client.complete_multipart_upload, Bucket=s3.bucket, Key=key,
                     UploadId=self.upload_id, MultipartUpload={"Parts": self.parts})
        self.buf = bytearray()

    def abort(self) -> None:
        if self.upload_id is not None:
            with contextlib.suppress(Exception):
                self.s3.client.abort_multipart_upload(Bucket=self.s3.bucket, Key=self.s3._key(self.key),
                                                      UploadId=self.upload_id)


class _RangeReader(io.RawIOBase):
    """The read side of `S3Storage.open_read`: each read is a ranged GET at the current offset."""

    def __init__(self, s3: S3Storage, key: str, size: int):
        super().__init__()
        self.s3, self.key, self.size, self.pos = s3, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, b) -> int:
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        s3 = self.s3
        resp = s3._call("read", self.key, s3.client.get_object, Bucket=s3.bucket, Key=s3._key(self.key),
                        Range=f"bytes={self.pos}-{self.pos + n - 1}")
        data = resp["Body"].read()
        memoryview(b).cast("B")[:len(data)] = data
        self.pos += len(data)
        return len(data)


class _Taken(Exception):
    """put_if_absent found the key already there (not an error, not retried)."""
