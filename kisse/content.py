"""Encrypted message content: opaque bytes streamed in and out, never whole in memory.

Small content travels inline with the message (base64 `ciphertext`); larger
content is uploaded once, by the sender, to `/api/messages/{id}/content`.
"""
from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from kisse import messaging
from kisse.errors import BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, RangeNotSatisfiable
from kisse.runtime import Runtime
from storage.base import BlobNotFound, BlobTooLarge, BlobWriter, Record

_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
# Positions with more digits than this are past any blob (and int() refuses
# strings of thousands of digits).
_MAX_DIGITS = 18


async def begin_upload(rt: Runtime, user_id: str, message_id: str, declared_size: int | None) -> tuple[Record, BlobWriter]:
    """Check the caller may upload this message's content; open a blob writer.

    One upload per message at a time in this process: a second one is refused
    before its body is read, so racing uploads never hold several bodies.
    Call `end_upload` when it is over, whatever happened."""
    message, _ = await messaging.member_message(rt, user_id, message_id)
    if message["sender_id"] != user_id:
        raise Forbidden("only the sender uploads a message's content", code="not_sender")
    if message["content"] is not None and message["content"]["inline"]:
        raise Conflict("this message carries inline ciphertext", code="content_exists")
    if declared_size is not None and declared_size > rt.settings.max_blob:
        raise PayloadTooLarge(f"content is larger than {rt.settings.max_blob} bytes", code="blob_too_large")
    if declared_size == 0:
        raise BadRequest("content must not be empty", code="empty_content")
    if declared_size is not None:  # refused before a byte is read; else counted as it comes
        await rt.limits.hit("upload_bytes", user_id, cost=declared_size)
    if message_id in rt.uploading:
        raise Conflict("this message's content is being uploaded right now", code="upload_in_progress")
    rt.uploading.add(message_id)
    try:
        return message, await rt.storage.open_blob_writer(rt.settings.max_blob)
    except BaseException:
        rt.uploading.discard(message_id)
        raise


def end_upload(rt: Runtime, message_id: str) -> None:
    rt.uploading.discard(message_id)


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
    if size == 0:
        await rt.storage.delete_blob(writer.blob_id)
        raise BadRequest("content must not be empty", code="empty_content")
    try:
        stored = await rt.storage.attach_content(message["id"], writer.blob_id, size, sha256)
    except KeyError:  # the message expired (and went) while its content was coming
        await rt.storage.delete_blob(writer.blob_id)
        raise NotFound("no such message: it expired", code="message_not_found") from None
    if stored["blob_id"] == writer.blob_id:
        return dict(stored["content"]), True
    await rt.storage.delete_blob(writer.blob_id)  # lost the race, or a repeat upload
    if stored["content"]["sha256"] != sha256 or stored["content"]["inline"]:
        raise Conflict("this message already has different content", code="content_exists")
    return dict(stored["content"]), False


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`[start, end)` for a single `bytes=` range; None for none, or for a
    syntax RFC 9110 lets us ignore (multiple ranges, last < first): the whole body.

    Raises 416 when the range cannot be satisfied."""
    match = _RANGE_RE.fullmatch(header.strip()) if header else None
    if not match or match.groups() == ("", ""):
        return None
    first, last = (None if not d else int(d) if len(d) <= _MAX_DIGITS else 2**63 for d in match.groups())
    if first is None:  # a suffix: the last `last` bytes
        assert last is not None
        if last == 0 or size == 0:
            raise RangeNotSatisfiable("a suffix range selects no byte here", details={"size": size})
        return max(size - last, 0), size
    if last is not None and last < first:
        return None
    if first >= size:
        raise RangeNotSatisfiable(f"range starts past the end ({size} bytes)", details={"size": size})
    return first, size if last is None else min(last + 1, size)


async def describe(rt: Runtime, user_id: str, message_id: str) -> tuple[Record, Record]:
    """`(message, content)` for whoever may read it (`messaging.readable_message`);
    404 if the message has no content."""
    message = await messaging.readable_message(rt, user_id, message_id)
    if message["content"] is None:
        raise NotFound("this message has no content", code="content_not_found")
    return message, message["content"]


async def open_download(rt: Runtime, message: Record, byte_range: tuple[int, int] | None) -> AsyncIterator[bytes]:
    """The chunks of a message's content (all of it, or `[start, end)`); 404 if the blob is gone."""
    content = message["content"]
    start, end = byte_range or (0, content["size"])
    if content["inline"]:
        return _one_chunk(message["ciphertext"][start:end])
    chunks = rt.storage.read_blob(message["blob_id"], start, end)
    try:
        first = await anext(chunks) if end > start else b""
    except (BlobNotFound, StopAsyncIteration):
        raise NotFound("this message's content is gone", code="content_not_found") from None
    return _prepend(first, chunks)


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk
