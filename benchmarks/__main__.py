"""`python -m benchmarks [--quick] [--only NAME ...]`: Kisse against a bare-Tornado baseline.

Starts every server it needs on free 127.0.0.1 ports (Kisse as `python -m kisse`
with in-memory storage, the baseline as `benchmarks/bare_server.py`), runs each
scenario's load generator in its own process, stops everything, writes
benchmarks/results/<timestamp>.json and latest.json, and prints a table.
Exits 0 whatever the figures are; 1 only if a scenario crashed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from benchmarks import procs
from benchmarks.procs import ROOT, Server, raise_nofile, start_bare, start_kisse

MIB = 1024 * 1024
RESULTS = Path(__file__).resolve().parent / "results"

PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"relay_pairs": (1, 50), "relay_duration": 2.0, "relay_warmup": 0.5, "relay_window": 4, "relay_repeats": 1,
              "relay_max": 200_000, "idle_counts": (200, 500), "idle_settle": 0.3, "storm_logins": 10, "storm_idle_s": 1.0,
              "blob_size": 16 * MIB, "history_messages": 5_000, "history_requests": 300,
              "history_duration": 2.0, "rest_duration": 2.0, "rest_warmup": 0.5,
              "restart_pairs": 10, "restart_sends_each": 5, "restart_engines": ("memory",),
              "soak_duration": 30.0, "soak_sample_every": 2.0,
              "soak_warmup": 6.0, "soak_send_every": 0.25, "soak_gc_interval": 5.0,
              "cluster_pairs": 10, "cluster_duration": 2.0, "cluster_warmup": 0.5, "cluster_idle": 200,
              "keys_prekeys": 1_000, "keys_extra_claims": 100,
              "push_pairs": 50, "push_duration": 2.0, "push_warmup": 0.5, "push_repeats": 1,
              "push_devices": 200, "push_burst_messages": 10, "push_bursts": ((4, 0.0), (4, 0.05))},
    "full": {"relay_pairs": (1, 50), "relay_duration": 6.0, "relay_warmup": 1.0, "relay_window": 4, "relay_repeats": 3,
             "relay_max": 2_000_000, "idle_counts": (1000, 5000), "idle_settle": 1.0, "storm_logins": 50, "storm_idle_s": 3.0,
             "blob_size": 100 * MIB, "history_messages": 100_000, "history_requests": 3000,
             "history_duration": 8.0, "rest_duration": 10.0, "rest_warmup": 1.0,
             "restart_pairs": 10, "restart_sends_each": 25, "restart_engines": ("memory", "sqlite"),
             "soak_duration": 300.0, "soak_sample_every": 10.0,
             "soak_warmup": 30.0, "soak_send_every": 0.5, "soak_gc_interval": 30.0,
             "cluster_pairs": 20, "cluster_duration": 6.0, "cluster_warmup": 1.0, "cluster_idle": 1000,
             "keys_prekeys": 10_000, "keys_extra_claims": 500,
             "push_pairs": 50, "push_duration": 6.0, "push_warmup": 1.0, "push_repeats": 3,
             "push_devices": 1_000, "push_burst_messages": 10,
             "push_bursts": ((4, 0.0), (4, 0.05), (16, 0.05))},
}


class Crash(Exception):
    """The load generator or a server failed: not a figure, a broken run."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail

    def __str__(self) -> str:
        return f"{self.reason}\n{self.detail}".strip()


def _one_line(text: str, limit: int = 300) -> str:
    """A multi-line message as one line: its first line, and its last if there are more."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "no reason given"
    line = lines[0].rstrip(":") + (f": {lines[-1]}" if len(lines) > 1 else "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def crash_outcome(error: BaseException) -> dict[str, Any]:
    """A crashed scenario's outcome in the JSON: a one-line reason, and the details behind it."""
    if isinstance(error, Crash):
        reason, detail = error.reason, error.detail
    else:
        reason = f"{type(error).__name__}: {_one_line(str(error))}"
        detail = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return {"crashed": True, "error": _one_line(reason), "detail": detail.strip()[-3000:]}


def run_client(scenario: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one scenario's load generator in its own process, bounded by `timeout`."""
    with tempfile.TemporaryDirectory(prefix="kisse-bench-load-") as tmp:
        params_path, result_path = os.path.join(tmp, "params.json"), os.path.join(tmp, "result.json")
        with open(params_path, "w") as f:
            json.dump(params, f)
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.load", scenario, params_path, result_path],
                                  cwd=ROOT, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            raise Crash(f"load generator still running after {timeout:.0f}s (killed)") from None
        if proc.returncode != 0 or not os.path.exists(result_path):
            why = _last_line(proc.stderr) if proc.returncode else "no result written"
            raise Crash(f"load generator exited {proc.returncode}: {why}", proc.stderr[-2000:])
        with open(result_path) as f:
            return json.load(f)


PROFILE_DIR: Path | None = None  # set by --profile: py-spy records every Kisse server


def start_profiler(server: Server, scenario: str) -> tuple[subprocess.Popen | None, Path | None]:
    """py-spy (collapsed stacks, GIL-holding samples only) on a Kisse server, if --profile."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if PROFILE_DIR is None or server.name != "kisse" or not os.path.exists(spy):
        return None, None
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    out = PROFILE_DIR / f"{scenario}-{server.port}.collapsed"
    proc = subprocess.Popen([spy, "record", "-p", str(server.pid), "-r", "250", "--format", "raw", "-o", str(out),
                             "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, out


def with_server(start: Callable[[], Server], scenario: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
    server = start()
    spy, spy_out = start_profiler(server, scenario)
    try:
        result = run_client(scenario, {**params, "base": server.base, "server_pid": server.pid}, timeout)
    except Crash as crash:
        crash.reason = f"{server.name}: {crash.reason}"
        crash.detail += f"\n--- {server.name} log tail ---\n{server.log_tail()}"
        raise
    finally:
        if spy is not None:
            spy.send_signal(2)
            try:
                spy.wait(20)
            except subprocess.TimeoutExpired:
                spy.kill()
        code = server.stop()
    if spy_out is not None:
        result["profile"] = str(spy_out)
    result["server_exit_code"] = code
    if server.name == "kisse":
        result["kisse_env"] = {k: v for k, v in server.env.items() if k != "KISSE_JWT_SECRET"}
    return result


# -- scenarios ------------------------------------------------------------------------
# The abuse limits on (kisse/limits.py), set where this load never reaches them: what the
# relay pays for checking them (a send, a frame) against the same server with them off.
LIMITS_ON = {"KISSE_RATE_LIMITS": "on", "KISSE_LIMIT_SEND": "1000000000/10 seconds;1000000000/hour",
             "KISSE_WS_FRAME_RATE": "1000000000", "KISSE_LIMIT_REGISTER_IP": "1000000/minute",
             "KISSE_LIMIT_WS_USER": "1000000/minute", "KISSE_LIMIT_WS_IP": "1000000/minute"}


def sc_relay(cfg: dict[str, Any], logs: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pairs in cfg["relay_pairs"]:
        params = {"pairs": pairs, "window": cfg["relay_window"], "duration": cfg["relay_duration"],
                  "warmup": cfg["relay_warmup"], "max_messages": cfg["relay_max"], "client": cfg["client"]}
        timeout = cfg["relay_duration"] + cfg["relay_warmup"] + 60
        runs: dict[str, list[dict[str, Any]]] = {"kisse": [], "kisse_limits": [], "bare": []}
        for _ in range(cfg["relay_repeats"]):  # interleaved, so the machine's drift hits all alike
            runs["kisse"].append(with_server(lambda: start_kisse(logs), "relay", {**params, "target": "kisse"}, timeout))
            runs["kisse_limits"].append(with_server(lambda: start_kisse(logs, **LIMITS_ON), "relay",
                                                    {**params, "target": "kisse"}, timeout))
            runs["bare"].append(with_server(lambda: start_bare(logs), "relay", {**params, "target": "bare"}, timeout))
        out[f"pairs_{pairs}"] = {name: median_run(results) for name, results in runs.items()}
    return out


def median_run(runs: list[dict[str, Any]], key: str = "msgs_per_s") -> dict[str, Any]:
    """The run with the median throughput (its latencies too), plus every run's throughput."""
    ordered = sorted(runs, key=lambda r: r.get(key) or 0)
    return {**ordered[len(ordered) // 2], f"runs_{key}": [r.get(key) for r in runs]}


def sc_idle(cfg: dict[str, Any], logs: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for count in cfg["idle_counts"]:
        timeout = 60 + count / 50
        out[f"conns_{count}"] = {
            "kisse": with_server(lambda: start_kisse(logs, KISSE_PRESENCE_GRACE="0"), "idle",
                                 {"target": "kisse", "count": count, "settle": cfg["idle_settle"]}, timeout),
            "bare": with_server(lambda: start_bare(logs), "idle", {"target": "bare", "count": count, "settle": cfg["idle_settle"]}, timeout),
        }
    return out


def sc_login_storm(cfg: dict[str, Any], logs: str) -> dict[str, Any]:
    params = {"logins": cfg["storm_logins"], "idle_s": cfg["storm_idle_s"], "interval": 0.01,
              "max_pings": 20_000, "timeout": 120}
    return with_server(lambda: start_kisse(logs, KISSE_BCRYPT_ROUNDS="12"), "login_storm", params, 180)


def sc_blob(cfg: dict[str, Any], logs: str) -> dict[str, Any]:
    size = cfg["blob_size"]
    params = {"size": size, "chunk": 256 * 1024}
    out: dict[str, Any] = {
        # Regression check: a JSON-sized server cap must not stop content uploads.
        "default_config_2mib": with_server(lambda: start_kisse(logs), "blob", {**params, "size": 2 * MIB}, 60),
        "memory": with_server(lambda: start_kisse(logs, KISSE_MAX_BLOB=str(size)),
                              "blob", params, 180),
    }
    mongo = os.environ.get("KISSE_BENCH_MONGODB_URI")
    if mongo:
        try:
            out["mongo"] = with_server(lambda: start_kisse(logs, KISSE_STORAGE=mongo, KISSE_MAX_BLOB=str(size)), "blob", params, 300)
        except Exception as error:  # an optional backend: reported in its row, not a crash of the run
            out["mongo"] = crash_outcome(error)
    return out


def sc_history(cfg: dict[str, Any], logs: str) -> dict[str, Any]:
    params = {"messages": cfg["history_messages"], "window": 256, "seed_timeout": 150,
              "requests": cfg["history_requests"], "duration": cfg["history_duration"]}
    return with_server(lambda: start_kisse(logs), "history", params, 240)


def sc_rest(cfg: dict[str, Any], logs: str) -> dict[str, Any]:
    params = {"concurrency": 50, "duration": cfg["rest_duration"], "warmup": cfg["rest_warmup"],
              "max_requests": 2_000_000, "conversations": 5}
    timeout = cfg["rest_duration"] + cfg["rest_warmup"] + 60
    return {"kisse": with_server(lambda: start_kisse(logs), "rest", {**params, "target": "kisse"}, timeout),
            "bare": with_server(lambda: start_bare(logs), "rest", {**params, "target": "bare"}, timeout)}


def sc_keys(cfg: dict[str, Any], logs: str) -> dict[str, Any]:
    """Prekey claims on the memory backend: one device's pools of N one-time EC and PQ
    prekeys, drained by 50 concurrent claimers and N + extra claims; bare: `GET /json`
    with the same client, claimers and count."""
    n = cfg["keys_prekeys"]
    params = {"prekeys": n, "extra_claims": cfg["keys_extra_claims"], "concurrency": 50, "batch": 100}
    timeout = 120 + n / 20
    return {"kisse": with_server(lambda: start_kisse(logs, KISSE_PREKEY_MAX=str(2 * n)), "keys",
                                 {**params, "target": "kisse"}, timeout),
            "bare": with_server(lambda: start_bare(logs), "keys", {**params, "target": "bare"}, timeout)}


def sc_restart(cfg: dict[str, Any], logs: str) -> dict[str, Any]:
    """kill -9 with every send in flight, then a restart on the same port and database;
    and the same sends without a crash (the storage's own time), each on a fresh database.
    On both mongoeco engines: SQLite (persistent, ~4 ms a write: the storage alone takes
    tens of seconds for the sends) and in memory (~1 ms a write, nearer a real MongoDB;
    the wire server outlives the Kisse process it serves, so nothing is lost either way)."""
    out: dict[str, Any] = {"kisse_root": str(procs.kisse_root())}
    for engine in cfg["restart_engines"]:
        mongo = procs.start_mongo(logs, persistent=engine == "sqlite")
        try:
            runs: dict[str, Any] = {"storage": f"mongoeco ({engine})" if mongo.server is not None
                                    else "KISSE_BENCH_MONGODB_URI"}
            for mode in ("restart", "control"):
                spec = procs.kisse_spec(logs, mongo.uri(f"kisse_bench_{mode}_{os.getpid()}"))
                server = procs.start_kisse_spec(spec)
                pid_file = os.path.join(logs, f"restart-{mode}-{server.port}.pid")
                params = {"base": server.base, "server_pid": server.pid, "pairs": cfg["restart_pairs"],
                          "sends_each": cfg["restart_sends_each"], "kill": mode == "restart", "respawn": spec,
                          "pid_file": pid_file, "backoff_base": 0.1, "backoff_cap": 1.0, "timeout": 120}
                try:
                    runs[mode] = run_client("restart", params, 300)
                except Crash as crash:
                    crash.reason = f"kisse: {crash.reason}"
                    crash.detail += f"\n--- kisse log tail ---\n{server.log_tail()}"
                    raise
                finally:
                    server.stop()
                    if os.path.exists(pid_file):  # the replacement, if the load generator could not stop it
                        procs.stop_pid(int(Path(pid_file).read_text()))
                runs[mode]["kisse_env"] = {k: v for k, v in spec["kisse_env"].items() if k != "KISSE_JWT_SECRET"}
            out[engine] = runs
        finally:
            mongo.stop()
        if mongo.server is None:
            break  # one real MongoDB: one run
    return out


def sc_soak(cfg: dict[str, Any], logs: str) -> dict[str, Any]:
    """Mixed traffic with connection churn; the server's RSS every few seconds (MongoDB
    storage in its own process, so stored data is not in the server's RSS)."""
    mongo = procs.start_mongo(logs, persistent=False)
    try:
        spec = procs.kisse_spec(logs, mongo.uri(f"kisse_bench_soak_{os.getpid()}"), KISSE_PRESENCE_GRACE="1",
                                KISSE_WS_PING="5", KISSE_GC_INTERVAL=str(cfg["soak_gc_interval"]))
        server = procs.start_kisse_spec(spec)
        params = {"base": server.base, "server_pid": server.pid, "pairs": 10, "duration": cfg["soak_duration"],
                  "sample_every": cfg["soak_sample_every"], "warmup": cfg["soak_warmup"],
                  "send_every": cfg["soak_send_every"], "cut_every": 2.0, "visit_every": 1.0, "rest_every": 0.05,
                  "presence_every": 1.0}
        try:
            result = run_client("soak", params, cfg["soak_duration"] + 240)
        except Crash as crash:
            crash.reason = f"kisse: {crash.reason}"
            crash.detail += f"\n--- kisse log tail ---\n{server.log_tail()}"
            raise
        finally:
            code = server.stop()
        result.update(server_exit_code=code, kisse_root=str(procs.kisse_root()),
                      kisse_env={k: v for k, v in spec["kisse_env"].items() if k != "KISSE_JWT_SECRET"})
        return result
    finally:
        mongo.stop()


# The cluster scenario's runs: (key, nodes, phases); a phase is (name, placement, pairs,
# window), None for the profile's pairs and the relay window. The same pairs on 2 nodes
# and on 1; "same" and "cross" put the same share of sockets on every node. The light
# phases (one pair per node, one message in flight) leave the storage idle, so their
# latencies show the bus's own hop.
CLUSTER_RUNS: tuple[tuple[str, int, tuple[tuple[str, str, int | None, int | None], ...]], ...] = (
    ("two_nodes", 2, (("same", "same", None, None), ("cross", "cross", None, None),
                      ("same_light", "same", 2, 1), ("cross_light", "cross", 2, 1))),
    ("one_node", 1, (("same", "same", None, None),)),
    ("three_nodes", 3, (("cross", "cross", None, None), ("cross_light", "cross", 3, 1))),
)


def sc_cluster(cfg: dict[str, Any], logs: str) -> dict[str, Any]:
    """Kisse nodes on one MongoDB (mongoeco in memory, its own process) and one
    redis-server (KISSE_BUS): relay pairs with both ends on one node vs across nodes,
    2 nodes vs 1 for the same pairs, bus round trips per message with 2 and 3 nodes,
    and idle sockets' RSS on a bus node against the bare baseline."""
    mongo = procs.start_mongo(logs, persistent=False)
    try:
        redis = procs.start_redis()
    except BaseException:
        mongo.stop()
        raise
    others = {"redis-server": redis.pid}
    if procs.mongo_pid(mongo) is not None:
        others["mongoeco"] = procs.mongo_pid(mongo)  # type: ignore[assignment]
    out: dict[str, Any] = {"storage": "mongoeco (memory)" if mongo.server is not None else "KISSE_BENCH_MONGODB_URI",
                           "kisse_root": str(procs.kisse_root())}
    env = {"KISSE_PRESENCE_GRACE": "0"}  # a socket closed at the end of a phase leaves the directory at once
    try:
        # Each phase on a fresh cluster and database: mongoeco gets slower as its collections
        # grow (O(documents) unique-index checks), so phases sharing one database would
        # favour whichever ran first (measured: same-then-cross gave cross 0.6x same,
        # cross-then-same gave same 0.66x cross).
        for key, nodes, phases in CLUSTER_RUNS:
            out[key] = {"nodes": nodes, "phases": {}}
            for name, where, pairs, window in phases:
                servers = procs.start_cluster(
                    logs, mongo.uri(f"kisse_bench_cluster_{key}_{name}_{os.getpid()}"), redis.url, nodes, **env)
                params = {"base": servers[0].base, "nodes": [{"base": s.base, "pid": s.pid} for s in servers],
                          "pids": others, "warmup": cfg["cluster_warmup"], "duration": cfg["cluster_duration"],
                          "settle": 0.5, "drain_timeout": 30, "max_messages": cfg["relay_max"],
                          "phases": [(name, where, pairs or cfg["cluster_pairs"], window or cfg["relay_window"])]}
                try:
                    result = run_client("cluster", params, 180 + cfg["cluster_duration"])
                except Crash as crash:
                    crash.reason = f"kisse ({nodes} nodes, {name}): {crash.reason}"
                    for server in servers:
                        crash.detail += f"\n--- kisse :{server.port} log tail ---\n{server.log_tail()}"
                    raise
                finally:
                    out.setdefault("server_exit_codes", {}).setdefault(key, []).extend(s.stop() for s in servers)
                out[key]["phases"].update(result["phases"])
                out[key]["kisse_env"] = {k: v for k, v in servers[0].env.items() if k != "KISSE_JWT_SECRET"}
        count = cfg["cluster_idle"]
        idle = {"target": "kisse", "count": count, "settle": cfg["idle_settle"]}
        timeout = 60 + count / 10
        out["idle"] = {}
        # On a bus node; and on the same MongoDB without KISSE_BUS, to tell the bus's share from the storage's.
        for key, bus in (("kisse", redis.url), ("kisse_no_bus", "")):
            spec = procs.kisse_spec(logs, mongo.uri(f"kisse_bench_cluster_{key}_{os.getpid()}"), KISSE_BUS=bus, **env)
            node = procs.start_kisse_spec(spec)
            try:
                out["idle"][key] = run_client("idle", {**idle, "base": node.base, "server_pid": node.pid}, timeout)
            except Crash as crash:
                crash.reason = f"kisse (idle, KISSE_BUS={bus or 'unset'}): {crash.reason}"
                crash.detail += f"\n--- kisse log tail ---\n{node.log_tail()}"
                raise
            finally:
                node.stop()
        out["idle"]["bare"] = with_server(lambda: start_bare(logs), "idle", {**idle, "target": "bare"}, timeout)
    finally:
        redis.stop()
        mongo.stop()
    return out


# Push wake-ups (issue 19). Only Web Push: its fake runs in the load generator, and a
# development server signs with a VAPID key of its own. Every other provider unset, so
# that the "off" server (production without a VAPID key) really pushes through nothing.
PUSH_ENV = {"KISSE_PUSH_VAPID_PRIVATE_KEY": "", "KISSE_PUSH_FCM_CREDENTIALS": "", "KISSE_PUSH_APNS_KEY": "",
            "KISSE_PUSH_WORKERS": "4", "KISSE_PUSH_QUEUE": "10000", "KISSE_PUSH_COALESCE": "30"}
PUSH_ON = {**PUSH_ENV, "KISSE_ENV": "development"}
# Production turns Web Push off without a key, and needs bcrypt >= 10 (only the setup's
# registrations hash; nothing else in the server reads KISSE_ENV).
PUSH_OFF = {**PUSH_ENV, "KISSE_ENV": "production", "KISSE_BCRYPT_ROUNDS": "10"}
PUSH_VARIANTS = {"on": PUSH_ON, "off": PUSH_OFF, "on_no_coalescing": {**PUSH_ON, "KISSE_PUSH_COALESCE": "0"}}


def sc_push(cfg: dict[str, Any], logs: str) -> dict[str, Any]:
    """Push wake-ups: the relay's senders to recipients who are all offline, with push on
    (each recipient's device has a Web Push subscription) vs off (production, no VAPID
    key, no subscriptions), interleaved; push on with coalescing off as a report. Then a
    burst of messages to a group of N offline devices: until each has had its wake-up."""
    params = {"pairs": cfg["push_pairs"], "window": cfg["relay_window"], "duration": cfg["push_duration"],
              "warmup": cfg["push_warmup"], "max_messages": cfg["relay_max"]}
    timeout = cfg["push_duration"] + cfg["push_warmup"] + 90
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in PUSH_VARIANTS}
    for repeat in range(cfg["push_repeats"]):  # interleaved, the order alternating: drift hits all alike
        order = list(PUSH_VARIANTS) if repeat % 2 == 0 else list(reversed(PUSH_VARIANTS))
        for name in order:
            if name == "on_no_coalescing" and repeat:
                continue  # a report: one run is enough (and keeps the full profile short)
            env = PUSH_VARIANTS[name]
            runs[name].append(with_server(lambda env=env: start_kisse(logs, **env), "push_relay",
                                          {**params, "push": env is not PUSH_OFF}, timeout))
    out: dict[str, Any] = {"relay": {name: median_run(r, "sends_per_s") for name, r in runs.items()}}
    # Each repeat's on / off: the runs of one repeat are neighbours in time.
    out["relay_ratio_by_repeat"] = [round(on["sends_per_s"] / off["sends_per_s"], 3)
                                    if on.get("sends_per_s") and off.get("sends_per_s") else None
                                    for on, off in zip(runs["on"], runs["off"])]
    n = cfg["push_devices"]
    out["burst"] = {}
    for workers, answer_delay in cfg["push_bursts"]:  # (KISSE_PUSH_WORKERS, seconds the fake takes to answer)
        env = {**PUSH_ON, "KISSE_PUSH_WORKERS": str(workers), "KISSE_MAX_GROUP_MEMBERS": str(n + 1)}
        burst = {"devices": n, "messages": cfg["push_burst_messages"], "answer_delay": answer_delay,
                 "workers": workers, "settle": 1.0, "timeout": 60}
        out["burst"][f"workers_{workers}_answer_{1000 * answer_delay:g}ms"] = with_server(
            lambda env=env: start_kisse(logs, **env), "push_burst", burst, 120 + n / 10)
    return out


SCENARIOS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "relay": sc_relay, "idle": sc_idle, "login_storm": sc_login_storm, "blob": sc_blob,
    "history": sc_history, "rest": sc_rest,
    "restart": sc_restart, "soak": sc_soak, "cluster": sc_cluster, "keys": sc_keys, "push": sc_push,
}


# -- the table ---------------------------------------------------------------------------
# Every reading goes through _get/_num, so a partial or malformed result gives "-" cells, never an exception.
Row = dict[str, Any]


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _num(v: Any) -> int | float | None:
    """`v` if it is a number (not a bool), else None."""
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _ratio(a: Any, b: Any) -> float | None:
    a, b = _num(a), _num(b)
    return round(a / b, 2) if a is not None and b else None


def _check(v: Any, ok: Callable[[float], bool]) -> bool | None:
    """Whether the figure `v` meets `ok`; None when there is no figure."""
    v = _num(v)
    return None if v is None else ok(v)


def _items(d: Any) -> list[tuple[str, Any]]:
    return list(d.items()) if isinstance(d, dict) else []


def _row(name: str, kisse: Any, base: Any, base_label: str, unit: str, target: str,
         met: bool | None, ratio: float | None = None) -> Row:
    return {"metric": name, "kisse": kisse, "baseline": base, "baseline_is": base_label, "unit": unit,
            "ratio": ratio if ratio is not None else _ratio(kisse, base), "target": target, "met": met}


def crash_reason(res: Any) -> str | None:
    """The one-line reason if `res` is a crashed outcome (or no result at all), else None."""
    if not isinstance(res, dict):
        return f"no result ({type(res).__name__})"
    if res.get("crashed") or "error" in res:  # "error" alone: the shape before "crashed" existed
        return _one_line(str(res.get("error") or "no reason given"))
    return None


def crashed_row(name: str, reason: str, target: str) -> Row:
    return _row(f"{name}: crashed: {reason}", None, None, "-", "-", target, False)


def _relay_rows(s: Any) -> list[Row]:
    rows: list[Row] = []
    for key, res in _items(s):
        kt, bt = _get(res, "kisse", "msgs_per_s"), _get(res, "bare", "msgs_per_s")
        rows.append(_row(f"relay {key}: delivered msgs/s", kt, bt, "bare relay", "msg/s", ">= 0.5x bare",
                         _check(_ratio(kt, bt), lambda r: r >= 0.5)))
        lt = _get(res, "kisse_limits", "msgs_per_s")
        if lt is not None:  # results from before the limits have none
            rows.append(_row(f"relay {key}: msgs/s with the abuse limits on", lt, kt, "kisse, limits off", "msg/s",
                             ">= 0.95x off", _check(_ratio(lt, kt), lambda r: r >= 0.95)))
        for q in ("p50_ms", "p99_ms"):
            kl, bl = _get(res, "kisse", "latency", q), _get(res, "bare", "latency", q)
            rows.append(_row(f"relay {key}: e2e latency {q[:3]}", kl, bl, "bare relay", "ms",
                             "<= 2x bare" if q == "p99_ms" else "-",
                             _check(_ratio(kl, bl), lambda r: r <= 2.0) if q == "p99_ms" else None))
    return rows


def _idle_rows(s: Any) -> list[Row]:
    rows: list[Row] = []
    for key, res in _items(s):
        kb, bb = _get(res, "kisse", "bytes_per_conn"), _get(res, "bare", "bytes_per_conn")
        rows.append(_row(f"idle {key}: server RSS per connection", kb, bb, "bare relay", "bytes",
                         "<= 1.5x bare", _check(_ratio(kb, bb), lambda r: r <= 1.5)))
        kc, requested = _get(res, "kisse", "connected"), _get(res, "kisse", "requested")
        rows.append(_row(f"idle {key}: connections reached", kc, _get(res, "bare", "connected"), "bare relay",
                         "conns", f"= {requested}" if requested is not None else "-",
                         _check(kc, lambda c: c == requested)))
    return rows


def _login_storm_rows(st: Any) -> list[Row]:
    rows: list[Row] = []
    for q in ("p50_ms", "p99_ms"):
        ks, ki = _get(st, "storm", q), _get(st, "idle", q)
        rows.append(_row(f"login storm ({_get(st, 'logins')} logins, bcrypt 12): WS ping {q[:3]}", ks, ki,
                         "same socket, idle", "ms", "<= 50 ms" if q == "p99_ms" else "-",
                         _check(ks, lambda v: v <= 50) if q == "p99_ms" else None))
    return rows


def _blob_rows(bl: Any) -> list[Row]:
    status = _get(bl, "default_config_2mib", "upload_status")
    rows = [_row("blob: 2 MiB upload with default KISSE_MAX_BODY", status, None, "-", "HTTP status", "201",
                 _check(status, lambda v: v == 201))]
    for backend in ("memory", "mongo"):
        m = _get(bl, backend)
        if m is None:
            continue
        reason = crash_reason(m)
        if reason:
            rows.append(crashed_row(f"blob {backend}", reason, "201"))
            continue
        name = f"blob {backend}: {(_num(m.get('size')) or 0) / MIB:.0f} MiB"
        if m.get("failed"):
            rows.append(_row(f"{name} upload", m.get("upload_status") or "error", None, "-", "HTTP status", "201",
                             False))
            continue
        rows.append(_row(f"{name} upload", m.get("upload_mb_s"), None, "-", "MB/s", "report", None))
        rows.append(_row(f"{name} download", m.get("download_mb_s"), None, "-", "MB/s", "report", None))
        g = _num(m.get("peak_growth_beyond_blob"))
        rows.append(_row(f"blob {backend}: peak RSS growth beyond the blob", None if g is None else round(g / MIB, 1),
                         None, "-", "MiB", "<= 16 MiB", _check(g, lambda v: v <= 16 * MIB)))
    return rows


def _history_rows(h: Any) -> list[Row]:
    rows: list[Row] = []
    for page in ("latest_page", "random_page"):
        for q in ("p50_ms", "p99_ms"):
            v = _get(h, page, "latency", q)
            rows.append(_row(f"history ({_get(h, 'seeded')} msgs): {page.replace('_', ' ')} of 50 {q[:3]}", v,
                             None, "-", "ms", "<= 5 ms" if q == "p99_ms" else "-",
                             _check(v, lambda x: x <= 5) if q == "p99_ms" else None))
    return rows


def _rest_rows(rs: Any) -> list[Row]:
    kr, br = _get(rs, "kisse", "req_per_s"), _get(rs, "bare", "req_per_s")
    rows = [_row("REST GET /api/conversations @50 conns", kr, br, "bare JSON GET", "req/s", "report ratio", None)]
    for q in ("p50_ms", "p99_ms"):
        rows.append(_row(f"REST @50 conns latency {q[:3]}", _get(rs, "kisse", "latency", q),
                         _get(rs, "bare", "latency", q), "bare JSON GET", "ms", "report", None))
    return rows


def _keys_rows(ks: Any) -> list[Row]:
    k = _get(ks, "kisse")
    n = _num(_get(k, "prekeys"))
    name = f"keys @{_fmt(_get(k, 'concurrency'))} claimers"
    rows = [_row(f"keys: upload of {_fmt(_whole(n))} EC + {_fmt(_whole(n))} PQ one-time prekeys, 100 + 100 a request",
                 _get(k, "upload", "keys_per_s"), None, "-", "keys/s", "report", None),
            _row(f"{name}: claims/s", _get(k, "req_per_s"), _get(ks, "bare", "req_per_s"), "bare JSON GET", "req/s",
                 "report", None)]
    for q in ("p50_ms", "p99_ms", "max_ms"):
        rows.append(_row(f"{name}: claim latency {q[:-3]}", _get(k, "latency", q), _get(ks, "bare", "latency", q),
                         "bare JSON GET", "ms", "report", None))
    tenths = _get(k, "claims_per_s_by_tenth")
    first, last = (tenths[0], tenths[-1]) if isinstance(tenths, list) and tenths else (None, None)
    rows.append(_row(f"{name}: claims/s, first tenth of the claims (pools full)", _num(first), _num(last),
                     "last tenth, pools near empty", "req/s", "report", None))
    for kind, label in (("ec", "EC"), ("pq", "PQ")):
        count, exact = _get(k, kind, "count"), _get(k, kind, "exactly_the_uploaded")
        ok = _check(count, lambda v: v == n)
        if ok is not None:
            ok = ok and exact is True and _get(k, kind, "wrong_public_key") == 0
        rows.append(_row(f"keys: one-time {label} keys handed out, exactly the uploaded ones", count, n, "uploaded",
                         "keys", "all, each once", ok))
    twice = _get(k, "handed_out_twice")
    rows.append(_row("keys: one-time keys handed out twice", twice, None, "-", "keys", "= 0",
                     _check(twice, lambda v: v == 0)))
    empty, extra = _get(k, "empty_pool_claims"), _get(k, "extra_claims")
    ok = _check(empty, lambda v: v == _num(extra))
    rows.append(_row("keys: claims on the empty pools (no EC key, last-resort PQ key)", empty, extra,
                     "claims beyond N", "claims", "all of them", None if ok is None
                     else ok and _get(k, "empty_pool_got_last_resort") is True))
    failed = _get(k, "error_count")
    rows.append(_row("keys: failed claims", failed, None, "-", "claims", "= 0", _check(failed, lambda v: v == 0)))
    return rows


RESTART_TARGET_S = 10.0
SOAK_SLOPE_TARGET = 64 * 1024  # bytes per minute: ~0, within what a GC cycle's sawtooth leaves in the fit


def _whole(v: int | float | None) -> int | None:
    return None if v is None else int(v)


def _restart_rows(r: Any) -> list[Row]:
    rows: list[Row] = []
    for engine, runs in (r.items() if isinstance(r, dict) else ()):
        if not isinstance(runs, dict) or "restart" not in runs:
            continue
        rows += _restart_engine_rows(runs, str(runs.get("storage", engine)))
    return rows


def _restart_engine_rows(runs: dict[str, Any], storage: str) -> list[Row]:
    k, c = _get(runs, "restart"), _get(runs, "control")
    sends, clients = _num(_get(k, "sends")), _num(_get(k, "clients"))
    name = f"restart on {storage} (kill -9, {_fmt(_whole(sends))} sends in flight, {_fmt(_whole(clients))} clients)"
    done = _get(k, "all_acked_after_listen_s")
    met = _check(done, lambda v: v <= RESTART_TARGET_S)
    if _get(k, "all_acked") is False:
        met = False
    book = _get(k, "ledger")
    wrong = [_num(_get(book, key)) for key in ("lost", "duplicated", "holes", "disordered_senders")]
    wrong_total = sum(wrong) if all(v is not None for v in wrong) else None  # type: ignore[arg-type]
    rows = [_row(f"{name}: every send acked after restart", done, _get(c, "total_s"), "same sends, no crash", "s",
                 f"<= {RESTART_TARGET_S:g} s", met)]
    for q in ("p50_s", "p99_s"):
        rows.append(_row(f"  acked after restart {q[:3]} (from listening)", _get(k, "recovery", q), None,
                         "-", "s", "report", None))
    for q in ("p50_ms", "p99_ms"):
        rows.append(_row(f"  ack latency after restart {q[:3]} ((re)send to ack)", _get(k, "ack_latency", q),
                         _get(c, "ack_latency", q), "same sends, no crash", "ms", "report", None))
    rows.append(_row("  every client reconnected and synced", _get(k, "all_synced_after_listen_s"), None,
                     "-", "s", "report", None))
    rows.append(_row("  lost + duplicated + holes + out of order", wrong_total, None, "-", "sends", "= 0",
                     _check(wrong_total, lambda v: v == 0)))
    return rows


def _soak_rows(s: Any) -> list[Row]:
    duration = _num(_get(s, "duration_s"))
    slope = _num(_get(s, "rss_slope_bytes_per_min"))
    growth = _num(_get(s, "rss_growth_beyond_warmup"))
    name = f"soak ({_fmt(_whole(duration))} s mixed traffic, churn, MongoDB)"
    book = _get(s, "ledger")
    wrong = [_num(_get(book, key)) for key in ("lost", "duplicated", "holes")]
    wrong_total = sum(wrong) if all(v is not None for v in wrong) else None  # type: ignore[arg-type]
    met = _check(slope, lambda v: abs(v) <= SOAK_SLOPE_TARGET)
    return [
        _row(f"{name}: RSS slope after warm-up", None if slope is None else round(slope / 1024, 1), None, "-",
             "KiB/min", f"<= {SOAK_SLOPE_TARGET // 1024} KiB/min", met),
        _row("soak: RSS growth after warm-up", None if growth is None else round(growth / MIB, 2), None, "-",
             "MiB", "report", None),
        _row("soak: sends lost + duplicated + holes", wrong_total, _get(s, "sends"), "sends made", "sends", "= 0",
             _check(wrong_total, lambda v: v == 0) if _get(s, "all_acked") is not False else False, ratio=None),
        _row("soak: WebSockets counted vs open at the end", _get(s, "ws_connections_counted"),
             _get(s, "ws_connections_open"), "open", "conns", "equal",
             _check(_get(s, "ws_connections_counted"), lambda v: v == _num(_get(s, "ws_connections_open")))),
    ]


CLUSTER_LATENCY_RATIO = 3.0  # cross-node p99 <= 3x same-node p99
CLUSTER_SCALE_TARGET = 1.3  # 2 nodes >= 1.3x one node's msgs/s
# Bus round trips per message must not grow from 2 nodes to 3. Events leave in batches, and
# a batch's cost does not depend on its size, so the figure moves with each node's rate: a
# broadcast would cost 1.5x with 3 nodes, the 10 % allowed is the batching's noise.
CLUSTER_BUS_TOLERANCE = 1.1
CLUSTER_IDLE_RATIO = 1.5
_CPU_NAMES = {"redis-server": "redis", "mongoeco": "mongoeco", "load generator": "load"}


def _cpu_text(phase: Any) -> str | None:
    """The CPU of every process over a phase's window, e.g. "n0 95 / n1 93 / redis 8 / mongoeco 60 / load 30"."""
    parts = [f"{_CPU_NAMES.get(name, name.replace('kisse node ', 'n'))} {_num(v):.0f}"
             for name, v in _items(_get(phase, "cpu", "cpu_pct")) if _num(v) is not None]
    return " / ".join(parts) or None


def _cluster_rows(c: Any) -> list[Row]:
    two, one, three = (_get(c, key, "phases") for key in ("two_nodes", "one_node", "three_nodes"))
    rows: list[Row] = []
    for same, cross in (("same", "cross"), ("same_light", "cross_light")):
        s, x = _get(two, same), _get(two, cross)
        if s is None and x is None:
            continue
        name = f"cluster 2 nodes, {_fmt(_get(s, 'pairs'))} pairs x {_fmt(_get(s, 'window'))} in flight"
        rows.append(_row(f"{name}: cross-node msgs/s", _get(x, "msgs_per_s"), _get(s, "msgs_per_s"), "same node",
                         "msg/s", "report", None))
        for q in ("p50_ms", "p99_ms"):
            xl, sl = _get(x, "latency", q), _get(s, "latency", q)
            last = q == "p99_ms"
            rows.append(_row(f"{name}: cross-node e2e latency {q[:3]}", xl, sl, "same node", "ms",
                             f"<= {CLUSTER_LATENCY_RATIO:g}x same node" if last else "-",
                             _check(_ratio(xl, sl), lambda r: r <= CLUSTER_LATENCY_RATIO) if last else None))
    t, o = _get(two, "same", "msgs_per_s"), _get(one, "same", "msgs_per_s")
    rows.append(_row(f"cluster {_fmt(_get(two, 'same', 'pairs'))} pairs: 2 nodes vs 1 node, msgs/s", t, o,
                     "1 node, KISSE_BUS set", "msg/s", f">= {CLUSTER_SCALE_TARGET:g}x 1 node",
                     _check(_ratio(t, o), lambda r: r >= CLUSTER_SCALE_TARGET)))
    for phase, load in (("cross", "loaded"), ("cross_light", "1 in flight per pair")):
        for figure, label in (("operations_per_message", "Redis round trips"), ("published_per_message", "publishes")):
            v3, v2 = _get(three, phase, figure), _get(two, phase, figure)
            if v3 is None and v2 is None and phase != "cross":
                continue
            rows.append(_row(f"cluster bus {label} per message, 3 nodes ({load})", v3, v2, "2 nodes",
                             "per msg", f"<= {CLUSTER_BUS_TOLERANCE:g}x 2 nodes",
                             _check(_ratio(v3, v2), lambda r: r <= CLUSTER_BUS_TOLERANCE)))
    wrong: int | float | None = 0
    for key in ("two_nodes", "one_node", "three_nodes"):
        for phase, res in _items(_get(c, key, "phases")):
            lost = [_num(_get(res, "bus", "undelivered")), _num(_get(res, "unreceipted"))]
            if wrong is None or any(v is None for v in lost):
                wrong = None
                continue
            wrong += sum(lost)  # type: ignore[arg-type]
    rows.append(_row("cluster: undelivered bus events + messages no receipt reached", wrong, None, "-", "events",
                     "= 0", _check(wrong, lambda v: v == 0)))
    for key, label in (("two_nodes", "2 nodes"), ("one_node", "1 node"), ("three_nodes", "3 nodes")):
        for phase, res in _items(_get(c, key, "phases")):
            rows.append(_row(f"cluster CPU, {label} {phase}", _cpu_text(res), None, "-", "% of a core", "report",
                             None))
    idle = _get(c, "idle")
    count = _get(idle, "kisse", "requested")
    kb, nb, bb = (_get(idle, key, "bytes_per_conn") for key in ("kisse", "kisse_no_bus", "bare"))
    rows.append(_row(f"cluster idle conns_{_fmt(count)}, KISSE_BUS node: RSS per connection", kb, bb, "bare relay",
                     "bytes", f"<= {CLUSTER_IDLE_RATIO:g}x bare", _check(_ratio(kb, bb), lambda r: r <= CLUSTER_IDLE_RATIO)))
    rows.append(_row(f"cluster idle conns_{_fmt(count)}, same MongoDB, no KISSE_BUS", nb, bb, "bare relay", "bytes",
                     "report", None))
    km, bm = _get(idle, "kisse", "marginal_bytes_per_conn"), _get(idle, "bare", "marginal_bytes_per_conn")
    rows.append(_row(f"cluster idle conns_{_fmt(count)}, KISSE_BUS node: RSS per connection of the second half",
                     km, bm, "bare relay, second half", "bytes", "report", None))
    before, after = _get(idle, "kisse", "outbound_before"), _get(idle, "kisse", "outbound_after")
    rows.append(_row(f"cluster idle conns_{_fmt(count)}, KISSE_BUS node: its own connections (MongoDB pool, Redis), "
                     "before / after", f"{before} / {after}", None, "-", "conns", "report", None))
    kc = _get(idle, "kisse", "connected")
    rows.append(_row(f"cluster idle conns_{_fmt(count)}: connections reached", kc, _get(idle, "bare", "connected"),
                     "bare relay", "conns", f"= {_fmt(count)}", _check(kc, lambda v: v == _num(count))))
    return rows


PUSH_RELAY_TARGET = 0.9  # acked sends/s with push on and every recipient offline >= 0.9x push off


def _push_rows(ps: Any) -> list[Row]:
    relay = _get(ps, "relay")
    on, off, loose = _get(relay, "on"), _get(relay, "off"), _get(relay, "on_no_coalescing")
    name = (f"push relay, {_fmt(_get(on, 'pairs'))} senders x {_fmt(_get(on, 'window'))} in flight, "
            "every recipient offline")
    ks, bs = _get(on, "sends_per_s"), _get(off, "sends_per_s")
    rows = [_row(f"{name}: acked sends/s, push on", ks, bs, "push off", "send/s",
                 f">= {PUSH_RELAY_TARGET:g}x push off", _check(_ratio(ks, bs), lambda r: r >= PUSH_RELAY_TARGET))]
    by_repeat = _get(ps, "relay_ratio_by_repeat")
    paired = [f"{v:.2f}" for v in (by_repeat if isinstance(by_repeat, list) else ()) if _num(v) is not None]
    if paired:
        rows.append(_row("push relay: on / off of each repeat (neighbouring runs)", " / ".join(paired), None, "-",
                         "ratio", "report", None))
    others = [_num(_get(run, "cpu", "others_cpu_pct")) for run in (on, off)]
    if all(v is not None for v in others):  # results from before it was measured have none
        rows.append(_row("push relay: other processes' CPU in the median runs' windows (on / off)",
                         " / ".join(f"{v:.0f}" for v in others), None, "-", "% of a core", "~0 (else noise)", None))
    for q in ("p50_ms", "p99_ms"):
        rows.append(_row(f"{name}: ack latency {q[:3]}, push on", _get(on, "latency", q), _get(off, "latency", q),
                         "push off", "ms", "report", None))
    woken, recipients = _get(on, "devices_woken"), _get(on, "recipients")
    ok = _check(woken, lambda v: v == _num(recipients))
    if ok is not None:
        ok = ok and _get(on, "max_wakeups_per_device") == 1 and _get(on, "fake_error_count") == 0
    rows.append(_row("push relay: recipients' devices woken, once each (coalescing)", woken, recipients,
                     "recipients", "devices", "all, once each", ok))
    if loose is not None:
        ls = _get(loose, "sends_per_s")
        rows.append(_row("push relay, coalescing off (KISSE_PUSH_COALESCE=0): acked sends/s", ls, bs, "push off",
                         "send/s", "report", None))
        rows.append(_row("push relay, coalescing off: wake-ups the fake received", _get(loose, "wakeups_received"),
                         _get(loose, "sent_total"), "sends made", "pushes", "report", None))
    for _, b in _items(_get(ps, "burst")):
        n, hold = _get(b, "devices"), _num(_get(b, "answer_delay_ms"))
        service = "answering at once" if not hold else f"answering in {hold:g} ms"
        burst = (f"push burst: {_fmt(_get(b, 'messages'))} msgs to {_fmt(n)} offline devices, "
                 f"{_fmt(_get(b, 'workers'))} workers, push service {service}")
        rows.append(_row(f"{burst}: every device woken after", _get(b, "time_to_all_s"), None, "-", "s",
                         "report", False if _get(b, "all_woken") is False else None))
        for q in ("p50_ms", "p99_ms", "max_ms"):
            rows.append(_row(f"{burst}: per-device delay {q[:-3]}", _get(b, "delay", q), None, "-", "ms",
                             "report", None))
        once = _get(b, "woken_exactly_once")
        ok = _check(once, lambda v: v == _num(n))
        rows.append(_row(f"{burst}: devices woken exactly once", once, n, "devices", "devices", f"= {_fmt(n)}",
                         None if ok is None else ok and _get(b, "woken_more_than_once") == 0))
        outcomes = _get(b, "pushes_sent")
        wrong = [_num(v) for k, v in _items(outcomes) if k != "sent"]
        wrong += [_num(_get(b, "fake_error_count")), _num(_get(b, "dropped_wakeups"))]
        known = isinstance(outcomes, dict) and all(v is not None for v in wrong)
        total = sum(wrong) if known else None  # type: ignore[arg-type]
        if isinstance(total, float) and total.is_integer():
            total = int(total)  # counters come as floats from /metrics
        rows.append(_row(f"{burst}: pushes retried, failed or refused + wake-ups dropped", total, None, "-",
                         "pushes", "= 0", _check(total, lambda v: v == 0)))
        server, load = _num(_get(b, "cpu", "server_cpu_pct")), _num(_get(b, "cpu", "client_cpu_pct"))
        text = f"server {server:.0f} / load {load:.0f}" if server is not None and load is not None else "-"
        rows.append(_row(f"{burst}: wake-ups/s (CPU: {text} % of a core)", _get(b, "wakeups_per_s"), None,
                         "-", "wake/s", "report", None))
    return rows


# Per scenario, in table order: its rows, and the target a crashed row shows.
TABLE: dict[str, tuple[Callable[[Any], list[Row]], str]] = {
    "relay": (_relay_rows, ">= 0.5x bare, p99 <= 2x bare"), "idle": (_idle_rows, "<= 1.5x bare"),
    "login_storm": (_login_storm_rows, "<= 50 ms"), "blob": (_blob_rows, "<= 16 MiB"),
    "history": (_history_rows, "<= 5 ms"), "rest": (_rest_rows, "report ratio"),
    "restart": (_restart_rows, f"<= {RESTART_TARGET_S:g} s"), "soak": (_soak_rows, "RSS slope ~0"),
    "cluster": (_cluster_rows, f"cross p99 <= {CLUSTER_LATENCY_RATIO:g}x same, 2 nodes >= {CLUSTER_SCALE_TARGET:g}x 1"),
    "keys": (_keys_rows, "0 twice, all handed out"),
    "push": (_push_rows, f">= {PUSH_RELAY_TARGET:g}x push off, each device woken once"),
}


def build_table(s: dict[str, Any]) -> list[Row]:
    """The table's rows: each scenario's figures, or one "<name>: crashed: <reason>" row (met: no)."""
    rows: list[Row] = []
    for name, (rows_of, target) in TABLE.items():
        if name in s:
            reason = crash_reason(s[name])
            rows += [crashed_row(name, reason, target)] if reason else rows_of(s[name])
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def render_table(rows: list[dict[str, Any]]) -> str:
    header = ["metric", "unit", "Kisse", "baseline", "ratio", "target", "met?"]
    body = [[r["metric"], r["unit"], _fmt(r["kisse"]), _fmt(r["baseline"]) + (f" ({r['baseline_is']})"
             if r["baseline"] is not None else ""), _fmt(r["ratio"]), r["target"],
             _fmt(r["met"]) if r["met"] is not None else "-"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in [header, *body]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _version(module: str, attr: str = "__version__") -> str | None:
    """A module's version, or None if it is not installed (a missing one crashes scenarios, not the report)."""
    try:
        version = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None
    return None if version is None else str(version)


def machine() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "kernel": platform.release(), "tornado": _version("tornado", "version"), "aiohttp": _version("aiohttp"),
            "cpu_model": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                               if line.startswith("model name")), None)}


def background_cpu(seconds: float = 1.0) -> float:
    """Machine-wide busy CPU before the run, in % of one core (other work skews every figure)."""
    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait
    total0, idle0 = snap()
    time.sleep(seconds)
    total1, idle1 = snap()
    busy = (total1 - total0) - (idle1 - idle0)
    return round(100 * (os.cpu_count() or 1) * busy / max(total1 - total0, 1), 1)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def write_report(report: dict[str, Any], out_dir: Path, stamp: str) -> Path:
    """Print the report's table, then write it as <stamp>.json and latest.json in `out_dir`."""
    print(render_table(report["table"]), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stamp}.json"
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    shutil.copyfile(path, out_dir / "latest.json")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts and short runs (< 1 minute)")
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), help="run just these scenarios")
    parser.add_argument("--client", choices=("picows", "aiohttp"), default="picows",
                        help="WebSocket client for the relay load (default picows; aiohttp to cross-check)")
    parser.add_argument("--profile", action="store_true",
                        help="record each Kisse server with py-spy (collapsed stacks in results/profiles/)")
    parser.add_argument("--results", default=str(RESULTS), help="directory for the JSON results")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    cfg = {**PROFILES[mode], "client": args.client}
    global PROFILE_DIR
    if args.profile:
        PROFILE_DIR = Path(args.results) / "profiles"
    nofile = raise_nofile()
    logs = procs.new_log_dir()
    background = background_cpu()
    if background > 20:
        print(f"[bench] WARNING: {background:.0f}% of a core is busy before the run (other processes); "
              "the figures will be low and noisy", file=sys.stderr, flush=True)
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    scenarios: dict[str, Any] = {}
    crashed: list[str] = []
    for name in args.only or list(SCENARIOS):
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t = time.monotonic()
        try:
            scenarios[name] = SCENARIOS[name](cfg, logs)
        except Exception as error:  # any failure is this scenario's crash; the others still run and print
            crashed.append(name)
            scenarios[name] = crash_outcome(error)
            print(f"[bench] {name} CRASHED: {scenarios[name]['error']}\n{scenarios[name]['detail']}",
                  file=sys.stderr, flush=True)
        print(f"[bench] {name} done in {time.monotonic() - t:.1f}s", file=sys.stderr, flush=True)
    report = {"mode": mode, "started_at": started.isoformat(timespec="seconds"),
              "duration_s": round(time.monotonic() - t0, 1), "machine": machine(), "git_commit": git_commit(),
              "rlimit_nofile": nofile, "background_cpu_pct_before": background, "profile": cfg, "crashed": crashed,
              "table": build_table(scenarios), "scenarios": scenarios}
    stamp = started.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if args.quick else "")
    path = write_report(report, Path(args.results), stamp)
    print(f"\n{mode} run, {report['duration_s']}s; results: {path} (and latest.json)")
    if crashed:
        print(f"crashed scenarios: {', '.join(crashed)}; server logs kept in {logs}", file=sys.stderr)
        return 1
    shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
