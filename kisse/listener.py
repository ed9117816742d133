"""The listening server: Tornado's `HTTPServer` with the two guards it lacks,
one against running out of file descriptors and one against slow clients.

Descriptors. Tornado's accept loop lets EMFILE escape: one traceback per
attempt, in a spin, since the listening socket stays readable. Here, once the
process holds RLIMIT_NOFILE minus `KISSE_FD_RESERVE` descriptors, a new
connection is accepted and reset at once (the kernel's queue drains, the loop
does not spin, the client learns at once) and a warning a second at most
counts them. The reserve stays for what the users already connected need
(database connections, files), so they keep being served. Should accept() fail for
want of a descriptor all the same, accepting pauses for a moment.

Slow clients. Tornado's `idle_connection_timeout` is not an idle timer: it
bounds the whole read of a request's headers, from the moment the server waits
for them (the connection opening, or the end of the previous response) to the
blank line; a client trickling a byte a second is cut all the same. So:
- a connection's first request must have sent its headers `KISSE_HEADER_TIMEOUT`
  after the connection opened (a timer here, cancelled by the headers);
- each later request on a keep-alive connection must have sent them
  `KISSE_IDLE_TIMEOUT` after the previous response (Tornado's timer);
- a body must arrive within `KISSE_BODY_TIMEOUT` of the end of its headers,
  plus one second per `KISSE_BODY_MIN_RATE` bytes received: a real upload at
  that rate is never cut, however large, while a trickle is cut after about
  `KISSE_BODY_TIMEOUT` (Tornado's own `body_timeout` bounds the whole body, so
  one value either cuts slow 100 MiB uploads or lets a trickle hold a
  connection for as long). The body of a WebSocket upgrade gets
  `KISSE_HEADER_TIMEOUT`: the handshake never waits long.
A cut connection is closed, and Tornado tells its handler, which lets go of
what it held.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import time
from typing import Any, Awaitable

import tornado.httpserver
import tornado.httputil
import tornado.iostream
from tornado.ioloop import IOLoop

try:
    import resource
except ImportError:  # not a Unix: no descriptor limit to read
    resource = None  # type: ignore[assignment]

log = logging.getLogger("kisse.listener")

ACCEPT_BATCH = 128  # connections taken per wake-up, as Tornado does (it is also the listen backlog)
PAUSE = 0.1  # seconds accepting rests when accept() itself found no descriptor
WARN_EVERY = 1.0  # seconds between two warnings about refused connections
# Measuring costs about 3 µs (Linux >= 6.2 gives the count as the size of
# /proc/self/fd) or 1 µs per open descriptor (listing it): measure at most this
# often, and stretch the interval so that measuring never takes more than 1-2 %
# of the time even with hundreds of thousands of descriptors open.
MEASURE_EVERY = 1.0
MEASURE_EVERY_WHEN_FULL = 0.05
MEASURE_COST_FACTOR = 100
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on with 0 s: close() sends RST and leaves no TIME_WAIT
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept(2) on Linux may report an error of the new connection itself: take the next one.
CONNECTION_ERRORS = frozenset({errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN,
                               errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EOPNOTSUPP, errno.EPERM,
                               getattr(errno, "ENONET", errno.ENETDOWN)})


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one, as the Go runtime does (the
    usual soft default, 1024, is for programs that use select()); returns the
    soft limit before and after. Nothing here uses select(): Tornado uses epoll."""
    if resource is None:
        return 0, 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Descriptors:
    """How many descriptors the process holds: measured now and then, and
    between measurements estimated as the last count plus the connections
    accepted since (an overestimate, corrected by the next measurement)."""

    def __init__(self, reserve: int) -> None:
        self.reserve = reserve
        self._dir = next((d for d in ("/proc/self/fd", "/dev/fd") if os.path.isdir(d)), None)
        self.limit = self.mark = 0
        self.count = 0
        self._measured_at = self._cost = 0.0
        self.measure()

    @property
    def known(self) -> bool:
        """False where nothing tells the count or the limit: then only EMFILE stops accepting."""
        return self._dir is not None and 0 < self.limit != getattr(resource, "RLIM_INFINITY", -1)

    def measure(self) -> None:
        started = time.monotonic()
        self.limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if resource is not None else 0
        # Never refuse below half the limit, whatever the reserve says.
        self.mark = max(self.limit - self.reserve, self.limit // 2)
        self.count = self._count()
        self._measured_at = time.monotonic()
        self._cost = self._measured_at - started

    def _count(self) -> int:
        if self._dir is None:
            return 0
        try:
            if self._dir == "/proc/self/fd":
                size = os.stat(self._dir).st_size  # Linux >= 6.2: the number of open descriptors
                if size > 0:
                    return size
            return len(os.listdir(self._dir)) - 1  # the listing's own descriptor
        except OSError:  # EMFILE while listing: as full as can be
            return self.limit

    def take(self) -> bool:
        """Whether one more connection keeps the count under the mark; counts it if so."""
        if not self.known:
            return True
        age = time.monotonic() - self._measured_at
        if age >= max(MEASURE_EVERY, MEASURE_COST_FACTOR * self._cost) or (
                self.count >= self.mark and age >= max(MEASURE_EVERY_WHEN_FULL, MEASURE_COST_FACTOR / 2 * self._cost)):
            self.measure()
        if self.count >= self.mark:
            return False
        self.count += 1
        return True


class GuardedHTTPServer(tornado.httpserver.HTTPServer):
    """`HTTPServer(app, header_timeout=…, idle_timeout=…, body_timeout=…,
    body_min_rate=…, fd_reserve=…, **HTTPServer options)`; see the module doc."""

    refused_total = 0  # connections refused near the descriptor limit
    cut_total = 0  # connections cut by the first request's header timeout or a body timeout

    def initialize(self, request_callback: Any, *, header_timeout: float, idle_timeout: float,
                   body_timeout: float, body_min_rate: float, fd_reserve: int, **options: Any) -> None:
        # Tornado's one header timer must not cut a first request this class allows.
        super().initialize(request_callback, idle_connection_timeout=max(idle_timeout, header_timeout),
                           body_timeout=None, **options)
        assert self.ssl_options is None, "TLS is the reverse proxy's job"
        self.header_timeout, self.body_timeout, self.body_min_rate = header_timeout, body_timeout, body_min_rate
        self.descriptors = Descriptors(fd_reserve)
        self._listening: dict[int, socket.socket] = {}
        self._reading: set[int] = set()  # listening sockets whose accept handler is registered
        self._first_headers: dict[object, Any] = {}  # HTTP1ServerConnection -> its header timer (None: done)
        self._unreported = 0
        self._report: Any = None
        self._reported_at = -WARN_EVERY
        self._refusing = False

    # -- accepting ----------------------------------------------------------
    def add_sockets(self, sockets: Any) -> None:
        for sock in sockets:
            self._listening[sock.fileno()] = sock
            self._resume(sock)

    def stop(self) -> None:
        loop = IOLoop.current()
        for fd, sock in self._listening.items():
            if fd in self._reading:
                loop.remove_handler(fd)
            sock.close()
        self._listening.clear()
        self._reading.clear()
        if self._report is not None:
            self._report.cancel()
            self._warn()
        super().stop()

    def _resume(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._listening.get(fd) is sock and fd not in self._reading:
            self._reading.add(fd)
            IOLoop.current().add_handler(fd, lambda _fd, _events: self._accept(sock), IOLoop.READ)

    def _pause(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        self._reading.discard(fd)
        loop = IOLoop.current()
        loop.remove_handler(fd)
        loop.call_later(PAUSE, self._resume, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            if sock.fileno() not in self._reading:
                return  # stopped, or paused
            try:
                connection, address = sock.accept()
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno == errno.ECONNABORTED or error.errno in CONNECTION_ERRORS:
                    continue
                if error.errno not in OUT_OF_DESCRIPTORS:
                    raise
                self._refused()  # no descriptor to take it with: wait, rather than spin
                self._pause(sock)
                return
            if not self.descriptors.take():
                self._refused()
                try:
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                except OSError:
                    pass
                connection.close()
                continue
            if self._refusing:
                self._recovered()
            try:
                stream = tornado.iostream.IOStream(connection, max_buffer_size=self.max_buffer_size,
                                                   read_chunk_size=self.read_chunk_size)
                self.handle_stream(stream, address)
            except Exception:
                log.exception("cannot serve a new connection")
                connection.close()

    def _refused(self) -> None:
        self.refused_total += 1
        self._unreported += 1
        self._refusing = True
        if self._report is None:
            loop = IOLoop.current()
            delay = max(0.0, self._reported_at + WARN_EVERY - loop.time())
            self._report = loop.call_later(delay, self._warn)

    def _warn(self) -> None:
        self._report = None
        self._reported_at = IOLoop.current().time()
        if self._unreported:
            d = self.descriptors
            log.warning("refusing new connections: the process is near its file-descriptor limit",
                        extra={"refused": self._unreported, "open_descriptors": d.count,
                               "descriptor_limit": d.limit, "refused_from": d.mark})
        self._unreported = 0

    def _recovered(self) -> None:
        self._refusing = False
        if self._report is not None:
            self._report.cancel()
            self._warn()
        log.info("accepting new connections again",
                 extra={"open_descriptors": self.descriptors.count, "refused_from": self.descriptors.mark})

    # -- slow clients ------------------------------------------------------
    def start_request(self, server_conn: object,
                      request_conn: tornado.httputil.HTTPConnection) -> tornado.httputil.HTTPMessageDelegate:
        if server_conn not in self._first_headers:  # the connection's first request: headers from its opening
            self._first_headers[server_conn] = IOLoop.current().call_later(
                self.header_timeout, self._headers_late, server_conn, request_conn)
        return _Guard(self, server_conn, request_conn, super().start_request(server_conn, request_conn))

    def on_close(self, server_conn: object) -> None:
        timer = self._first_headers.pop(server_conn, None)
        if timer is not None:
            timer.cancel()
        super().on_close(server_conn)

    def _headers_in(self, server_conn: object) -> None:
        timer = self._first_headers.get(server_conn)
        if timer is not None:
            timer.cancel()
            self._first_headers[server_conn] = None

    def _headers_late(self, server_conn: object, request_conn: Any) -> None:
        self._first_headers[server_conn] = None
        self.cut(request_conn)

    def cut(self, request_conn: Any) -> None:
        stream = request_conn.stream  # None once a WebSocket has taken it over
        if stream is not None and not stream.closed():
            self.cut_total += 1
            stream.close()


class _Guard(tornado.httputil.HTTPMessageDelegate):
    """Passes one request through to the application, timing its body."""

    __slots__ = ("server", "server_conn", "request_conn", "inner", "timer", "started", "grace", "received")

    def __init__(self, server: GuardedHTTPServer, server_conn: object, request_conn: Any,
                 inner: tornado.httputil.HTTPMessageDelegate) -> None:
        self.server, self.server_conn, self.request_conn, self.inner = server, server_conn, request_conn, inner
        self.timer: Any = None
        self.received = 0

    def headers_received(self, start_line: Any, headers: tornado.httputil.HTTPHeaders) -> Awaitable[None] | None:
        self.server._headers_in(self.server_conn)
        if headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in headers:
            loop = IOLoop.current()
            self.started = loop.time()
            self.grace = self.server.header_timeout if "Upgrade" in headers else self.server.body_timeout
            self.timer = loop.call_at(self.started + self.grace, self._check)
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        self.received += len(chunk)
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        self._stop()
        self.inner.finish()

    def on_connection_close(self) -> None:
        self._stop()
        self.inner.on_connection_close()

    def _stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check(self) -> None:
        due = self.started + self.grace + self.received / self.server.body_min_rate
        loop = IOLoop.current()
        if loop.time() < due:
            self.timer = loop.call_at(due, self._check)
            return
        self.timer = None
        self.server.cut(self.request_conn)
