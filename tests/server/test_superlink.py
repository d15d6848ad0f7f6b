"""The public listener's wrapper (server.superlink.FleetOnly) under a real uvicorn on
loopback: an outsider's oversized body is refused before the app reads it, whether it is
announced (Content-Length) or streamed (chunked); many held bodies together, from one address
or from several, and a body that never finishes are refused too; so are connections beyond
the listener's bounds, and those that send no request; honest Fleet requests pass whole.
The full SuperLink behind it is attacked in tests/deployment/test_security.py."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import threading
import time
from typing import Iterator

import pytest
import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from server.certs import create_all
from server.superlink import (
    BUSY, MAX_BODY, REFUSAL, TOO_LARGE, TOO_SLOW, FleetOnly, PerAddressLogLimit, PublicConnections, address_key, bind)
from tests.deployment.loopback import closed_by_server, free_port, silent_connection, still_open, wait_until

FLEET = "/v1/fleet/push-object"


MiB = 2**20


@pytest.fixture
def listener(request) -> Iterator[tuple[int, int, list[int]]]:
    """(public port, control port, body sizes the app received) of a wrapped echo app; the
    wrapper's limits are its defaults or the test's (indirect parametrization), and with
    ``tls`` there, the listeners serve TLS with a certificate of ours (``certs/ca.crt`` in
    the test's ``tmp_path`` verifies it)."""
    limits = dict(getattr(request, "param", {}))
    tls = {}
    if limits.pop("tls", False):
        certs = create_all(request.getfixturevalue("tmp_path") / "certs", ["127.0.0.1"])
        tls = dict(ssl_keyfile=str(certs / "server.key"), ssl_certfile=str(certs / "server.pem"))
    seen: list[int] = []

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        seen.append(len(body))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    public, control = free_port(), free_port()
    connections = PublicConnections(public, **limits.pop("connections", {}))
    server = uvicorn.Server(uvicorn.Config(FleetOnly(app, public, frozenset({FLEET}), connections=connections, **limits),
                                           log_level="warning", lifespan="off", loop="asyncio", **tls,
                                           http=connections.protocol(AutoHTTPProtocol)))
    sockets = [bind("127.0.0.1", control), connections.listen(bind("127.0.0.1", public))]
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield public, control, seen
    server.should_exit = True
    thread.join(timeout=20)


def _post(port: int, body: bytes, path: str = FLEET) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/protobuf"})
        response = conn.getresponse()
        data = response.read()
        return response.status, (json.loads(data) if response.status != 200 else {})
    finally:
        conn.close()


def _attack(port: int, head: str, chunks: Iterator[bytes]) -> tuple[int, dict]:
    """An outsider's request, raw: the head, then body bytes for as long as the server
    reads them; then the server's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):  # the server stopped reading: its answer is below
            pass
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def test_an_oversized_body_on_the_public_port_is_refused_before_the_app_reads_it(listener):
    public, control, seen = listener
    assert _post(public, b"x" * 1000) == (200, {}) and seen == [1000]  # an honest request, whole
    assert _post(public, b"x" * MAX_BODY)[0] == 200 and seen[-1] == MAX_BODY  # the cap itself passes

    # announced: a Content-Length of 10 GB, answered at once, before any of the body is sent
    head = f"POST {FLEET} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**10}\r\n\r\n"
    assert _attack(public, head, iter(())) == (413, {"detail": TOO_LARGE.format(MAX_BODY)})
    # streamed without a length: 1 MiB chunks, cut off once past the cap
    head = f"POST {FLEET} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n" % 2**20 + b"x" * 2**20 + b"\r\n"
    assert _attack(public, head, (chunk for _ in range(MAX_BODY // 2**20 + 1))) == (413, {"detail": TOO_LARGE.format(MAX_BODY)})
    assert seen == [1000, MAX_BODY]  # the app saw neither
    # other paths are still refused as before; the control listener (loopback, trusted) is not capped
    assert _post(public, b"", path="/v1/control/start-run") == (403, {"detail": REFUSAL})
    assert _post(control, b"x" * (MAX_BODY + 1))[0] == 200 and seen[-1] == MAX_BODY + 1


def _hold(port: int, size: int, source: str = "127.0.0.1") -> socket.socket:
    """An outsider's connection that announces a body of ``size`` bytes, sends a little of it
    and keeps the rest back; once the server has taken the request up."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    sock.sendall(f"POST {FLEET} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode() + b"x" * 100)
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    data = response.read()
    return response.status, (json.loads(data) if response.status != 200 else {})


@pytest.mark.parametrize("listener", [dict(max_held=5 * MiB, per_address=3 * MiB, deadline=3.0)], indirect=True)
def test_held_bodies_are_bounded_together_and_in_time(listener):
    public, _, seen = listener
    first = _hold(public, 2 * MiB)
    time.sleep(0.5)
    # one address: 2 MiB held, another 2 MiB would pass its 3 MiB -> 503 at once (a SuperNode retries)
    start = time.monotonic()
    with _hold(public, 2 * MiB) as second:
        assert _answer(second) == (503, {"detail": BUSY}) and time.monotonic() - start < 2
    assert _post(public, b"x" * 1000) == (200, {})  # a small honest request from it still passes
    # several addresses: 2 + 2 MiB held, a third address's 2 MiB would pass the 5 MiB in all
    other = _hold(public, 2 * MiB, source="127.0.0.2")
    time.sleep(0.5)
    with _hold(public, 2 * MiB, source="127.0.0.3") as third:
        assert _answer(third) == (503, {"detail": BUSY})
    # a body that does not arrive is cut off at the deadline, and what it held is free again
    for sock in (first, other):
        with sock:
            assert _answer(sock) == (408, {"detail": TOO_SLOW.format(3.0)})
    assert _post(public, b"x" * (2 * MiB))[0] == 200 and seen == [1000, 2 * MiB]
    # a client that leaves mid-body: the app never sees the part it sent, and its share is freed
    _hold(public, 2 * MiB).close()
    time.sleep(0.5)
    assert _post(public, b"x" * (3 * MiB))[0] == 200 and seen == [1000, 2 * MiB, 3 * MiB]


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))


def _refused(port: int, source: str = "127.0.0.1") -> bool:
    """Whether a new connection from ``source`` is closed by the server as it is made (the
    reset can arrive before ``connect`` returns, or just after)."""
    sock = silent_connection(port, source)
    return sock is None or closed_by_server(sock, 5.0)


@pytest.mark.parametrize("listener", [dict(connections=dict(per_address=4, max_open=6, idle=3.0))], indirect=True)
def test_connections_are_bounded_by_address_in_all_and_in_time(listener):
    """The attack: connections that never send a whole request. Unbounded, one address held
    every file descriptor of the SuperLink (a systemd service has 1024) for ever."""
    public, _, seen = listener
    idle = [_connect(public) for _ in range(3)]
    partial = _connect(public)
    partial.sendall(f"POST {FLEET} HTTP/1.1\r\nHost: x\r\n".encode())  # a request head never finished
    # a fifth from the same address is closed as soon as it is made; the four stay, for now
    assert _refused(public)
    assert not any(closed_by_server(sock, 0.05) for sock in (*idle, partial))
    # other addresses share the listener's 6: two more connect, the third is closed
    others = [_connect(public, "127.0.0.2"), _connect(public, "127.0.0.3")]
    assert _refused(public, "127.0.0.4")
    # a request in progress is not idle: its body arrives over twice the idle deadline, and passes
    for sock in others:
        sock.close()
    time.sleep(0.3)
    slow = _connect(public, "127.0.0.2")
    slow.sendall(f"POST {FLEET} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n".encode())
    for _ in range(4):
        time.sleep(1.6)
        slow.sendall(b"x")
    assert _answer(slow) == (200, {}) and seen[-1] == 4
    # meanwhile the first four, which never sent a request, were closed at the idle deadline
    assert all(closed_by_server(sock, 0.5) for sock in (*idle, partial))
    assert _post(public, b"x" * 1000) == (200, {})  # the address may connect again



@pytest.mark.parametrize("listener", [dict(tls=True, connections=dict(per_address=4, max_open=6, idle=3.0))],
                         indirect=True)
def test_connections_are_bounded_before_their_tls_handshake(listener, tmp_path):
    """The attack: TCP connections to the TLS port that never send a ClientHello. The
    bounds used to start at the end of the handshake (asyncio allows it 60 s), so that one
    address held as many connections, and file descriptors, as it opened (all 200 of a try
    at 65e9d88): the limits now count a connection from the moment the kernel hands it over."""
    public, _, seen = listener
    attacker = [silent_connection(public, "127.0.0.2") for _ in range(50)]
    # the rest are closed as the server accepts them, before any TLS byte
    held = wait_until(lambda: still_open(attacker, at_most=4), 20, "the connections beyond the address's 4 closed")
    others = [silent_connection(public, "127.0.0.3") for _ in range(2)]
    assert _refused(public, "127.0.0.3")  # 6 in all: a seventh is closed
    assert len(held) == 4 and len(still_open([*held, *others])) == 6
    for sock in others:
        sock.close()
    time.sleep(0.3)
    # an honest TLS request from another address passes beside the attacker's 4
    tls = ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.crt"))
    conn = http.client.HTTPSConnection("127.0.0.1", public, context=tls, timeout=30)
    conn.request("POST", FLEET, body=b"x" * 1000)
    assert conn.getresponse().status == 200 and seen == [1000]
    conn.close()
    for sock in held:
        sock.close()
    time.sleep(0.3)
    assert [silent_connection(public, "127.0.0.2") is not None for _ in range(4)] == [True] * 4  # their places are free again


def test_per_address_limits_count_an_ipv6_slash_64_as_one_address():
    """One host (or subscriber) gets a whole IPv6 /64: counted per address, it would have 2**64."""
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:10.0.0.1") == address_key("10.0.0.1") == "10.0.0.1"  # dual-stack listener
    assert address_key("fe80::1%eth0") == "fe80::/64"


def test_log_lines_about_one_address_are_limited_and_say_what_they_left_out():
    """An outsider's refused requests wrote two lines each (ours and uvicorn's access line)
    into a console log nothing rotates; now a few a minute per address."""
    now = [0.0]
    limit = PerAddressLogLimit(window=60, burst=3, max_addresses=2, clock=lambda: now[0])

    def ours(host: str) -> logging.LogRecord:
        record = logging.LogRecord("flwr.medunic.superlink", logging.WARNING, "", 0, "refused %s", ("x",), None)
        record.client_host = host
        return record

    def access(host: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                                 (f"{host}:5555", "POST", "/v1/control/start-run", "1.1", 403), None)

    assert [limit.filter(make("10.0.0.1")) for make in (ours, access) * 3] == [True] * 3 + [False] * 3
    assert limit.filter(access("10.0.0.2"))  # another address has its own count
    assert limit.filter(logging.LogRecord("flwr", logging.INFO, "", 0, "round 1", (), None))  # not about a client
    now[0] = 61.0
    record = ours("10.0.0.1")
    assert limit.filter(record) and "[3 more lines about 10.0.0.1 left out in the last 60 s]" in record.getMessage()
    # beyond max_addresses (after the expired ones are dropped), new addresses share one count
    assert limit.filter(ours("10.0.0.3")) and limit.filter(ours("10.0.0.4"))
    assert "other addresses" in limit.counts
