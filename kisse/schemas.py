"""The schema of every request, written once: REST bodies and WebSocket `data`
use the same definitions (docs/openapi.yaml and docs/asyncapi.yaml mirror them,
and tests/test_specs.py checks they agree)."""
from __future__ import annotations

from kisse.validation import Schema, obj

ID: Schema = {"type": "string", "minLength": 1, "maxLength": 64}
CLIENT_MESSAGE_ID: Schema = {"type": "string", "minLength": 1, "maxLength": 64}
SEQ: Schema = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
# Large enough for any group (KISSE_MAX_GROUP_MEMBERS is checked by the service).
MAX_PARTICIPANTS = 1024
PRESENCE_STATUSES = ("online", "away", "busy", "offline")
MEDIA = ("audio", "video")

EMPTY = obj({})

# -- accounts ------------------------------------------------------------------
PASSWORD: Schema = {"type": "string", "maxLength": 1024}
DEVICE_NAME: Schema = {"type": ["string", "null"], "maxLength": 64}
LOGIN = obj({"username": {"type": "string", "maxLength": 256}, "password": PASSWORD, "device_name": DEVICE_NAME,
             "replace_device_id": {"type": ["integer", "null"], "minimum": 1, "maximum": 127}},
            ("username", "password"))
REGISTER = obj({"username": LOGIN["properties"]["username"], "password": PASSWORD, "device_name": DEVICE_NAME,
                "display_name": {"type": ["string", "null"], "maxLength": 64}},
               ("username", "password"))
REFRESH = obj({"refresh_token": {"type": "string", "minLength": 1, "maxLength": 256}}, ("refresh_token",))
CHANGE_PASSWORD = obj({"current_password": PASSWORD, "new_password": PASSWORD}, ("current_password", "new_password"))
CONFIRM_PASSWORD = obj({"password": PASSWORD}, ("password",))

# -- conversations and messages --------------------------------------------------
CREATE_CONVERSATION = obj({"participant_ids": {"type": "array", "items": ID, "minItems": 1,
                                               "maxItems": MAX_PARTICIPANTS},
                           "title": {"type": ["string", "null"], "maxLength": 128}},
                          ("participant_ids",))
MAX_ADDED = 256  # members one request may add
ROLES = ("admin", "member")
CONVERSATION_FILTERS = ("accepted", "requests", "all")
ADD_MEMBERS = obj({"user_ids": {"type": "array", "items": ID, "minItems": 1, "maxItems": MAX_ADDED}}, ("user_ids",))
SET_ROLE = obj({"role": {"enum": list(ROLES)}}, ("role",))
# Disappearing messages: KISSE_MIN_MESSAGE_TTL (5 s) to a year, or null (off).
MESSAGE_TTL_MAX = 365 * 86400
UPDATE_CONVERSATION = obj({"title": CREATE_CONVERSATION["properties"]["title"],
                           "message_ttl": {"type": ["integer", "null"], "minimum": 1, "maximum": MESSAGE_TTL_MAX}})
SEND_MESSAGE = obj({"conversation_id": ID, "client_message_id": CLIENT_MESSAGE_ID,
                    "ciphertext": {"type": ["string", "null"]}},
                   ("conversation_id", "client_message_id"))
MESSAGE_REF = obj({"message_id": ID}, ("message_id",))
CONVERSATION_REF = obj({"conversation_id": ID}, ("conversation_id",))
SYNC = obj({"cursors": {"type": "object", "additionalProperties": SEQ, "maxProperties": 10_000}})

# -- presence and calls ----------------------------------------------------------------
SET_PRESENCE = {**obj({"status": {"enum": list(PRESENCE_STATUSES)}, "show_last_seen": {"type": "boolean"}}),
                "anyOf": [{"required": ["status"]}, {"required": ["show_last_seen"]}]}  # one of them, at least
START_CALL = obj({"callee_id": ID, "media": {"enum": list(MEDIA)}}, ("callee_id", "media"))
CALL_REF = obj({"call_id": ID}, ("call_id",))
SIGNAL = obj({"call_id": ID, "payload": {}}, ("call_id", "payload"))
HANGUP = obj({"call_id": ID, "payload": {}}, ("call_id",))

# -- the key directory (kisse/keys.py checks the bytes and the signatures) ------------
MAX_PREKEYS_PER_REQUEST = 100  # of each kind


def _base64(size: int) -> Schema:
    """Standard base64 of exactly `size` bytes."""
    length = 4 * -(-size // 3)
    return {"type": "string", "minLength": length, "maxLength": length, "pattern": "^[A-Za-z0-9+/]*={0,2}$"}


KEY_ID: Schema = {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}  # libsignal's u32 ids
CURVE_PUBLIC_KEY = _base64(33)
KYBER_PUBLIC_KEY = _base64(1569)
KEY_SIGNATURE = _base64(64)
SIGNED_PREKEY = obj({"key_id": KEY_ID, "public_key": CURVE_PUBLIC_KEY, "signature": KEY_SIGNATURE},
                    ("key_id", "public_key", "signature"))
PQ_PREKEY = obj({"key_id": KEY_ID, "public_key": KYBER_PUBLIC_KEY, "signature": KEY_SIGNATURE},
                ("key_id", "public_key", "signature"))
ONE_TIME_PREKEY = obj({"key_id": KEY_ID, "public_key": CURVE_PUBLIC_KEY}, ("key_id", "public_key"))
ONE_TIME_PREKEYS = {
    "one_time_prekeys": {"type": ["array", "null"], "items": ONE_TIME_PREKEY, "maxItems": MAX_PREKEYS_PER_REQUEST},
    "pq_one_time_prekeys": {"type": ["array", "null"], "items": PQ_PREKEY, "maxItems": MAX_PREKEYS_PER_REQUEST},
}
UPLOAD_KEYS = obj({"registration_id": {"type": "integer", "minimum": 1, "maximum": 0x3FFF},
                   "identity_key": CURVE_PUBLIC_KEY, "signed_prekey": SIGNED_PREKEY,
                   "pq_last_resort_prekey": PQ_PREKEY, **ONE_TIME_PREKEYS},
                  ("registration_id", "identity_key", "signed_prekey", "pq_last_resort_prekey"))
ADD_PREKEYS = obj(ONE_TIME_PREKEYS)

# -- push registrations (kisse/push/registrations.py checks what each provider needs) -----
PUSH_PROVIDERS = ("fcm", "apns", "webpush")
PUSH_TOKEN: Schema = {"type": "string", "minLength": 1, "maxLength": 4096}
B64URL: Schema = {"type": "string", "minLength": 1, "maxLength": 256, "pattern": "^[A-Za-z0-9_\\-=]+$"}
SET_PUSH = obj({"provider": {"enum": list(PUSH_PROVIDERS)}, "token": PUSH_TOKEN, "voip_token": PUSH_TOKEN,
                "endpoint": {"type": "string", "minLength": 8, "maxLength": 2048},
                "keys": obj({"p256dh": B64URL, "auth": B64URL}, ("p256dh", "auth"))},
               ("provider",))
