"""Replay set-ups that can never answer are named once, when the config goes in force."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.test_addons import chat_flow, config_file, run, whole_addon

NO_SOURCE = ("llm-mitm: replay.mode strict has no recorded answers to read (no replay.source, traces.destination null): "
             "every call is answered 404 replay_miss; name a trace file or traces.directory in replay.source")


def no_bodies(mode: str, bodies: str) -> str:
    return (f"llm-mitm: replay.mode {mode} with traces.bodies: {bodies}: the calls traced keep no bodies to answer from, "
            "so none of them is replayed after a restart (replay needs traces.bodies: full)")


def warnings_for(tmp_path: Path, caplog: pytest.LogCaptureFixture, *configs: str) -> list[str]:
    """The warnings replay logs while each config in turn goes in force (the first twice:
    a reload of the same file)."""
    paths = []
    for number, text in enumerate(configs):
        (tmp_path / str(number)).mkdir(parents=True)
        paths.append(config_file(tmp_path / str(number), text))

    async def go() -> None:
        with caplog.at_level(logging.WARNING), whole_addon(paths[0]) as (llm, tctx):
            for path in (paths[0], *paths):
                tctx.configure(llm, llm_config=str(path))

    caplog.clear()
    run(go())
    return [r.getMessage() for r in caplog.records if r.name == "llm_mitm.replay" and r.levelno >= logging.WARNING]


def test_strict_replay_with_no_source_is_named_once(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Traces off and no replay.source: strict answered every call 404 replay_miss and
    logged nothing (a review)."""
    monkeypatch.chdir(tmp_path)
    config = config_file(tmp_path, "traces:\n  destination: null\nreplay:\n  mode: strict\n")

    async def go() -> int:
        with caplog.at_level(logging.WARNING), whole_addon(config) as (llm, tctx):
            tctx.configure(llm, llm_config=str(config))  # a reload: said once
            flow = chat_flow()
            llm.request(flow)
            return flow.response.status_code

    assert run(go()) == 404  # what the warning says
    assert [r.getMessage() for r in caplog.records if r.name == "llm_mitm.replay" and r.levelno >= logging.WARNING] == [NO_SOURCE]


def test_replay_without_full_bodies_is_named_once(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README: replay needs traces.bodies: full; with less, nothing recorded could be
    answered after a restart, and nothing said so (a review). Named again only after a
    config that no longer has the problem."""
    monkeypatch.chdir(tmp_path)
    metadata = "traces:\n  bodies: metadata\nreplay:\n  mode: 'on'\n"
    full = "replay:\n  mode: 'on'\n"
    assert warnings_for(tmp_path / "a", caplog, metadata, full, metadata) == [no_bodies("on", "metadata")] * 2


@pytest.mark.parametrize("text", [
    "replay:\n  mode: 'on'\n",  # the README's set-up
    "replay:\n  mode: strict\n",
    "traces:\n  bodies: none\n",  # replay off
    "traces:\n  destination: null\nreplay:\n  mode: 'on'\n",  # answers what this run recorded
    "traces:\n  bodies: metadata\nreplay:\n  mode: strict\n  source: '{folder}/recorded.jsonl'\n",  # a file recorded with bodies
])
def test_a_replay_set_up_that_can_answer_is_not_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                                             text: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recorded.jsonl").write_bytes(b"")
    assert warnings_for(tmp_path, caplog, text.format(folder=tmp_path)) == []


def test_strict_replay_from_traces_without_bodies_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert warnings_for(tmp_path, caplog, "traces:\n  bodies: none\nreplay:\n  mode: strict\n") == [no_bodies("strict", "none")]
