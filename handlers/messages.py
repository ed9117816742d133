"""Sending messages and receipts."""
from __future__ import annotations

from handlers.base import APIHandler
from kisse import messaging, schemas


class MessagesHandler(APIHandler):
    BODIES = {"POST": schemas.SEND_MESSAGE}
    async def post(self) -> None:
        body = self.json_body()
        view, created = await messaging.send_message(
            self.rt, self.user_id, body["conversation_id"], body["client_message_id"], body.get("ciphertext"))
        self.send_json({"message": view}, status=201 if created else 200)


class ReceiptHandler(APIHandler):
    BODIES = {"POST": schemas.EMPTY}
    async def post(self, message_id: str, kind: str) -> None:
        self.json_body()
        self.send_json({"receipt": await messaging.mark(self.rt, self.user_id, message_id, kind)})


class ReceiptsHandler(APIHandler):
    async def get(self, message_id: str) -> None:
        self.send_json(await messaging.message_receipts(self.rt, self.user_id, message_id))


routes = [
    (r"/api/messages", MessagesHandler),
    (r"/api/messages/([^/]+)/(delivered|read)", ReceiptHandler),
    (r"/api/messages/([^/]+)/receipts", ReceiptsHandler),
]
