"""Numbers given on a command line, read strictly: a clear usage error, not a traceback
or a value that breaks something later (a port of 99999 written into the system proxy)."""

from __future__ import annotations

import argparse


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


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
