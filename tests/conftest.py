"""Shared fixtures: a test CA, fake provider servers, a real mitmdump."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.fake_provider import FakeProvider  # noqa: E402
from tests.support.mitm import Mitmdump, printed_lines, printed_since  # noqa: E402
from tests.support.pki import ServerCert, make_pki  # noqa: E402

PROVIDER_HOSTS = ("api.openai.com", "*.openai.azure.com", "*.services.ai.azure.com", "api.anthropic.com")
_PRINTED = pytest.StashKey[dict[int, int]]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_PRINTED] = printed_lines()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report shows what each mitmdump printed while it ran (a client that
    timed out tells nothing of the proxy between it and the server)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when in ("setup", "call"):
        for title, text in printed_since(item.stash.get(_PRINTED, {})):
            report.sections.append((title, text))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def provider(pki: ServerCert) -> Iterator[FakeProvider]:
    server = FakeProvider(str(pki.cert_path), str(pki.key_path)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def other_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeProvider, ServerCert]]:
    """A non-LLM HTTPS site with a CA of its own."""
    cert = make_pki(
        tmp_path_factory.mktemp("other-pki"), names=("localhost", "api.openai.com.evil.net"), label="other site"
    )
    server = FakeProvider(str(cert.cert_path), str(cert.key_path)).start()
    yield server, cert
    server.stop()


def provider_routes(provider: FakeProvider) -> dict[str, int]:
    return {host: provider.port for host in PROVIDER_HOSTS}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, provider: FakeProvider, pki: ServerCert) -> Iterator[Mitmdump]:
    """A regular-mode mitmdump with the addon, default config, provider names on loopback."""
    with Mitmdump(
        tmp_path_factory.mktemp("proxy"), routes=provider_routes(provider), upstream_ca=pki.ca_path
    ) as running:
        yield running
