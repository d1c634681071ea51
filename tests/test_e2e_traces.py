"""Config and trace files through a real mitmdump: start-up errors, live edits, destinations."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import requests

from tests.conftest import provider_routes
from tests.support.fake_provider import FakeProvider
from tests.support.mitm import ADDON, MITMDUMP, Mitmdump
from tests.support.pki import ServerCert
from tests.test_e2e_clients import OPENAI_KEY, chat, marker


def post(proxy: Mitmdump, text: str) -> requests.Response:
    return requests.post(
        "https://api.openai.com/v1/chat/completions",
        json=chat(text),
        headers={"Authorization": f"Bearer {OPENAI_KEY}"},
        proxies={"https": proxy.proxy_url},
        verify=str(proxy.ca_cert),
        timeout=30,
    )


def start(folder: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """mitmdump with the addon, run until it stops on its own (a good config: never)."""
    return subprocess.run(
        [str(MITMDUMP), "-s", str(ADDON), "--set", f"confdir={folder / 'conf'}", "-p", "0", "--set", "listen_host=127.0.0.1"],
        cwd=folder, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )


def test_bad_config_stops_mitmdump_with_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("traces:\n  bodies: everything\n")
    result = start(tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if "config.yaml" in line]
    assert len(lines) == 1, output
    assert f"{tmp_path / 'config.yaml'}: traces.bodies: Input should be 'full', 'metadata' or 'none' (got 'everything')" in lines[0]
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("config", "env", "expected"),
    [
        ("traces:\n  destination: a-dir\n", {}, "{config}: traces.destination: a-dir: is a directory, not a file"),
        ("traces:\n  destination: a-file/traces.jsonl\n", {}, "{config}: traces.destination: a-file/traces.jsonl: {folder}/a-file is a file, not a directory"),
        ("traces:\n  directory: a-file\n", {}, "{config}: traces.directory: a-file: is a file, not a directory"),
        ("", {"GATEWAY_TRACE_DESTINATION": "a-dir"}, "GATEWAY_TRACE_DESTINATION: a-dir: is a directory, not a file"),
        (None, {"GATEWAY_TRACE_DESTINATION": "{folder}/a-dir"}, "GATEWAY_TRACE_DESTINATION: {folder}/a-dir: is a directory, not a file"),
        # a file an addon opens as it takes the config (it gave a traceback)
        ("usage:\n  spend_db: a-dir\npolicy:\n  budgets: [{usd_per_day: 5}]\n", {},
         "{config}: usage.spend_db: a-dir: cannot be opened: unable to open database file"),
    ],
)
def test_files_the_config_names_that_cannot_be_used_stop_mitmdump_at_start(tmp_path: Path, config: str | None, env: dict[str, str], expected: str) -> None:
    """Taken, they would lose every record, each with an error line at a call, and never
    say which key named them."""
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("not a directory")
    if config is not None:
        (tmp_path / "config.yaml").write_text(config)
    result = start(tmp_path, {name: value.format(folder=tmp_path) for name, value in env.items()})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert expected.format(config=tmp_path / "config.yaml", folder=tmp_path) in output
    assert "Traceback" not in output and "TRACE LOST" not in output


def test_live_config_edits(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    config = {"traces": {"destination": "a.jsonl"}}
    with Mitmdump(tmp_path, config=config, routes=provider_routes(provider), upstream_ca=pki.ca_path) as proxy:
        config_path = tmp_path / "config.yaml"
        assert post(proxy, marker()).status_code == 200
        # A bad edit is refused with its reason; the last good config stays in force.
        config_path.write_text("traces:\n  destination: b.jsonl\n  bodys: full\n")
        assert f"{config_path}: traces.bodys: unknown key" in proxy.wait_for_output("config change refused")
        assert post(proxy, marker()).status_code == 200
        # A good edit takes effect without a restart.
        config_path.write_text("traces:\n  destination: b.jsonl\n")
        deadline = time.monotonic() + 10
        while "reloaded" not in proxy.output and time.monotonic() < deadline:
            time.sleep(0.1)
        last = marker()
        assert post(proxy, last).status_code == 200
        time.sleep(0.5)
    a = (tmp_path / "a.jsonl").read_bytes().splitlines()
    b = (tmp_path / "b.jsonl").read_bytes().splitlines()
    assert len(a) == 2 and len(b) == 1
    assert last.encode() in b[0]


def test_a_destination_change_with_a_stalled_writer_holds_no_call_and_the_proxy_still_exits(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """The old writer is let go off the event loop (a review: every call waited up to 15 s
    for it), and one that never finishes is killed, so mitmdump exits (it waited for ever)."""
    import os
    import signal

    with Mitmdump(tmp_path, config={"traces": {"destination": "a.jsonl"}}, routes=provider_routes(provider), upstream_ca=pki.ca_path) as proxy:
        assert post(proxy, marker()).status_code == 200
        stalled = [pid for pid in proxy.wait_for_children() if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]  # the writer
        assert len(stalled) == 1
        for pid in stalled:
            os.kill(pid, signal.SIGSTOP)
        for _ in range(20):
            assert post(proxy, marker()).status_code == 200
        (tmp_path / "config.yaml").write_text("traces:\n  destination: b.jsonl\n")
        deadline = time.monotonic() + 10
        while "reloaded" not in proxy.output and time.monotonic() < deadline:
            time.sleep(0.1)
        started = time.monotonic()
        assert post(proxy, marker()).status_code == 200
        assert time.monotonic() - started < 3, "a call waited for the old writer"
        proxy.process.send_signal(signal.SIGINT)
        proxy.process.wait(40)  # the old writer's 15 s, then it is killed
    states = {pid: Path(f"/proc/{pid}/status").read_text().splitlines()[2] if Path(f"/proc/{pid}").exists() else "gone" for pid in stalled}
    assert all(state == "gone" or "zombie" in state for state in states.values()), (states, proxy.output[-2000:])


def test_gateway_trace_destination_and_concurrency(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    target = tmp_path / "elsewhere" / "traces.json"
    env = {"GATEWAY_TRACE_DESTINATION": str(target)}
    with Mitmdump(tmp_path, routes=provider_routes(provider), upstream_ca=pki.ca_path, env=env) as proxy:
        markers = [marker() for _ in range(60)]
        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(lambda m: post(proxy, m).status_code, markers))
        assert statuses == [200] * 60
    lines = target.read_bytes().splitlines()
    assert len(lines) == 60
    records = [orjson.loads(line) for line in lines]
    assert len({r["id"] for r in records}) == 60
    assert {r["request"]["body"]["messages"][0]["content"] for r in records} == set(markers)
    assert not (tmp_path / "traces.jsonl").exists()


def test_trace_files_that_fail_later_never_break_proxying(tmp_path: Path, provider: FakeProvider, pki: ServerCert) -> None:
    """The per-exchange directory replaced by a file while running: each call still goes
    and is still in the JSONL trace; the loss is one log line, not one per call; an edit
    that names a directory as the trace file is refused, the running one stays."""
    config = {"traces": {"directory": "per-exchange"}}
    with Mitmdump(tmp_path, config=config, routes=provider_routes(provider), upstream_ca=pki.ca_path) as proxy:
        assert post(proxy, marker()).status_code == 200
        proxy.wait_for_traces(1)
        shutil.rmtree(tmp_path / "per-exchange")
        (tmp_path / "per-exchange").write_text("now a file")
        for _ in range(4):
            assert post(proxy, marker()).status_code == 200
        proxy.wait_for_traces(5)
        (tmp_path / "a-dir").mkdir()
        (tmp_path / "config.yaml").write_text("traces:\n  destination: a-dir\n")
        printed = proxy.wait_for_output("config change refused")
        assert f"{tmp_path / 'config.yaml'}: traces.destination: a-dir: is a directory, not a file" in printed
        assert post(proxy, marker()).status_code == 200
        assert len(proxy.wait_for_traces(6)) == 6
    lost = [line for line in proxy.lines if "TRACE LOST" in line]
    assert len(lost) == 1, proxy.output
    assert "per-exchange" in lost[0]


def test_runs_from_a_plain_checkout_without_install(tmp_path: Path) -> None:
    """mitmdump only puts addons/ on sys.path; the script finds the package itself."""
    import sysconfig

    site_packages = sysconfig.get_paths()["purelib"]
    code = (
        # -S: no site processing, so neither the editable install's finder nor its .pth
        f"import sys; sys.path.append({site_packages!r});"
        "import importlib.util; assert importlib.util.find_spec('llm_mitm') is None, 'installed';"
        f"import runpy; ns = runpy.run_path({str(ADDON)!r}); print(' '.join(type(c).__name__ for a in ns['addons'] for c in a.concerns))"
    )
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    names = result.stdout.split()
    assert names[0] == "Settings" and "Recorder" in names and names[-1] == "Tracer"
