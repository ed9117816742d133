"""Environment variables → one typed, validated, immutable `Settings`.

Each default is written once, in `Settings`; `OPTIONS` maps every field to its
variable, parser and help. The CLI's --help, `config/example.env` and the
README table all describe that one list (a test keeps them in step). Invalid
values raise `SettingsError` naming the variable.
"""
from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

KNOWN_STORAGE_SCHEMES = ("memory", "mongodb", "mongodb+srv")
MIN_PRODUCTION_SECRET_BYTES = 32
# Below this a stolen hash database is cheap to crack; tests use 4 for speed.
MIN_PRODUCTION_BCRYPT_ROUNDS = 10


KIB = 1024
MIB = 1024 * KIB


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the variable."""


def _int(raw: str) -> int:
    return int(raw.strip())


def _float(raw: str) -> float:
    return float(raw.strip())


def _str(raw: str) -> str:
    return raw.strip()


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    """Typed settings; build with `Settings.from_env()` or `Settings(**overrides)`."""

    host: str = "0.0.0.0"
    port: int = 8080
    storage: str = "memory://"
    bus: str = ""
    bus_lease: float = 10.0
    jwt_secret: str = ""
    access_ttl: int = 900
    refresh_ttl: int = 90 * 86400
    refresh_race_grace: float = 10.0
    max_devices: int = 10
    bcrypt_rounds: int = 12
    env: str = "development"
    max_body: int = 1 * MIB
    max_inline_ciphertext: int = 64 * KIB
    max_blob: int = 100 * MIB
    max_group_members: int = 256
    max_ws_frame: int = 256 * KIB
    ws_ping: float = 25.0
    ws_queue_bytes: int = 4 * MIB
    ws_sync_grace: float = 5.0
    presence_grace: float = 10.0
    typing_timeout: float = 6.0
    call_ring_timeout: float = 45.0
    call_sweep_interval: float = 30.0
    send_repair_after: float = 5.0
    max_signal: int = 64 * KIB
    turn_secret: str = ""
    turn_uris: tuple[str, ...] = ()
    turn_ttl: int = 86400
    gc_interval: float = 30.0
    log_level: str = "INFO"
    # True when the JWT secret was generated at start-up (development only).
    jwt_secret_generated: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "Settings":
        """Parse `KISSE_*` variables; raise `SettingsError` naming the bad one."""
        values: dict[str, Any] = {}
        for option in OPTIONS:
            raw = environ.get(option.env)
            if raw is None or raw == "":
                continue
            try:
                value = option.kind(raw)
            except ValueError:
                raise SettingsError(f"{option.env}: {raw!r} is not a valid {_kind_name(option)}") from None
            if option.minimum is not None and value < option.minimum:
                raise SettingsError(f"{option.env}: must be at least {option.minimum:g}, got {raw!r}")
            values[option.field] = value
        return cls(**values).validated()

    def validated(self) -> "Settings":
        """Check cross-field rules; fill in a development JWT secret if needed."""
        if self.env not in ("development", "production"):
            raise SettingsError(f"KISSE_ENV: must be 'development' or 'production', got {self.env!r}")
        if self.port > 65535:
            raise SettingsError(f"KISSE_PORT: {self.port} is not a TCP port")
        if not 4 <= self.bcrypt_rounds <= 31:
            raise SettingsError(f"KISSE_BCRYPT_ROUNDS: must be between 4 and 31, got {self.bcrypt_rounds}")
        scheme = urlsplit(self.storage).scheme
        if scheme not in KNOWN_STORAGE_SCHEMES:
            raise SettingsError(
                f"KISSE_STORAGE: unknown scheme {scheme!r} in {self.storage!r}; "
                f"use one of {', '.join(s + '://' for s in KNOWN_STORAGE_SCHEMES)}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError(f"KISSE_LOG_LEVEL: unknown level {self.log_level!r}")
        if self.turn_secret and not self.turn_uris:
            raise SettingsError("KISSE_TURN_URIS: required when KISSE_TURN_SECRET is set")
        if self.env == "production" and self.bcrypt_rounds < MIN_PRODUCTION_BCRYPT_ROUNDS:
            raise SettingsError(f"KISSE_BCRYPT_ROUNDS: production needs a cost of at least "
                                f"{MIN_PRODUCTION_BCRYPT_ROUNDS} (got {self.bcrypt_rounds})")
        secret_bytes = len(self.jwt_secret.encode())
        if self.env == "production" and secret_bytes < MIN_PRODUCTION_SECRET_BYTES:
            raise SettingsError(
                f"KISSE_JWT_SECRET: production needs a secret of at least "
                f"{MIN_PRODUCTION_SECRET_BYTES} bytes (got {secret_bytes})")
        if not self.jwt_secret:
            return dataclasses.replace(self, jwt_secret=secrets.token_urlsafe(48), jwt_secret_generated=True)
        return self



@dataclass(frozen=True)
class Option:
    env: str
    field: str
    kind: Callable[[str], Any]
    help: str
    minimum: float | None = None

    @property
    def default(self) -> Any:
        return getattr(Settings, self.field)


OPTIONS: tuple[Option, ...] = (
    Option("KISSE_HOST", "host", _str, "Interface to listen on."),
    Option("KISSE_PORT", "port", _int, "TCP port to listen on (0 picks a free port).", 0),
    Option("KISSE_STORAGE", "storage", _str,
           "Storage URL: memory:// (default) or mongodb://host:port/dbname?replicaSet=..."),
    Option("KISSE_BUS", "bus", _str,
           "Empty (default): this process alone. redis://host:port/db: a cluster of the Kisse processes "
           "on that Redis (and one MongoDB), sharing live events."),
    Option("KISSE_BUS_LEASE", "bus_lease", _float,
           "Seconds a cluster node's lease lasts (renewed every third of it): a node that dies is "
           "known dead, and its users offline, within this plus KISSE_PRESENCE_GRACE.", 0.1),
    Option("KISSE_JWT_SECRET", "jwt_secret", _str, "HS256 signing secret (>= 32 bytes, required in production)."),
    Option("KISSE_ACCESS_TTL", "access_ttl", _int, "Access token lifetime in seconds.", 1),
    Option("KISSE_REFRESH_TTL", "refresh_ttl", _int,
           "Refresh token lifetime in seconds, renewed on every refresh (default 90 days).", 1),
    Option("KISSE_REFRESH_RACE_GRACE", "refresh_race_grace", _float,
           "Seconds during which a just-spent refresh token is a race (409), not a theft.", 0),
    Option("KISSE_MAX_DEVICES", "max_devices", _int, "Most live devices (sessions) an account may have.", 1),
    Option("KISSE_BCRYPT_ROUNDS", "bcrypt_rounds", _int, "bcrypt cost factor (4-31; at least 10 in production).", 4),
    Option("KISSE_ENV", "env", _str, "development or production."),
    Option("KISSE_MAX_BODY", "max_body", _int, "Largest JSON request body in bytes.", 1),
    Option("KISSE_MAX_INLINE_CIPHERTEXT", "max_inline_ciphertext", _int,
           "Largest decoded inline `ciphertext` of a message, in bytes.", 0),
    Option("KISSE_MAX_BLOB", "max_blob", _int, "Largest uploaded message content (attachment) in bytes.", 1),
    Option("KISSE_MAX_GROUP_MEMBERS", "max_group_members", _int, "Most members a conversation may have.", 2),
    Option("KISSE_MAX_WS_FRAME", "max_ws_frame", _int,
           "Largest incoming WebSocket frame in bytes (bigger closes with 1009).", 1),
    Option("KISSE_WS_PING", "ws_ping", _float,
           "Seconds between server pings; a connection silent for two intervals is closed.", 0.01),
    Option("KISSE_WS_QUEUE_BYTES", "ws_queue_bytes", _int,
           "Unsent bytes a slow WebSocket client may hold before it is disconnected.", 1),
    Option("KISSE_WS_SYNC_GRACE", "ws_sync_grace", _float,
           "Seconds a new WebSocket's live messages wait for its first sync (catch-up first).", 0),
    Option("KISSE_PRESENCE_GRACE", "presence_grace", _float,
           "Seconds after a user's last connection closes before they show offline.", 0),
    Option("KISSE_TYPING_TIMEOUT", "typing_timeout", _float, "Seconds a typing.start lasts unless refreshed.", 0.01),
    Option("KISSE_CALL_RING_TIMEOUT", "call_ring_timeout", _float, "Seconds a call rings before it becomes missed.",
           0.01),
    Option("KISSE_CALL_SWEEP_INTERVAL", "call_sweep_interval", _float,
           "Seconds between sweeps that mark overdue ringing calls missed.", 0.01),
    Option("KISSE_SEND_REPAIR_AFTER", "send_repair_after", _float,
           "Seconds after which a send left half-done (its process died, nobody retried) is finished "
           "by the server; also how often it looks.", 0.01),
    Option("KISSE_MAX_SIGNAL", "max_signal", _int, "Largest call signalling payload (SDP/ICE) in bytes.", 1),
    Option("KISSE_TURN_SECRET", "turn_secret", _str,
           "coturn static-auth-secret for TURN REST credentials (empty: TURN off)."),
    Option("KISSE_TURN_URIS", "turn_uris", _csv, "Comma-separated TURN/STUN URIs handed to clients."),
    Option("KISSE_TURN_TTL", "turn_ttl", _int, "TURN credential lifetime in seconds.", 60),
    Option("KISSE_GC_INTERVAL", "gc_interval", _float,
           "Seconds between full garbage collections of the server process (0: never).", 0),
    Option("KISSE_LOG_LEVEL", "log_level", _str, "DEBUG, INFO, WARNING or ERROR."),
)


def _kind_name(option: Option) -> str:
    return {_int: "integer", _float: "number"}.get(option.kind, "value")
