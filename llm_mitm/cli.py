"""The `llm-mitm` command (also `python -m llm_mitm`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from llm_mitm.environment import DEFAULT_NO_PROXY, SHELLS, client_environment, prepare_bundle, render
from llm_mitm.trust import DEFAULT_CONFDIR, TrustError


def _env(args: argparse.Namespace) -> int:
    try:
        bundle = prepare_bundle(args.confdir, args.bundle)
    except TrustError as exc:
        print(f"llm-mitm env: {exc}", file=sys.stderr)
        return 2
    variables = client_environment(f"http://{args.host}:{args.port}", bundle, args.no_proxy)
    print(render(variables, args.shell))
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="llm-mitm", description="llm-mitm tools")
    commands = root.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="print the environment a client needs for this proxy")
    env.add_argument("--shell", choices=SHELLS, default="bash")
    env.add_argument("--host", default="127.0.0.1")
    env.add_argument("--port", type=int, default=8080)
    env.add_argument("--confdir", type=Path, default=DEFAULT_CONFDIR, help="mitmproxy's confdir (default ~/.mitmproxy)")
    env.add_argument("--bundle", type=Path, help="where to write certifi + the CA (default CONFDIR/llm-mitm-bundle.pem)")
    env.add_argument("--no-proxy", default=DEFAULT_NO_PROXY, help=f"NO_PROXY (default {DEFAULT_NO_PROXY})")
    env.set_defaults(run=_env)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args))
