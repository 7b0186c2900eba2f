"""A local weight channel: `/update_weights_from_tensor` and `/update_weights_from_distributed` of
a `miles serve` on this machine over a Unix socket kept open from push to push, beside its HTTP API.

Why not HTTP: a colocated `cuda_ipc` push is one small call (a description's sha256) around a
copy of ~0.5 ms at 0.6B, and an HTTP round trip through httpx, uvicorn and FastAPI costs the
same again or more in Python on both ends; an `nccl` bucket's call (~300 names, dtypes and
shapes) stands between the trainer's broadcast and the server's receive. The channel carries the
same JSON bodies and answers as the routes, framed (a 4-byte big-endian length, then the JSON; a
route other than `/update_weights_from_tensor` as a line before it), with no per-call headers,
parsing or event-loop hops; the server runs each between its worker's batches, as the route does
(`serve/weight_channel.py`), and answers a CUDA IPC update once its copies are queued, with an
event for the trainer to wait on. The server's first answer lists the routes it takes (a
server without `routes` takes tensor updates only).

Who may use it: the socket lies in a folder only the server's user can enter, and a connection
must first show the token the server handed out on `POST /weight_channel` (a protected route:
the api key). Any failure (refused token, closed socket, timeout) is one clear `MilesError`; the
caller drops the channel and may open a new one.
"""

from __future__ import annotations

import json
import select
import socket
import struct

from miles_core.errors import MilesError, Refused

TENSOR_ROUTE = "/update_weights_from_tensor"
DISTRIBUTED_ROUTE = "/update_weights_from_distributed"
HEADER = struct.Struct(">I")
MAX_ANSWER_BYTES = 1 << 20
"""Largest answer a client reads (answers are a few hundred bytes)."""


class ChannelClosed(Exception):
    """The peer closed the socket before a whole frame came."""


class ChannelTimeout(MilesError):
    """No answer within the channel's timeout."""


class FrameTooLarge(ValueError):
    """A frame announced more bytes than the receiver takes."""


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(HEADER.pack(len(payload)) + payload)


def route_frame(route: str, body: dict) -> bytes:
    """A body's frame payload: the JSON, after its route's line unless it is `TENSOR_ROUTE`."""
    text = json.dumps(body).encode()
    return text if route == TENSOR_ROUTE else route.encode() + b"\n" + text


def route_of(payload: bytes) -> tuple[str, bytes]:
    """(route, JSON body) of a frame payload (`route_frame`'s inverse)."""
    if payload[:1] != b"/":
        return TENSOR_ROUTE, payload
    route, _, text = payload.partition(b"\n")
    return route.decode(errors="replace"), text


def receive_frame(sock: socket.socket, max_bytes: int) -> bytes:
    """One frame's payload; `ChannelClosed` at end of stream, `FrameTooLarge` over `max_bytes`."""
    (size,) = HEADER.unpack(_exactly(sock, HEADER.size))
    if size > max_bytes:
        raise FrameTooLarge(f"a message of {size} bytes exceeds the limit of {max_bytes}")
    return _exactly(sock, size)


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray(size)
    view, got = memoryview(data), 0
    while got < size:
        count = sock.recv_into(view[got:])
        if count == 0:
            raise ChannelClosed
        got += count
    return bytes(data)


class WeightChannel:
    """The client end for one server (`url` names it in errors)."""

    def __init__(self, url: str, path: str, token: str, timeout_s: float) -> None:
        self.url = url
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._timeout_s = 0.0
        self.timeout_s = timeout_s
        try:
            try:
                self.sock.connect(path)
            except OSError as err:  # another host, or another filesystem namespace (container)
                raise MilesError(f"{url}: cannot connect to its local weight channel {path}: {err}") from None
            self.send({"token": token})
            self.routes = frozenset(self.receive().get("routes", [TENSOR_ROUTE]))
            """The routes the server takes over this channel."""
        except BaseException:
            self.close()
            raise

    @property
    def timeout_s(self) -> float:
        """Seconds any one send or read may wait."""
        return self._timeout_s

    @timeout_s.setter
    def timeout_s(self, seconds: float) -> None:
        if seconds != self._timeout_s:
            self.sock.settimeout(seconds)
            self._timeout_s = seconds

    def send(self, body: dict, route: str = TENSOR_ROUTE) -> None:
        try:
            send_frame(self.sock, route_frame(route, body))
        except OSError as err:
            raise MilesError(f"{self.url}: the local weight channel failed on send: {err}") from None

    def receive(self) -> dict:
        """The server's answer; `Refused` (with its status) when it says no."""
        try:
            answer = json.loads(receive_frame(self.sock, MAX_ANSWER_BYTES))
        except TimeoutError:
            raise ChannelTimeout(f"{self.url}: no answer over the local weight channel within {self._timeout_s:g} s "
                                 "(the server is stuck or gone)") from None
        except (OSError, ChannelClosed, ValueError) as err:
            reason = str(err) or type(err).__name__
            raise MilesError(f"{self.url}: the local weight channel failed: {reason}") from None
        if not answer.get("success"):
            raise Refused(f"{self.url} refused the update over its local weight channel: "
                          f"{answer.get('message')}", int(answer.get("code", 400)))
        return answer

    def peer_open(self) -> bool:
        """Whether the server's end looks open: nothing to read while no answer is due (a server
        that stopped, or dropped this channel, leaves it readable: at its end). One `poll`, no
        round trip; call it only between updates."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        return not poller.poll(0)

    def close(self) -> None:
        self.sock.close()
