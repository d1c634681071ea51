"""The mitmproxy addon classes, one concern each, in the order their hooks must run."""

from __future__ import annotations

from llm_mitm.addons.firewall import Firewall
from llm_mitm.addons.meter import Meter
from llm_mitm.addons.organization import Organization
from llm_mitm.addons.output import OutputRedaction
from llm_mitm.addons.quota import QuotaAddon
from llm_mitm.addons.recorder import Recorder
from llm_mitm.addons.replay import Replay
from llm_mitm.addons.scope import Scope
from llm_mitm.addons.settings import Settings
from llm_mitm.addons.shared import Shared
from llm_mitm.addons.stats import Stats
from llm_mitm.addons.stream_usage import StreamUsage
from llm_mitm.addons.tracer import Tracer


def build() -> list[object]:
    """Hooks run in this order for every event. On the way out: config, scope, the
    exchange record, org headers, policy, replay, stream usage, quota; on the way back:
    the record is closed, metered, charged, counted and traced last."""
    shared = Shared()
    return [
        Settings(shared),
        OutputRedaction(shared),
        Scope(shared),
        Recorder(shared),
        Organization(shared),
        Firewall(shared),
        Replay(shared),
        StreamUsage(shared),
        Meter(shared),
        QuotaAddon(shared),
        Stats(shared),
        Tracer(shared),
    ]


__all__ = [
    "Firewall",
    "Meter",
    "Organization",
    "OutputRedaction",
    "QuotaAddon",
    "Recorder",
    "Replay",
    "Scope",
    "Settings",
    "Shared",
    "Stats",
    "StreamUsage",
    "Tracer",
    "build",
]
