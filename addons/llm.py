"""The script mitmdump loads: `mitmdump -s addons/llm.py -p 8080`."""

import sys
from pathlib import Path

try:
    import llm_mitm  # noqa: F401
except ImportError:  # a plain checkout: mitmproxy only put addons/ on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_mitm.addons import build, unhandled_hooks

addons = build()
globals().update(unhandled_hooks(globals()))  # mitmproxy asks this module for every hook of every flow
