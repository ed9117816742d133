"""Accounts: register, login, me."""
from __future__ import annotations

from handlers.base import APIHandler
from kisse import auth, schemas
from kisse.views import user_view


class RegisterHandler(APIHandler):
    BODIES = {"POST": schemas.REGISTER}
    auth_required = False

    async def post(self) -> None:
        body = self.json_body()
        self.send_json(await auth.register(self.rt, body["username"], body["password"],
                                           body.get("display_name")), status=201)


class LoginHandler(APIHandler):
    BODIES = {"POST": schemas.LOGIN}
    auth_required = False

    async def post(self) -> None:
        body = self.json_body()
        self.send_json(await auth.login(self.rt, body["username"], body["password"]))


class MeHandler(APIHandler):
    async def get(self) -> None:
        assert self.current_user is not None
        self.send_json({"user": user_view(self.current_user)})


routes = [
    (r"/api/auth/register", RegisterHandler),
    (r"/api/auth/login", LoginHandler),
    (r"/api/auth/me", MeHandler),
]
