"""What a client process needs to go through the proxy, as lines for its shell.

Certificate variables point at a bundle (certifi's roots plus the mitmproxy CA), never
at the CA alone: SSL_CERT_FILE replaces a client's trust store, and hosts that pass
through untouched still need the public roots. Nothing that turns verification off.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from llm_mitm.trust import CACert, bundle_environment, ensure_ca, write_bundle

SHELLS = ("bash", "fish", "powershell", "cmd")
DEFAULT_NO_PROXY = "localhost,127.0.0.1,::1"
BUNDLE_NAME = "llm-mitm-bundle.pem"


def client_environment(proxy_url: str, bundle: Path, no_proxy: str = DEFAULT_NO_PROXY) -> dict[str, str]:
    return {
        "HTTP_PROXY": proxy_url,
        "HTTPS_PROXY": proxy_url,
        "NO_PROXY": no_proxy,
        # curl takes a proxy for http:// only from the lower-case name (a CGI script's
        # HTTP_PROXY is a request header); without it such a call, key and all, goes direct
        "http_proxy": proxy_url,
        "https_proxy": proxy_url,
        "no_proxy": no_proxy,
        "OPENAI_PROXY": proxy_url,  # langchain
        **bundle_environment(bundle),  # httpx and the SDKs, requests, curl, Node
        "NODE_USE_ENV_PROXY": "1",  # Node 24 (and late 22.x) honours HTTP(S)_PROXY with this; Node 20 does not
    }


class UnsafeValue(ValueError):
    """A value the chosen shell cannot be given literally."""


def render(variables: dict[str, str], shell: str) -> str:
    if shell == "cmd" or (shell == "powershell" and sys.platform == "win32"):  # Windows names are case-insensitive
        variables = {name: value for name, value in variables.items() if name.upper() == name or name.upper() not in variables}
    if shell == "fish":
        lines = [f"set -gx {name} {_fish_quoted(value)}" for name, value in variables.items()]
    elif shell == "powershell":
        lines = [f"$env:{name} = {_powershell_quoted(value)}" for name, value in variables.items()]
    elif shell == "cmd":
        lines = [_cmd_set(name, value) for name, value in variables.items()]
    else:
        lines = [f"export {name}={_posix_quoted(value)}" for name, value in variables.items()]
    return "\n".join(lines)


def _posix_quoted(value: str) -> str:
    """Single quotes take everything literally; a quote closes, is escaped, and reopens."""
    return "'" + value.replace("'", "'\\''") + "'"


def _fish_quoted(value: str) -> str:
    r"""In fish's single quotes \\ and \' are escapes, so every backslash and quote is
    escaped (a bare backslash before the closing quote would swallow it)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _powershell_quoted(value: str) -> str:
    """PowerShell also takes the typographic single quotes as quotes; each is doubled."""
    return "'" + re.sub("(['\u2018\u2019\u201a\u201b])", r"\1\1", value) + "'"


def _cmd_set(name: str, value: str) -> str:
    """`set "NAME=value"`: the quotes keep & | < > ^ literal. cmd has no escape for % that
    works both typed and in a batch file (%% is one only in a batch), nor for a quote
    inside the quotes, so such a value is refused rather than set wrong."""
    if any(c in value for c in '%"\r\n'):
        raise UnsafeValue(f"cmd cannot set {name} to {value!r} literally (it holds %, a quote or a line break): use paths without them, or another shell")
    return f'set "{name}={value}"'


def prepare_bundle(confdir: Path, bundle: Path | None) -> Path:
    """Write (or refresh) the bundle next to the CA and return its path."""
    ca = CACert.load(ensure_ca(confdir))
    return write_bundle(bundle or confdir.expanduser() / BUNDLE_NAME, ca)
