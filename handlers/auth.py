"""Accounts and sessions: register, login, refresh, logout, password, me (and deleting it)."""
from __future__ import annotations

from handlers.base import APIHandler
from kisse import auth, schemas, sessions
from kisse.errors import NotFound
from kisse.views import user_view


class RegisterHandler(APIHandler):
    BODIES = {"POST": schemas.REGISTER}
    auth_required = False

    async def post(self) -> None:
        body = self.json_body()
        self.send_json(await auth.register(self.rt, body["username"], body["password"], body.get("display_name"),
                                           body.get("device_name"), client=self.client_ip), status=201)


class LoginHandler(APIHandler):
    BODIES = {"POST": schemas.LOGIN}
    auth_required = False

    async def post(self) -> None:
        body = self.json_body()
        self.send_json(await auth.login(self.rt, body["username"], body["password"], body.get("device_name"),
                                        body.get("replace_device_id"), client=self.client_ip))


class RefreshHandler(APIHandler):
    BODIES = {"POST": schemas.REFRESH}
    auth_required = False  # the access token may have expired: the refresh token is the proof

    async def post(self) -> None:
        self.send_json(await sessions.refresh(self.rt, self.json_body()["refresh_token"]))


class LogoutHandler(APIHandler):
    BODIES = {"POST": schemas.EMPTY}

    async def post(self) -> None:
        self.json_body()
        await sessions.revoke(self.rt, self.user_id, device_id=self.me.device_id)
        self.send_empty()


class PasswordHandler(APIHandler):
    BODIES = {"POST": schemas.CHANGE_PASSWORD}

    async def post(self) -> None:
        body = self.json_body()
        self.send_json(await auth.change_password(self.rt, self.me, body["current_password"], body["new_password"]))


class MeHandler(APIHandler):
    BODIES = {"DELETE": schemas.CONFIRM_PASSWORD}

    async def get(self) -> None:
        user = await self.storage.get_user(self.user_id)
        if user is None:
            raise NotFound("no such user", code="user_not_found")
        self.send_json({"user": user_view(user)})

    async def delete(self) -> None:
        await auth.delete_account(self.rt, self.me, self.json_body()["password"])
        self.send_empty()


routes = [
    (r"/api/auth/register", RegisterHandler),
    (r"/api/auth/login", LoginHandler),
    (r"/api/auth/refresh", RefreshHandler),
    (r"/api/auth/logout", LogoutHandler),
    (r"/api/auth/password", PasswordHandler),
    (r"/api/auth/me", MeHandler),
]
