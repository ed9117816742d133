"""Environment variables → one typed, validated, immutable `Settings`.

Each default is written once, in `Settings`; `OPTIONS` maps every field to its
variable, parser and help. The CLI's --help, `config/example.env` and the
README table all describe that one list (a test keeps them in step). Invalid
values raise `SettingsError` naming the variable.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

import limits

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


def _networks(raw: str) -> tuple[str, ...]:
    """Comma-separated CIDRs (a bare address is a /32 or /128); ValueError names none."""
    return tuple(str(ipaddress.ip_network(part, strict=False)) for part in _csv(raw))


@dataclass(frozen=True)
class Settings:
    """Typed settings; build with `Settings.from_env()` or `Settings(**overrides)`."""

    host: str = "0.0.0.0"
    port: int = 8080
    trusted_proxies: tuple[str, ...] = ()
    storage: str = "memory://"
    bus: str = ""
    bus_lease: float = 10.0
    jwt_secret: str = ""
    access_ttl: int = 900
    refresh_ttl: int = 90 * 86400
    refresh_race_grace: float = 10.0
    max_devices: int = 10
    prekey_low: int = 10
    prekey_max: int = 1000
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
    retention_days: float = 0.0
    min_message_ttl: int = 5
    forget_sweep_interval: float = 1.0
    last_seen_precision: int = 60
    push_coalesce: float = 30.0
    push_timeout: float = 10.0
    push_queue: int = 10_000
    push_workers: int = 4
    push_ca_file: str = ""
    push_fcm_credentials: str = ""
    push_fcm_url: str = "https://fcm.googleapis.com"
    push_apns_key: str = ""
    push_apns_key_id: str = ""
    push_apns_team_id: str = ""
    push_apns_topic: str = ""
    push_apns_url: str = "https://api.push.apple.com"
    push_vapid_private_key: str = ""
    push_vapid_subject: str = ""
    gc_interval: float = 30.0
    log_level: str = "INFO"
    # Abuse limits, in the `limits` library's notation ("N/period;M/period"); see kisse/limits.py.
    rate_limits: str = "on"
    limit_login_ip: str = "5/minute;9/10 minutes;50/hour"
    limit_login_user: str = "20/10 minutes"
    limit_register_ip: str = "10/hour;50/day"
    limit_refresh: str = "30/hour"
    limit_password: str = "5/hour"
    limit_send: str = "60/10 seconds;2000/hour"
    limit_upload_bytes: str = "2147483648/hour"
    limit_claims: str = "300/hour"
    limit_claims_pair: str = "30/hour"
    limit_calls: str = "10/minute;100/hour"
    limit_search: str = "60/minute"
    limit_ws_user: str = "30/minute"
    limit_ws_ip: str = "120/minute"
    max_ws_per_user: int = 50
    max_ws_per_ip: int = 1000
    ws_frame_rate: int = 50
    header_timeout: float = 10.0
    idle_timeout: float = 75.0
    body_timeout: float = 30.0
    body_min_rate: int = 8 * KIB
    fd_reserve: int = 128
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
        if self.rate_limits not in ("on", "off"):
            raise SettingsError(f"KISSE_RATE_LIMITS: must be 'on' or 'off', got {self.rate_limits!r}")
        for option in OPTIONS:
            if option.field.startswith("limit_"):
                try:
                    limits.parse_many(getattr(self, option.field))
                except ValueError:
                    raise SettingsError(f"{option.env}: {getattr(self, option.field)!r} is not a limit such as "
                                        "'10/minute' or '60/10 seconds;2000/hour'") from None
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
    Option("KISSE_PREKEY_LOW", "prekey_low", _int,
           "A device left with fewer one-time EC or PQ prekeys than this gets keys.low to upload more.", 0),
    Option("KISSE_PREKEY_MAX", "prekey_max", _int, "Most one-time prekeys of each kind (EC, PQ) a device may hold.",
           1),
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
    Option("KISSE_RETENTION_DAYS", "retention_days", _float,
           "Days after which messages, their content and call history are deleted (0: kept until deleted).", 0),
    Option("KISSE_MIN_MESSAGE_TTL", "min_message_ttl", _int,
           "Shortest disappearing-message timer a conversation may set, in seconds.", 1),
    Option("KISSE_FORGET_SWEEP_INTERVAL", "forget_sweep_interval", _float,
           "Seconds between sweeps that delete expired messages (and, with retention, old ones).", 0.01),
    Option("KISSE_LAST_SEEN_PRECISION", "last_seen_precision", _int,
           "Seconds last_seen is rounded down to, as stored and as shown (1: exact).", 1),
    Option("KISSE_PUSH_COALESCE", "push_coalesce", _float,
           "Seconds within which a device gets one message wake-up at most (a burst wakes it once).", 0),
    Option("KISSE_PUSH_TIMEOUT", "push_timeout", _float, "Seconds a request to a push provider may take.", 0.01),
    Option("KISSE_PUSH_QUEUE", "push_queue", _int,
           "Pushes waiting at most; past it a device's oldest wake-ups are dropped first.", 1),
    Option("KISSE_PUSH_WORKERS", "push_workers", _int, "Pushes sent at once.", 1),
    Option("KISSE_PUSH_CA_FILE", "push_ca_file", _str,
           "Extra CA certificates (PEM) trusted for push providers (a private relay; the tests' fakes)."),
    Option("KISSE_PUSH_FCM_CREDENTIALS", "push_fcm_credentials", _str,
           "Path to the Firebase service-account JSON (empty: FCM off)."),
    Option("KISSE_PUSH_FCM_URL", "push_fcm_url", _str, "FCM HTTP v1 base URL."),
    Option("KISSE_PUSH_APNS_KEY", "push_apns_key", _str, "Path to the APNs auth key (.p8; empty: APNs off)."),
    Option("KISSE_PUSH_APNS_KEY_ID", "push_apns_key_id", _str, "The APNs key's id (kid)."),
    Option("KISSE_PUSH_APNS_TEAM_ID", "push_apns_team_id", _str, "The Apple developer team id (iss)."),
    Option("KISSE_PUSH_APNS_TOPIC", "push_apns_topic", _str,
           "The app's bundle id (the apns-topic; VoIP pushes go to <topic>.voip)."),
    Option("KISSE_PUSH_APNS_URL", "push_apns_url", _str,
           "APNs base URL (https://api.sandbox.push.apple.com for development builds)."),
    Option("KISSE_PUSH_VAPID_PRIVATE_KEY", "push_vapid_private_key", _str,
           "Path to the VAPID private key (PEM, P-256) for Web Push; empty: generated with a warning in "
           "development, Web Push off in production."),
    Option("KISSE_PUSH_VAPID_SUBJECT", "push_vapid_subject", _str,
           "VAPID contact (mailto: or https: URL) push services may reach the operator at."),
    Option("KISSE_GC_INTERVAL", "gc_interval", _float,
           "Seconds between full garbage collections of the server process (0: never).", 0),
    Option("KISSE_LOG_LEVEL", "log_level", _str, "DEBUG, INFO, WARNING or ERROR."),
    Option("KISSE_TRUSTED_PROXIES", "trusted_proxies", _networks,
           "Comma-separated CIDRs of reverse proxies whose X-Forwarded-For names the client; empty: "
           "the socket's peer is the client, whatever the headers say."),
    Option("KISSE_RATE_LIMITS", "rate_limits", _str,
           "on, or off to lift every limit below (load tests). Counters are shared on KISSE_BUS's Redis."),
    Option("KISSE_LIMIT_LOGIN_IP", "limit_login_ip", _str, "Failed logins per client IP."),
    Option("KISSE_LIMIT_LOGIN_USER", "limit_login_user", _str,
           "Failed logins per username; past it the account answers 429, even to the right password."),
    Option("KISSE_LIMIT_REGISTER_IP", "limit_register_ip", _str, "Sign-ups per client IP."),
    Option("KISSE_LIMIT_REFRESH", "limit_refresh", _str, "Token refreshes per device."),
    Option("KISSE_LIMIT_PASSWORD", "limit_password", _str, "Password changes (and account deletions) per user."),
    Option("KISSE_LIMIT_SEND", "limit_send", _str, "Messages sent per user, REST and WebSocket together."),
    Option("KISSE_LIMIT_UPLOAD_BYTES", "limit_upload_bytes", _str, "Content (attachment) bytes uploaded per user."),
    Option("KISSE_LIMIT_CLAIMS", "limit_claims", _str, "Key-bundle claims per claimer."),
    Option("KISSE_LIMIT_CLAIMS_PAIR", "limit_claims_pair", _str, "Key-bundle claims per claimer of one user."),
    Option("KISSE_LIMIT_CALLS", "limit_calls", _str, "Calls started per user."),
    Option("KISSE_LIMIT_SEARCH", "limit_search", _str, "User searches per user."),
    Option("KISSE_LIMIT_WS_USER", "limit_ws_user", _str, "WebSocket connections opened per user."),
    Option("KISSE_LIMIT_WS_IP", "limit_ws_ip", _str, "WebSocket connections opened per client IP."),
    Option("KISSE_MAX_WS_PER_USER", "max_ws_per_user", _int, "WebSockets a user may hold open at once, per node.", 1),
    Option("KISSE_MAX_WS_PER_IP", "max_ws_per_ip", _int, "WebSockets a client IP may hold open at once, per node.", 1),
    Option("KISSE_WS_FRAME_RATE", "ws_frame_rate", _int,
           "Frames a WebSocket may send per second; past it they get rate_limited, and past twice it the "
           "socket closes with 1008.", 1),
    Option("KISSE_HEADER_TIMEOUT", "header_timeout", _float,
           "Seconds a new connection has to send its first request's complete headers, however it "
           "trickles them (WebSocket upgrades included).", 0.01),
    Option("KISSE_IDLE_TIMEOUT", "idle_timeout", _float,
           "Seconds a keep-alive connection has, after a response, to send its next request's complete "
           "headers; keep it above a reverse proxy's upstream keep-alive timeout.", 0.01),
    Option("KISSE_BODY_TIMEOUT", "body_timeout", _float,
           "Seconds a request body may take, plus one per KISSE_BODY_MIN_RATE bytes received: a slow "
           "upload goes on, a trickle is cut.", 0.01),
    Option("KISSE_BODY_MIN_RATE", "body_min_rate", _int,
           "Bytes a second a long request body must average to keep going (see KISSE_BODY_TIMEOUT).", 1),
    Option("KISSE_FD_RESERVE", "fd_reserve", _int,
           "File descriptors kept free for the users already served (database connections, files): "
           "this close to the limit (ulimit -n), new connections are refused.", 1),
)


def _kind_name(option: Option) -> str:
    return {_int: "integer", _float: "number"}.get(option.kind, "value")
