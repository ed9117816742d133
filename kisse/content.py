"""Encrypted message content: opaque bytes streamed in and out, never whole in memory.

Small content travels inline with the message (base64 `ciphertext`); larger
content is uploaded once, by the sender, to `/api/messages/{id}/content`.
"""
from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from kisse import messaging
from kisse.errors import Conflict, Forbidden, NotFound, PayloadTooLarge, RangeNotSatisfiable
from kisse.runtime import Runtime
from storage.base import BlobNotFound, BlobTooLarge, BlobWriter, Record

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


async def begin_upload(rt: Runtime, user_id: str, message_id: str, declared_size: int | None) -> tuple[Record, BlobWriter]:
    """Check the caller may upload this message's content; open a blob writer."""
    message, _ = await messaging.member_message(rt, user_id, message_id)
    if message["sender_id"] != user_id:
        raise Forbidden("only the sender uploads a message's content", code="not_sender")
    if message["content"] is not None and message["content"]["inline"]:
        raise Conflict("this message carries inline ciphertext", code="content_exists")
    if declared_size is not None and declared_size > rt.settings.max_blob:
        raise PayloadTooLarge(f"content is larger than {rt.settings.max_blob} bytes", code="blob_too_large")
    return message, await rt.storage.open_blob_writer(rt.settings.max_blob)


async def write_chunk(rt: Runtime, writer: BlobWriter, chunk: bytes) -> None:
    try:
        await writer.write(chunk)
    except BlobTooLarge:
        raise PayloadTooLarge(f"content is larger than {rt.settings.max_blob} bytes",
                              code="blob_too_large") from None


async def finish_upload(rt: Runtime, message: Record, writer: BlobWriter) -> tuple[dict[str, Any], bool]:
    """Seal the blob and attach it to the message (compare-and-set).

    Returns `(content, created)`. Uploading the same bytes again is accepted
    (created False); different bytes for a message that has content are a 409.
    """
    size, sha256 = await writer.finish()
    stored = await rt.storage.attach_content(message["id"], writer.blob_id, size, sha256)
    if stored["blob_id"] == writer.blob_id:
        return dict(stored["content"]), True
    await rt.storage.delete_blob(writer.blob_id)  # lost the race, or a repeat upload
    if stored["content"]["sha256"] != sha256 or stored["content"]["inline"]:
        raise Conflict("this message already has different content", code="content_exists")
    return dict(stored["content"]), False


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`[start, end)` for a single `bytes=` range, None for none or a syntax we ignore.

    Raises 416 when the range cannot be satisfied."""
    if not header:
        return None
    match = _RANGE_RE.match(header.strip())
    if not match or match.groups() == ("", ""):
        return None  # multi-range or malformed: RFC 9110 lets us serve the whole body
    first, last = match.groups()
    if first == "":
        length = int(last)
        if length == 0:
            raise RangeNotSatisfiable("empty suffix range", details={"size": size})
        return max(size - length, 0), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or end <= start:
        raise RangeNotSatisfiable(f"range is outside 0-{max(size - 1, 0)}", details={"size": size})
    return start, end


async def open_download(rt: Runtime, user_id: str, message_id: str,
                        range_header: str | None) -> tuple[Record, tuple[int, int] | None, AsyncIterator[bytes]]:
    """`(content, range, chunks)` for a member; 404 if the message has no content."""
    message, _ = await messaging.member_message(rt, user_id, message_id)
    content = message["content"]
    if content is None:
        raise NotFound("this message has no content", code="content_not_found")
    size = content["size"]
    byte_range = parse_range(range_header, size)
    start, end = byte_range or (0, size)
    if content["inline"]:
        return content, byte_range, _one_chunk(message["ciphertext"][start:end])
    chunks = rt.storage.read_blob(message["blob_id"], start, end)
    try:
        first = await anext(chunks) if end > start else b""
    except (BlobNotFound, StopAsyncIteration):
        raise NotFound("this message's content is gone", code="content_not_found") from None
    return content, byte_range, _prepend(first, chunks)


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk
