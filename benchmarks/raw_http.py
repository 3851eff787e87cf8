"""A lean HTTP/1.1 load generator: requests built ahead of time, sent over keep-alive sockets.

A benchmark on a small machine measures the hub and its load generator on
the same cores, so every microsecond the generator spends per request is
taken from the hub. An aiohttp client spends about 180 µs of CPU a request
(measured against a hub at 1,400 requests/s: 0.25 to 0.29 cores); this one
sends bytes prepared before the clock starts and reads answers with one
``select`` loop in one thread, a few tens of µs a request.

It understands only what the hub answers: a status line, headers and a body
of ``Content-Length`` bytes. A connection the hub closes is opened again and
the client goes on with its next request.
"""

from __future__ import annotations

import selectors
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_RECEIVE = 1 << 18


def prepared_request(url: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """The bytes of one ``POST`` to ``url`` + ``path``, ready to send."""
    host = urlsplit(url).netloc
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Tally:
    """What the clients saw: latencies of 200 answers (seconds), counts by status and by worker."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    by_worker: dict[str, int] = field(default_factory=dict)


class _Client:
    """One connection keeping one request in flight, going through its own list of requests."""

    def __init__(self, url: str, requests: list[bytes]) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.requests = requests
        self.next = 0
        self.began = 0.0
        self.buffer = bytearray()
        self.sock = self._connect()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def reconnect(self) -> None:
        self.sock.close()
        self.buffer.clear()
        self.sock = self._connect()

    def send_next(self) -> bool:
        """Send the next request; False when none is left."""
        if self.next >= len(self.requests):
            return False
        request = self.requests[self.next]
        self.next += 1
        self.began = time.perf_counter()
        self.sock.sendall(request)
        return True

    def answers(self) -> list[tuple[int, str]]:
        """Complete answers in the buffer (status, ``Hashfed-Worker``), taken out of it."""
        found: list[tuple[int, str]] = []
        buffer = self.buffer
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return found
            head = bytes(buffer[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                raise ValueError("an answer without Content-Length: this client cannot read it")
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else len(head)])
            if len(buffer) < end + 4 + length:
                return found
            worker = "0"
            at = head.find(b"\r\nhashfed-worker:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                worker = head[at + 17 : stop if stop >= 0 else len(head)].strip().decode()
            found.append((int(head[9:12]), worker))
            del buffer[: end + 4 + length]


def drive(requests: list[tuple[str, list[bytes]]], seconds: float) -> Tally:
    """Send each client's requests (``(url, [request bytes])``) one at a time until ``seconds`` pass.

    Every client keeps one request in flight, so the figure is that of
    ``len(requests)`` closed-loop clients.
    """
    tally = Tally()
    selector = selectors.DefaultSelector()
    deadline = time.perf_counter() + seconds
    clients = [_Client(url, mine) for url, mine in requests]
    for client in clients:
        if client.send_next():
            selector.register(client.sock, selectors.EVENT_READ, client)
    while selector.get_map():
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        for key, _ in selector.select(timeout=left):
            client = key.data
            data = client.sock.recv(_RECEIVE)
            if not data:  # closed by the hub: what was in flight is lost, the client goes on
                tally.statuses[0] = tally.statuses.get(0, 0) + 1
                selector.unregister(client.sock)
                client.reconnect()
                if client.send_next():
                    selector.register(client.sock, selectors.EVENT_READ, client)
                continue
            client.buffer += data
            for status, worker in client.answers():
                now = time.perf_counter()
                tally.statuses[status] = tally.statuses.get(status, 0) + 1
                tally.by_worker[worker] = tally.by_worker.get(worker, 0) + 1
                if status == 200:
                    tally.latencies.append(now - client.began)
                if now >= deadline or not client.send_next():
                    selector.unregister(client.sock)
    for client in clients:
        client.sock.close()
    selector.close()
    return tally
