"""The bare-Tornado baseline: a minimal WebSocket relay and a minimal JSON GET handler.

- `WS /ws?pair=P&side=a|b`: two clients join pair P; each text frame one sends
  is written, unchanged, to the other. No auth, no parsing, no storage.
- `GET /json`: a small JSON object. `GET /healthz`: readiness for the runner.

Run: `python -m benchmarks.bare_server --port N` (listens on 127.0.0.1 only).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
from typing import Any

import tornado.httpserver
import tornado.web
import tornado.websocket

PAIRS: dict[str, dict[str, "RelaySocket"]] = {}
OTHER = {"a": "b", "b": "a"}


class RelaySocket(tornado.websocket.WebSocketHandler):
    def check_origin(self, origin: str) -> bool:
        return True

    def open(self, *args: Any) -> None:
        self.pair = self.get_query_argument("pair", "0")
        self.side = self.get_query_argument("side", "a")
        self.set_nodelay(True)
        PAIRS.setdefault(self.pair, {})[self.side] = self

    def on_message(self, message: str | bytes) -> None:
        peer = PAIRS.get(self.pair, {}).get(OTHER.get(self.side, "a"))
        if peer is not None:
            try:
                peer.write_message(message, binary=isinstance(message, bytes))
            except tornado.websocket.WebSocketClosedError:
                pass

    def on_close(self) -> None:
        sides = PAIRS.get(self.pair)
        if sides and sides.get(self.side) is self:
            del sides[self.side]
            if not sides:
                del PAIRS[self.pair]


class JSONHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps({"status": "ok", "items": [{"id": i, "name": f"item{i}"} for i in range(3)]},
                               separators=(",", ":")))


class HealthHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish({"status": "ok"})


async def main(port: int) -> None:
    app = tornado.web.Application([(r"/ws", RelaySocket), (r"/json", JSONHandler), (r"/healthz", HealthHandler)],
                                  log_function=lambda handler: None)
    server = tornado.httpserver.HTTPServer(app)
    server.listen(port, "127.0.0.1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(parser.parse_args().port))
