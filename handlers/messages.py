"""Sending messages and receipts."""
from __future__ import annotations

from handlers.base import APIHandler
from kisse import messaging
from kisse.validation import EMPTY, ID, obj

SEND = obj({"conversation_id": ID,
            "client_message_id": {"type": "string", "minLength": 1, "maxLength": 64},
            "ciphertext": {"type": ["string", "null"]}},
           ("conversation_id", "client_message_id"))


class MessagesHandler(APIHandler):
    async def post(self) -> None:
        body = self.json_body(SEND)
        view, created = await messaging.send_message(
            self.rt, self.user_id, body["conversation_id"], body["client_message_id"], body.get("ciphertext"))
        self.send_json({"message": view}, status=201 if created else 200)


class ReceiptHandler(APIHandler):
    async def post(self, message_id: str, kind: str) -> None:
        self.json_body(EMPTY)
        self.send_json({"receipt": await messaging.mark(self.rt, self.user_id, message_id, kind)})


class ReceiptsHandler(APIHandler):
    async def get(self, message_id: str) -> None:
        self.send_json(await messaging.message_receipts(self.rt, self.user_id, message_id))


routes = [
    (r"/api/messages", MessagesHandler),
    (r"/api/messages/([^/]+)/(delivered|read)", ReceiptHandler),
    (r"/api/messages/([^/]+)/receipts", ReceiptsHandler),
]
