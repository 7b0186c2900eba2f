"""HTTP clients with Nagle's algorithm off.

httpx writes a request's headers and its body as two sends; with Nagle on, the body waits for
the server's ACK of the headers, which a delayed-ACK peer holds for ~40 ms, so every POST to a
rollout server took ~8-40 ms on localhost instead of ~1 ms. `TCP_NODELAY` sends at once (the
server side is `serve.server.bind`).
"""

from __future__ import annotations

import socket

import httpx

NO_DELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def client(*, limits: httpx.Limits = httpx.Limits(), **kwargs) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(socket_options=NO_DELAY, limits=limits), **kwargs)


def async_client(*, limits: httpx.Limits = httpx.Limits(), **kwargs) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(socket_options=NO_DELAY, limits=limits), **kwargs)
