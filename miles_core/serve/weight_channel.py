"""The server's end of the local weight channel (`engine/local_channel.py`): a Unix socket beside
the HTTP API that takes `/update_weights_from_tensor` and `/update_weights_from_distributed`
bodies and answers as the routes do.

Opened on the first `POST /weight_channel` (a protected route), which answers the socket's path
and a token; closed with the server. The socket lies in a fresh folder only this user may enter
(mode 0700), and a connection that does not first show the token is answered 401 and closed.
Each connection has its own thread, which parses a body exactly as the route does
(`bodies.parse_bytes`, the same schema and size limit; a distributed bucket is checked, received
and loaded by the route's own `distributed_weights`) and runs the update itself, between the
batching worker's batches and control items (`BatchingWorker.control_here`: the route's abort and
hold, under the worker's lock, without two thread hand-offs). A CUDA IPC update is answered once
its copies are queued, with `copied_event`: the handle of an interprocess event recorded after
them, which the trainer waits on before it writes its weights again (the engine's next forward
is on the same stream as the copies, so it computes with the new weights).
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import torch

from miles_core.engine.local_channel import (DISTRIBUTED_ROUTE, TENSOR_ROUTE, ChannelClosed, FrameTooLarge,
                                             receive_frame, route_of, send_frame)
from miles_core.engine.native.engine import EngineReleased
from miles_core.serve import distributed_weights
from miles_core.serve.bodies import parse_bytes
from miles_core.serve.schemas import UpdateFromTensorBody
from miles_core.serve.state import RequestError, ServeState
from miles_core.serve.weights import copied_event, load_tensor_weights
from miles_core.sync.ipc_format import LOAD_FORMAT
from miles_core.utils.device import on_device

logger = logging.getLogger("miles.serve")


class WeightChannelServer:
    """The listening socket, its token, and a thread per connection."""

    def __init__(self, state: ServeState) -> None:
        self.state = state
        self.folder = Path(tempfile.mkdtemp(prefix="miles-serve-"))  # mode 0700: this user only
        self.path = str(self.folder / "weights.sock")
        self.token = secrets.token_hex(16)
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(self.path)
            self.listener.listen(16)
        except OSError:
            self.close()
            raise
        threading.Thread(target=self._accept, name="miles-serve-weight-channel", daemon=True).start()

    def close(self) -> None:
        """Stop listening, drop every connection, remove the folder."""
        self.listener.close()
        with self._lock:
            for connection in self._connections:
                _shut(connection)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                self._connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        limit = self.state.options.max_request_bytes
        try:
            hello = json.loads(receive_frame(connection, limit))
            if not secrets.compare_digest(str(hello.get("token", "")).encode(), self.token.encode()):
                _answer(connection, {"success": False, "message": "wrong token (POST /weight_channel)", "code": 401})
                return
            _answer(connection, {"success": True, "routes": [TENSOR_ROUTE, DISTRIBUTED_ROUTE]})
            while True:
                _answer(connection, self._update(receive_frame(connection, limit)))
        except FrameTooLarge as err:  # the rest of it is unread: answered, then closed
            _answer(connection, {"success": False, "message": f"{err} (--max-request-bytes)", "code": 413})
        except (OSError, ChannelClosed, ValueError, AttributeError):  # gone, or not speaking the protocol
            pass
        finally:
            with self._lock:
                self._connections.remove(connection)
            _shut(connection)

    def _update(self, raw: bytes) -> dict:
        """The route's answer to one body: success and the version, or the refusal and its code."""
        state = self.state
        route, raw = route_of(raw)
        try:
            if route == DISTRIBUTED_ROUTE:
                return self._receive_bucket(raw)
            if route != TENSOR_ROUTE:
                raise RequestError(f"route '{route}' is not taken over the local weight channel; expected "
                                   f"{TENSOR_ROUTE} or {DISTRIBUTED_ROUTE}", 404)
            body = parse_bytes(raw, UpdateFromTensorBody, state.options.max_request_bytes)
            answer = state.worker.control_here(lambda: self._load(body), alone=body.abort_all_requests)
        except RequestError as err:
            return {"success": False, "message": str(err), "code": err.status}
        except EngineReleased as err:  # the caller's turn-taking, as the route answers it
            return {"success": False, "message": str(err), "code": 409}
        except Exception as err:  # noqa: BLE001 - answered (the route's 500), never a dead channel
            logger.exception("miles serve: an update over the local weight channel failed")
            return {"success": False, "message": f"internal error ({type(err).__name__}): {err}", "code": 500}
        return answer

    def _receive_bucket(self, raw: bytes) -> dict:
        """`/update_weights_from_distributed`'s answer: the bucket received from the group and loaded
        on this thread (the engine's device made current), between the worker's batches."""
        state = self.state
        body = parse_bytes(raw, distributed_weights.DistributedBody, state.options.max_request_bytes)
        group, dtypes = distributed_weights.announced(state, body)
        try:
            with on_device(getattr(state.engine, "device", torch.device("cpu"))):
                message = state.worker.control_here(
                    lambda: distributed_weights.receive_bucket(state, group, body, dtypes), alone=body.abort_all_requests)
        except distributed_weights.REFUSALS as err:
            raise distributed_weights.refusal(err, distributed_weights.REFUSED) from None
        return {"success": True, "message": message, "weight_version": state.engine.weight_version}

    def _load(self, body: UpdateFromTensorBody) -> dict:
        """Load the body's tensors on this thread (the engine's device made current); CUDA IPC copies
        are answered once queued, with the event the trainer waits on."""
        engine = self.state.engine
        with on_device(getattr(engine, "device", torch.device("cpu"))):
            message = load_tensor_weights(engine, body.serialized_named_tensors, body.weight_version,
                                          body.flush_cache, body.load_format, wait=False)
            event = copied_event(engine) if body.load_format == LOAD_FORMAT else None
        answer = {"success": True, "message": message, "weight_version": engine.weight_version}
        return answer if event is None else {**answer, "copied_event": event}


def _answer(connection: socket.socket, answer: dict) -> None:
    send_frame(connection, json.dumps(answer).encode())


def _shut(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    connection.close()
