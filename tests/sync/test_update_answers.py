"""The trainer checks a weight update's version from the servers' answers where they carry it
(`miles serve`), and asks `/get_model_info` where they do not (SGLang), over a stand-in server."""

from __future__ import annotations

import httpx
import pytest

from miles_core.config import EngineConfig
from miles_core.engine import http as http_engine
from miles_core.engine.http import SGLangHttpEngine
from miles_core.errors import MilesError

URL = "http://stand-in:30000"


def _engine(monkeypatch, answer_version):
    """An engine over one stand-in server whose update answers report `answer_version` (None: no field)."""
    calls, state = [], {"version": "0"}

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path))
        if request.url.path == "/get_model_info":
            return httpx.Response(200, json={"weight_version": state["version"]})
        if request.url.path == "/update_weights_from_tensor":
            state["version"] = "7"
            extra = {} if answer_version is None else {"weight_version": answer_version}
            return httpx.Response(200, json={"success": True, "message": "ok", **extra})
        return httpx.Response(200, json={})

    monkeypatch.setattr(http_engine, "http_client", lambda limits=None, **kw: httpx.Client(
        transport=httpx.MockTransport(handle), **kw))
    engine = SGLangHttpEngine(EngineConfig(backend="sglang", urls=[URL]), urls=[URL])
    calls.clear()
    return engine, calls


def test_a_version_in_the_answer_needs_no_model_info_call(monkeypatch):
    engine, calls = _engine(monkeypatch, "7")
    engine.update_weights_from_tensor(["{}"], load_format=None, version="7", flush=True)
    assert calls == [("POST", "/update_weights_from_tensor")] and engine.weight_version == "7"


def test_an_answer_without_a_version_is_checked_through_model_info(monkeypatch):
    engine, calls = _engine(monkeypatch, None)
    engine.update_weights_from_tensor(["{}"], load_format=None, version="7", flush=True)
    assert calls == [("POST", "/update_weights_from_tensor"), ("GET", "/get_model_info")]
    assert engine.weight_version == "7"


def test_a_stale_version_in_the_answer_fails_the_update(monkeypatch):
    engine, _ = _engine(monkeypatch, "6")
    with pytest.raises(MilesError, match=r"stand-in:30000 reports weight_version '6' after the update to '7'"):
        engine.update_weights_from_tensor(["{}"], load_format=None, version="7", flush=True)
    assert engine.weight_version == "0"
