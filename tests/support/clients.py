"""Real client SDKs in a venv of their own.

The openai and anthropic SDKs pin an h11 that mitmproxy 11 refuses, so they cannot
share the proxy's venv; like a real application, they live in their own.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[2]
CLIENTS_VENV = Path(os.environ.get("LLM_MITM_CLIENTS_VENV", ROOT / ".venv-clients"))
DRIVER = ROOT / "tests" / "clients" / "drive.py"
PACKAGES = ("openai", "anthropic", "requests", "websockets")  # websockets: the openai SDK's realtime client


def client_python() -> Path:
    """The clients venv's interpreter, created on first use."""
    python = CLIENTS_VENV / "bin" / "python"
    marker = CLIENTS_VENV / ".llm-mitm-ready"
    CLIENTS_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(CLIENTS_VENV.parent / ".venv-clients.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists() or marker.read_text() != " ".join(PACKAGES) + "\n":  # made for other packages
            subprocess.run([sys.executable, "-m", "venv", str(CLIENTS_VENV)], check=True)
            subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PACKAGES],
                check=True,
            )
            marker.write_text(" ".join(PACKAGES) + "\n")
    return python


def drive(action: Mapping[str, Any], env: Mapping[str, str], timeout: float = 60.0) -> dict[str, Any]:
    """Run one client action (see tests/clients/drive.py) and return its JSON result."""
    result = subprocess.run(
        [str(client_python()), str(DRIVER)],
        input=orjson.dumps(dict(action)),
        env={**env, "LLM_MITM_TEST_DUMP_AFTER": str(max(timeout - 5, 1))},  # where it hung, before the timeout kills it
        capture_output=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"client failed ({result.returncode}):\n{result.stderr.decode(errors='replace')}")
    return orjson.loads(result.stdout)
