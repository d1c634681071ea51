"""What a client process needs to go through the proxy, as lines for its shell.

Certificate variables point at a bundle (certifi's roots plus the mitmproxy CA), never
at the CA alone: SSL_CERT_FILE replaces a client's trust store, and hosts that pass
through untouched still need the public roots. Nothing that turns verification off.
"""

from __future__ import annotations

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
        "OPENAI_PROXY": proxy_url,  # langchain
        **bundle_environment(bundle),  # httpx and the SDKs, requests, Node
        "NODE_USE_ENV_PROXY": "1",  # Node 22+ honours HTTP(S)_PROXY with this
    }


def render(variables: dict[str, str], shell: str) -> str:
    if shell == "fish":
        lines = [f"set -gx {name} {_single_quoted(value)}" for name, value in variables.items()]
    elif shell == "powershell":
        lines = [f"$env:{name} = {_single_quoted(value, powershell=True)}" for name, value in variables.items()]
    elif shell == "cmd":
        lines = [f"set {name}={value}" for name, value in variables.items()]
    else:
        lines = [f"export {name}={_single_quoted(value)}" for name, value in variables.items()]
    return "\n".join(lines)


def _single_quoted(value: str, powershell: bool = False) -> str:
    if powershell:
        return "'" + value.replace("'", "''") + "'"
    return "'" + value.replace("'", "'\\''") + "'"


def prepare_bundle(confdir: Path, bundle: Path | None) -> Path:
    """Write (or refresh) the bundle next to the CA and return its path."""
    ca = CACert.load(ensure_ca(confdir))
    return write_bundle(bundle or confdir.expanduser() / BUNDLE_NAME, ca)
