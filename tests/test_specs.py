"""The machine-readable specs stay valid and in step with the code.

- docs/openapi.yaml is a valid OpenAPI 3.1 document (openapi-spec-validator),
  its examples match their schemas, and its paths and methods are exactly the
  routes the app serves (no drift either way). Each JSON request body is the
  schema its handler reads (`BODIES`, from kisse/schemas.py), `$ref`s resolved,
  and the Capabilities schema is what `capabilities()` returns.
- Both load as strict YAML: every mapping key a string, so an unquoted `, ` or
  `{` in a description cannot turn it into a mapping a client generator rejects.
- docs/asyncapi.yaml passes the official parser, @asyncapi/parser from npm
  (installed on first use by tests/node_tools.py; no AsyncAPI 3 validator
  exists on PyPI), and is checked structurally: version, every `$ref`
  resolves, every request type of kisse/protocol.py and every server frame
  has a message with a payload schema and a valid example, the
  request `data` schemas and the envelope equal the server's, and the schemas
  shared with openapi.yaml are identical.
- A live pass drives the real app (memory storage) through every route and
  most WebSocket frames and validates each response and frame against the specs.
"""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import tornado.web
import yaml
from jsonschema import Draft202012Validator, FormatChecker
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from config.settings import Settings
from handlers import default_handlers
from kisse import protocol
from kisse.capabilities import capabilities
from tests import node_tools
from tests.conftest import with_settings


class StrictLoader(yaml.SafeLoader):
    """A SafeLoader for the specs that refuses mapping keys other than strings.

    A plain scalar with `, ` inside a flow mapping is split into extra keys:
    `{description: numbers 1, 2, 3}` has keys 1, 2 and 3, which client
    generators reject. The same split can yield string keys with no value
    (`{description: f(a, b)}` gains `b)`), so value-less flow entries are
    refused too."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)  # resolve `<<` merges first, as SafeLoader does
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(
                    None, None, f"mapping key {key!r} on line {line} is {type(key).__name__}, not str",
                    key_node.start_mark)
            if node.flow_style and value_node.tag == "tag:yaml.org,2002:null" and value_node.value == "":
                raise yaml.constructor.ConstructorError(
                    None, None, f"flow mapping entry {key!r} on line {line} has no value (unquoted `, `?)",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_spec(source: Path | str) -> Any:
    """A spec (a file, or YAML text) loaded with `StrictLoader`."""
    if isinstance(source, Path):
        with source.open(encoding="utf-8") as stream:  # the stream names the file in errors
            return yaml.load(stream, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    return yaml.load(source, Loader=StrictLoader)  # noqa: S506


DOCS = Path(__file__).resolve().parent.parent / "docs"
# Every test below reads the specs through these two, so all of them get the strict loader.
OPENAPI = load_spec(DOCS / "openapi.yaml")
ASYNCAPI = load_spec(DOCS / "asyncapi.yaml")
# The official parser; 3.x parses AsyncAPI 3.0.0, the version asyncapi.yaml declares.
ASYNCAPI_PARSER = "@asyncapi/parser@3.6.6"
ASYNCAPI_VALIDATE = Path(__file__).resolve().parent / "asyncapi_validate.mjs"
HTTP_METHODS = ("get", "post", "put", "patch", "delete", "head", "options")
# Routes served but documented elsewhere: the WebSocket lives in asyncapi.yaml.
NOT_IN_OPENAPI = {"/ws"}
# Frames the server sends: replies, then pushed events.
SERVER_FRAMES = ("ack", "error", "pong", "message.new", "message.receipt", "conversation.new",
                 "conversation.request", "conversation.updated", "member.added", "member.removed",
                 "typing.start", "typing.stop", "presence", "call.incoming", "call.state",
                 "call.answered_elsewhere", "call.offer", "call.answer", "call.ice", "call.hangup",
                 "user.deleted", "keys.low", "identity.changed", "device.added", "device.removed")


# -- helpers -----------------------------------------------------------------
def _rebase(node: Any, base: str) -> Any:
    """A copy of `node` whose local `$ref`s point into the document at `base`."""
    if isinstance(node, dict):
        return {k: (base + v if k == "$ref" and isinstance(v, str) and v.startswith("#") else _rebase(v, base))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase(v, base) for v in node]
    return node


_REGISTRY = Registry().with_resources([
    ("urn:kisse:openapi", Resource.from_contents(OPENAPI, default_specification=DRAFT202012)),
    ("urn:kisse:asyncapi", Resource.from_contents(ASYNCAPI, default_specification=DRAFT202012)),
])


def validator(schema: dict, base: str) -> Draft202012Validator:
    return Draft202012Validator(_rebase(schema, base), registry=_REGISTRY, format_checker=FormatChecker())


def resolve(document: dict, ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def deref(document: dict, node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = resolve(document, node["$ref"])
    return node


def all_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in all_refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in all_refs(v)]
    return []


# Keywords whose value maps names to schemas: their keys are names, not keywords.
_NAMED = ("properties", "patternProperties", "$defs", "definitions")


def as_code(document: dict, node: Any, named: bool = False) -> Any:
    """A schema as kisse/schemas.py writes it: every `$ref` replaced by its target
    (recursively) and the documentation-only keywords dropped."""
    if isinstance(node, dict):
        if not named and "$ref" in node:
            extra = sorted(k for k in node if k not in ("$ref", "description", "examples", "example"))
            assert not extra, f"{node['$ref']}: keywords beside $ref ({extra}) would be lost"
            return as_code(document, resolve(document, node["$ref"]))
        return {k: as_code(document, v, not named and k in _NAMED) for k, v in node.items()
                if named or k not in ("description", "examples", "example")}
    if isinstance(node, list):
        return [as_code(document, v) for v in node]
    return node


def all_keys(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return list(node) + [k for v in node.values() for k in all_keys(v)]
    if isinstance(node, list):
        return [k for v in node for k in all_keys(v)]
    return []


# -- strict YAML -----------------------------------------------------------------
@pytest.mark.parametrize("text,problem", [
    ("seq: {description: numbers 1, 2, 3}\n", "mapping key 2 on line 1 is int"),
    ("a:\n  b:\n    true: yes\n", "mapping key True on line 3 is bool"),
    ("a: {? : x}\n", "mapping key None on line 1 is NoneType"),
    ("a: {[x]: y}\n", "mapping key ['x'] on line 1 is list"),
    ("p: {description: f(a, b)}\n", "flow mapping entry 'b)' on line 1 has no value"),
])
def test_spec_loader_refuses_non_string_keys(text: str, problem: str) -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match=re.escape(problem)):
        load_spec(text)


def test_specs_are_strict_yaml_with_string_keys() -> None:
    """Both specs load with StrictLoader (as OPENAPI and ASYNCAPI, which every test uses)."""
    assert load_spec('a: {description: "numbers 1, 2, 3", b: null, "1": [x]}') == \
        {"a": {"description": "numbers 1, 2, 3", "b": None, "1": ["x"]}}
    for spec in (OPENAPI, ASYNCAPI):
        assert all(isinstance(key, str) for key in all_keys(spec))


# -- route drift ---------------------------------------------------------------
def _expand(pattern: str) -> list[str]:
    """Route regex → OpenAPI-style templates with anonymous `{}` parameters.

    `([^/]+)` is a parameter; `(a|b)` is a literal alternation and becomes one
    template per alternative."""
    pattern = pattern.removeprefix("^").removesuffix("$")
    match = re.search(r"\(([^()]*)\)", pattern)
    if match is None:
        return [pattern.replace("\\", "")]
    group = match.group(1)
    head, tail = pattern[:match.start()], pattern[match.end():]
    if group == "[^/]+":
        return [t for t in _expand(head + "\0" + tail)]
    return [t for alt in group.split("|") for t in _expand(head + alt + tail)]


def served_routes() -> dict[str, set[str]]:
    """`{template with {} params: {methods}}` for every route the app registers."""
    routes: dict[str, set[str]] = {}
    for pattern, handler in default_handlers:
        methods = {m for m in HTTP_METHODS
                   if getattr(handler, m, None) is not getattr(tornado.web.RequestHandler, m, None)}
        for template in _expand(pattern):
            routes.setdefault(template.replace("\0", "{}"), set()).update(methods)
    return routes


def documented_routes() -> dict[str, set[str]]:
    return {re.sub(r"\{[^}]+\}", "{}", path): {m for m in item if m in HTTP_METHODS}
            for path, item in OPENAPI["paths"].items()}


def test_route_conversion() -> None:
    assert _expand(r"/api/calls/([^/]+)/(accept|reject)") == ["/api/calls/\0/accept", "/api/calls/\0/reject"]


def test_every_served_route_is_documented() -> None:
    served = {p: m for p, m in served_routes().items() if p not in NOT_IN_OPENAPI}
    documented = documented_routes()
    missing = sorted(set(served) - set(documented))
    assert not missing, f"routes served but not in docs/openapi.yaml: {missing}"
    for path, methods in served.items():
        assert methods == documented[path], f"{path}: served {sorted(methods)}, documented {sorted(documented[path])}"


def test_every_documented_route_is_served() -> None:
    served = served_routes()
    stale = sorted(set(documented_routes()) - set(served))
    if stale == ["/metrics"]:
        pytest.xfail("/metrics is documented but not served yet (the lead is adding it)")
    assert not stale, f"paths in docs/openapi.yaml that the app does not serve: {stale}"


def test_ws_route_is_the_asyncapi_channel() -> None:
    assert "/ws" in served_routes()
    assert ASYNCAPI["channels"]["gateway"]["address"] == "/ws"


# -- OpenAPI ---------------------------------------------------------------------
def test_openapi_is_valid() -> None:
    assert OPENAPI["openapi"].startswith("3.1")
    validate_openapi(OPENAPI)


def _media_examples():
    for path, item in OPENAPI["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            bodies = [("request", deref(OPENAPI, operation.get("requestBody", {})))]
            bodies += [(status, deref(OPENAPI, r)) for status, r in operation["responses"].items()]
            for where, body in bodies:
                for media, content in (body or {}).get("content", {}).items():
                    if "example" in content and media == "application/json":
                        yield f"{method.upper()} {path} {where}", content["schema"], content["example"]
    for name, schema in OPENAPI["components"]["schemas"].items():
        if "example" in schema:
            yield f"components/schemas/{name}", {"$ref": f"#/components/schemas/{name}"}, schema["example"]


@pytest.mark.parametrize("where,schema,example", list(_media_examples()), ids=lambda v: v if isinstance(v, str) else "")
def test_openapi_examples_match_their_schemas(where: str, schema: dict, example: Any) -> None:
    validator(schema, "urn:kisse:openapi").validate(example)


def test_openapi_refs_resolve() -> None:
    for ref in all_refs(OPENAPI):
        assert ref.startswith("#/"), ref
        resolve(OPENAPI, ref)


def served_bodies() -> dict[tuple[str, str], Any]:
    """`{(METHOD, openapi path): schema}` for every JSON body a handler reads (its `BODIES`)."""
    paths = {re.sub(r"\{[^}]+\}", "{}", path): path for path in OPENAPI["paths"]}
    bodies: dict[tuple[str, str], Any] = {}
    for pattern, handler in default_handlers:
        for method, schema in getattr(handler, "BODIES", {}).items():
            assert getattr(handler, method.lower()) is not getattr(tornado.web.RequestHandler, method.lower()), \
                f"{handler.__name__}.BODIES names {method}, which it does not serve"
            for template in _expand(pattern):
                path = paths.get(template.replace("\0", "{}"))
                assert path is not None, f"{template!r} is not in docs/openapi.yaml"
                bodies[(method, path)] = schema
    return bodies


def documented_json_bodies() -> dict[tuple[str, str], Any]:
    """`{(METHOD, openapi path): schema}` for every documented `application/json` request body."""
    found = {}
    for path, item in OPENAPI["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS and "requestBody" in operation:
                content = deref(OPENAPI, operation["requestBody"])["content"]
                if "application/json" in content:
                    found[(method.upper(), path)] = content["application/json"]["schema"]
    return found


def test_rest_bodies_are_documented_as_the_handlers_read_them() -> None:
    """Every handler's `BODIES[method]` (kisse/schemas.py) is its route's requestBody schema
    in openapi.yaml, `$ref`s resolved and documentation dropped; no other route documents one."""
    served, documented = served_bodies(), documented_json_bodies()
    assert len(served) >= 12  # register, login, conversations, messages, receipts x2, presence, calls x5
    assert set(documented) == set(served), \
        f"JSON bodies documented but not read: {sorted(set(documented) - set(served))}; " \
        f"read but not documented: {sorted(set(served) - set(documented))}"
    for key, schema in served.items():
        assert as_code(OPENAPI, documented[key]) == schema, \
            f"{' '.join(key)}: requestBody schema differs from the handler's BODIES"


def test_capabilities_are_documented_field_by_field() -> None:
    """The Capabilities schema describes exactly what `capabilities()` returns, at every level."""
    schema = OPENAPI["components"]["schemas"]["Capabilities"]
    for settings in (Settings(), Settings(turn_secret="s", turn_uris=("turn:x",), ws_ping=1, max_body=10)):
        answer = json.loads(json.dumps(capabilities(settings)))
        validator({"$ref": "#/components/schemas/Capabilities"}, "urn:kisse:openapi").validate(answer)
        assert set(answer) == set(schema["properties"]) == set(schema["required"])
        for group in ("limits", "timers", "features"):
            documented = schema["properties"][group]
            assert set(answer[group]) == set(documented["properties"]) == set(documented["required"]), group
    example = OPENAPI["paths"]["/api/capabilities"]["get"]["responses"]["200"]["content"]["application/json"]["example"]
    defaults = capabilities(Settings(turn_secret="s", turn_uris=("turn:x",)))
    assert example == {**defaults, "version": example["version"]}, "the example shows the default settings"


# -- AsyncAPI ----------------------------------------------------------------------
ASYNCAPI_SHAPE = {
    "type": "object",
    "required": ["asyncapi", "info", "channels", "operations", "components"],
    "properties": {
        "asyncapi": {"const": "3.0.0"},
        "info": {"type": "object", "required": ["title", "version"]},
        "servers": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["host", "protocol"],
            "properties": {"protocol": {"enum": ["ws", "wss"]}}}},
        "channels": {"type": "object", "minProperties": 1, "additionalProperties": {
            "type": "object", "required": ["address", "messages"],
            "properties": {"messages": {"type": "object", "additionalProperties": {
                "type": "object", "required": ["$ref"]}}}}},
        "operations": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["action", "channel", "messages"],
            "properties": {"action": {"enum": ["send", "receive"]},
                           "channel": {"type": "object", "required": ["$ref"],
                                       "properties": {"$ref": {"pattern": "^#/channels/"}}},
                           "messages": {"type": "array", "minItems": 1, "items": {
                               "type": "object", "required": ["$ref"],
                               "properties": {"$ref": {"pattern": "^#/channels/[^/]+/messages/"}}}},
                           "reply": {"type": "object", "required": ["messages"]}}}},
        "components": {"type": "object", "required": ["messages", "schemas"], "properties": {
            "messages": {"type": "object", "additionalProperties": {
                "type": "object", "required": ["name", "payload", "examples"],
                "properties": {"examples": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["payload"]}}}}},
            "securitySchemes": {"type": "object", "additionalProperties": {
                "type": "object", "required": ["type"]}}}},
    },
}


def test_asyncapi_passes_the_official_parser() -> None:
    prefix = node_tools.require(ASYNCAPI_PARSER)
    result = subprocess.run(["node", str(ASYNCAPI_VALIDATE), str(prefix), str(DOCS / "asyncapi.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{ASYNCAPI_VALIDATE.name} failed:\n{result.stderr}"
    diagnostics = json.loads(result.stdout)
    for d in diagnostics:
        print(f"asyncapi.yaml:{d['line']}: {d['severity']} {d['code']}: {d['message']} ({d['path']})")
    errors = [d for d in diagnostics if d["severity"] == "error"]
    assert not errors, f"{ASYNCAPI_PARSER} reports {len(errors)} error(s) in docs/asyncapi.yaml: {errors}"


def test_asyncapi_shape() -> None:
    Draft202012Validator(ASYNCAPI_SHAPE).validate(ASYNCAPI)
    for ref in all_refs(ASYNCAPI):
        assert ref.startswith("#/"), ref
        resolve(ASYNCAPI, ref)


def asyncapi_messages(action: str) -> dict[str, list[dict]]:
    """`{frame type: [message objects]}` the server receives or sends."""
    found: dict[str, list[dict]] = {}
    for operation in ASYNCAPI["operations"].values():
        refs = []
        if operation["action"] == action:
            refs += operation["messages"]
        if action == "send" and "reply" in operation:
            refs += operation["reply"]["messages"]
        for ref in refs:
            message = deref(ASYNCAPI, ref)
            kind = message["payload"]["properties"]["type"]["const"]
            if message not in found.setdefault(kind, []):
                found[kind].append(message)
    return found


def test_every_request_type_is_documented() -> None:
    documented = asyncapi_messages("receive")
    assert set(documented) == set(protocol.REQUESTS)
    for kind, (message, *others) in documented.items():
        assert not others, f"{kind}: more than one request message"
        data = message["payload"]["properties"]["data"]
        assert as_code(ASYNCAPI, data) == protocol.REQUESTS[kind], \
            f"{kind}: data schema differs from kisse/protocol.py REQUESTS"


def test_envelope_is_documented_as_the_server_reads_it() -> None:
    """Each request payload is ENVELOPE with its own `type` and `data`."""
    for kind, (message, *_) in asyncapi_messages("receive").items():
        payload = as_code(ASYNCAPI, message["payload"])
        properties = payload["properties"]
        assert properties["type"] == {"const": kind}
        assert properties["id"] == protocol.ENVELOPE["properties"]["id"], f"{kind}: id differs from ENVELOPE"
        assert set(properties) == set(protocol.ENVELOPE["properties"]), kind
        assert payload.get("maxProperties") == protocol.ENVELOPE["maxProperties"], kind
        assert "additionalProperties" not in payload, f"{kind}: unknown envelope fields are ignored, not refused"
        assert "type" in payload["required"], kind


def test_every_server_frame_is_documented() -> None:
    assert set(asyncapi_messages("send")) == set(SERVER_FRAMES)


def _asyncapi_examples():
    for key, message in ASYNCAPI["components"]["messages"].items():
        for example in message["examples"]:
            yield key, message["payload"], example["payload"]


@pytest.mark.parametrize("key,schema,example", list(_asyncapi_examples()), ids=lambda v: v if isinstance(v, str) else "")
def test_asyncapi_examples_match_their_payloads(key: str, schema: dict, example: Any) -> None:
    validator(schema, "urn:kisse:asyncapi").validate(example)
    if key.endswith("Request"):  # and the server accepts it as it is
        kind, _, data = protocol.parse(json.dumps(example))
        assert kind == example["type"] and data == example.get("data", {})


def test_shared_schemas_are_identical() -> None:
    ours, theirs = ASYNCAPI["components"]["schemas"], OPENAPI["components"]["schemas"]
    for name in set(ours) & set(theirs):
        assert ours[name] == theirs[name], f"components/schemas/{name} differs between the specs"
    for ref in all_refs(ASYNCAPI["components"]["schemas"]):
        assert ref.removeprefix("#/components/schemas/") in ours, ref


def test_close_codes_are_documented() -> None:
    codes = ASYNCAPI["channels"]["gateway"]["x-close-codes"]
    used = [value for name, value in vars(protocol).items() if name.startswith("CLOSE_")]
    assert len(used) >= 5
    for code in used:
        assert str(code) in codes
        assert f"| {code} |" in ASYNCAPI["info"]["description"]


# -- live conformance -----------------------------------------------------------------
_TEMPLATES = [(re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(p)) + "$"), p)
              for p in OPENAPI["paths"]]


def _template(path: str) -> str:
    # Literal paths win over templated ones, as in the route table (/api/calls/active).
    for regex, template in sorted(_TEMPLATES, key=lambda t: t[1].count("{")):
        if regex.match(path):
            return template
    raise AssertionError(f"{path} matches no path in openapi.yaml")


class Checked:
    """Wraps the test `Api`: every JSON answer is checked against openapi.yaml."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.seen: set[tuple[str, str, int]] = set()

    async def call(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> tuple[int, Any]:
        status, body = await self.api.call(method, path, token, **kwargs)
        template = _template(urlsplit(path).path)
        operation = OPENAPI["paths"][template].get(method.lower())
        assert operation is not None, f"{method} {template} is not documented"
        response = operation["responses"].get(str(status))
        assert response is not None, f"{method} {template} answered undocumented {status}: {body!r}"
        content = deref(OPENAPI, response).get("content", {})
        if "application/json" in content:
            assert isinstance(body, (dict, list)), f"{method} {template} {status}: not JSON"
            validator(content["application/json"]["schema"], "urn:kisse:openapi").validate(body)
        self.seen.add((method, template, status))
        return status, body


def _check_frame(frame: dict, direction: str = "send") -> None:
    messages = asyncapi_messages(direction).get(frame["type"])
    assert messages, f"undocumented {direction} frame {frame['type']}"
    errors = [list(validator(m["payload"], "urn:kisse:asyncapi").iter_errors(frame)) for m in messages]
    assert any(not e for e in errors), f"{frame} does not match asyncapi.yaml: {errors}"


# A small device cap and race grace, so that 409 too_many_devices and both answers
# to a spent refresh token (409 refresh_race, then 401 refresh_token_reused) show up.
@pytest.mark.parametrize("settings", [with_settings(max_devices=3, refresh_race_grace=0.5)], ids=["sessions"])
@pytest.mark.gen_test(timeout=30)
async def test_live_rest_responses_match_openapi(api) -> None:
    c = Checked(api)
    assert (await c.call("GET", "/healthz"))[0] == 200
    assert (await c.call("GET", "/readyz"))[0] == 200
    assert (await c.call("GET", "/api/capabilities"))[1]["api_version"] >= 1

    _, alice = await c.call("POST", "/api/auth/register", body={"username": "spec_alice", "password": "password123",
                                                                "display_name": "Alice"})
    _, bob = await c.call("POST", "/api/auth/register", body={"username": "spec_bob", "password": "password123"})
    _, carol = await c.call("POST", "/api/auth/register", body={"username": "spec_carol", "password": "password123"})
    ta, tb, tc = alice["token"], bob["token"], carol["token"]
    alice, bob, carol = alice["user"], bob["user"], carol["user"]
    assert (await c.call("POST", "/api/auth/register", body={"username": "spec_alice", "password": "password123"}))[0] == 409
    assert (await c.call("POST", "/api/auth/register", body={"username": "x", "password": "password123"}))[0] == 400
    assert (await c.call("POST", "/api/auth/register", raw=b"{nope"))[0] == 400
    assert (await c.call("POST", "/api/auth/login", body={"username": "spec_bob", "password": "password123"}))[0] == 200
    assert (await c.call("POST", "/api/auth/login", body={"username": "spec_bob", "password": "wrong-pass"}))[0] == 401
    assert (await c.call("GET", "/api/auth/me", ta))[0] == 200
    assert (await c.call("GET", "/api/auth/me"))[0] == 401
    assert (await c.call("GET", "/api/auth/me", "not-a-jwt"))[0] == 401

    assert (await c.call("GET", "/api/users?q=spec_&limit=1", ta))[1]["next_after"] is not None
    assert (await c.call("GET", "/api/users?limit=0", ta))[0] == 400
    assert (await c.call("GET", f"/api/users/{bob['id']}", ta))[0] == 200
    assert (await c.call("GET", "/api/users/nobody", ta))[0] == 404

    status, body = await c.call("POST", "/api/conversations", ta, body={"participant_ids": [bob["id"]]})
    assert status == 201
    conv = body["conversation"]
    assert (await c.call("POST", "/api/conversations", ta, body={"participant_ids": [bob["id"]]}))[0] == 200
    status, body = await c.call("POST", "/api/conversations", ta,
                                body={"participant_ids": [bob["id"], carol["id"]], "title": "g"})
    assert status == 201
    group = body["conversation"]
    assert (await c.call("GET", "/api/conversations?filter=requests", tb))[0] == 200
    assert (await c.call("GET", "/api/conversations?filter=nope", tb))[0] == 400
    assert (await c.call("POST", f"/api/conversations/{conv['id']}/accept", tb))[0] == 200
    assert (await c.call("POST", f"/api/conversations/{group['id']}/accept", tb, body={}))[0] == 200
    assert (await c.call("POST", f"/api/conversations/{group['id']}/accept", tc))[0] == 200
    assert (await c.call("POST", f"/api/conversations/{conv['id']}/decline", tb))[0] == 409
    assert (await c.call("PATCH", f"/api/conversations/{group['id']}", ta, body={"title": "g2"}))[0] == 200
    assert (await c.call("PATCH", f"/api/conversations/{group['id']}", tb, body={"title": "g3"}))[0] == 403
    assert (await c.call("PATCH", f"/api/conversations/{group['id']}/members/{carol['id']}", ta,
                         body={"role": "admin"}))[0] == 200
    assert (await c.call("PATCH", f"/api/conversations/{conv['id']}/members/{bob['id']}", ta,
                         body={"role": "admin"}))[0] == 409
    _, fay = await c.call("POST", "/api/auth/register", body={"username": "spec_fay", "password": "password123"})
    members = f"/api/conversations/{group['id']}/members"
    assert (await c.call("POST", members, ta, body={"user_ids": [fay["user"]["id"]]}))[0] == 200
    assert (await c.call("POST", members, ta, body={"user_ids": ["ghost"]}))[0] == 400
    assert (await c.call("DELETE", f"{members}/{fay['user']['id']}", ta))[0] == 204
    assert (await c.call("DELETE", f"{members}/{fay['user']['id']}", ta))[0] == 404
    assert (await c.call("POST", f"/api/users/{fay['user']['id']}/block", tb))[0] == 204
    assert (await c.call("POST", f"/api/users/{bob['id']}/block", tb))[0] == 400
    assert (await c.call("GET", "/api/blocks", tb))[0] == 200
    assert (await c.call("DELETE", f"/api/users/{fay['user']['id']}/block", tb))[0] == 204
    assert (await c.call("POST", "/api/conversations", ta, body={"participant_ids": ["ghost"]}))[0] == 400
    assert (await c.call("POST", "/api/conversations", ta, body={}))[0] == 400
    assert (await c.call("GET", "/api/conversations?limit=1", ta))[1]["next_before"] is not None
    assert (await c.call("GET", "/api/conversations?before=junk", ta))[0] == 400
    assert (await c.call("GET", f"/api/conversations/{conv['id']}", ta))[0] == 200
    assert (await c.call("GET", f"/api/conversations/{conv['id']}", tc))[0] == 404

    status, body = await c.call("POST", "/api/messages", ta, body={"conversation_id": conv["id"],
                                                                   "client_message_id": "m1", "ciphertext": "q83vEjRWeJA="})
    assert status == 201
    inline = body["message"]
    assert (await c.call("POST", "/api/messages", ta, body={"conversation_id": conv["id"],
                                                            "client_message_id": "m1"}))[0] == 200
    assert (await c.call("POST", "/api/messages", ta, body={"conversation_id": conv["id"], "client_message_id": "m2",
                                                            "ciphertext": "not base64!"}))[0] == 400
    assert (await c.call("POST", "/api/messages", tc, body={"conversation_id": conv["id"],
                                                            "client_message_id": "m3"}))[0] == 404
    _, body = await c.call("POST", "/api/messages", ta, body={"conversation_id": conv["id"], "client_message_id": "m4"})
    blob_message = body["message"]
    history = f"/api/conversations/{conv['id']}/messages"
    assert (await c.call("GET", history + "?limit=1", ta))[1]["has_more"] is True
    assert (await c.call("GET", history + "?after=0&before=2", ta))[0] == 400
    assert (await c.call("GET", history + "?after=1", tb))[0] == 200

    content = f"/api/messages/{blob_message['id']}/content"
    assert (await c.call("GET", content, ta))[0] == 404
    assert (await c.call("POST", content, ta, raw=b"\x00" * 1000))[0] == 201
    assert (await c.call("POST", content, ta, raw=b"\x00" * 1000))[0] == 200
    assert (await c.call("POST", content, ta, raw=b"\x01" * 1000))[0] == 409
    assert (await c.call("POST", content, tb, raw=b"\x00"))[0] == 403
    assert (await c.call("POST", f"/api/messages/{inline['id']}/content", ta, raw=b"\x00"))[0] == 409
    assert (await c.call("GET", content, tb))[0] == 200
    assert (await c.call("GET", content, tb, headers={"Range": "bytes=10-19"})) == (206, b"\x00" * 10)
    assert (await c.call("GET", content, tb, headers={"Range": "bytes=5000-"}))[0] == 416
    assert (await c.call("GET", f"/api/messages/{inline['id']}/content", tb))[0] == 200

    assert (await c.call("POST", f"/api/messages/{inline['id']}/delivered", tb))[0] == 200
    assert (await c.call("POST", f"/api/messages/{blob_message['id']}/read", tb, body={}))[0] == 200
    assert (await c.call("POST", f"/api/messages/{inline['id']}/read", tb, body={"x": 1}))[0] == 200  # ignored
    assert (await c.call("POST", f"/api/messages/{inline['id']}/read", tb, body=[1]))[1]["error"]["details"] == \
        {"field": "body"}
    assert (await c.call("POST", f"/api/messages/{inline['id']}/read", tc))[0] == 404
    assert (await c.call("GET", f"/api/messages/{inline['id']}/receipts", ta))[0] == 200

    assert (await c.call("POST", "/api/presence", tb, body={"status": "away"}))[0] == 200
    assert (await c.call("POST", "/api/presence", tb, body={"status": "asleep"}))[0] == 400
    assert (await c.call("GET", f"/api/presence/{bob['id']}", ta))[0] == 200
    assert (await c.call("GET", f"/api/presence/{alice['id']}", tc))[0] == 200  # they share the group
    _, dave = await c.call("POST", "/api/auth/register", body={"username": "spec_dave", "password": "password123"})
    assert (await c.call("GET", f"/api/presence/{dave['user']['id']}", ta))[0] == 404

    _, body = await c.call("POST", "/api/calls", ta, body={"callee_id": bob["id"], "media": "audio"})
    call = body["call"]
    assert (await c.call("POST", "/api/calls", tc, body={"callee_id": bob["id"], "media": "video"}))[1]["call"]["status"] == "busy"
    assert (await c.call("POST", "/api/calls", ta, body={"callee_id": dave["user"]["id"], "media": "audio"}))[0] == 403
    assert (await c.call("GET", "/api/calls/active", tb))[0] == 200
    assert (await c.call("GET", f"/api/calls/{call['id']}", tb))[0] == 200
    assert (await c.call("GET", "/api/calls/turn", ta))[0] == 200  # a party to a live call
    assert (await c.call("GET", "/api/calls/nope", tb))[0] == 404
    assert (await c.call("POST", f"/api/calls/{call['id']}/accept", ta))[0] == 409  # only the callee
    assert (await c.call("POST", f"/api/calls/{call['id']}/accept", tb))[0] == 200
    assert (await c.call("POST", f"/api/calls/{call['id']}/end", ta))[1]["call"]["duration"] is not None
    assert (await c.call("POST", f"/api/calls/{call['id']}/reject", tb))[0] == 409
    _, body = await c.call("POST", "/api/calls", ta, body={"callee_id": bob["id"], "media": "video"})
    assert (await c.call("POST", f"/api/calls/{body['call']['id']}/cancel", ta))[0] == 200
    _, body = await c.call("POST", "/api/calls", ta, body={"callee_id": bob["id"], "media": "video"})
    assert (await c.call("POST", f"/api/calls/{body['call']['id']}/reject", tb))[0] == 200
    assert (await c.call("GET", "/api/calls/history?limit=1", ta))[1]["next_before"] is not None
    assert (await c.call("GET", "/api/calls/history?before=x", ta))[0] == 400
    assert (await c.call("GET", "/api/calls/turn", ta))[0] == 409  # no live call any more

    # -- devices and sessions -------------------------------------------------------
    erin_login = {"username": "spec_erin", "password": "password123"}
    _, erin = await c.call("POST", "/api/auth/register", body={**erin_login, "device_name": "Erin's phone"})
    te = erin["token"]
    assert erin["device"] == {**erin["device"], "device_id": 1, "name": "Erin's phone"}
    for _ in range(2):
        assert (await c.call("POST", "/api/auth/login", body=erin_login))[0] == 200
    status, body = await c.call("POST", "/api/auth/login", body={**erin_login, "device_name": "one too many"})
    assert status == 409 and [d["device_id"] for d in body["error"]["details"]["devices"]] == [1, 2, 3]
    assert [d["current"] for d in (await c.call("GET", "/api/devices", te))[1]["devices"]] == [True, False, False]
    assert (await c.call("GET", "/api/devices"))[0] == 401
    assert (await c.call("DELETE", "/api/devices/3", te))[0] == 204
    assert (await c.call("DELETE", "/api/devices/3", te))[0] == 404
    assert (await c.call("DELETE", "/api/devices/abc", te))[0] == 404

    status, renewed = await c.call("POST", "/api/auth/refresh", body={"refresh_token": erin["refresh_token"]})
    assert status == 200 and renewed["device"]["device_id"] == 1
    status, body = await c.call("POST", "/api/auth/refresh", body={"refresh_token": erin["refresh_token"]})
    assert status == 409 and body["error"]["code"] == "refresh_race"
    assert (await c.call("POST", "/api/auth/refresh", body={"refresh_token": "garbage"}))[0] == 401
    assert (await c.call("POST", "/api/auth/refresh", body={}))[0] == 400
    await asyncio.sleep(0.6)  # past the race grace: the spent token again is a copy
    status, body = await c.call("POST", "/api/auth/refresh", body={"refresh_token": erin["refresh_token"]})
    assert status == 401 and body["error"]["code"] == "refresh_token_reused"
    status, body = await c.call("GET", "/api/auth/me", renewed["token"])
    assert status == 401 and body["error"]["code"] == "session_revoked"

    _, erin = await c.call("POST", "/api/auth/login", body=erin_login)
    te = erin["token"]
    password = {"current_password": "password123", "new_password": "password456"}
    assert (await c.call("POST", "/api/auth/password", te, body={**password, "current_password": "wrong-one"}))[0] == 401
    assert (await c.call("POST", "/api/auth/password", te, body={**password, "new_password": "short"}))[0] == 400
    status, erin = await c.call("POST", "/api/auth/password", te, body=password)
    assert status == 200 and [d["device_id"] for d in (await c.call("GET", "/api/devices", te))[1]["devices"]] == [1]
    _, other = await c.call("POST", "/api/auth/login", body={**erin_login, "password": "password456"})
    assert (await c.call("POST", "/api/auth/logout", other["token"]))[0] == 204
    assert (await c.call("POST", "/api/auth/logout", other["token"]))[0] == 401

    _, body = await c.call("POST", "/api/conversations", ta, body={"participant_ids": [erin["user"]["id"]]})
    with_erin = body["conversation"]["id"]
    assert (await c.call("POST", "/api/messages", te, body={"conversation_id": with_erin, "client_message_id": "e1",
                                                            "ciphertext": "AAEC"}))[0] == 201
    assert (await c.call("DELETE", "/api/auth/me", te, body={"password": "password123"}))[0] == 401
    assert (await c.call("DELETE", "/api/auth/me", te, body={}))[0] == 400
    assert (await c.call("DELETE", "/api/auth/me", te, body={"password": "password456"}))[0] == 204
    assert (await c.call("GET", "/api/auth/me", te))[0] == 401
    _, body = await c.call("GET", f"/api/conversations/{with_erin}", ta)
    assert [p.get("deleted") for p in body["conversation"]["participants"] if p["id"] == erin["user"]["id"]] == [True]
    _, body = await c.call("GET", f"/api/conversations/{with_erin}/messages", ta)
    assert [m["tombstone"] for m in body["messages"]] == ["sender_deleted"]
    assert (await c.call("GET", f"/api/users/{erin['user']['id']}", ta))[1]["user"]["deleted"] is True
    assert (await c.call("GET", "/api/users?q=spec_erin", ta))[1]["users"] == []
    assert (await c.call("POST", "/api/auth/register", body=erin_login))[0] == 409  # the name stays reserved


@pytest.mark.gen_test(timeout=30)
async def test_live_ws_frames_match_asyncapi(api, ws_url) -> None:
    from tests.client import Ws
    from tests.prekeys import DeviceKeys
    ta, alice = await api.register()
    tb, bob = await api.register()
    conv = await api.conversation(ta, bob)
    a = await Ws.connect(ws_url, ta)
    b = await Ws.connect(ws_url, tb)
    frames: list[dict] = []

    async def req(ws: Any, kind: str, data: dict | None = None) -> dict:
        if kind in protocol.REQUESTS:
            _check_frame({"type": kind, "id": "x", "data": data or {}}, "receive")
        reply = await ws.request(kind, data)
        frames.append(reply)
        return reply

    async def event(ws: Any, kind: str) -> dict:
        frame = await ws.event(kind)
        frames.append(frame)
        return frame

    try:
        assert (await req(a, "ping"))["type"] == "pong"
        assert (await req(a, "nope"))["type"] == "error"
        await req(a, "typing.start", {"conversation_id": conv["id"]})
        await event(b, "typing.start")
        await req(a, "typing.stop", {"conversation_id": conv["id"]})
        await event(b, "typing.stop")
        sent = (await req(a, "message.send", {"conversation_id": conv["id"], "client_message_id": "w1",
                                              "ciphertext": "AAEC"}))["data"]["message"]
        await event(b, "message.new")
        await req(b, "message.read", {"message_id": sent["id"]})
        await event(a, "message.receipt")
        fresh = await Ws.connect(ws_url, tb)  # b already had it live: sync would not resend it
        try:
            await req(fresh, "sync", {"cursors": {conv["id"]: 0}})
            await event(fresh, "message.new")
        finally:
            fresh.close()
        await req(b, "presence.set", {"status": "busy"})
        await event(a, "presence")
        group = await api.conversation(ta, bob, (await api.register())[1], title="t")
        assert group["kind"] == "group"
        await event(b, "conversation.request")
        await event(b, "conversation.updated")  # bob's own accept
        _, newcomer = await api.register()
        await api.call("POST", f"/api/conversations/{group['id']}/members", ta, {"user_ids": [newcomer["id"]]})
        await event(b, "member.added")
        await api.call("DELETE", f"/api/conversations/{group['id']}/members/{newcomer['id']}", ta)
        await event(b, "member.removed")
        await event(a, "conversation.new")
        b2 = await Ws.connect(ws_url, tb)
        try:
            call = (await req(a, "call.start", {"callee_id": bob["id"], "media": "video"}))["data"]["call"]
            await event(b, "call.incoming")
            await req(b, "call.accept", {"call_id": call["id"]})
            await event(a, "call.state")
            await event(b2, "call.answered_elsewhere")
            for kind in ("call.offer", "call.answer", "call.ice"):
                await req(a, kind, {"call_id": call["id"], "payload": {"sdp": "v=0"}})
                await event(b, kind)
            await req(a, "call.hangup", {"call_id": call["id"], "payload": {"reason": "bye"}})
            await event(b, "call.hangup")
            await event(b, "call.state")
            for kind in ("call.reject", "call.cancel", "call.end"):
                assert (await req(a, kind, {"call_id": call["id"]}))["type"] == "error"
        finally:
            b2.close()
        assert (await api.call("PUT", "/api/keys", tb, DeviceKeys().upload()))[0] == 200
        await event(a, "device.added")
        assert (await api.call("GET", f"/api/keys/{bob['id']}", ta))[0] == 200
        await event(b, "keys.low")  # 4 one-time keys left, fewer than KISSE_PREKEY_LOW
        assert (await api.call("PUT", "/api/keys", tb, DeviceKeys().upload(one_time=[], pq=[])))[0] == 200
        await event(a, "identity.changed")
        status, second = await api.login(bob["username"])
        assert (await api.call("DELETE", f"/api/devices/{second['device']['device_id']}", tb))[0] == 204
        await event(a, "device.removed")
        gone_token, gone = await api.register()
        await api.conversation(gone_token, alice)
        assert (await api.call("DELETE", "/api/auth/me", gone_token, {"password": "password123"}))[0] == 204
        await event(a, "user.deleted")
    finally:
        a.close()
        b.close()
    for frame in frames:
        _check_frame(frame)
    assert {f["type"] for f in frames} >= set(SERVER_FRAMES)
    await asyncio.sleep(0)
