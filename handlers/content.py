"""Encrypted message content: streamed upload and ranged, streamed download."""
from __future__ import annotations

from typing import Any

from handlers.base import APIHandler
from kisse import content
from kisse.errors import KisseError, RangeNotSatisfiable
from storage.base import BlobWriter, Record


class ContentHandler(APIHandler):
    """`POST` streams the body into a blob chunk by chunk; `GET` streams it back; `HEAD` describes it."""

    _message: Record | None = None
    _writer: BlobWriter | None = None
    _upload_error: KisseError | None = None

    def body_limit(self) -> int:
        return self.kisse_settings.max_blob

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method == "POST":
            self._message, self._writer = await content.begin_upload(
                self.rt, self.user_id, self.path_args[0], self.declared_length())

    async def data_received(self, chunk: bytes) -> None:
        if self._writer is None or self._upload_error is not None:
            return
        self.rt.metrics.blob_bytes.labels("in").inc(len(chunk))
        try:
            if self.declared_length() is None:
                await self.rt.limits.hit("upload_bytes", self.user_id, cost=len(chunk))
            await content.write_chunk(self.rt, self._writer, chunk)
        except KisseError as error:  # answered in post(), once the body is read
            self._upload_error = error
        except Exception:
            await self._writer.abort()
            raise

    async def post(self, message_id: str) -> None:
        assert self._writer is not None and self._message is not None
        if self._upload_error is not None:
            raise self._upload_error
        # From here the blob may get attached even if storage then fails to
        # answer: never abort it (an orphan blob is better than deleted content).
        writer, self._writer = self._writer, None
        result, created = await content.finish_upload(self.rt, self._message, writer)
        self.send_json({"message_id": message_id, **result}, status=201 if created else 200)

    def on_finish(self) -> None:
        super().on_finish()
        self._abandon()

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self._abandon()  # the client went away mid-upload: keep nothing of it

    def _abandon(self) -> None:
        if self._message is not None:
            content.end_upload(self.rt, self._message["id"])
        if self._writer is not None:
            writer, self._writer = self._writer, None
            self.rt.tasks.spawn(writer.abort(), "abandoned upload cleanup")

    async def head(self, message_id: str) -> None:
        await self._answer(message_id, with_body=False)

    async def get(self, message_id: str) -> None:
        await self._answer(message_id, with_body=True)

    async def _answer(self, message_id: str, with_body: bool) -> None:
        message, record = await content.describe(self.rt, self.user_id, message_id)
        size = record["size"]
        self.set_header("ETag", f'"{record["sha256"]}"')
        self.set_header("Accept-Ranges", "bytes")
        # Immutable ciphertext: the app may keep it, but revalidates (304) and no shared cache may.
        self.set_header("Cache-Control", "private, no-cache")
        if self.check_etag_header():  # If-None-Match: the client has these bytes already
            self.set_status(304)
            self.finish()
            return
        byte_range = content.parse_range(self.request.headers.get("Range"), size)
        start, end = byte_range or (0, size)
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Content-Length", str(end - start))
        if byte_range is not None:
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        if not with_body:
            self.finish()
            return
        sent = self.rt.metrics.blob_bytes.labels("out")
        async for chunk in await content.open_download(self.rt, message, byte_range):
            sent.inc(len(chunk))
            self.write(chunk)
            await self.flush()  # wait for the socket: memory stays at one chunk
        self.finish()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, RangeNotSatisfiable) and exc.details:
            self.set_header("Content-Range", f"bytes */{exc.details['size']}")
        super().write_error(status_code, **kwargs)


routes = [(r"/api/messages/([^/]+)/content", ContentHandler)]
