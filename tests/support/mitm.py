"""Run a real mitmdump with the llm-mitm addon as a subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[2]
ADDON = ROOT / "addons" / "llm.py"
LOOPBACK_DNS = Path(__file__).with_name("loopback_dns.py")
MITMDUMP = Path(sys.executable).with_name("mitmdump")

_LISTENING = re.compile(r"listening at .*?:(\d+)\.?\s*$")
_STARTED: weakref.WeakSet[Mitmdump] = weakref.WeakSet()  # for a failed test's report (`printed_since`)


def schema_checked(line: bytes) -> dict[str, Any]:
    """A trace line, held to the schema: the writer makes records as plain data, so each
    one a test reads must be what `TraceRecord` itself writes (fields, order, types)."""
    from llm_mitm.trace import TraceRecord

    record = orjson.loads(line)
    assert orjson.dumps(TraceRecord.model_validate(record).model_dump()) == orjson.dumps(record), line[:300]
    return record


class Mitmdump:
    """One mitmdump process: its ports, its output, its trace file."""

    def __init__(
        self,
        workdir: Path,
        *,
        config: Mapping[str, Any] | None = None,
        modes: Sequence[str] = ("regular",),
        routes: Mapping[str, int] | None = None,
        upstream_ca: Path | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        addon: Path | None = ADDON,
        own_session: bool = False,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.confdir = workdir / "confdir"
        self.traces_path = workdir / "traces.jsonl"
        self.lines: list[str] = []
        self.ports: list[int] = []
        args = [str(MITMDUMP), "--set", f"confdir={self.confdir}", "--set", "listen_host=127.0.0.1"]
        if addon is not None:  # None: bare mitmdump, for comparison
            args += ["-s", str(addon)]
        if routes:
            args += ["-s", str(LOOPBACK_DNS)]
        for mode in modes:
            args += ["--mode", mode if "@" in mode else f"{mode}@0"]
        if upstream_ca:
            args += ["--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}"]
        if config is not None:
            config_path = workdir / "config.yaml"
            with config_path.open("w") as handle:
                YAML(typ="safe", pure=True).dump(dict(config), handle)
            args += ["--set", f"llm_config={config_path}"]
        args += list(extra_args)
        process_env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        process_env.pop("GATEWAY_TRACE_DESTINATION", None)
        if routes:
            process_env["LLM_MITM_TEST_ROUTES"] = ",".join(f"{k}={v}" for k, v in routes.items())
        process_env.update(env or {})
        self.args = args
        self._env = process_env
        self._modes = len(modes)
        self._own_session = own_session  # a process group of its own, as a terminal or a service manager starts it
        self.process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> Mitmdump:
        self.process = subprocess.Popen(
            self.args,
            cwd=self.workdir,
            env=self._env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=self._own_session,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        _STARTED.add(self)
        deadline = time.monotonic() + timeout
        while len(self.ports) < self._modes:
            if self.process.poll() is not None:
                time.sleep(0.2)
                raise RuntimeError(f"mitmdump exited with {self.process.returncode}:\n{self.output}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mitmdump did not start listening:\n{self.output}")
            time.sleep(0.05)
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if match := _LISTENING.search(line):
                self.ports.append(int(match.group(1)))

    def wait_for_children(self, timeout: float = 10.0) -> list[int]:
        """The process ids of mitmdump's children (the trace writer) once there is one
        (Linux; elsewhere, or none in time, an empty list)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                children = [int(pid) for pid in Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()]
            except OSError:
                return []
            if children or time.monotonic() > deadline:
                return children
            time.sleep(0.05)

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_cert(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    @property
    def output(self) -> str:
        """What mitmdump printed so far: a line logged while a call is answered may reach
        this pipe after the client has its answer; wait_for_output waits for it."""
        return "".join(self.lines)

    def wait_for_output(self, text: str, timeout: float = 10.0) -> str:
        """The output once `text` is in it; an AssertionError with its last lines if it is
        not within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while text not in (output := self.output):
            assert time.monotonic() < deadline, f"{text!r} not printed within {timeout} s; the output ends:\n{output[-2000:]}"
            time.sleep(0.05)
        return output

    def client_env(self) -> dict[str, str]:
        """What a client process needs to go through this proxy (no CA bypass)."""
        env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and k not in _CA_VARIABLES}
        env.update(
            HTTPS_PROXY=self.proxy_url,
            HTTP_PROXY=self.proxy_url,
            SSL_CERT_FILE=str(self.ca_cert),
            REQUESTS_CA_BUNDLE=str(self.ca_cert),
        )
        return env

    def stop(self) -> int | None:
        """Stops mitmdump; its whole output is read once this returns."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        return self.process.returncode

    def traces(self) -> list[dict[str, Any]]:
        """The whole lines written so far (a large one may be half-way through its write)."""
        if not self.traces_path.exists():
            return []
        data = self.traces_path.read_bytes()
        return [schema_checked(line) for line in data[: data.rfind(b"\n") + 1].splitlines() if line]

    def wait_for_traces(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            records = self.traces()
            if len(records) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.05)

    def __enter__(self) -> Mitmdump:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_CA_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")


def printed_lines() -> dict[int, int]:
    """How many lines each mitmdump still known has printed so far (by `id`)."""
    return {id(proxy): len(proxy.lines) for proxy in list(_STARTED)}


def printed_since(marks: dict[int, int], last: int = 80) -> list[tuple[str, str]]:
    """(title, text) of what each mitmdump printed since `marks` (the last `last` lines):
    a test that hangs on a client says nothing of the proxy it went through otherwise."""
    sections = []
    for proxy in list(_STARTED):
        lines = proxy.lines[marks.get(id(proxy), 0):]
        if lines:
            shown = "".join(lines[-last:])
            sections.append((f"mitmdump {proxy.workdir.name} ({len(lines)} lines, the last {min(last, len(lines))})", shown))
    return sections
