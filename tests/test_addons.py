"""The addon classes in-process, through mitmproxy's own test helpers."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import os
import socket
import time
from pathlib import Path

import orjson
import pytest
import mitmproxy.flow
from mitmproxy import exceptions
from mitmproxy.flow import Error as flow_error
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils

from llm_mitm import sse
from llm_mitm.addons import OutputRedaction, Recorder, Scope, Settings, Shared, Tracer, Tunnels
from tests.support.canned_server import CannedServer, ok
from tests.test_sse import through


def make_addons() -> tuple[Shared, list[object]]:
    shared = Shared()
    return shared, [Settings(shared), OutputRedaction(shared), Scope(shared), Recorder(shared), Tracer(shared), Tunnels(shared), Proxyserver()]


def chat_flow(host: str = "api.openai.com", body: dict | None = None, scheme: str = "https", port: int = 443, headers=()):
    content = orjson.dumps(body or {"model": "gpt-4o", "stream": False, "messages": [{"role": "user", "content": "hi"}]})
    request = tutils.treq(
        host=host, port=port, scheme=scheme.encode() if isinstance(scheme, str) else scheme,
        path=b"/v1/chat/completions", method=b"POST",
        headers=[(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-proj-" + b"K" * 40), *headers],
        content=content,
    )
    request.scheme = scheme
    return tflow.tflow(req=request)


@contextlib.contextmanager
def whole_addon(config: Path | None = None):
    """The addon as mitmdump loads it (`build()`), configured (defaults without a file),
    closed at the end; inside a running loop, as taddons needs."""
    from llm_mitm.addons import build

    addons = build() + [Proxyserver()]
    with taddons.context(*addons) as tctx:
        tctx.configure(addons[0], llm_config=str(config) if config else "")
        try:
            yield addons[0], tctx
        finally:
            addons[0].done()


@contextlib.contextmanager
def watched_config(path: Path):
    """Settings watching the config at `path`, as after mitmdump's start (`running`), with
    the concerns that react to it; stopped at the end. Inside a running loop."""
    shared, addons = make_addons()
    settings: Settings = addons[0]  # type: ignore[assignment]
    with taddons.context(*addons) as tctx:
        tctx.configure(settings, llm_config=str(path))
        settings.running()
        try:
            yield shared, settings, tctx
        finally:
            settings.done()


def config_file(folder: Path, text: str) -> Path:
    """A config.yaml in `folder` holding `text`, for `whole_addon`."""
    config = folder / "config.yaml"
    config.write_text(text)
    return config


def run(coro):
    return asyncio.run(coro)


def stats_table(tctx, llm) -> str:  # type: ignore[no-untyped-def]
    """`llm.stats` once the writer process has reported every call: the command itself
    waits 2 s, which a writer still starting on a loaded machine may need more than."""
    llm.shared.collect_counts(30)
    return tctx.master.commands.execute("llm.stats")


def test_scope_sets_allow_hosts_and_lazy_connections(tmp_path: Path) -> None:
    async def go() -> None:
        shared, addons = make_addons()
        with taddons.context(*addons) as tctx:
            tctx.configure(addons[0], llm_config="")
            assert tctx.options.connection_strategy == "lazy"
            assert tctx.options.rawtcp is False and tctx.options.tcp_hosts == []  # no LLM host's connection passes unread
            tctx.options.update(rawtcp=True, tcp_hosts=["api.openai.com"])
            assert tctx.options.rawtcp is False and tctx.options.tcp_hosts == []
            assert r"^api\.openai\.com\.?:\d+$" in tctx.options.allow_hosts  # and its fully qualified form
            assert len(tctx.options.allow_hosts) == 7  # openai 3, azure 3, anthropic 1

    os.chdir(tmp_path)
    run(go())


def test_ignore_hosts_is_turned_off_as_it_would_pass_llm_hosts_unread(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """mitmproxy checks `ignore_hosts` after `allow_hosts`, so with llm-mitm owning the
    latter an ignore pattern can only take an LLM host out of interception: a probe with
    `--set ignore_hosts=openai` had a model the policy refuses answered 200, untraced, while
    the log said api.openai.com was intercepted. Turned off, and said, as `tcp_hosts` is."""
    async def go() -> None:
        shared, addons = make_addons()
        with taddons.context(*addons) as tctx:
            caplog.set_level(logging.WARNING, "llm_mitm")
            tctx.options.update(ignore_hosts=["openai"])
            tctx.configure(addons[0], llm_config="")
            assert tctx.options.ignore_hosts == []
            tctx.options.update(ignore_hosts=[r"^api\.anthropic\.com:443$"])  # set while running
            assert tctx.options.ignore_hosts == []
            warned = [r.getMessage() for r in caplog.records if "ignore_hosts" in r.getMessage()]
            assert len(warned) == 2 and "openai" in warned[0] and "anthropic" in warned[1], warned

    os.chdir(tmp_path)
    run(go())


def test_a_reverse_proxy_to_a_server_no_provider_names_is_said_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`--mode reverse:https://127.0.0.1:8443` (an address, or a host no provider lists):
    mitmproxy sends each call there with the target's Host header, so no call is a
    provider's, and every one passed unchecked and untraced without a word (a probe: a
    model the policy refuses was answered 200). Said once a target, for each mode."""
    async def go() -> None:
        shared, addons = make_addons()
        with taddons.context(*addons) as tctx:
            caplog.set_level(logging.WARNING, "llm_mitm")
            tctx.options.update(mode=["reverse:https://127.0.0.1:8443@18001", "reverse:https://api.openai.com@18002", "regular@18003"])
            tctx.configure(addons[0], llm_config="")
            warned = [r.getMessage() for r in caplog.records if "reverse" in r.getMessage()]
            assert len(warned) == 1 and "https://127.0.0.1:8443" in warned[0] and "api.openai.com" not in warned[0], warned
            tctx.options.update(allow_hosts=[])  # looked at again (Scope puts its own back): not said again
            tctx.options.update(keep_host_header=True)  # the Host header names the provider: routed by it
            assert len([r for r in caplog.records if "reverse" in r.getMessage()]) == 1

    os.chdir(tmp_path)
    run(go())


def test_mitmproxy_sees_only_the_hooks_working_concerns_implement(tmp_path: Path) -> None:
    """A hook no working concern needs is None (mitmproxy skips it on every flow); the
    others go through the loop that isolates the concerns from each other's failures."""
    async def go() -> None:
        with whole_addon() as (llm, tctx):
            assert llm.requestheaders is None
            assert [hook.__self__.__class__.__name__ for hook in llm._hooks["request"]] == ["Scope", "Recorder", "Organization", "Firewall", "StreamUsage"]
            assert llm.request.func == llm._each
            flow = chat_flow(body={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
            llm.request(flow)
            assert llm.shared.exchange(flow).policy.decision == "allow"

    os.chdir(tmp_path)
    run(go())


def test_http_upgrade_changes_scheme_only(tmp_path: Path) -> None:
    async def go() -> None:
        shared, addons = make_addons()
        with taddons.context(*addons) as tctx:
            tctx.configure(addons[0], llm_config="")
            flow = chat_flow(scheme="http", port=80)
            flow.request.headers["host"] = "api.openai.com"
            before = list(flow.request.headers.items(multi=True))
            addons[2].request(flow)
            assert flow.request.scheme == "https" and flow.request.port == 443
            assert list(flow.request.headers.items(multi=True)) == before
            other = chat_flow(host="example.com", scheme="http", port=80)
            addons[2].request(other)
            assert other.request.scheme == "http"

    os.chdir(tmp_path)
    run(go())


def test_proxy_hop_headers_never_reach_a_provider_over_http(tmp_path: Path) -> None:
    """SECURITY.md: a plain-http call's `Proxy-Authorization` and `Proxy-Connection` are the
    proxy's. They were taken off only where the call was upgraded to https: a server of your
    own on http (`localhost:8000`, upgrade_http off) got the client's proxy credentials."""
    config = tmp_path / "config.yaml"
    config.write_text("providers:\n  vllm:\n    api: openai\n    hosts: ['localhost:8000']\n")
    hop = [(b"proxy-authorization", b"Basic dXNlcjpwYXNz"), (b"proxy-connection", b"keep-alive")]

    async def go() -> None:
        shared, addons = make_addons()
        with taddons.context(*addons) as tctx:
            tctx.configure(addons[0], llm_config=str(config))
            own = chat_flow(host="localhost", scheme="http", port=8000, headers=hop)
            addons[2].request(own)
            assert own.request.scheme == "http" and "proxy-authorization" not in own.request.headers
            assert "proxy-connection" not in own.request.headers
            other = chat_flow(host="example.com", scheme="http", port=80, headers=hop)
            addons[2].request(other)
            assert "proxy-authorization" in other.request.headers  # not an LLM host: untouched
            # behind a corporate proxy (upstream mode) the call goes on to that proxy with its
            # credentials, set by mitmproxy's upstream_auth (a review: they were taken off, 407)
            chained = chat_flow(host="localhost", scheme="http", port=8000, headers=hop)
            chained.client_conn.proxy_mode = ProxyMode.parse("upstream:http://corp:3128")
            addons[2].request(chained)
            assert "proxy-authorization" in chained.request.headers and "proxy-connection" not in chained.request.headers

    os.chdir(tmp_path)
    run(go())


@pytest.mark.parametrize("deferred", [False, True])
def test_one_exchange_per_flow_with_usage(tmp_path: Path, deferred: bool) -> None:
    """Read here, or (traces on, no limits) left unread for the writer process, decoded."""
    answer = orjson.dumps({"model": "gpt-4o-2024-08-06", "usage": {"prompt_tokens": 3, "completion_tokens": 4}})

    async def go() -> None:
        shared, addons = make_addons()
        with taddons.context(*addons) as tctx:
            tctx.configure(addons[0], llm_config="")
            assert shared.defer_responses  # the default: traces on, no limits
            shared.defer_responses = deferred
            flow = chat_flow(headers=[(b"openai-organization", b"org-1")])
            recorder: Recorder = addons[3]  # type: ignore[assignment]
            recorder.request(flow)
            exchange = shared.exchange(flow)
            assert exchange is not None
            assert (exchange.route.operation, exchange.model, exchange.stream) == ("chat.completions", "gpt-4o", False)
            assert exchange.organization == "org-1"
            assert exchange.api_key and exchange.api_key.startswith("sk-proj-…KKKK#")
            recorder.request(flow)
            flow.response = tutils.tresp(
                headers=[(b"content-type", b"application/json"), (b"content-encoding", b"gzip")],
                content=gzip.compress(answer),
            )
            flow.response.headers["content-encoding"] = "gzip"
            recorder.responseheaders(flow)
            recorder.response(flow)
            exchange = shared.exchange(flow)
            assert exchange.done and exchange.deferred is deferred
            if deferred:
                assert exchange.response.unread and exchange.response.raw == answer
                assert exchange.response_model is None and exchange.usage is None
                return
            assert exchange.response_model == "gpt-4o-2024-08-06"
            assert exchange.usage.total_tokens == 7

    os.chdir(tmp_path)
    run(go())


def recorded(flow):  # type: ignore[no-untyped-def]
    """The exchange the Recorder makes of a flow, with the default config."""
    async def go():  # type: ignore[no-untyped-def]
        shared, addons = make_addons()
        with taddons.context(*addons) as tctx:
            tctx.configure(addons[0], llm_config="")
            addons[3].request(flow)
            return shared.exchange(flow)

    return run(go())


def test_one_key_is_one_identity_however_it_is_sent(tmp_path: Path) -> None:
    """Limits, budgets and `by_key` go by the key: not by how `Bearer` is spelt, nor by
    whether Azure's key came in a header or the query, nor by a stray second header."""
    os.chdir(tmp_path)
    key = b"sk-proj-" + b"K" * 40

    def key_of(host: str = "api.openai.com", path: bytes = b"/v1/chat/completions", **headers: bytes) -> str | None:
        flow = chat_flow(host=host)
        flow.request.path = path
        del flow.request.headers["authorization"]
        for name, value in headers.items():
            flow.request.headers[name.replace("_", "-")] = value
        return recorded(flow).api_key

    bearer = key_of(authorization=b"Bearer " + key)
    assert bearer == key_of(authorization=b"bearer " + key) == key_of(authorization=b"BEARER\t " + key) == key_of(authorization=key)
    azure, deployment = "r.openai.azure.com", b"/openai/deployments/d/chat/completions?api-version=1"
    assert key_of(azure, deployment, api_key=b"0123456789abcdef" * 2) == key_of(azure, deployment + b"&api-key=" + b"0123456789abcdef" * 2)
    assert key_of(azure, deployment + b"&api-key=" + b"f" * 32) != key_of(azure, deployment + b"&api-key=" + b"e" * 32)
    anthropic = key_of("api.anthropic.com", b"/v1/messages", x_api_key=key, authorization=b"Bearer junk-" + b"j" * 20)
    assert anthropic == key_of("api.anthropic.com", b"/v1/messages", x_api_key=key)
    # a gateway's password header: the caller as its header is traced, with none of its characters (it kept its last four)
    password = key_of(x_gateway_password=b"hunter2-but-longer-Zq9!")
    assert password is not None and password.startswith("…#") and "Zq9!" not in password


def test_a_provider_named_only_by_server_name_or_host_header_is_recorded(tmp_path: Path) -> None:
    """mitmproxy intercepts a connection by its address, its TLS server name or its Host
    header: a call to 127.0.0.1 with SNI api.openai.com is policed and traced as OpenAI."""
    os.chdir(tmp_path)
    flow = chat_flow(host="127.0.0.1")
    flow.client_conn.sni = "api.openai.com"
    assert recorded(flow).route.provider == "openai"
    flow = chat_flow(host="127.0.0.1")
    flow.client_conn.sni = None
    flow.request.headers["host"] = "api.anthropic.com:443"
    assert recorded(flow).route.provider == "anthropic"
    assert recorded(chat_flow(host="api.openai.com.")).route.provider == "openai"
    assert recorded(chat_flow(host="127.0.0.1")) is None


def test_the_model_where_the_body_does_not_name_it(tmp_path: Path) -> None:
    os.chdir(tmp_path)
    flow = chat_flow()
    flow.request.method, flow.request.path, flow.request.content = "GET", "/v1/realtime?model=gpt-4o-realtime-preview", b""
    assert recorded(flow).model == "gpt-4o-realtime-preview"  # realtime: in the query
    flow = chat_flow()
    flow.request.path = "/v1/audio/transcriptions"
    flow.request.headers["content-type"] = "Multipart/Form-Data; boundary=b"
    flow.request.content = b'--b\r\ncontent-disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--b--\r\n'
    assert recorded(flow).model == "whisper-1"  # a media type in capitals is the same type


def test_non_llm_flow_gets_no_exchange(tmp_path: Path) -> None:
    async def go() -> None:
        shared, addons = make_addons()
        with taddons.context(*addons) as tctx:
            tctx.configure(addons[0], llm_config="")
            flow = chat_flow(host="api.openai.com.evil.net")
            addons[3].request(flow)
            assert shared.exchange(flow) is None

    os.chdir(tmp_path)
    run(go())


@pytest.mark.parametrize(("held", "deferred"), [(False, False), (True, True), (True, False)])
def test_event_stream_response_gets_a_tap(tmp_path: Path, held: bool, deferred: bool) -> None:
    """Read as it passes, or (traces on, no limits) held for the writer process; held, and
    then no writer to leave it to (it went mid-stream): read here at the end."""
    async def go() -> None:
        shared, addons = make_addons()
        with taddons.context(*addons) as tctx:
            tctx.configure(addons[0], llm_config="")
            shared.defer_responses = held
            flow = chat_flow(body={"model": "gpt-4o", "stream": True, "messages": []})
            addons[3].request(flow)
            flow.response = tutils.tresp(headers=[(b"content-type", b"text/event-stream")], content=b"")
            flow.response.data.content = None  # headers only, as at responseheaders from upstream
            addons[3].responseheaders(flow)
            assert callable(flow.response.stream)
            chunk = b'data: {"model": "m", "choices": [{"index": 0, "delta": {"content": "hey"}}]}\n\n'
            assert flow.response.stream(chunk) == chunk
            flow.response.stream(b"")
            shared.defer_responses = deferred
            addons[3].response(flow)
            exchange = shared.exchange(flow)
            assert exchange.stream and exchange.deferred is deferred
            if deferred:
                assert exchange.response.unread and exchange.held_stream and exchange.tap.held == [chunk]
                assert exchange.tap.rebuilder.events == 0 and exchange.usage is None
                return
            assert exchange.response.json["choices"][0]["message"]["content"] == "hey"
            assert exchange.tap.rebuilder.events == 1 and exchange.response.size == len(chunk)

    os.chdir(tmp_path)
    run(go())


def test_bad_config_change_is_refused_and_last_good_stays(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("providers:\n  vllm:\n    api: openai\n    hosts: ['localhost:8000']\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers:\n  vllm:\n    api: nope\n    hosts: ['localhost:8000']\n")

    async def go() -> None:
        with watched_config(good) as (shared, settings, tctx):
            with pytest.raises(exceptions.OptionsError, match=r"bad.yaml: providers.vllm.api: Input should be"):
                tctx.configure(settings, llm_config=str(bad))
            assert tctx.options.llm_config == str(good)
            assert "vllm" in shared.config.providers
            # An edit of the file on disk: refused with the same message, then accepted.
            time.sleep(0.01)
            good.write_text("providers:\n  vllm:\n    api: openai\n    hosts: [1 2\n")
            with caplog.at_level(logging.ERROR):
                assert not settings.reload_if_changed()  # seen changed: read once it holds still
                assert not settings.reload_if_changed()
            assert "config change refused" in caplog.text and "good.yaml: invalid YAML" in caplog.text
            assert shared.matcher.match("localhost", 8000) is not None
            good.write_text("providers:\n  vllm:\n    api: anthropic\n    hosts: ['localhost:9000']\n")
            assert not settings.reload_if_changed() and settings.reload_if_changed()
            assert shared.matcher.match("localhost", 8000) is None
            assert shared.matcher.match("localhost", 9000).api == "anthropic"
            assert r"^localhost\.?:9000$" in tctx.options.allow_hosts

    run(go())


def test_an_edit_caught_half_written_or_an_emptied_file_never_drops_the_policy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An editor that empties the file and then writes it, a poll between the two, and a
    file emptied by mistake: the policy in force stays until a whole file holds still."""
    path = tmp_path / "config.yaml"
    path.write_text("policy:\n  denied_models: [gpt-4]\n")

    async def go() -> None:
        with watched_config(path) as (shared, settings, tctx):
            path.write_text("")  # emptied, about to be written
            assert not settings.reload_if_changed()
            path.write_text("policy:\n  denied_models: [gpt-4, o1]\n")  # written before the next poll
            assert not settings.reload_if_changed()
            assert shared.config.policy.denied_models == ["gpt-4"]
            assert settings.reload_if_changed()
            assert shared.config.policy.denied_models == ["gpt-4", "o1"]
            for emptied in ("", "\n", "# all commented out\n# policy:\n"):  # left empty, or with nothing but comments
                caplog.clear()
                path.write_text(emptied)
                with caplog.at_level(logging.ERROR):
                    assert not settings.reload_if_changed() and not settings.reload_if_changed()
                assert "config change refused" in caplog.text and "config.yaml: the file is empty (write {} for the built-in defaults)" in caplog.text
                assert shared.config.policy.denied_models == ["gpt-4", "o1"]
            path.write_text("{}\n")
            assert not settings.reload_if_changed() and settings.reload_if_changed()
            assert shared.config.policy.denied_models == []

    run(go())


def test_a_host_taken_into_scope_by_an_edit_is_named_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An edit that takes a host into scope says so (and closes the tunnels open to it:
    `tests/test_e2e_scope.py`); one that takes none in says nothing."""
    path = tmp_path / "config.yaml"
    path.write_text("providers:\n  anthropic: {enabled: false}\n")

    async def go() -> None:
        with watched_config(path) as (shared, settings, tctx):
            caplog.set_level(logging.WARNING, "llm_mitm")
            assert "now intercepted" not in caplog.text  # at start: nothing is taken in
            path.write_text("providers:\n  anthropic: {enabled: false}\npolicy:\n  denied_models: [o1]\n")
            assert not settings.reload_if_changed() and settings.reload_if_changed()
            assert "now intercepted" not in caplog.text  # no host taken in
            path.write_text("policy:\n  allowed_models: ['gpt-4o*']\n")
            assert not settings.reload_if_changed() and settings.reload_if_changed()
            said = [r.getMessage() for r in caplog.records if "now intercepted" in r.getMessage()]
            assert said == ["llm-mitm: api.anthropic.com now intercepted"], said

    run(go())


def test_a_trace_directory_gone_bad_does_not_hold_back_a_policy_edit(tmp_path: Path) -> None:
    """Trace targets are checked on a reload only when they change: the writer logs its own
    losses, and a tighter policy must still go into force."""
    path = tmp_path / "config.yaml"
    (tmp_path / "per").mkdir()
    path.write_text(f"traces:\n  directory: {tmp_path}/per\n")

    async def go() -> None:
        with watched_config(path) as (shared, settings, tctx):
            (tmp_path / "per").rmdir()
            (tmp_path / "per").write_text("now a file")
            path.write_text(f"traces:\n  directory: {tmp_path}/per\npolicy:\n  denied_models: [gpt-4]\n")
            assert not settings.reload_if_changed() and settings.reload_if_changed()
            assert shared.config.policy.denied_models == ["gpt-4"]
            path.write_text(f"traces:\n  directory: {tmp_path}/per/deeper\npolicy:\n  denied_models: [gpt-4, o1]\n")  # a new target: checked
            assert not settings.reload_if_changed() and not settings.reload_if_changed()
            assert shared.config.policy.denied_models == ["gpt-4"]

    run(go())


@pytest.mark.parametrize(
    ("edit", "refusal"),
    [
        ("usage:\n  spend_db: {dir}\n  # a budget needs its store\npolicy:\n  budgets: [{{usd_per_day: 5}}]\n",
         "usage.spend_db: {dir}: cannot be opened: unable to open database file"),
    ],
)
def test_a_config_an_addon_cannot_take_is_refused_whole(tmp_path: Path, caplog: pytest.LogCaptureFixture, edit: str, refusal: str) -> None:
    """A file it names that cannot be used: none of the edit goes into force (its policy
    did, while the log said the previous config stayed)."""
    from llm_mitm.addons import build

    path, folder = tmp_path / "config.yaml", tmp_path / "a-dir"
    folder.mkdir()
    path.write_text("policy:\n  denied_models: [gpt-4]\n")

    async def go() -> None:
        addons = build() + [Proxyserver()]
        settings: Settings = addons[0].concerns[0]  # type: ignore[attr-defined]
        with taddons.context(*addons) as tctx:
            tctx.configure(addons[0], llm_config=str(path))
            settings.running()
            policy = settings.shared.policy
            try:
                edited = edit.format(dir=folder)
                path.write_text(edited.replace("policy:\n", "policy:\n  denied_models: [gpt-4, o1]\n") if "policy:" in edited
                                else edited + "policy:\n  denied_models: [gpt-4, o1]\n")
                with caplog.at_level(logging.ERROR):
                    assert not settings.reload_if_changed() and not settings.reload_if_changed()
                assert f"config change refused, the previous config stays in force: {path}: {refusal.format(dir=folder)}" in caplog.text
                assert settings.shared.config.policy.denied_models == ["gpt-4"]
                assert settings.shared.policy is policy
                path.write_text("policy:\n  denied_models: [gpt-4, o1]\n")
                assert not settings.reload_if_changed() and settings.reload_if_changed()
                assert settings.shared.config.policy.denied_models == ["gpt-4", "o1"]
            finally:
                addons[0].done()

    run(go())


def test_a_script_reload_while_the_file_holds_a_bad_edit_keeps_the_config_in_force(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """mitmproxy reloads the script (new addons, the package kept) when it changes: the new
    addons started on the built-in defaults, no policy, and stopped following the file."""
    from llm_mitm.addons import build

    path = tmp_path / "config.yaml"
    path.write_text("policy:\n  denied_models: [gpt-4]\n")

    async def go() -> None:
        first = build() + [Proxyserver()]
        with taddons.context(*first) as tctx:
            tctx.configure(first[0], llm_config=str(path))
            first[0].done()
        path.write_text("policy:\n  denied_models: gpt-4, o1]\n")  # a bad edit, then the script reloads
        reloaded = build() + [Proxyserver()]
        settings: Settings = reloaded[0].concerns[0]  # type: ignore[attr-defined]
        with taddons.context(*reloaded) as tctx:
            with caplog.at_level(logging.ERROR):
                tctx.configure(reloaded[0], llm_config=str(path))
            assert f"config change refused, the previous config stays in force: {path}: " in caplog.text
            assert settings.shared.config.policy.denied_models == ["gpt-4"]
            settings.running()
            try:
                time.sleep(0.01)
                path.write_text("policy:\n  denied_models: [gpt-4, o1]\n")
                assert not settings.reload_if_changed() and settings.reload_if_changed()
                assert settings.shared.config.policy.denied_models == ["gpt-4", "o1"]
            finally:
                reloaded[0].done()

    run(go())


def test_a_config_yaml_made_after_start_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Started without one (the built-in defaults), the proxy never looked again: a policy
    written into ./config.yaml later was never in force (a config probe)."""
    monkeypatch.chdir(tmp_path)

    async def go() -> None:
        shared, addons = make_addons()
        settings: Settings = addons[0]  # type: ignore[assignment]
        with taddons.context(*addons) as tctx:
            tctx.configure(settings, llm_config="")
            settings.running()
            try:
                assert not settings.reload_if_changed() and shared.config.policy.denied_models == []
                (tmp_path / "config.yaml").write_text("policy:\n  denied_models: [gpt-4]\n")
                assert not settings.reload_if_changed() and settings.reload_if_changed()
                assert shared.config.policy.denied_models == ["gpt-4"]
                time.sleep(0.01)
                (tmp_path / "config.yaml").write_text("policy:\n  denied_models: [gpt-4, o1]\n")  # and followed from then on
                assert not settings.reload_if_changed() and settings.reload_if_changed()
                assert shared.config.policy.denied_models == ["gpt-4", "o1"]
            finally:
                settings.done()

    run(go())


def test_bad_config_at_start_logs_one_line_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("traces:\n  bodies: some\n")

    async def go() -> None:
        shared, addons = make_addons()
        with taddons.context(*addons) as tctx:
            with caplog.at_level(logging.ERROR):
                tctx.configure(addons[0], llm_config=str(bad))
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert errors == [f"llm-mitm: {bad}: traces.bodies: Input should be 'full', 'metadata' or 'none' (got 'some')"]

    run(go())


def test_blocked_flow_is_marked_and_commented_and_stats_count_it(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("policy:\n  allowed_models: ['gpt-4o-mini']\n")

    async def go() -> None:
        from llm_mitm.addons import build

        addons = build() + [Proxyserver()]
        with taddons.context(*addons) as tctx:
            tctx.configure(addons[0], llm_config=str(config))
            flow = chat_flow()
            for hook in ("request", "responseheaders", "response"):  # as mitmproxy would
                for addon in addons:
                    if hasattr(addon, hook):
                        getattr(addon, hook)(flow)
                if hook == "request":
                    assert flow.response is not None and flow.response.status_code == 403
            assert flow.marked and "model_not_allowed" in flow.comment
            table = stats_table(tctx, addons[0])
            assert "1 calls (0 errors, 1 blocked)" in table and "gpt-4o" in table

    os.chdir(tmp_path)
    run(go())


@pytest.mark.parametrize(
    "host, host_header, scheme, port, url",
    [
        ("api.openai.com", b"api.openai.com", "https", 443, "https://api.openai.com/v1/chat/completions"),
        ("api.openai.com", b"api.openai.com:8443", "https", 8443, "https://api.openai.com:8443/v1/chat/completions"),
        ("api.openai.com", None, "https", 443, "https://api.openai.com/v1/chat/completions"),  # HTTP/2: no Host header
        ("::1", b"api.openai.com", "https", 443, "https://api.openai.com/v1/chat/completions"),
        # a Host naming another resource than the CONNECT: the call went where the CONNECT said (a review)
        ("res-a.openai.azure.com", b"res-b.openai.azure.com", "https", 443, "https://res-a.openai.azure.com/v1/chat/completions"),
        # transparent mode: the connection names an address, the Host header the host
        ("203.0.113.7", b"api.openai.com", "https", 443, "https://api.openai.com/v1/chat/completions"),
    ],
)
def test_recorded_url_names_where_the_call_went(host: str, host_header: bytes | None, scheme: str, port: int, url: str) -> None:
    headers = [(b"host", host_header)] if host_header else []
    flow = chat_flow(host=host, scheme=scheme, port=port)
    flow.request.headers = type(flow.request.headers)([(k, v) for k, v in flow.request.headers.fields if k != b"host"] + headers)
    shared = Shared()
    Recorder(shared).request(flow)
    assert shared.exchange(flow).url == url


def test_a_realtime_key_sent_as_a_subprotocol_names_the_caller() -> None:
    flow = chat_flow(headers=[(b"sec-websocket-protocol", b"realtime, openai-insecure-api-key.XYZZY7noshape0123")])
    flow.request.headers.pop("authorization")
    shared = Shared()
    Recorder(shared).request(flow)
    assert shared.exchange(flow).api_key == shared.redactor.credential("XYZZY7noshape0123")


def test_a_recorded_urls_ipv6_host_keeps_its_brackets() -> None:
    from llm_mitm.addons.recorder import _url

    flow = chat_flow(host="::1", scheme="http", port=8080)
    flow.request.headers.pop("host", None)
    assert _url(flow.request) == "http://[::1]:8080/v1/chat/completions"
    flow.request.headers["host"] = "[::1]:8080"  # as written (mitmproxy 11's pretty_url dropped the brackets: a review)
    assert _url(flow.request) == "http://[::1]:8080/v1/chat/completions"
    # HTTP/2 in transparent mode: no Host header, the :authority names the host
    h2 = chat_flow(host="203.0.113.7")
    h2.request.headers.pop("host", None)
    h2.request.http_version, h2.request.authority = "HTTP/2.0", "api.openai.com"
    assert _url(h2.request) == "https://api.openai.com/v1/chat/completions"


def test_a_policy_check_that_fails_refuses_the_request(tmp_path: Path) -> None:
    """Fail closed: a request the policy cannot read does not go upstream unchecked."""

    async def go() -> None:
        with whole_addon() as (llm, _):

            def broken(view):
                raise RuntimeError("a bug in a rule")

            llm.shared.policy.check = broken
            flow = chat_flow()
            llm.request(flow)
            assert flow.response is not None and flow.response.status_code == 403
            assert flow.response.headers["x-llm-mitm-rule"] == "policy_error"

    os.chdir(tmp_path)
    run(go())


def test_a_concern_guarding_calls_that_fails_refuses_the_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Fail closed in every concern that checks a call (its record, organization, limits), not
    only in those that catch their own failures: a concern that raised was skipped, so the
    call went upstream with the client's organization, past its rate limit (or, the record
    failing, past every check). A concern that checks nothing (the stream-usage request)
    still fails alone."""
    import llm_mitm.addons.organization
    import llm_mitm.addons.recorder
    import llm_mitm.addons.stream_usage
    from llm_mitm.quota import Quota

    config = config_file(tmp_path, "organization:\n  default: org-ours\n  override: true\n"
                                   "policy:\n  rate_limits: [{requests_per_minute: 100, per: api_key}]\n")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in a concern")

    async def go() -> None:
        with whole_addon(config) as (llm, _):
            def answer(flow) -> tuple[int, str] | None:  # type: ignore[no-untyped-def]
                llm.request(flow)
                return (flow.response.status_code, flow.response.headers["x-llm-mitm-rule"]) if flow.response is not None else None

            assert answer(chat_flow()) is None
            with monkeypatch.context() as patch:
                patch.setattr(llm_mitm.addons.organization, "choose", broken)
                assert answer(chat_flow()) == (500, "policy_error")
            assert "request failed in Organization; the call is refused" in caplog.text
            with monkeypatch.context() as patch:
                patch.setattr(Quota, "admit", broken)
                assert answer(chat_flow()) == (500, "policy_error")
            assert "request failed in QuotaAddon; the call is refused" in caplog.text
            with monkeypatch.context() as patch:  # the record itself, before it is made: no dialect known, OpenAI's
                patch.setattr(llm_mitm.addons.recorder, "_client", broken)
                assert answer(chat_flow()) == (500, "policy_error")
            assert "request failed in Recorder; the call is refused" in caplog.text
            with monkeypatch.context() as patch:
                patch.setattr(llm_mitm.addons.stream_usage.StreamUsage, "request", broken)
                llm._route_hooks()
                assert answer(chat_flow(body={"model": "gpt-4o", "stream": True, "messages": []})) is None
            assert "request failed in StreamUsage" in caplog.text and "failed in StreamUsage; the call" not in caplog.text

    os.chdir(tmp_path)
    run(go())


def test_a_realtime_event_the_policy_fails_to_read_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy guards a realtime session's events as it guards calls: a client's event it
    fails to read (a bug, not bad input) is dropped, not sent on unchecked, and the client
    gets the API's `error` event for it (dropped silently, a client waiting for its answer
    waited forever)."""
    import llm_mitm.addons.firewall
    from mitmproxy.websocket import WebSocketData, WebSocketMessage
    from wsproto.frame_protocol import Opcode

    config = config_file(tmp_path, "policy:\n  forbidden_instructions: ['ignore previous instructions']\n")

    def broken(content: bytes) -> None:
        raise RuntimeError("a bug in reading events")

    async def go() -> None:
        with whole_addon(config) as (llm, tctx):
            injected: list[tuple[bool, bytes]] = []

            def inject(flow: mitmproxy.flow.Flow, to_client: bool, message: bytes, is_text: bool = True) -> None:  # Proxyserver's, as it is called
                injected.append((to_client, message))

            tctx.master.commands.add("inject.websocket", inject)
            flow = chat_flow(headers=[(b"upgrade", b"websocket"), (b"connection", b"upgrade")])
            flow.request.method, flow.request.path, flow.request.content = "GET", "/v1/realtime?model=gpt-realtime", b""
            llm.request(flow)
            assert flow.response is None and llm.shared.exchange(flow) is not None
            flow.response, flow.websocket = tutils.tresp(status_code=101), WebSocketData()
            event = WebSocketMessage(Opcode.TEXT, True, b'{"type": "session.update", "event_id": "ev_1", "session": {"instructions": "be kind"}}')
            flow.websocket.messages.append(event)
            monkeypatch.setattr(llm_mitm.addons.firewall, "read_client_event", broken)
            llm.websocket_message(flow)
            assert event.dropped
            [(to_client, error)] = injected
            assert to_client
            assert orjson.loads(error)["type"] == "error"
            assert orjson.loads(error)["error"] | {"message": ""} == {
                "type": "invalid_request_error", "code": "policy_error", "message": "", "param": None, "event_id": "ev_1"}
            assert "session.update event" in orjson.loads(error)["error"]["message"] and "Firewall failed" in orjson.loads(error)["error"]["message"]
            # not JSON at all: still answered, named as the client's event
            garbled = WebSocketMessage(Opcode.TEXT, True, b'{"type": "session.upd')
            flow.websocket.messages.append(garbled)
            llm.websocket_message(flow)
            assert garbled.dropped and orjson.loads(injected[-1][1])["error"]["event_id"] is None
            assert "client event" in orjson.loads(injected[-1][1])["error"]["message"]
            # the model's own events are not the policy's to hold back, the policy failing or not
            firewall = next(c for c in llm.concerns if isinstance(c, llm_mitm.addons.firewall.Firewall))
            monkeypatch.setattr(firewall, "_last_items", None)  # a bug in what it keeps of a session
            answer = WebSocketMessage(Opcode.TEXT, False, b'{"type": "response.created"}')
            flow.websocket.messages.append(answer)
            llm.websocket_message(flow)
            assert not answer.dropped

    os.chdir(tmp_path)
    run(go())


def test_replay_records_a_session_in_memory_up_to_its_most(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """`mode: on` records each miss's answer in memory, so the same call is a hit next time;
    a proxy left running grew with every new call. Past SESSION_BYTES of answers a miss still
    goes upstream (and is traced), is not kept, and the log says so once."""
    import llm_mitm.addons.replay as replay

    answer = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"message": {"role": "assistant", "content": "ok"}}]})
    monkeypatch.setattr(replay, "SESSION_BYTES", 2 * len(answer))
    config = config_file(tmp_path, "replay:\n  mode: on\n")

    async def go() -> None:
        with whole_addon(config) as (llm, _):
            index = next(c for c in llm.concerns if isinstance(c, replay.Replay)).index

            def ask(question: str) -> str:
                flow = chat_flow(body={"model": "gpt-4o", "messages": [{"role": "user", "content": question}]})
                llm.request(flow)
                if flow.response is None:  # a miss: upstream answers
                    flow.response = tutils.tresp(headers=[(b"content-type", b"application/json")], content=answer)
                    llm.responseheaders(flow)
                    llm.response(flow)
                return flow.response.headers[replay.HEADER]

            assert [ask("one"), ask("two"), ask("one"), ask("two")] == ["MISS", "MISS", "HIT", "HIT"]
            assert [ask("three"), ask("four"), ask("three")] == ["MISS", "MISS", "MISS"]
            assert len(index) == 2
        assert caplog.text.count("its most: later misses go upstream each time") == 1

    os.chdir(tmp_path)
    run(go())


def batch_flow(port: int, file_id: str = "file-1", host_header: str | None = None):  # type: ignore[no-untyped-def]
    """A batch's creation, sent to a plain-HTTP server of ours on loopback."""
    flow = chat_flow(host="127.0.0.1", port=port, scheme="http", body={"input_file_id": file_id, "endpoint": "/v1/chat/completions"})
    flow.request.path = "/v1/batches"
    if host_header is not None:
        flow.request.headers["host"] = host_header
    return flow


def local_provider(folder: Path, port: int, allowed: str = "gpt-4o*") -> Path:
    return config_file(folder, f"providers:\n  local:\n    api: openai\n    hosts: ['127.0.0.1:{port}']\n"
                               f"policy:\n  allowed_models: ['{allowed}']\n")


def test_upstream_quoting_the_key_a_batch_read_sent_is_not_logged_with_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A key of no known shape (a gateway's) that upstream quotes when it refuses the read of
    a batch's input file reached the log whole (a secrets probe)."""
    key = "gw-virtual-key-7Hq2Lm9Xc4Rt"
    refusal = orjson.dumps({"error": {"message": f"Incorrect API key provided: {key}.", "type": "invalid_request_error"}})
    with CannedServer({"/v1/files/file-1/content": ok(refusal, "Content-Type: application/json", status="401 Unauthorized")}) as server:

        async def go() -> None:
            with whole_addon(local_provider(tmp_path, server.port)) as (llm, _):
                flow = batch_flow(server.port)
                flow.request.headers["authorization"] = f"Bearer {key}"
                with caplog.at_level(logging.WARNING):
                    await llm.request(flow)
                assert flow.response.status_code == 403

        os.chdir(tmp_path)
        run(go())
    assert "could not be read" in caplog.text and "Incorrect API key provided" in caplog.text
    assert key not in caplog.text


def test_a_concern_that_waits_holds_the_rest_of_the_hook(tmp_path: Path) -> None:
    """A batch's input file is read from upstream before the batch goes: the concerns after
    the one reading it run once it is done (not at all for a flow killed meanwhile), and a
    file that cannot be read refuses the batch."""

    async def go() -> None:
        with socket.socket() as closed:  # a port nothing listens on
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        with whole_addon(local_provider(tmp_path, port)) as (llm, _):
            names = [hook.__self__.__class__.__name__ for hook in llm._hooks["request"]]
            assert names.index("InputFiles") > names.index("Firewall")
            after: list[int | None] = []
            llm._hooks["request"].append(lambda flow: after.append(flow.response and flow.response.status_code))
            flow = batch_flow(port)
            waits = llm.request(flow)
            assert waits is not None and after == []
            await waits
            assert after == [403] and flow.response.headers["x-llm-mitm-rule"] == "policy_error"
            assert b"could not be read to check the calls made of it: upstream could not be reached (Connection refused)" in flow.response.content
            assert llm.request(chat_flow()) is None and after == [403, None]  # other calls do not wait

            killed = batch_flow(port, "file-2")
            waits = llm.request(killed)
            killed.kill()
            await waits
            assert after == [403, None]

    os.chdir(tmp_path)
    run(go())


def test_a_batch_input_file_is_read_where_the_batch_goes_once_per_policy(tmp_path: Path) -> None:
    """From the address mitmproxy connects to, whatever the Host header says; a verdict
    remembered for the policy it was made under."""
    line = b'{"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-4"}}\r\n'

    async def go() -> None:
        with CannedServer({"/v1/files/file-1/content": ok(line), "/v1/files/file-2/content": ok(b"not json")}) as server:
            with whole_addon(local_provider(tmp_path, server.port)) as (llm, tctx):
                for host_header in (None, f"127.0.0.2:{server.port}", None):
                    flow = batch_flow(server.port, host_header=host_header)
                    await llm.request(flow)
                    assert flow.response.status_code == 403 and b"model 'gpt-4' is not allowed" in flow.response.content
                reads, first = len(server.requests), server.requests[0].split(b"\r\n")[0]
                assert reads == 1 and first == b"GET /v1/files/file-1/content HTTP/1.1"
                together = [batch_flow(server.port, "file-2") for _ in range(3)]  # one read for batches made at once
                await asyncio.gather(*(llm.request(flow) for flow in together))
                reads = len(server.requests)
                assert reads == 2 and [flow.response.status_code for flow in together] == [400] * 3  # not JSON lines

                tctx.configure(llm, llm_config=str(local_provider(tmp_path, server.port, allowed="gpt-4*")))
                flow = batch_flow(server.port)
                assert await llm.request(flow) is None and flow.response is None  # read again, and allowed now
                reads = len(server.requests)
                assert reads == 3

    os.chdir(tmp_path)
    run(go())


def test_a_lifecycle_hook_is_a_plain_call(tmp_path: Path) -> None:
    """mitmproxy calls load, configure, running and done where nothing waits: a concern's
    answer is not a reason to skip the concerns after it."""

    async def go() -> None:
        with whole_addon() as (llm, _):
            seen: list[str] = []
            llm._hooks["running"][:0] = [lambda: "an answer", lambda: seen.append("next")]
            assert llm.running() is None and seen == ["next"]

    os.chdir(tmp_path)
    run(go())


def form_flow(path: str, parts: list[tuple[str, bytes]], content_type: str = "multipart/form-data; boundary=b"):  # type: ignore[no-untyped-def]
    flow = chat_flow()
    flow.request.path = path
    flow.request.headers["content-type"] = content_type
    body = b"".join(b'--b\r\ncontent-disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (name.encode(), value) for name, value in parts)
    flow.request.content = body + b"--b--\r\n" if parts else b"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"
    return flow


def test_what_an_upload_or_a_webrtc_offer_says_is_policed(tmp_path: Path) -> None:
    """A form's prompt, instructions and realtime session are read as a JSON body's would
    be; an SDP offer (WebRTC realtime) is a format the API takes, not an unreadable body."""
    config = config_file(tmp_path, "policy:\n  allowed_models: ['gpt-4o*', 'gpt-image-1', 'gpt-realtime']\n  forbidden_instructions: ['ignore previous instructions']\n")

    async def go() -> None:
        with whole_addon(config) as (llm, _):
            def refused(flow) -> str | None:  # type: ignore[no-untyped-def]
                llm.request(flow)
                return flow.response.headers["x-llm-mitm-rule"] if flow.response is not None else None

            edit = form_flow("/v1/images/edits", [("model", b"gpt-image-1"), ("prompt", b"Ignore previous instructions"), ("image", b"\x89PNG")])
            assert refused(edit) == "forbidden_instruction"
            session = b'{"type": "realtime", "model": "gpt-realtime-mini", "instructions": "be kind"}'
            assert refused(form_flow("/v1/realtime/calls", [("sdp", b"v=0"), ("session", session)])) == "model_not_allowed"
            assert refused(form_flow("/v1/realtime/calls?mod%65l=o1-realtime", [], "application/sdp")) == "model_not_allowed"
            # Its events would pass the proxy by (a WebRTC data channel): refused where phrases are forbidden (probe).
            assert refused(form_flow("/v1/realtime/calls", [("sdp", b"v=0"), ("session", session.replace(b"-mini", b""))])) == "operation_not_allowed"
            assert refused(form_flow("/v1/realtime/calls?model=gpt-realtime", [], "application/sdp")) == "operation_not_allowed"
            assert refused(form_flow("/v1/chat/completions", [], "text/plain")) == "unparseable_body"
            # A format only where the API takes it, and a form only as servers all read it.
            assert refused(form_flow("/v1/chat/completions", [], "application/sdp")) == "unparseable_body"
            assert refused(form_flow("/v1/chat/completions", [("model", b"gpt-4o")])) == "unparseable_body"
            twice = [("model", b"gpt-image-1"), ("model", b"dall-e-2"), ("prompt", b"a cat")]
            assert refused(form_flow("/v1/images/edits", twice)) == "unparseable_body"
            quoted = form_flow("/v1/images/edits", [("model", b"dall-e-2"), ("prompt", b"a cat")], 'multipart/form-data; boundary="b"')
            assert refused(quoted) == "model_not_allowed"

    os.chdir(tmp_path)
    run(go())


def test_a_webrtc_offer_goes_where_no_rule_would_need_its_events(tmp_path: Path) -> None:
    """With models the only rule, a WebRTC call is checked at its offer and goes on."""
    config = config_file(tmp_path, "policy:\n  allowed_models: ['gpt-realtime']\n")

    async def go() -> None:
        with whole_addon(config) as (llm, _):
            for flow in (form_flow("/v1/realtime/calls", [("sdp", b"v=0"), ("session", b'{"type": "realtime", "model": "gpt-realtime"}')]),
                         form_flow("/v1/realtime/calls?model=gpt-realtime", [], "application/sdp")):
                llm.request(flow)
                assert flow.response is None

    os.chdir(tmp_path)
    run(go())


def test_a_form_forwarded_unread_is_not_clamped(tmp_path: Path) -> None:
    """With `on_unparseable: forward`, a form where JSON was due goes as it came: a form's
    own fields have no limit to clamp (only a batch file's lines do)."""
    config = config_file(tmp_path, "policy:\n  on_unparseable: forward\n  max_tokens: 100\n  max_tokens_action: clamp\n")

    async def go() -> None:
        with whole_addon(config) as (llm, _):
            flow = form_flow("/v1/chat/completions", [("model", b"gpt-4o"), ("prompt", b"hi")])
            sent = flow.request.content
            llm.request(flow)
            assert flow.response is None and flow.request.content == sent
            assert llm.shared.exchange(flow).policy.decision == "allow"

    os.chdir(tmp_path)
    run(go())


def test_a_utf16_body_rewritten_is_sent_as_what_it_now_is(tmp_path: Path) -> None:
    """Clamping writes UTF-8; the header must not go on saying UTF-16."""
    config = config_file(tmp_path, "policy:\n  max_tokens: 100\n  max_tokens_action: clamp\n")

    async def go() -> None:
        with whole_addon(config) as (llm, _):
            flow = chat_flow()
            flow.request.headers["content-type"] = "application/json; charset=utf-16"
            flow.request.content = orjson.dumps({"model": "gpt-4o", "max_tokens": 5000, "messages": []}).decode().encode("utf-16")
            llm.request(flow)
            assert flow.response is None and flow.request.headers["content-type"] == "application/json"
            assert orjson.loads(flow.request.content)["max_tokens"] == 100

    os.chdir(tmp_path)
    run(go())


def untimed_records(path: Path) -> list[dict]:
    """The trace file's records without what differs from one run of a call to the next."""
    timing = ("id", "timestamp", "duration_ms", "ttfb_ms")
    return [{k: v for k, v in orjson.loads(line).items() if k not in timing} for line in path.read_bytes().splitlines()]


def test_deferred_and_in_place_give_the_same_trace_and_counts(tmp_path: Path) -> None:
    """The writer process reads and meters a response exactly as the proxy would."""
    answers = [
        (200, {"model": "gpt-4o-2024-08-06", "usage": {"prompt_tokens": 12, "completion_tokens": 7},
               "choices": [{"message": {"role": "assistant", "content": "keep sk-" + "Z" * 48}}]}),
        (400, {"error": {"type": "invalid_request_error", "message": "no such model"}}),
        (200, {"model": "mystery-model", "choices": [{"message": {"role": "assistant", "content": "four words of text"}}]}),
    ]

    async def go() -> None:
        with whole_addon() as (llm, tctx):
            shared = llm.shared
            for deferred in (True, False):
                shared.defer_responses = deferred
                for status, answer in answers:
                    flow = chat_flow()
                    for hook in ("request", "responseheaders", "response"):
                        if hook == "responseheaders":
                            flow.response = tutils.tresp(status_code=status, headers=[(b"content-type", b"application/json")],
                                                         content=orjson.dumps(answer))
                        getattr(llm, hook)(flow)
                    assert shared.exchange(flow).deferred is deferred
            table = stats_table(tctx, llm)
            rows = {key: (t.requests, t.errors, t.input_tokens, t.output_tokens, round(t.cost_usd, 10), t.unpriced)
                    for key, t in shared.usage_stats.rows.items()}
        assert "6 calls (2 errors, 0 blocked)" in table
        key = next(iter(rows))[0]
        assert rows == {
            (key, "gpt-4o-2024-08-06"): (2, 0, 24, 14, round(2 * (12 * 2.5 + 7 * 10) / 1e6, 10), 0),
            (key, "gpt-4o"): (2, 2, 0, 0, 0.0, 0),  # failed: no tokens, nothing unpriced
            (key, "mystery-model"): (2, 0, 2, 10, 0.0, 2),  # estimated: "hi" 1 token, 18 bytes of answer 5
        }
        same = untimed_records(tmp_path / "traces.jsonl")
        assert len(same) == 6 and same[:3] == same[3:]
        assert "Z" * 8 not in (tmp_path / "traces.jsonl").read_text()
        assert same[0]["cost_usd"] and same[1]["error"] == "invalid_request_error: no such model"
        assert same[2]["usage"]["estimated"] is True

    os.chdir(tmp_path)
    run(go())


def test_held_and_read_streams_give_the_same_trace_and_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream the writer process rebuilds from the held chunks traces and counts exactly
    as one read as it passed, or one held until it grew past the limit and then read here:
    usage asked for and hidden, gzip, an error event, and a 500."""
    def event(payload: dict) -> bytes:
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    head = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06"}
    tokens = [event({**head, "choices": [{"index": 0, "delta": {"content": word}}]}) for word in ("sk-" + "Z" * 48, " and", " more")]
    usage = event({**head, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}})
    done = b"data: [DONE]\n\n"
    streams = [  # (status, content-encoding, chunks as upstream sends them, what the client gets)
        (200, b"", [tokens[0][:20], tokens[0][20:] + tokens[1], tokens[2], usage, done], b"".join(tokens) + done),
        (200, b"gzip", [gzip.compress(b"".join(tokens) + usage + done)], None),
        (200, b"", [tokens[0], event({"error": {"type": "server_error", "message": "overloaded"}})], None),
        (500, b"", [b"data: {\"error\": {\"message\": \"boom\"}}\n\n"], None),
    ]

    async def go() -> None:
        with whole_addon() as (llm, tctx):
            shared = llm.shared
            for deferred, hold_limit in ((True, sse.HOLD_LIMIT), (False, sse.HOLD_LIMIT), (True, 10)):
                shared.defer_responses = deferred
                monkeypatch.setattr(sse, "HOLD_LIMIT", hold_limit)
                for status, encoding, chunks, client_gets in streams:
                    flow = chat_flow(body={"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
                    llm.request(flow)
                    headers = [(b"content-type", b"text/event-stream")] + ([(b"content-encoding", encoding)] if encoding else [])
                    flow.response = tutils.tresp(status_code=status, headers=headers, content=b"")
                    flow.response.data.content = None  # headers only, as at responseheaders from upstream
                    llm.responseheaders(flow)
                    sent = through(flow.response.stream, *chunks, b"")
                    assert sent == (client_gets if client_gets is not None else b"".join(chunks))
                    llm.response(flow)
                    assert shared.exchange(flow).deferred is (deferred and hold_limit > 10)
            table = stats_table(tctx, llm)
        assert "12 calls (6 errors, 0 blocked)" in table
        same = untimed_records(tmp_path / "traces.jsonl")
        assert len(same) == 12 and same[:4] == same[4:8] == same[8:]
        assert "Z" * 8 not in (tmp_path / "traces.jsonl").read_text()
        first, zipped, errored, failed = same[:4]
        assert first["usage"]["input_tokens"] == 9 and first["usage"]["output_tokens"] == 3 and first["cost_usd"]
        assert first["response"]["events"] == 5 and first["response"]["size"] == len(b"".join(tokens) + usage + done)
        assert first["response"]["body"]["choices"][0]["message"]["content"].endswith(" and more")
        assert zipped["usage"] == first["usage"] and zipped["response"]["body"] == first["response"]["body"]
        assert errored["error"] == "server_error: overloaded"
        assert failed["error"] == "boom" and failed["status_code"] == 500

    os.chdir(tmp_path)
    run(go())


def test_calls_that_wait_for_a_new_trace_writer_are_written_at_shutdown(tmp_path: Path) -> None:
    """The writer process went, and a new one may not start yet (one did a moment ago):
    the calls wait, and at shutdown a last new process writes them."""
    async def go() -> None:
        with whole_addon() as (llm, _):
            tracer = next(c for c in llm.concerns if isinstance(c, Tracer))
            tracer._restarted_at = time.monotonic()
            tracer.sink.process.kill()
            tracer.sink.process.join(10)
            for number in range(3):
                flow = chat_flow(body={"model": "gpt-4o", "messages": [{"role": "user", "content": f"waiting {number}"}]})
                llm.request(flow)
                flow.response = tutils.tresp(headers=[(b"content-type", b"application/json")], content=b'{"model": "gpt-4o"}')
                llm.responseheaders(flow)
                llm.response(flow)
                await asyncio.sleep(0.06)  # a trace round: it finds the process gone
        texts = [r["request"]["body"]["messages"][0]["content"] for r in untimed_records(tmp_path / "traces.jsonl")]
        assert texts == ["waiting 0", "waiting 1", "waiting 2"]

    os.chdir(tmp_path)
    run(go())


def test_calls_that_come_while_the_proxy_stops_are_refused_and_traced(tmp_path: Path) -> None:
    """mitmproxy takes calls until the process ends, after `done` closed the trace writer:
    one that came then went upstream untraced (seen in CI). From the start of `done` each
    new call is answered 503 here; one in the grace window is traced, as the call in flight is."""
    async def go() -> None:
        with whole_addon() as (llm, _):
            in_flight = chat_flow(body={"model": "gpt-4o", "messages": [{"role": "user", "content": "in flight"}]})
            llm.request(in_flight)
            stopping = llm.done()
            assert stopping is not None
            answered = []
            for text in ("during the grace", "after done"):
                flow = chat_flow(body={"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})
                llm.request(flow)
                assert flow.response is not None and flow.response.status_code == 503, text
                assert flow.response.headers["x-llm-mitm-rule"] == "proxy_stopping" and flow.response.headers["retry-after"] == "1"
                llm.responseheaders(flow)
                llm.response(flow)
                answered.append(flow)
                if text == "during the grace":
                    in_flight.response = tutils.tresp(headers=[(b"content-type", b"application/json")], content=b'{"model": "gpt-4o"}')
                    llm.responseheaders(in_flight)
                    llm.response(in_flight)
                    await stopping
        records = {r["request"]["body"]["messages"][0]["content"]: r for r in untimed_records(tmp_path / "traces.jsonl")}
        assert sorted(records) == ["during the grace", "in flight"]
        assert records["during the grace"]["status_code"] == 503

    os.chdir(tmp_path)
    run(go())


def test_error_after_response_counts_the_call_once(tmp_path: Path) -> None:
    """mitmproxy may follow `response` with `error`; traces off, so nothing else marks it."""
    config = config_file(tmp_path, "traces:\n  destination: null\n")

    async def go() -> None:
        with whole_addon(config) as (llm, tctx):
            assert not llm.shared.defer_responses
            flow = chat_flow()
            llm.request(flow)
            flow.response = tutils.tresp(headers=[(b"content-type", b"application/json")],
                                         content=orjson.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}))
            llm.responseheaders(flow)
            llm.response(flow)
            flow.error = flow_error("client disconnected")
            llm.error(flow)
            assert "1 calls (0 errors, 0 blocked)" in tctx.master.commands.execute("llm.stats")

    os.chdir(tmp_path)
    run(go())


def test_llm_stats_shows_a_key_sent_as_the_model_only_as_its_fingerprint(tmp_path: Path) -> None:
    """What the command returns (mitmweb and the console show it) is redacted as its log
    line is (a secrets probe: the model column was returned as sent)."""
    key = "sk-proj-FAKE" + "Q7w" * 15
    config = config_file(tmp_path, "traces:\n  destination: null\n")

    async def go() -> None:
        with whole_addon(config) as (llm, tctx):
            flow = chat_flow(body={"model": key, "messages": [{"role": "user", "content": "hi"}]})
            llm.request(flow)
            flow.response = tutils.tresp(headers=[(b"content-type", b"application/json")],
                                         content=orjson.dumps({"model": "ft:gpt-4o:acme:" + key, "usage": {"prompt_tokens": 3, "completion_tokens": 4}}))
            llm.responseheaders(flow)
            llm.response(flow)
            table = tctx.master.commands.execute("llm.stats")
            assert key[12:30] not in table and "sk-proj-…" in table, table

    os.chdir(tmp_path)
    run(go())


@pytest.mark.parametrize("traces", ["null", "traces.jsonl"])  # counted here, or by the trace writer process (the answer deferred there)
def test_llm_stats_names_a_model_as_its_trace_does(tmp_path: Path, traces: str) -> None:
    """A key of no known shape, sent as the Bearer and in the model's name: hidden in the
    trace, and now in `llm.stats` too (a secrets probe: its model column printed it whole)."""
    key = "tenant-FAKE" + "q9ZxW3vT7pL2" * 2
    config = config_file(tmp_path, f"traces:\n  destination: {traces}\n")

    async def go() -> None:
        with whole_addon(config) as (llm, tctx):
            for _ in range(2):  # the second is named from memory
                flow = chat_flow(body={"model": f"ft:gpt-4o:{key}", "messages": [{"role": "user", "content": "hi"}]})
                flow.request.headers["authorization"] = f"Bearer {key}"
                llm.request(flow)
                flow.response = tutils.tresp(headers=[(b"content-type", b"application/json")],
                                             content=orjson.dumps({"model": f"ft:gpt-4o:{key}", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}))
                llm.responseheaders(flow)
                llm.response(flow)
            table = stats_table(tctx, llm)
            assert key[7:27] not in table and "ft:gpt-4o:…" in table and " 2 " in table, table

    os.chdir(tmp_path)
    run(go())


def test_a_body_that_cannot_be_clamped_is_refused(tmp_path: Path) -> None:
    """Clamping rewrites the body; one nested deeper than orjson writes cannot go out unclamped."""
    config = config_file(tmp_path, "policy:\n  max_tokens: 100\n  max_tokens_action: clamp\n")
    deep = b'{"model": "gpt-4o", "max_tokens": 99999, "messages": [], "x": ' + b"[" * 300 + b"]" * 300 + b"}"

    async def go() -> None:
        with whole_addon(config) as (llm, _):
            flow = chat_flow()
            flow.request.content = deep
            llm.request(flow)
            assert flow.response is not None and flow.response.headers["x-llm-mitm-rule"] == "policy_error"

    os.chdir(tmp_path)
    run(go())


def test_config_changes_keep_the_writer_unless_its_files_change(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("traces:\n  destination: a.jsonl\n")
    (tmp_path / "b.yaml").write_text("traces:\n  destination: a.jsonl\n  bodies: metadata\n"
                                     "pricing:\n  models:\n    house-model: {input: 1, output: 1}\n")
    (tmp_path / "a-rotated.yaml").write_text("traces:\n  destination: a.jsonl\n  max_bytes: 1000000\n")
    (tmp_path / "c.yaml").write_text("traces:\n  destination: c.jsonl\n")

    async def go() -> None:
        with whole_addon(tmp_path / "a.yaml") as (llm, tctx):
            tracer = next(c for c in llm.concerns if isinstance(c, Tracer))
            writer = tracer.sink
            assert writer is not None
            tctx.configure(llm, llm_config=str(tmp_path / "b.yaml"))
            assert tracer.sink is writer and writer.process.is_alive()
            assert writer.settings.bodies == "metadata"
            tctx.configure(llm, llm_config=str(tmp_path / "a-rotated.yaml"))
            # a new writer on the same file: the old one is done first (a review: both wrote and rotated it, and records were lost)
            assert tracer.sink is not writer and not writer.process.is_alive()
            writer = tracer.sink
            tctx.configure(llm, llm_config=str(tmp_path / "c.yaml"))
            assert tracer.sink is not writer
            for _ in range(100):  # another file: the old writer finishes off the event loop
                if not writer.process.is_alive():
                    break
                await asyncio.sleep(0.1)
            assert not writer.process.is_alive()

    os.chdir(tmp_path)
    run(go())


def test_an_unpriced_model_is_named_once_across_reloads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """In the proxy (traces off): each reload makes a new price table, not a new warning."""
    for number in range(3):
        (tmp_path / f"{number}.yaml").write_text(f"traces:\n  destination: null\npricing:\n  models:\n    other-{number}: {{input: 1, output: 1}}\n")

    async def go() -> None:
        with whole_addon(tmp_path / "0.yaml") as (llm, tctx), caplog.at_level(logging.WARNING):
            for number in range(3):
                tctx.configure(llm, llm_config=str(tmp_path / f"{number}.yaml"))
                flow = chat_flow()
                llm.request(flow)
                flow.response = tutils.tresp(headers=[(b"content-type", b"application/json")],
                                             content=orjson.dumps({"model": "house-model", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}))
                llm.responseheaders(flow)
                llm.response(flow)
                assert llm.shared.exchange(flow).usage is not None
        assert caplog.text.count("no price for model 'house-model'") == 1

    os.chdir(tmp_path)
    run(go())


def test_a_token_limit_turned_off_and_on_holds_nothing_for_a_call_that_ended_meanwhile(tmp_path: Path) -> None:
    """A call admitted under a token limit ends while limits are off (the concern idle, its
    hooks not called): what it held was never given back, and once the limit returned every
    call was refused for 15 minutes, "held by the calls in flight" (a review)."""
    limited, unlimited = tmp_path / "limited.yaml", tmp_path / "unlimited.yaml"
    limited.write_text("traces:\n  destination: null\npolicy:\n  rate_limits:\n    - tokens_per_minute: 150\n      per: global\n")
    unlimited.write_text("traces:\n  destination: null\n")

    async def go() -> None:
        with whole_addon(limited) as (llm, tctx):
            slow = chat_flow(body={"model": "gpt-4o", "max_tokens": 200, "messages": [{"role": "user", "content": "hi"}]})
            llm.request(slow)
            assert slow.response is None  # admitted, holding its prompt and 200 tokens of output: the whole limit
            tctx.configure(llm, llm_config=str(unlimited))
            slow.response = tutils.tresp(headers=[(b"content-type", b"application/json")],
                                         content=orjson.dumps({"model": "gpt-4o", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}))
            llm.responseheaders(slow)
            llm.response(slow)
            tctx.configure(llm, llm_config=str(limited))
            later = chat_flow(body={"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]})
            llm.request(later)
            assert later.response is None, later.response.content

    os.chdir(tmp_path)
    run(go())


def test_a_replay_source_that_does_not_exist_is_named_in_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A typo in replay.source answered nothing (in strict mode every call a 404), said only
    as "0 recorded answers" at info level (a replay probe)."""
    config = config_file(tmp_path, f"replay:\n  mode: strict\n  source: {tmp_path}/recordd.jsonl\n")

    async def go() -> None:
        with caplog.at_level(logging.WARNING), whole_addon(config):
            pass

    run(go())
    assert f"replay.source {tmp_path}/recordd.jsonl does not exist: no recorded answers (a miss is answered 404)" in caplog.text


def test_a_call_the_recorder_cannot_read_is_refused_not_passed_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record is what every concern reads: without it the policy took the call for no
    LLM call and let it go unchecked (a firewall probe: a codec that raised)."""
    import llm_mitm.addons.recorder as recorder

    def broken(*args: object) -> None:
        raise TypeError("a body nothing foresaw")

    async def go() -> None:
        with whole_addon(config_file(tmp_path, "policy:\n  denied_models: [gpt-4o]\n")) as (llm, _):
            monkeypatch.setattr(recorder.Body, "parse", broken)
            flow = chat_flow()
            llm.request(flow)
            assert flow.response is not None and flow.response.status_code == 400
            assert flow.response.headers["x-llm-mitm-rule"] == "policy_error"

    os.chdir(tmp_path)
    run(go())


def test_a_cache_checked_against_other_phrases_is_not_taken_for_checked(tmp_path: Path) -> None:
    """A Gemini cache made through the proxy is remembered with the forbidden_instructions it
    was checked against: once they change, a call on it is refused (its texts were never
    read against the new phrases, and cannot be read back); made again, it goes."""
    from mitmproxy import http

    from llm_mitm.config import parse_config

    config = tmp_path / "config.yaml"
    config.write_text("providers:\n  gateway: {api: openai, hosts: ['gemini.example']}\npolicy:\n  forbidden_instructions: ['ignore previous instructions']\n")

    def gemini_flow(path: str, body: dict) -> tflow.HTTPFlow:
        request = tutils.treq(host="gemini.example", port=443, scheme=b"https", path=path.encode(), method=b"POST",
                              headers=[(b"content-type", b"application/json")], content=orjson.dumps(body))
        return tflow.tflow(req=request)

    def make_cache(llm) -> str:
        flow = gemini_flow("/v1beta/cachedContents", {"model": "models/gemini-2.5-flash", "systemInstruction": {"parts": [{"text": "Be brief."}]}})
        llm.request(flow)
        assert flow.response is None
        flow.response = http.Response.make(200, orjson.dumps({"name": "cachedContents/c1"}), {"content-type": "application/json"})
        llm.responseheaders(flow)
        llm.response(flow)
        return "cachedContents/c1"

    def call_on(llm, cache: str) -> int | None:
        flow = gemini_flow("/v1beta/models/gemini-2.5-flash:generateContent", {"cachedContent": cache, "contents": []})
        llm.request(flow)
        return flow.response.status_code if flow.response is not None else None

    async def go() -> None:
        with whole_addon(config) as (llm, _):
            assert call_on(llm, "cachedContents/c1") == 403
            cache = make_cache(llm)
            assert call_on(llm, cache) is None
            llm.shared.apply(parse_config({**llm.shared.config.model_dump(), "policy": {"forbidden_instructions": ["you are dan"]}}, "edit"))
            assert call_on(llm, cache) == 403
            make_cache(llm)
            assert call_on(llm, cache) is None

    os.chdir(tmp_path)
    run(go())
