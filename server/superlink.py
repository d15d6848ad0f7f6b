"""The coordinator's SuperLink: Flower's own, with only the Fleet API on the network.

Flower 1.42 serves three APIs on one HTTP port: Fleet (``/v1/fleet/*``, the SuperNodes),
Control (``/v1/control/*``: ``flwr run|ls|log|stop``, ``flwr supernode
register|unregister``) and Runtime (``/v1/runtime/*``: the SuperExec and ServerApps). The
open-source Control API has no accounts, so whoever reaches that port with the CA
certificate controls the federation and runs code at the coordinator and at every site.

This wrapper serves Flower's SuperLink app (``flwr.superlink.main.create_app``, unchanged)
from one uvicorn server on two listeners:

- the **control listener**, on loopback only (Flower's ``--host``/``--port``, which must be
  a loopback address): every API, for the coordinator's own tools (``medunic server ...``,
  ``flwr``) and for the SuperExec the SuperLink starts;
- the **public listener** (``--public HOST:PORT``): the Fleet API routes and ``/health``,
  nothing else. Any other path, whatever the caller holds, is answered ``403`` with a line
  saying why, and logged. A request body larger than ``MAX_BODY`` is answered ``413``
  before the app sees it: Flower reads a whole body before it checks the node's signature,
  so without a cap anyone with the CA certificate could make the SuperLink buffer gigabytes.
  For the same reason the bodies in flight are bounded together (``MAX_HELD``, and
  ``MAX_HELD_PER_ADDRESS`` for one client address; a request beyond either is answered
  ``503``, which a SuperNode retries) and in time (``BODY_DEADLINE``, then ``408``): many
  slow connections cannot pile up more than that, nor hold it for ever. Its connections
  are bounded too (:class:`PublicConnections`), from the moment the kernel hands one over,
  before its TLS handshake: ``MAX_CONNECTIONS_PER_ADDRESS`` from one address (an IPv6 /64
  counts as one) and ``MAX_CONNECTIONS`` in all (beyond, closed at once); a connection
  without a request in progress is closed after ``IDLE_DEADLINE`` seconds, one that does
  not finish its TLS handshake after asyncio's 60 seconds. Before, a connection that never
  sent a whole request head stayed open for ever, and one that never sent a TLS ClientHello
  was not counted at all, so that one address could hold every file descriptor the process
  had (a systemd service gets 1024 by default).
  What it logs about one client address is limited to a few lines a minute
  (:class:`PerAddressLogLimit`), so that refused requests cannot fill the disk.

The listener a request came in on is the local port of its connection (ASGI
``scope["server"]``), which a caller cannot choose. Pinned to flwr 1.42.0: the wrapper
replaces ``flower_superlink._run_superlink_http_api``, the function that starts uvicorn.

Run as ``python -m server.superlink --public HOST:PORT <flower-superlink arguments>``
(``medunic server start`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ipaddress
import json
import logging
import socket
import struct
import sys
import time
from collections import Counter
from typing import Any, Awaitable, Callable, Optional, Sequence

import flwr

PINNED_FLWR = "1.42.0"
REFUSAL = ("medunic coordinator: this port serves only the Fleet API (site daemons); the Control and Runtime "
           "APIs are reachable from the coordinator host only")
# The largest Fleet request body the public listener accepts. Flower sends an array in chunks
# of at most 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE), one object per push-object request;
# the other Fleet messages are small. Four chunks' worth leaves room for protobuf framing.
MAX_BODY = 20 * 1024 * 1024
TOO_LARGE = "medunic coordinator: a request body on this port is at most {} bytes"
# Request bodies the public listener holds at once: all of them, and those from one client
# address (a hospital's SuperNodes behind one gateway share it). An honest SuperNode pushes at
# most two chunks at a time (FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES); an outsider with many
# connections would otherwise pile up MAX_BODY on each.
MAX_HELD = 256 * 1024 * 1024
MAX_HELD_PER_ADDRESS = 64 * 1024 * 1024
BUSY = "medunic coordinator: too many request bodies in flight; retry later"
# Seconds a request body may take to arrive (a 5 MiB chunk at 1 Mbit/s takes about 45).
BODY_DEADLINE = 300.0
TOO_SLOW = "medunic coordinator: a request body on this port must arrive within {:g} seconds"

# Connections to the public listener, counted from accept (before the TLS handshake, which
# asyncio bounds to 60 s): from one address (an honest SuperNode keeps a few open) and in all;
# the process's open-file limit is raised to its hard limit at start, and half of it bounds
# MAX_CONNECTIONS where that is less. A connection with no request in progress for
# IDLE_DEADLINE seconds after its handshake is closed (uvicorn closes one after a response
# itself, after 5 s; this bounds one that never sends a whole request head).
MAX_CONNECTIONS_PER_ADDRESS = 64
MAX_CONNECTIONS = 4096
IDLE_DEADLINE = 20.0

log = logging.getLogger("flwr.medunic.superlink")

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def public_paths() -> frozenset[str]:
    """The exact paths the public listener serves: Flower's Fleet routes and the health check."""
    from flwr.supercore.routers.health.router import router as health_router
    from flwr.superlink.routers.fleet.router import router as fleet_router

    return frozenset(route.path for router in (fleet_router, health_router) for route in router.routes)


Peer = tuple[str, int]


def _warn(host: str, msg: str, *args: Any) -> None:
    """A warning about a client of the public listener, which :class:`PerAddressLogLimit` counts."""
    log.warning(msg, *args, extra={"client_host": host})


class PerAddressLogLimit(logging.Filter):
    """At most ``burst`` log lines about one client address per ``window`` seconds (our
    refusals, and uvicorn's access lines, which Flower keeps for refused requests); the
    first line of the next window says how many were left out. Without it, an outsider's
    refused requests wrote two lines each, without end, into a console log nothing rotates.
    Addresses beyond ``max_addresses`` share one count."""

    def __init__(self, window: float = 60.0, burst: int = 20, max_addresses: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window, self.burst, self.max_addresses, self.clock = window, burst, max_addresses, clock
        self.counts: dict[str, list] = {}  # address -> [window start, lines logged, lines left out]

    def filter(self, record: logging.LogRecord) -> bool:
        host = _client_host(record)
        if host is None:
            return True
        now = self.clock()
        if host not in self.counts and len(self.counts) >= self.max_addresses:
            self.counts = {h: c for h, c in self.counts.items() if now - c[0] < self.window}
            if len(self.counts) >= self.max_addresses:
                host = "other addresses"
        count = self.counts.get(host)
        if count is None or now - count[0] >= self.window:
            left_out = count[2] if count else 0
            self.counts[host] = [now, 1, 0]
            if left_out:
                record.msg = f"{record.msg} [{left_out} more lines about {host} left out in the last {self.window:g} s]"
            return True
        if count[1] < self.burst:
            count[1] += 1
            return True
        count[2] += 1
        return False


def _client_host(record: logging.LogRecord) -> Optional[str]:
    """The client address a record is about: ours carry it, uvicorn's access lines start with "host:port"."""
    host = getattr(record, "client_host", None)
    if host is None and record.name == "uvicorn.access" and isinstance(record.args, tuple) and record.args:
        host = str(record.args[0]).rpartition(":")[0] or str(record.args[0])
    return None if host is None else address_key(str(host))


def address_key(host: str) -> str:
    """What the per-address limits count against: an IPv4 address (also as the IPv4-mapped
    IPv6 address a dual-stack listener reports) or an IPv6 /64, which one host or subscriber
    usually holds whole (one address each would give an attacker 2**64)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class PublicConnections:
    """The public listener's connections, counted from accept, before any TLS handshake: at
    most ``per_address`` from one client address (:func:`address_key`) and ``max_open`` in
    all; a connection beyond either is closed as soon as the kernel hands it over. After its
    handshake a connection is closed once it has gone ``idle`` seconds without a request in
    progress. :meth:`listen` wraps the listening socket, :meth:`protocol` uvicorn's HTTP
    protocol class; :class:`FleetOnly` says when a request starts and ends. One event loop:
    no lock needed."""

    def __init__(self, public_port: int, *, per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
                 max_open: int = MAX_CONNECTIONS, idle: float = IDLE_DEADLINE) -> None:
        self.public_port, self.per_address, self.max_open, self.idle = public_port, per_address, max_open, idle
        self.accepted = 0  # connections the listener holds, in their TLS handshake or past it
        self.by_address: Counter[str] = Counter()
        self.open: dict[Peer, asyncio.BaseTransport] = {}  # past the handshake: the idle deadline applies
        self.timers: dict[Peer, asyncio.TimerHandle] = {}

    def listen(self, sock: socket.socket) -> socket.socket:
        """The bound socket ``sock`` as the public listener, whose ``accept`` admits or refuses
        each connection (asyncio's event loop calls it; uvloop would not: serve with
        ``loop="asyncio"``)."""
        return _Listener(self, sock)

    def admit(self, peer: Sequence) -> Optional[str]:
        """The address key a new connection from ``peer`` counts against, or None where it is
        refused."""
        key = address_key(str(peer[0]))
        if self.accepted >= self.max_open or self.by_address[key] >= self.per_address:
            _warn(key, "closed a connection from %s:%d on the public port at once: %d open, %d from %s",
                  peer[0], peer[1], self.accepted, self.by_address[key], key)
            return None
        self.accepted += 1
        self.by_address[key] += 1
        return key

    def release(self, key: str) -> None:
        self.accepted -= 1
        self.by_address[key] -= 1
        if not self.by_address[key]:
            del self.by_address[key]

    def protocol(self, base: type) -> type:
        """``base`` (an asyncio protocol class) whose connections on the public port get the
        idle deadline."""
        guard = self

        class WithDeadline(base):  # type: ignore[misc, valid-type]
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                self.medunic_peer = guard.opened(transport)

            def connection_lost(self, exc: Optional[Exception]) -> None:
                guard.closed(getattr(self, "medunic_peer", None))
                super().connection_lost(exc)

        return WithDeadline

    def opened(self, transport: asyncio.BaseTransport) -> Optional[Peer]:
        """The peer of a connection past its handshake, or None for another listener's."""
        local, peer = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
        if not local or local[1] != self.public_port or not peer:
            return None
        key = (str(peer[0]), int(peer[1]))
        self.open[key] = transport
        self.request_ended(key)
        return key

    def closed(self, key: Optional[Peer]) -> None:
        if key is not None and self.open.pop(key, None) is not None:
            self._disarm(key)

    def request_started(self, key: Peer) -> None:
        self._disarm(key)

    def request_ended(self, key: Peer) -> None:
        """From now the connection must start its next request within ``idle`` seconds."""
        if key in self.open:
            self._disarm(key)
            self.timers[key] = asyncio.get_running_loop().call_later(self.idle, self._expire, key)

    def _disarm(self, key: Peer) -> None:
        timer = self.timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, key: Peer) -> None:
        self.timers.pop(key, None)
        transport = self.open.get(key)
        if transport is not None:
            _warn(key[0], "closed the connection from %s:%d on the public port: no request for %g s", *key, self.idle)
            transport.abort()


class _Listener(socket.socket):
    """The public listening socket: each accepted connection is admitted or closed at once
    (a reset, before any TLS byte), and an admitted one is released when it closes."""

    def __init__(self, guard: PublicConnections, sock: socket.socket) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.guard = guard

    def accept(self) -> tuple[socket.socket, Any]:
        fd, peer = self._accept()  # type: ignore[attr-defined]
        conn = _Connection(self.family, self.type, self.proto, fileno=fd)
        key = self.guard.admit(peer)
        if key is None:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            # the event loop's cue to stop accepting for this tick (it tries again at the next)
            raise ConnectionAbortedError(f"refused {peer[0]}:{peer[1]}")
        conn.admitted = (self.guard, key)
        return conn, peer


class _Connection(socket.socket):
    """An admitted connection: closing it (asyncio does, whatever ended it) releases its place."""

    admitted: Optional[tuple[PublicConnections, str]] = None  # its guard and address key

    def close(self) -> None:
        if self.admitted is not None:
            guard, key = self.admitted
            self.admitted = None
            guard.release(key)
        super().close()


class FleetOnly:
    """ASGI wrapper: requests that arrive on ``public_port`` reach the app only for ``allowed``
    paths, with a body of at most ``max_body`` bytes that arrives within ``deadline`` seconds,
    while the bodies held stay within ``max_held`` bytes (``per_address`` for one address).
    ``connections`` hears when each public request starts and ends (by default a counter of
    its own, which counts nothing unless its protocol serves the listener)."""

    def __init__(self, app: ASGIApp, public_port: int, allowed: frozenset[str], *, max_body: int = MAX_BODY,
                 max_held: int = MAX_HELD, per_address: int = MAX_HELD_PER_ADDRESS,
                 deadline: float = BODY_DEADLINE, connections: Optional[PublicConnections] = None) -> None:
        self.app, self.public_port, self.allowed = app, public_port, allowed
        self.max_body, self.max_held, self.per_address, self.deadline = max_body, max_held, per_address, deadline
        self.connections = connections or PublicConnections(public_port)
        self.held = 0  # bytes reserved by the public requests in flight (one event loop: no lock needed)
        self.held_by: Counter[str] = Counter()

    def on_public_listener(self, scope: Scope) -> bool:
        server = scope.get("server") or (None, None)
        return server[1] == self.public_port

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.on_public_listener(scope):
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or ("?", 0)
        peer = (str(client[0]), int(client[1]))
        self.connections.request_started(peer)
        try:
            await self._public(scope, receive, send, client)
        finally:
            self.connections.request_ended(peer)

    async def _public(self, scope: Scope, receive, send, client: Sequence) -> None:
        if scope["path"] not in self.allowed:
            _warn(client[0], "refused %s %s from %s:%s on the public port", scope.get("method", "WS"),
                  scope["path"][:200], client[0], client[1])
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await _refuse(send, 403, REFUSAL)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        where = f"{scope['method']} {scope['path'][:200]} from {client[0]}:{client[1]} on the public port"
        size = _announced_size(scope, self.max_body)
        if size is None:
            await self._too_large(send, where, client[0])
            return
        key = address_key(str(client[0]))
        if self.held + size > self.max_held or self.held_by[key] + size > self.per_address:
            _warn(key, "refused %s: %d bytes in flight (%d from %s)", where, self.held, self.held_by[key], key)
            await _refuse(send, 503, BUSY, retry_after=5)
            return
        self.held += size
        self.held_by[key] += size
        try:
            try:
                body = await asyncio.wait_for(_read_body(receive, size), self.deadline)
            except TimeoutError:
                _warn(client[0], "refused %s: the body did not arrive within %g s", where, self.deadline)
                await _refuse(send, 408, TOO_SLOW.format(self.deadline))
                return
            except _ClientGone:  # nothing to answer, and a part of a body is not a request
                return
            if body is None:
                await self._too_large(send, where, client[0])
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.held -= size
            self.held_by[key] -= size
            if not self.held_by[key]:
                del self.held_by[key]

    async def _too_large(self, send, where: str, host: str) -> None:
        _warn(host, "refused %s: body over %d bytes", where, self.max_body)
        await _refuse(send, 413, TOO_LARGE.format(self.max_body))


async def _refuse(send, status: int, detail: str, retry_after: Optional[int] = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _announced_size(scope: Scope, limit: int) -> Optional[int]:
    """The bytes a request's body may take, from its head: its Content-Length, ``limit`` for
    a body sent in chunks (its size is unknown until read), 0 for none; None when the head
    announces more than ``limit`` or a length that is not a number."""
    headers = {name.lower(): value for name, value in scope.get("headers", [])}
    if b"content-length" in headers:
        value = headers[b"content-length"].strip()
        return int(value) if value.isdigit() and int(value) <= limit else None
    return limit if b"transfer-encoding" in headers else 0


class _ClientGone(Exception):
    """The client closed its connection before its request body was complete."""


async def _read_body(receive, limit: int) -> Optional[bytes]:
    """The whole request body, or None as soon as it exceeds ``limit`` bytes: at most
    ``limit`` bytes are ever held. Raises _ClientGone when the client leaves first."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _ClientGone
        size += len(message.get("body", b""))
        if size > limit:
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """A ``receive`` that hands the app the body already read, then the connection's own
    messages (a disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"'{address}' is not HOST:PORT")
    return host.strip("[]"), int(port)


def bind(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn (which listens on it)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                        flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(address)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def open_files_limit() -> int:
    """The process's open-file limit, first raised to its hard limit (systemd gives a
    service 1024 unless its unit says otherwise): every connection takes a descriptor."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return MAX_CONNECTIONS * 2 if soft == resource.RLIM_INFINITY else soft


def _serve(config: Any, public: tuple[str, int]) -> None:
    """Replacement of ``flower_superlink._run_superlink_http_api`` (flwr 1.42.0)."""
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan
    from flwr.superlink.main import create_app

    if not _is_loopback(config.host):
        raise SystemExit(f"server.superlink: the control listener --host {config.host} must be a loopback "
                         "address (127.0.0.1): the Control API has no authentication")
    if public[1] == config.port:
        raise SystemExit(f"server.superlink: the public port {public[1]} must differ from the control port")
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    connections = PublicConnections(public[1], max_open=min(MAX_CONNECTIONS, open_files_limit() // 2))
    app = FleetOnly(create_app(config, SuperLinkLifespan), public[1], public_paths(), connections=connections)
    server = uvicorn.Server(uvicorn.Config(
        app=app, reload=False, access_log=True, log_config=get_uvicorn_log_config(console_handler.level),
        ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile, workers=1,
        http=connections.protocol(AutoHTTPProtocol), loop="asyncio",  # asyncio calls the listener's accept
    ))
    limit = PerAddressLogLimit()  # after uvicorn.Config, which sets its loggers up
    for name in ("uvicorn.access", log.name):
        logging.getLogger(name).addFilter(limit)
    log.info("control listener (all APIs) on %s:%d; public listener (Fleet API only) on %s:%d",
             config.host, config.port, *public)
    server.run(sockets=[bind(config.host, config.port), connections.listen(bind(*public))])


def main(argv: Optional[Sequence[str]] = None) -> None:
    if flwr.__version__ != PINNED_FLWR:
        raise SystemExit(f"server.superlink wraps flwr {PINNED_FLWR}; this environment has {flwr.__version__}")
    parser = argparse.ArgumentParser(prog="python -m server.superlink", add_help=False)
    parser.add_argument("--public", required=True, help="HOST:PORT of the public (Fleet API only) listener")
    ours, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    public = parse_address(ours.public)

    superlink_cli = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the module, not the function
    superlink_cli._run_superlink_http_api = lambda lifespan_config: _serve(lifespan_config, public)
    sys.argv = ["flower-superlink", *rest]
    superlink_cli.flower_superlink()


if __name__ == "__main__":
    main()
