#!/usr/bin/env python3
"""Trust the mitmproxy CA in certifi's bundle (or write a separate bundle).

    python scripts/trust-ca.py                      # this Python's certifi
    python scripts/trust-ca.py --python app/.venv/bin/python
    python scripts/trust-ca.py --check | --remove | --bundle ~/.mitmproxy/bundle.pem
"""

import sys
from pathlib import Path

try:
    import llm_mitm  # noqa: F401
except ImportError:  # a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_mitm.trust import main

if __name__ == "__main__":
    sys.exit(main())
