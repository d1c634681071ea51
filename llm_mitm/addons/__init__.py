"""The mitmproxy addon classes, one concern each, and the one object mitmproxy sees.

mitmproxy offers every event (there are some thirty per flow) to every addon it knows,
so each extra addon object costs on every flow. `LLMMitm` is the single object it
sees: it forwards just the hooks the concerns implement, to them, in order.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from mitmproxy import command, exceptions, hooks
from mitmproxy.flow import Error as FlowError

from llm_mitm.addons.caches import CachedContents
from llm_mitm.addons.firewall import Firewall
from llm_mitm.addons.input_files import InputFiles
from llm_mitm.addons.meter import Meter
from llm_mitm.addons.organization import Organization
from llm_mitm.addons.output import OutputRedaction
from llm_mitm.addons.quota import QuotaAddon
from llm_mitm.addons.recorder import Recorder
from llm_mitm.addons.refuse import refuse, refuse_event
from llm_mitm.addons.replay import Replay
from llm_mitm.addons.safety import Safety
from llm_mitm.addons.scope import Scope
from llm_mitm.addons.settings import Settings
from llm_mitm.addons.shared import Shared
from llm_mitm.addons.stats import Stats
from llm_mitm.addons.stream_usage import StreamUsage
from llm_mitm.addons.tracer import Tracer
from llm_mitm.addons.tunnels import Tunnels
from llm_mitm.realtime import event_names

logger = logging.getLogger("llm_mitm")

LIFECYCLE_HOOKS = ("load", "configure", "running", "done")
SHUTDOWN_GRACE = 3.0  # seconds the calls in flight at shutdown have to finish, traced and charged
SHUTDOWN_STALL = 0.25  # ... while one ends at least this often
_frozen = False  # gc.freeze() done in this process
FLOW_HOOKS = ("requestheaders", "request", "responseheaders", "response", "error", "websocket_message")
CONNECTION_HOOKS = ("next_layer", "client_disconnected")  # a few times a connection, not a request


def concerns(shared: Shared) -> list[Any]:
    """In hook order. On the way out: config, scope, the exchange record, org headers,
    policy, replay, stream usage, quota; on the way back the record is closed, metered,
    charged, counted and traced last."""
    return [
        Settings(shared),
        OutputRedaction(shared),
        Safety(),
        Scope(shared),
        Tunnels(shared),
        Recorder(shared),
        Organization(shared),
        Firewall(shared),
        CachedContents(shared),
        Replay(shared),
        InputFiles(shared),
        StreamUsage(shared),
        Meter(shared),
        QuotaAddon(shared),
        Stats(shared),
        Tracer(shared),
    ]


class LLMMitm:
    """Forwards mitmproxy's hooks to the concerns; one failing concern does not stop the
    rest (as mitmproxy itself treats addons), but a refused option change still does.

    mitmproxy looks each flow hook up on this object for every flow: a hook no working
    concern implements is None here, so mitmproxy skips it."""

    requestheaders: Callable[[Any], None] | None
    request: Callable[[Any], None] | None
    responseheaders: Callable[[Any], None] | None
    response: Callable[[Any], None] | None
    error: Callable[[Any], None] | None
    websocket_message: Callable[[Any], None] | None
    next_layer: Callable[[Any], None] | None
    client_disconnected: Callable[[Any], None] | None

    def __init__(self, shared: Shared | None = None) -> None:
        self.shared = shared or Shared()
        self.concerns = concerns(self.shared)
        self.stats = next(c for c in self.concerns if isinstance(c, Stats))
        self._hooks: dict[str, list[Callable[..., Any]]] = {}
        self._route_hooks()
        self.shared.on_config(lambda config: self._route_hooks(), now=False)

    def _route_hooks(self) -> None:
        """Each hook's list of concerns. Flow hooks skip a concern the config leaves idle
        (`active` false: no replay, no limits, no organization rules): every call costs
        on every flow."""
        self._hooks = {name: [getattr(c, name) for c in self.concerns if hasattr(c, name)] for name in LIFECYCLE_HOOKS}
        working = [c for c in self.concerns if getattr(c, "active", True)]
        for name in FLOW_HOOKS + CONNECTION_HOOKS:
            hooks = [getattr(c, name) for c in working if hasattr(c, name)]
            self._hooks[name] = hooks
            setattr(self, name, functools.partial(self._each, name) if hooks else None)

    def _each(self, name: str, flow: Any) -> Coroutine[Any, Any, None] | None:
        """A flow hook: each concern in turn."""
        hooks = self._hooks[name]
        for index, hook in enumerate(hooks):
            try:
                waits = hook(flow)
            except Exception:
                self._failed(name, hook, flow)
                continue
            if waits is not None and inspect.isawaitable(waits):  # a concern that must wait (a read upstream)
                return self._after(name, hook, waits, hooks[index + 1 :], flow)
        return None

    async def _after(self, name: str, waiting: Callable[..., Any], waits: Awaitable[None], rest: list[Callable[..., Any]], flow: Any) -> None:
        """The rest of a hook's concerns once the one that waits is done (mitmproxy holds
        the flow until this returns), unless the flow was killed meanwhile."""
        try:
            await waits
        except Exception:
            self._failed(name, waiting, flow)
        for hook in rest:
            if flow.error is not None:
                return
            try:
                if (more := hook(flow)) is not None and inspect.isawaitable(more):
                    await more
            except Exception:
                self._failed(name, hook, flow)

    def _failed(self, name: str, hook: Callable[..., Any], flow: Any) -> None:
        """Logged; and what a concern guarding calls (the record, the policy, organization,
        limits, strict replay) failed to check does not go upstream unchecked: a call is
        refused (in its API's dialect once recorded), a realtime event dropped."""
        concern = getattr(hook, "__self__", hook)
        if not getattr(concern, "guards_calls", False) or name not in ("request", "websocket_message"):
            _failed(name, hook)
            return
        from_client = name == "websocket_message" and flow.websocket is not None and flow.websocket.messages[-1].from_client
        logger.exception("llm-mitm: %s failed in %s; %s", name, concern.__class__.__name__, "the call is refused" if name == "request" else
                         "the event is refused" if from_client else "the model's event is passed on")
        if from_client:  # the model's own events are not the policy's to hold back
            self._refuse_unchecked_event(flow, concern.__class__.__name__)
        elif name == "request" and flow.response is None:
            refuse(flow, self.shared.exchange(flow), 500, "policy_error",
                   f"the proxy could not check this call ({concern.__class__.__name__} failed); it was not sent")

    @staticmethod
    def _refuse_unchecked_event(flow: Any, concern: str) -> None:
        """Dropped, and the client told so by the API's `error` event: dropped silently, a
        client waiting for the answer to its event waited forever."""
        message = flow.websocket.messages[-1]
        kind, event_id = event_names(message.content)
        try:
            refuse_event(flow, message, kind, event_id, "policy_error", f"the proxy could not check this event ({concern} failed); it was not sent")
        except Exception:  # noqa: BLE001 - the client is not told, but the event still does not go
            logger.exception("llm-mitm: the client could not be told its event was dropped")
            message.drop()

    def _lifecycle(self, name: str, *args: Any) -> None:
        """mitmproxy calls these where nothing can wait: a concern's are plain calls."""
        for hook in self._hooks[name]:
            try:
                hook(*args)
            except exceptions.OptionsError:
                raise
            except Exception:
                _failed(name, hook)

    def load(self, loader: Any) -> None:
        self._lifecycle("load", loader)

    def configure(self, updated: set[str]) -> None:
        self._lifecycle("configure", updated)

    def running(self) -> None:
        self._lifecycle("running")
        # What exists once the proxy runs (mitmproxy's and our modules, pydantic schemas,
        # price and policy tables) lives as long as the process. Out of the collector's
        # reach it is no longer walked by every full collection: with our imports on top
        # of mitmproxy's, each such walk stalled all flows for ~40 ms (p99.9 of 50 ms at
        # c=8; 25 ms frozen) and cost 2 % of throughput. Bare mitmdump gains no throughput
        # from it (measured), so it takes back only what loading us costs. Once per process
        # (mitmproxy calls `running` again when it reloads the script), garbage collected first.
        global _frozen
        if not _frozen:
            _frozen = True
            gc.collect()
            gc.freeze()

    def done(self) -> Awaitable[None] | None:
        """At shutdown mitmproxy still answers the calls in flight after `done`: their
        traces and charges would find the writer and the spend store closed. So the concerns
        are done once those calls are (up to SHUTDOWN_GRACE seconds); at once when none is.
        Calls that come meanwhile or later are refused (the Recorder): they could not be
        traced or charged."""
        self.shared.stopping = True
        if self.shared.open_calls():
            return asyncio.get_running_loop().create_task(self._done_once_answered())  # awaited by mitmproxy; runs alone on a reload
        self._lifecycle("done")
        return None

    async def _done_once_answered(self) -> None:
        """Wait while calls still end (mitmproxy cancels some connections at shutdown: those
        never do), then record the rest as cut short by the shutdown, with what came of
        them (a stream whose last event came is answered all the same), and be done."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_GRACE
        open_calls, still_since = self.shared.open_calls(), loop.time()
        while open_calls and loop.time() < deadline and loop.time() - still_since < SHUTDOWN_STALL:
            await asyncio.sleep(0.01)
            if (now_open := self.shared.open_calls()) < open_calls:
                open_calls, still_since = now_open, loop.time()
        for flow, exchange in list(self.shared.exchanges.items()):
            if not exchange.done:
                error, flow.error = flow.error, flow.error or FlowError("llm-mitm: the proxy shut down before this call ended")
                try:
                    self._each("error", flow)
                finally:
                    flow.error = error  # the flow's own (the script may be reloading while it goes on)
        self._lifecycle("done")

    @command.command("llm.stats")
    def llm_stats(self) -> str:
        """Spend and counts per API key and model since the proxy started."""
        return self.stats.llm_stats()


def _failed(name: str, hook: Callable[..., Any]) -> None:
    logger.exception("llm-mitm: %s failed in %s", name, getattr(hook, "__self__", hook).__class__.__name__)


def build() -> list[object]:
    return [LLMMitm()]


def unhandled_hooks(namespace: Mapping[str, Any]) -> dict[str, None]:
    """Each mitmproxy hook a script module does not define, as None (mitmproxy skips a
    None hook). mitmproxy counts the script module as an addon too and asks it for the hook
    of every event, eight per request; on Python 3.11 each name the module lacks costs an
    AttributeError, formatted and thrown away: 0.9 % of bare mitmdump's own instructions
    per request (callgrind), more than a third of what an addon doing nothing costs."""
    return {name: None for name in hooks.all_hooks if name not in namespace and name not in _DEPRECATED_HOOKS}


# Hooks mitmproxy warns about at every start when a script module has the name at all.
_DEPRECATED_HOOKS = frozenset({"add_log"})


__all__ = [
    "CachedContents",
    "Firewall",
    "InputFiles",
    "LLMMitm",
    "Meter",
    "Organization",
    "OutputRedaction",
    "QuotaAddon",
    "Recorder",
    "Replay",
    "Safety",
    "Scope",
    "Settings",
    "Shared",
    "Stats",
    "StreamUsage",
    "Tracer",
    "Tunnels",
    "build",
    "concerns",
    "unhandled_hooks",
]
