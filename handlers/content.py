"""Encrypted message content: streamed upload and ranged, streamed download."""
from __future__ import annotations

from typing import Any

from handlers.base import APIHandler
from kisse import content
from kisse.errors import KisseError, RangeNotSatisfiable
from storage.base import BlobWriter, Record


class ContentHandler(APIHandler):
    """`POST` streams the body into a blob chunk by chunk; `GET` streams it back."""

    _message: Record | None = None
    _writer: BlobWriter | None = None
    _upload_error: KisseError | None = None

    def body_limit(self) -> int:
        return self.kisse_settings.max_blob

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method == "POST":
            declared = self.request.headers.get("Content-Length")
            size = int(declared) if declared and declared.isdigit() else None
            self._message, self._writer = await content.begin_upload(
                self.rt, self.user_id, self.path_args[0], size)

    async def data_received(self, chunk: bytes) -> None:
        if self._writer is None or self._upload_error is not None:
            return
        self.rt.metrics.blob_bytes.labels("in").inc(len(chunk))
        try:
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
        result, created = await content.finish_upload(self.rt, self._message, self._writer)
        self._writer = None
        self.send_json({"message_id": message_id, **result}, status=201 if created else 200)

    def on_finish(self) -> None:
        super().on_finish()
        self._abandon()

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self._abandon()  # the client went away mid-upload: keep nothing of it

    def _abandon(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            self.rt.tasks.spawn(writer.abort(), "abandoned upload cleanup")

    async def get(self, message_id: str) -> None:
        record, byte_range, chunks = await content.open_download(
            self.rt, self.user_id, message_id, self.request.headers.get("Range"))
        size = record["size"]
        start, end = byte_range or (0, size)
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Accept-Ranges", "bytes")
        self.set_header("ETag", f'"{record["sha256"]}"')
        self.set_header("Content-Length", str(end - start))
        if byte_range is not None:
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        sent = self.rt.metrics.blob_bytes.labels("out")
        async for chunk in chunks:
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
