"""The weight routes of SGLang-protocol servers, as client methods of `SGLangHttpEngine`.

Used by the `nccl` and `cuda_ipc` sync transports and by `sync.check_weight_update_equal`:
`/init_weights_update_group`, `/update_weights_from_distributed` and
`/destroy_weights_update_group` (SGLang's names and fields), `/update_weights_from_tensor`, and
miles serve's `/weights_checksum`. Every call goes to every live server at once (threads: a server
answers `/update_weights_from_distributed` only after it has received the bucket, while the
caller broadcasts it), and unlike generation a server that fails here is an error, never skipped:
its weights would fall behind. The two update routes go over a `miles serve`'s local weight
channel (`local_channel.py`) when the caller asks and every server has one.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol
from urllib.parse import urlsplit

from miles_core.engine.local_channel import DISTRIBUTED_ROUTE, TENSOR_ROUTE, ChannelTimeout, WeightChannel
from miles_core.errors import MilesError, Refused
from miles_core.utils.threads import background

logger = logging.getLogger(__name__)


class Pending(Protocol):
    """Answers still to come (`concurrent.futures.Future` is one)."""

    def result(self, timeout: float | None = None) -> list[dict]: ...


class _ChannelAnswers:
    """The servers' answers to a body sent over their local channels, read on the first `result`;
    a `timeout` given there bounds each read and, as a future's would, raises `TimeoutError`
    (the channels are dropped: an answer left unread would be taken for the next)."""

    def __init__(self, read: Callable[[], list[dict]], channels: list[WeightChannel]) -> None:
        self._read, self._channels, self._answers = read, channels, None

    def result(self, timeout: float | None = None) -> list[dict]:
        if self._answers is None:
            if timeout is None:
                self._answers = self._read()
                return self._answers
            for channel in self._channels:
                channel.timeout_s = timeout
            try:
                self._answers = self._read()
            except ChannelTimeout:
                raise TimeoutError from None
        return self._answers


class WeightRoutes:
    """Mixin of `SGLangHttpEngine` (needs its `servers`, `_call`, `_live`, `_get`, `_weight_version`)."""

    def weight_ranks(self) -> list[int]:
        """How many ranks each live server has in a weight-update group (SGLang: its tp_size)."""
        return [server.num_ranks for server in self._live()]

    def local_address(self) -> str:
        """This machine's address on the route to the first server (what the servers connect back to)."""
        host = urlsplit(self._live()[0].url).hostname or "127.0.0.1"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((host, 9))  # UDP connect sends nothing; it only picks the route
                return probe.getsockname()[0]
            except OSError:
                return "127.0.0.1"

    def init_weights_update_group(self, *, master_address: str, master_port: int, world_size: int,
                                  group_name: str, backend: str) -> None:
        """Every server joins the group; server i gets ranks after rank 0 and the servers before it."""
        offsets, offset = [], 1
        for ranks in self.weight_ranks():
            offsets.append(offset)
            offset += ranks
        bodies = [{"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
                   "world_size": world_size, "group_name": group_name, "backend": backend} for rank_offset in offsets]
        self._post_all("/init_weights_update_group", bodies)

    def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str, version: str | None, flush: bool,
                                        load_format: str | None = None, abort_all: bool = False,
                                        local: bool = False, timeout_s: float | None = None) -> Pending:
        """Every server starts to receive one bucket from the group: the caller broadcasts it, then
        calls `result()` on what this returns (every server's answer, each once it holds the
        bucket; with `version`, each must report it). `abort_all`: each aborts its running
        requests and holds new ones until the bucket is in. `local`: over the servers' local
        weight channels when every one takes the route there (sent before this returns: no
        thread, no HTTP; no answer within `timeout_s`, else `request_timeout_s`, is an error),
        else over HTTP on a thread."""
        body = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name, "flush_cache": flush,
                "weight_version": version, "load_format": load_format, "abort_all_requests": abort_all}
        channels = self._weight_channels() if local else None
        if channels and all(DISTRIBUTED_ROUTE in channel.routes for channel in channels):
            self._send_over_channels(channels, body, timeout_s or self.cfg.request_timeout_s, DISTRIBUTED_ROUTE)
            return _ChannelAnswers(lambda: self._checked(version, self._answers_over_channels(channels)), channels)
        return background(self._distributed_over_http, body=body, version=version)

    def _distributed_over_http(self, body: dict, version: str | None) -> list[dict]:
        return self._checked(version, self._post_all(DISTRIBUTED_ROUTE, [body] * len(self._live())))

    def destroy_weights_update_group(self, group_name: str) -> None:
        self._post_all("/destroy_weights_update_group", [{"group_name": group_name}] * len(self._live()))

    def update_weights_from_tensor(self, serialized: list[str], *, load_format: str | None, version: str | None,
                                   flush: bool, abort_all: bool = False, local: bool = False,
                                   timeout_s: float | None = None) -> list[dict]:
        """Every server loads the tensors; returns their answers. `local`: over each one's local
        weight channel (a `miles serve` on this machine; opened on first use; no answer within
        `timeout_s`, else `request_timeout_s`, is an error), over HTTP where one has none."""
        body = {"serialized_named_tensors": serialized, "load_format": load_format, "flush_cache": flush,
                "weight_version": version, "abort_all_requests": abort_all}
        channels = self._weight_channels() if local else None
        if channels:
            self._send_over_channels(channels, body, timeout_s or self.cfg.request_timeout_s, TENSOR_ROUTE)
            answers = self._answers_over_channels(channels)
        else:
            answers = self._post_all(TENSOR_ROUTE, [body] * len(self._live()))
        return self._checked(version, answers)

    def listening(self, server) -> bool:
        """Whether `server` still takes connections: its local channel, if open, has not ended
        (a `poll`), else a TCP connect to its port answers (~0.1 ms on one machine; a process
        that is gone refuses at once). A channel that ended is dropped with the others."""
        urls, channels = self._channels or ((), ())
        if channels and server.url in urls:  # a server without a channel is not asked for one again
            if channels[urls.index(server.url)].peer_open():
                return True
            self.close_weight_channels()
        return accepts_connections(server.url)

    def weight_channels_open(self) -> bool:
        """Whether every live server's local weight channel is open (an update will make no HTTP call)."""
        return bool(self._channels and self._channels[1]) and self._channels[0] == [s.url for s in self._live()]

    def close_weight_channels(self) -> None:
        for channel in self._channels[1] if self._channels else ():
            channel.close()
        self._channels = None

    def _weight_channels(self) -> list[WeightChannel]:
        """One open channel per live server; none (once warned) where a server offers none."""
        live = self._live()
        urls = [server.url for server in live]
        if self._channels is not None and self._channels[0] == urls:
            return self._channels[1]
        self.close_weight_channels()
        channels = []
        try:
            for server in live:
                where = self._post_one(server, "/weight_channel", {})
                channels.append(WeightChannel(server.url, where["path"], where["token"], self.cfg.request_timeout_s))
        except (MilesError, OSError, KeyError, TypeError) as err:
            for channel in channels:
                channel.close()
            logger.warning("no local weight channel (%s); weight updates go over HTTP", err)
            channels = []  # not asked again until the servers change
        self._channels = (urls, channels)
        return channels

    def _send_over_channels(self, channels: list[WeightChannel], body: dict, timeout_s: float, route: str) -> None:
        """Send `body` to every server; a broken channel drops them all."""
        try:
            for channel in channels:
                channel.timeout_s = timeout_s
                channel.send(body, route)
        except BaseException:
            self.close_weight_channels()
            raise

    def _answers_over_channels(self, channels: list[WeightChannel]) -> list[dict]:
        """Read every server's answer (a refusal is raised once all are read); a broken channel
        drops them all (an answer left unread would be taken for the next)."""
        answers, refusals = [], []
        try:
            for channel in channels:
                try:
                    answers.append(channel.receive())
                except Refused as err:
                    refusals.append(err)
        except BaseException:
            self.close_weight_channels()
            raise
        if refusals:
            raise refusals[0]
        return answers

    def weights_checksums(self, names: list[str]) -> list[tuple[str, dict]]:
        """(url, {name: {"dtype", "shape", "sha256"}}) of every live server (miles serve only)."""
        servers = self._live()
        answers = self._post_all("/weights_checksum", [{"names": names}] * len(servers))
        return [(server.url, answer["tensors"]) for server, answer in zip(servers, answers)]

    # -- helpers -----------------------------------------------------------------------------
    def _post_all(self, path: str, bodies: list[dict]) -> list[dict]:
        servers = self._live()
        if len(servers) == 1:  # no pool for one server: starting its thread costs more than the call
            return [self._post_one(servers[0], path, bodies[0])]
        with ThreadPoolExecutor(max_workers=len(servers)) as pool:
            futures = [pool.submit(self._post_one, server, path, body) for server, body in zip(servers, bodies)]
            errors, answers = [], []
            for future in futures:
                try:
                    answers.append(future.result())
                except MilesError as err:
                    errors.append(str(err))
        if errors:
            raise MilesError(errors[0] + (f" (and {len(errors) - 1} more servers failed)" if len(errors) > 1 else ""))
        return answers

    def _post_one(self, server, path: str, body: dict) -> dict:
        try:
            answer = self._call(server, "POST", path, body).json()
        except MilesError:  # a 4xx: the server's own one-line reason
            raise
        except Exception as err:  # noqa: BLE001 - `ServerFailed` (connection, timeout, 5xx): name it
            raise MilesError(f"weight update failed: {err}") from None
        if isinstance(answer, dict) and answer.get("success") is False:
            raise MilesError(f"{server.url}{path} failed: {answer.get('message')}")
        return answer

    def _checked(self, version: str | None, answers: list[dict]) -> list[dict]:
        """`answers`, once every server reports `version` (if one was set)."""
        if version is not None:
            self._expect_version(version, answers)
        return answers

    def _expect_version(self, version: str, answers: list[dict]) -> None:
        """Every server must report `version`: in its answer to the update (`miles serve`), else
        from `/get_model_info` (SGLang's answers carry no version)."""
        for server, answer in zip(self._live(), answers):
            reported = answer["weight_version"] if isinstance(answer, dict) and "weight_version" in answer else \
                self._get(server, "/get_model_info").get("weight_version")
            if str(reported) != str(version):
                raise MilesError(f"{server.url} reports weight_version '{reported}' after the update to '{version}'")
        self._weight_version = str(version)


def accepts_connections(url: str) -> bool:
    """Whether something listens at `url`'s host and port (a TCP connect)."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 80), timeout=5):
            return True
    except OSError:
        return False
