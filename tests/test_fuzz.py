"""Fuzzing (issue 9): schemathesis drives every operation of docs/openapi.yaml
against a live `python -m kisse` on 127.0.0.1 and checks each answer against the
spec: no 5xx, only documented status codes, documented content types, response
bodies and headers that match their schemas.

Generation is bounded (`MAX_EXAMPLES` per operation and mode) and derandomized,
so a run is repeatable and stays well under a minute. Calls are authenticated
with a real bearer token, and path parameters are swapped for ids of real
users, conversations, messages and calls about half of the time, so the fuzzer
reaches handlers past their 404s. Findings are collected over the whole run and
reported together, then the test fails if there was any.
"""
from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "docs", "openapi.yaml")
HOST = "127.0.0.1"
MAX_EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 20}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Live:
    """A `python -m kisse` subprocess on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, "KISSE_HOST": HOST, "KISSE_PORT": str(self.port), "KISSE_STORAGE": "memory://",
               "KISSE_BCRYPT_ROUNDS": "4", "KISSE_JWT_SECRET": "fuzz-secret-that-is-long-enough-for-hs256!",
               "KISSE_TURN_SECRET": "fuzz-turn-secret", "KISSE_TURN_URIS": "turn:turn.example.org:3478"}
        self.process = subprocess.Popen([sys.executable, "-m", "kisse"], cwd=ROOT, env=env,
                                        stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.call("GET", "/healthz")
                return
            except OSError:
                assert self.process.poll() is None, "server exited: " + self.stderr()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.05)

    def call(self, method: str, path: str, token: str | None = None, body=None, raw: bytes | None = None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = json.dumps(body).encode() if body is not None else raw
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()

    def json(self, method: str, path: str, token: str | None = None, body=None, expect=(200, 201)) -> dict:
        status, _, raw = self.call(method, path, token, body)
        assert status in expect, (method, path, status, raw)
        return json.loads(raw)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def live():
    server = Live()
    yield server
    server.stop()


def seed(live: Live) -> tuple[str, dict[str, list[str]]]:
    """Real data for path parameters: `(token, {parameter name: real ids})`."""
    users = {}
    for name in ("fuzzer", "peer", "stranger"):
        users[name] = live.json("POST", "/api/auth/register",
                                body={"username": name, "password": "password123"})
    token = users["fuzzer"]["token"]
    me, peer, stranger = (users[name]["user"]["id"] for name in ("fuzzer", "peer", "stranger"))
    direct = live.json("POST", "/api/conversations", token, {"participant_ids": [peer]})["conversation"]["id"]
    group = live.json("POST", "/api/conversations", token,
                      {"participant_ids": [peer, stranger], "title": "group"})["conversation"]["id"]
    inline = live.json("POST", "/api/messages", token, {"conversation_id": direct, "client_message_id": "inline",
                                                        "ciphertext": "q83vEjRWeJA="})["message"]["id"]
    blob = live.json("POST", "/api/messages", token, {"conversation_id": direct,
                                                      "client_message_id": "blob"})["message"]["id"]
    status, _, raw = live.call("POST", f"/api/messages/{blob}/content", token, raw=os.urandom(4096))
    assert status == 201, raw
    empty = live.json("POST", "/api/messages", token, {"conversation_id": group,
                                                       "client_message_id": "empty"})["message"]["id"]
    theirs = live.json("POST", "/api/messages", users["peer"]["token"],
                       {"conversation_id": direct, "client_message_id": "theirs",
                        "ciphertext": "AAECAwQFBgc="})["message"]["id"]
    calls = [live.json("POST", "/api/calls", token, {"callee_id": peer, "media": "audio"})["call"]["id"],
             live.json("POST", "/api/calls", users["peer"]["token"],
                       {"callee_id": stranger, "media": "video"}, expect=(201, 403)).get("call", {}).get("id")]
    ids = {
        "user_id": [me, peer, stranger],
        "conversation_id": [direct, group],
        "message_id": [inline, blob, empty, theirs],
        "call_id": [call for call in calls if call],
    }
    return token, ids


# Body fields that name an existing resource, and the pool of real ids they may take.
BODY_IDS = {"conversation_id": "conversation_id", "callee_id": "user_id", "participant_ids": "user_id"}


def with_real_ids(strategy, operation, ids: dict[str, list[str]]):
    """Half of the time, replace each path parameter (and each id field of a JSON
    body) by a real id of its kind."""
    names = [parameter.name for parameter in operation.path_parameters if ids.get(parameter.name)]
    path = {name: st.one_of(st.none(), st.sampled_from(ids[name])) for name in names}
    body = {field: st.one_of(st.none(), st.lists(st.sampled_from(ids[kind]), min_size=1, max_size=3)
                             if field == "participant_ids" else st.sampled_from(ids[kind]))
            for field, kind in BODY_IDS.items()}

    def apply(triple):
        case, chosen_path, chosen_body = triple
        for name, value in chosen_path.items():
            if value is not None:
                case.path_parameters = {**(case.path_parameters or {}), name: value}
        if isinstance(case.body, dict):
            for field, value in chosen_body.items():
                if value is not None and field in case.body:
                    case.body = {**case.body, field: value}
        return case

    return st.tuples(strategy, st.fixed_dictionaries(path), st.fixed_dictionaries(body)).map(apply)


def test_fuzz_openapi_against_live_server(live):
    token, ids = seed(live)
    auth = {"Authorization": f"Bearer {token}"}
    schema = schemathesis.openapi.from_path(SPEC)
    schema.config.update(base_url=live.base)
    assert schema.config.base_url.startswith(f"http://{HOST}:")

    status, headers, _ = live.call("GET", "/metrics")
    metrics_served = status == 200 and headers.get("Content-Type", "").startswith("text/plain")
    if not metrics_served:
        schema = schema.exclude(path="/metrics")

    operations = [result.ok() for result in schema.get_all_operations()]
    cases: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[int] = collections.Counter()
    findings: dict[tuple[str, str, str], str] = {}
    unsatisfiable: list = []

    def run(case) -> None:
        label = case.operation.label
        cases[label] += 1
        try:
            response = case.call_and_validate(headers=auth, checks=CHECKS, timeout=30)
            statuses[response.status_code] += 1
        except FailureGroup as group:
            for failure in group.exceptions:
                key = (label, type(failure).__name__, failure.title)
                findings.setdefault(key, f"{failure.title}: {failure.message}\n{case.as_curl_command(headers=auth)}")

    bounded = dict(database=None, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                   suppress_health_check=list(HealthCheck))

    def drive(strategy, count: int) -> None:
        @settings(max_examples=count, **bounded)
        @given(strategy)
        def fuzz(case) -> None:
            run(case)

        try:
            fuzz()
        except Unsatisfiable:
            # Nothing to generate, e.g. negative data for an operation without any input.
            unsatisfiable.append(strategy)

    started = time.monotonic()
    for operation in operations:
        # The spec's own examples first, then generated data.
        examples = operation.get_strategies_from_examples()
        for strategy in examples:
            drive(with_real_ids(strategy, operation, ids), 1)
        for mode, count in MAX_EXAMPLES.items():
            strategy = with_real_ids(operation.as_strategy(generation_mode=mode), operation, ids)
            drive(strategy, count)
    elapsed = time.monotonic() - started

    stderr = live.stderr()
    tracebacks = stderr.count("Traceback")
    summary = [f"schemathesis {schemathesis.__version__}: {len(operations)} operations, "
               f"{sum(cases.values())} cases in {elapsed:.1f}s"
               f"{'' if metrics_served else ' (/metrics not served, skipped)'}"
               f"; {len(unsatisfiable)} generation runs had nothing to generate",
               "statuses of passing cases: " + ", ".join(f"{code}×{n}" for code, n in sorted(statuses.items()) if n),
               f"findings: {len(findings)}; server tracebacks: {tracebacks}"]
    for (label, kind, title), detail in sorted(findings.items()):
        summary.append(f"--- {label} [{kind}] {title}\n{detail}")
    if tracebacks:
        summary.append(stderr[-4000:])
    report = "\n".join(summary)
    print(report)
    assert not findings and not tracebacks, report
