"""The mitmproxy addon classes, one concern each, in the order their hooks must run."""

from __future__ import annotations

from llm_mitm.addons.output import OutputRedaction
from llm_mitm.addons.recorder import Recorder
from llm_mitm.addons.scope import Scope
from llm_mitm.addons.settings import Settings
from llm_mitm.addons.shared import Shared
from llm_mitm.addons.tracer import Tracer


def build() -> list[object]:
    """Settings first (config), then scope, the exchange record, and the trace writer last."""
    shared = Shared()
    return [Settings(shared), OutputRedaction(shared), Scope(shared), Recorder(shared), Tracer(shared)]


__all__ = ["OutputRedaction", "Recorder", "Scope", "Settings", "Shared", "Tracer", "build"]
