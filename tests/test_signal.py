"""Signal's own library through Kisse, end to end (issue 18, "Proof with Signal's library").

Node's test runner runs examples/signal/e2e.test.mjs (the reference client
integrators copy, examples/signal/kisse.mjs, driving `@signalapp/libsignal-client`)
against the app under test, on each storage backend: registration and key
upload, consent before one-time keys, PQXDH sessions per device and messages
both ways, a group on sender keys, a prekey pool exhausted by concurrent
claims. The script then lists every plaintext it sent and every private key it
generated; afterwards the backend's whole storage (tests/dump.py) must hold
none of them, in any encoding a server could plausibly use.

Node and npm are needed: without them the test skips with the reason (fails
under `CI=true`), like every Node-based check (tests/node_tools.py).
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
from pathlib import Path

from tests import node_tools
from tests.dump import dump, holds

LIBSIGNAL = "@signalapp/libsignal-client@0.103.0"  # the exact pin of examples/signal/package.json
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "signal"
NODE_TIMEOUT = 240.0  # seconds for the whole script: a loaded 2-core CI machine is slow


def _use_installed_library(prefix: Path) -> None:
    """Make `import ... from '@signalapp/libsignal-client'` in the example resolve, as it
    does for an integrator after `npm install`: examples/signal/node_modules (git-ignored)
    is a link to the pinned install. An integrator's own `npm install` there is kept."""
    link = EXAMPLE / "node_modules"
    target = os.path.relpath(prefix / "node_modules", EXAMPLE)
    if link.is_symlink() and os.readlink(link) == target:
        return
    if link.exists() and not link.is_symlink():
        installed = json.loads((link / "@signalapp" / "libsignal-client" / "package.json").read_text())
        assert installed["version"] == LIBSIGNAL.rsplit("@", 1)[1], (
            f"{link} holds libsignal-client {installed['version']}, not the pinned {LIBSIGNAL}: "
            "remove it (the test links the pinned install there)")
        return
    temporary = link.with_name(f"node_modules.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target, target_is_directory=True)
    os.replace(temporary, link)  # atomic: parallel runs never see a half-made link


async def _run_node(env: dict[str, str]) -> tuple[int | None, str]:
    """`(exit code, output)` of the Node script; exit code None when it timed out (then killed)."""
    process = await asyncio.create_subprocess_exec(
        shutil.which("node") or "node", "--test", "--test-reporter=spec", "e2e.test.mjs",
        cwd=EXAMPLE, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    chunks: list[bytes] = []

    async def drain() -> None:
        while chunk := await process.stdout.read(65536):
            chunks.append(chunk)

    try:
        await asyncio.wait_for(asyncio.gather(drain(), process.wait()), NODE_TIMEOUT)
        code: int | None = process.returncode
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        code = None
    return code, b"".join(chunks).decode(errors="replace")


def test_signal_protocol_through_kisse_leaves_no_secret_on_the_server(http_server, http_port, storage, io_loop,
                                                                      tmp_path):
    prefix = node_tools.require(LIBSIGNAL)
    _use_installed_library(prefix)
    secrets_file = tmp_path / "secrets.json"
    env = {**os.environ, "KISSE_URL": f"http://127.0.0.1:{http_port}", "KISSE_SECRETS_OUT": str(secrets_file),
           "NO_COLOR": "1"}
    env.pop("FORCE_COLOR", None)
    env.pop("NODE_OPTIONS", None)  # e.g. a debugger's --inspect would make node wait

    # On the test's IOLoop, so the app keeps serving while Node talks to it.
    code, output = io_loop.run_sync(lambda: _run_node(env), timeout=NODE_TIMEOUT + 30)
    print(output)
    assert code is not None, f"e2e.test.mjs did not finish within {NODE_TIMEOUT:.0f} s:\n{output}"
    assert code == 0, f"e2e.test.mjs exited {code}:\n{output}"
    assert secrets_file.exists(), f"e2e.test.mjs wrote no {secrets_file.name}:\n{output}"

    secrets = json.loads(secrets_file.read_text())
    plaintexts = [p.encode() for p in secrets["plaintexts"]]
    private_keys = [base64.b64decode(k) for k in secrets["private_keys"]]
    identity_keys = [base64.b64decode(k) for k in secrets["identity_public_keys"]]
    # 5 devices (Alice, Bob x2, Carol, Dave), 16 texts: a short list would mean a scenario was skipped.
    assert len(identity_keys) == 5 and len(plaintexts) >= 16 and len(private_keys) >= 60, output

    held = b"\x00".join(io_loop.run_sync(lambda: dump(storage), timeout=60))
    # The search looks in the right place: every published identity key is there.
    missing = [base64.b64encode(k).decode() for k in identity_keys
               if not holds(held, k)]
    assert not missing, f"the storage dump ({len(held)} bytes) lacks published identity keys {missing}:\n{output}"

    leaked_texts = [p.decode() for p in plaintexts if holds(held, p)]
    assert not leaked_texts, f"the server's storage holds plaintexts {leaked_texts}:\n{output}"
    leaked_keys = [base64.b64encode(k).decode()[:16] + "…" for k in private_keys
                   if holds(held, k)]
    assert not leaked_keys, f"the server's storage holds {len(leaked_keys)} private keys {leaked_keys}:\n{output}"
