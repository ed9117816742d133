"""Encrypted blobs in GridFS (bucket `encrypted_content`), streamed both ways.

Uploads go chunk by chunk into `open_upload_stream_with_id` (the blob id is a
`new_id()` string, like every other id); the writer hashes and counts as bytes
arrive and aborts the GridFS file, chunks included, when the size limit is
passed or the caller gives up. Reads seek to the chunk holding `start` and
yield at most one GridFS chunk at a time, so no blob is ever held whole.
"""
from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

from gridfs import AsyncGridFSBucket
from gridfs.errors import NoFile

from storage.base import BlobNotFound, BlobTooLarge, BlobWriter, new_id

BUCKET_NAME = "encrypted_content"


class MongoBlobWriter(BlobWriter):
    def __init__(self, bucket: AsyncGridFSBucket, max_size: int, stats: dict[str, int]) -> None:
        self.blob_id = new_id()
        self._bucket = bucket
        self._max_size = max_size
        self._stats = stats
        self._stream = bucket.open_upload_stream_with_id(self.blob_id, self.blob_id)
        self._size = 0
        self._sha = hashlib.sha256()
        self._state = "open"  # open -> finished | aborted

    async def write(self, chunk: bytes) -> None:
        if self._state != "open":
            raise ValueError(f"blob writer is {self._state}")
        self._size += len(chunk)
        if self._size > self._max_size:
            await self.abort()
            raise BlobTooLarge(f"blob exceeds {self._max_size} bytes")
        self._sha.update(chunk)
        self._stats["blob_writes"] += 1
        self._stats["largest_blob_write"] = max(self._stats["largest_blob_write"], len(chunk))
        await self._stream.write(chunk)

    async def finish(self) -> tuple[int, str]:
        if self._state != "open":
            raise ValueError(f"blob writer is {self._state}")
        await self._stream.close()
        self._state = "finished"
        return self._size, self._sha.hexdigest()

    async def abort(self) -> None:
        if self._state == "aborted":
            return
        if self._state == "open":
            await self._stream.abort()  # deletes the chunks flushed so far
        else:
            await delete_blob(self._bucket, self.blob_id)
        self._state = "aborted"


async def read_blob(bucket: AsyncGridFSBucket, blob_id: str, start: int,
                    end: int | None) -> AsyncIterator[bytes]:
    try:
        stream = await bucket.open_download_stream(blob_id)
    except NoFile:
        raise BlobNotFound(blob_id) from None
    try:
        end = stream.length if end is None else min(end, stream.length)
        if start >= end:
            return
        await stream.seek(start)  # jumps to the chunk holding `start`
        remaining = end - start
        while remaining > 0:
            piece = await stream.readchunk()  # rest of the current chunk only
            if not piece:
                break
            piece = piece[:remaining]
            remaining -= len(piece)
            yield piece
    finally:
        await stream.close()


async def delete_blob(bucket: AsyncGridFSBucket, blob_id: str) -> None:
    try:
        await bucket.delete(blob_id)  # removes the chunks even if the file doc is gone
    except NoFile:
        pass
