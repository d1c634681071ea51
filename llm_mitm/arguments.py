"""Numbers and hosts given on a command line, read strictly: a clear usage error, not a
traceback or a value that breaks something later (a port of 99999 written into the system
proxy)."""

from __future__ import annotations

import argparse
import ipaddress
import re


def count_of(text: str) -> int:
    """A number of things: 0 or more."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is fewer than none")
    return value


def port_number(text: str) -> int:
    value = _integer(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is no TCP port (1-65535)")
    return value


# A host name as a URL takes it: labels of letters, digits and hyphens, dot-separated.
_HOST_NAME = re.compile(r"(?=.{1,253}\.?$)(?:(?!-)[A-Za-z0-9-]{1,63}(?<!-)\.)*(?!-)[A-Za-z0-9-]{1,63}(?<!-)\.?")


def proxy_host(text: str) -> str:
    """The proxy's host as a URL writes it: a name, an IPv4 address, or an IPv6 address in
    brackets (a zone's `%` written `%25`). Anything else is refused, where it went into
    every client's proxy URL as it was (`http://[http://x]:8080`: a setup probe)."""
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        address = ipaddress.ip_address(inner)
    except ValueError:
        if _HOST_NAME.fullmatch(text):
            return text
        raise argparse.ArgumentTypeError(f"{text!r} is no host name or IP address") from None
    if address.version == 4:
        return inner
    return "[" + inner.replace("%", "%25") + "]"


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
