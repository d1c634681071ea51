"""Host + path -> provider, API operation and deployment. Pure: no I/O, no mitmproxy.

Host patterns are anchored: `api.openai.com` never matches `api.openai.com.evil.net`.
A pattern without a port matches any port; `*.` matches one or more labels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote

from llm_mitm.config import ApiKind, ProviderConfig
from llm_mitm.memo import Memo

_LABELS = r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*"


def host_regex(pattern: str) -> str:
    """An anchored regex over `host:port` for one configured host pattern."""
    host, port = _split_port(pattern.lower())
    if host.startswith("*."):
        host_re = _LABELS + re.escape(host[1:])
    elif host.startswith("["):  # mitmproxy writes an IPv6 address without its brackets (`::1:443`) where it decides what to intercept
        host_re = f"(?:{re.escape(host)}|{re.escape(host[1:-1])})"
    else:
        host_re = re.escape(host)
    port_re = re.escape(port) if port else r"\d+"
    return rf"^{host_re}\.?:{port_re}$"  # `api.openai.com.` (fully qualified) is the same host


def _split_port(pattern: str) -> tuple[str, str | None]:
    if pattern.startswith("["):
        end = pattern.index("]")
        rest = pattern[end + 1 :]
        return pattern[: end + 1], rest[1:] if rest.startswith(":") else None
    host, sep, port = pattern.rpartition(":")
    return (host, port) if sep else (pattern, None)


def split_host(name: str, default_port: int) -> tuple[str, int]:
    """`host[:port]` (a Host header, a server name) as host and port."""
    host, port = _split_port(name)
    return (host.strip("[]"), int(port)) if port and port.isascii() and port.isdigit() else (name.strip("[]"), default_port)


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    api: ApiKind
    upgrade_http: bool


@dataclass(frozen=True, slots=True)
class Route:
    """What a request is: who serves it, which operation, and Azure's deployment."""

    provider: str
    api: ApiKind
    operation: str
    deployment: str | None = None
    api_version: str | None = None
    # The path goes past a generating operation's endpoint, to a stored object or a part of
    # one (`/responses/{id}`, `.../cancel`, `/responses/input_tokens`, `/chat/completions/{id}`):
    # read, cancelled, counted or updated there, never generated, so never charged.
    subresource: bool = False
    # A query parameter that says what runs (`model`, `deployment`, `api-version`) given
    # more than once, with different values: servers differ on which one counts.
    repeated: str | None = None
    # An endpoint that runs a model beyond those billed by tokens (`generates`): its default
    # where the call names none (images, audio, moderations, realtime) or an assistant's
    # stored one (a thread's run).
    runs_model: bool = False
    # The path asks for a stream, not the body (Gemini's `:streamGenerateContent`, Claude's
    # `:streamRawPredict` on Vertex AI).
    streams: bool = False

    def azure_takes_2024_09_fields(self) -> bool:
        """Whether the call's API takes what Azure's api-version 2024-09-01-preview brought
        (`stream_options`, `max_completion_tokens`): every API but Azure's older versions (an
        older one answers 400 "Unrecognized request argument"); its v1 API, with none, does."""
        version = self.api_version
        return self.api != "azure" or not version or not version[:4].isdigit() or version[:10] >= "2024-09-01"

    def runs_a_model(self, method: str) -> bool:
        """Runs a model, named in the call or not: a POST to a generating endpoint or to one
        of `runs_model`, or the realtime WebSocket's GET (an allow list must see which)."""
        return self.generates(method) or (self.runs_model and (method == "POST" or (method == "GET" and self.operation == "realtime")))

    def generates(self, method: str) -> bool:
        """Asks a model for new output (what the APIs bill): a POST to a generating
        operation's endpoint, or to one of its actions that runs the model (`/responses/compact`)."""
        return method == "POST" and self.operation in GENERATING_ENDPOINTS and not self.subresource


def shapes_of(api: str, operation: str) -> str:
    """Whose shapes a call's bodies and streams take: its API's, but for Anthropic's OpenAI
    SDK compatibility endpoint (`/v1/chat/completions`), which speaks OpenAI's, and for
    Anthropic's Messages API served by a server of your own (vLLM, llama.cpp, Ollama and
    LiteLLM serve `/v1/messages`), which speaks Anthropic's (a shapes probe: read as OpenAI's,
    its cache tokens were dropped and its streams lost their input and their end)."""
    if api == "anthropic" and operation == "chat.completions":
        return "openai"
    return "anthropic" if operation in ANTHROPIC_OPERATIONS else api


ANTHROPIC_OPERATIONS = frozenset(("messages", "messages.batches", "messages.count_tokens"))  # Anthropic's, whoever serves them


def _specificity(pattern: str) -> tuple[bool, bool, int]:
    """Sorts the most specific pattern first, so that it takes the host: a host of your own
    (`eu.openai.azure.com`) before a wildcard (Azure's `*.openai.azure.com`), a pattern
    with a port before one without, a longer wildcard before a shorter one."""
    host, port = _split_port(pattern.lower())
    return host.startswith("*."), port is None, -len(host)


class ProviderMatcher:
    """Finds the configured provider for a destination host and port."""

    def __init__(self, providers: Mapping[str, ProviderConfig]) -> None:
        self._entries: list[tuple[re.Pattern[str], Provider]] = []
        self.allow_hosts: list[str] = []
        claims = [(pattern, Provider(name=name, api=config.api, upgrade_http=config.upgrade_http))
                  for name, config in providers.items() for pattern in config.hosts]
        for pattern, provider in sorted(claims, key=lambda claim: _specificity(claim[0])):
            regex = host_regex(pattern)
            self.allow_hosts.append(regex)
            self._entries.append((re.compile(regex, re.IGNORECASE), provider))
        self._routes: Memo[tuple[str, int, str], Route | None] = Memo(self._route)

    def match(self, host: str, port: int) -> Provider | None:
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        target = f"{host.lower().removesuffix('.')}:{port}"
        for regex, provider in self._entries:
            if regex.match(target):
                return provider
        return None

    def route(self, host: str, port: int, path: str) -> Route | None:
        return self._routes((host, port, path))

    def _route(self, destination: tuple[str, int, str]) -> Route | None:
        host, port, path = destination
        provider = self.match(host, port)
        if provider is None:
            return None
        return route_for(provider, path)


def route_for(provider: Provider, path: str) -> Route:
    """Classify a request path (query included) for a provider's API."""
    path_only, _, query = path.partition("#")[0].partition("?")  # a fragment is no part of what a server reads
    segments = _segments(path_only)
    params = parse_qs(query, keep_blank_values=True) if query else {}
    repeated = next((name for name in _RUNS_WHAT if len(set(params.get(name, ()))) > 1), None)
    if on_vertex := _publisher_model_on_vertex(segments):
        operation, model, streams = on_vertex
        return Route(provider.name, provider.api, operation, model, repeated=repeated, streams=streams)
    # Claude on Azure AI Foundry: Anthropic's own API under `/anthropic` (its bodies, streams,
    # errors and limits are Anthropic's: read as OpenAI's, a stream was rebuilt as nothing).
    claude_on_azure = provider.api == "azure" and bool(segments) and segments[0].lower() == "anthropic"  # Azure's paths match in any case
    if provider.api == "anthropic" or claude_on_azure:
        segments = _after_version([segment.lower() for segment in segments[1:]] if claude_on_azure else segments)
        operation = _anthropic_operation(segments)
        return Route(provider.name, "anthropic", operation, subresource=_subresource(operation, segments), repeated=repeated)
    if provider.api == "azure":
        deployment, rest = _azure_parts(segments)
        rest = _openai_segments(rest)
        operation = _openai_operation(rest)
        if deployment is None and operation == "realtime":  # realtime names it in the query; elsewhere the body's model counts
            deployment = params.get("deployment", [None])[0] or None
        return Route(provider.name, provider.api, operation, deployment, params.get("api-version", [None])[0] or None,
                     _subresource(operation, rest), repeated, _runs_model(rest))
    segments = _openai_segments(_after_version(segments))
    if (cache := _cached_contents(segments)) is not None:
        return Route(provider.name, provider.api, "cached_contents", subresource=cache, repeated=repeated)
    if gemini := _gemini_call(segments):
        operation, model, streams = gemini
        return Route(provider.name, provider.api, operation, model, repeated=repeated, runs_model=True, streams=streams)
    deployment = None
    if len(segments) > 2 and segments[0] in ("deployments", "engines"):
        # The model named in the path, as LiteLLM's proxy serves Azure's and OpenAI's old paths:
        # it runs whatever the body's says (a firewall probe: a denied one passed so). Its
        # name may hold slashes (`openai/o1-pro`): it ends where an operation's path begins.
        start = next((index for index in range(2, len(segments)) if segments[index] in _MODEL_PATH_ENDS), None)
        if start is not None:
            deployment, segments = "/".join(segments[1:start]), segments[start:]
    operation = _openai_operation(segments)
    return Route(provider.name, provider.api, operation, deployment, subresource=_subresource(operation, segments), repeated=repeated,
                 runs_model=_runs_model(segments))


# Claude on Vertex AI, as gateways pass it through (LiteLLM's `/vertex_ai/v1/...`): the model
# in the path (`publishers/anthropic/models/claude-sonnet-4-5@20250929:streamRawPredict`),
# Anthropic's Messages API in the body and the answer; `count-tokens:rawPredict` counts for
# the model the body names. Read as Gemini's `predict`, a call had no usage nor cost and its
# stream was read as chat chunks (a shapes probe).
_CLAUDE_ON_VERTEX = {"rawpredict": "messages", "streamrawpredict": "messages", "counttokens": "messages.count_tokens"}
_VERTEX_COUNT_TOKENS = "count-tokens"
# The other partners' models on Vertex AI (Mistral's `mistral-large-2411`, AI21's
# `jamba-1.5-large@001`): OpenAI's chat completions in the body and the answer, the model in
# the path. Read as Gemini's `predict`, their calls had no usage nor cost (budgets neither
# held nor charged them) and their streams were not read.
_PARTNER_ON_VERTEX = {"rawpredict": "chat.completions", "streamrawpredict": "chat.completions"}


def _publisher_model_on_vertex(segments: list[str]) -> tuple[str, str | None, bool] | None:
    """(operation, model, whether the path asks for a stream) of a call to a partner's model
    on Vertex AI (`.../publishers/{partner}/models/{model}:{action}`): Claude's, or another
    partner's raw predictions. None for any other path (Google's own models are Gemini's)."""
    if len(segments) < 4 or [segment.lower() for segment in segments[-4:-1:2]] != ["publishers", "models"]:
        return None
    publisher = segments[-3].lower()
    if publisher == "google":
        return None
    model, action = _model_and_action(segments[-1])
    operation = (_CLAUDE_ON_VERTEX if publisher == "anthropic" else _PARTNER_ON_VERTEX).get(action)
    if operation is None:
        return None
    if publisher == "anthropic" and model.lower() == _VERTEX_COUNT_TOKENS:
        return "messages.count_tokens", None, False
    return operation, model, action == "streamrawpredict"


def _model_and_action(segment: str) -> tuple[str, str]:
    """`gemini-2.5-pro:streamGenerateContent` -> the model, and the action lower-cased (as
    Google's servers match it)."""
    model, _, action = segment.rpartition(":")
    return model, action.lower()


# Gemini's own API, which gateways pass through (LiteLLM's `/gemini/v1beta/...`) and
# Google serves beside its OpenAI-compatible endpoint: the model in the path, then the
# action (`models/gemini-2.5-pro:streamGenerateContent`, Vertex's
# `projects/.../publishers/google/models/...:predict`). Read as OpenAI's, each was
# `models`, a call no rule applied to (a review: a denied model and forbidden phrases passed).
_GEMINI_ACTIONS = {
    "generatecontent": "generate_content", "streamgeneratecontent": "generate_content", "generateanswer": "generate_content",
    "counttokens": "count_tokens", "embedcontent": "embed_content", "batchembedcontents": "embed_content",
    "predict": "predict", "predictlongrunning": "predict", "rawpredict": "predict", "streamrawpredict": "predict",
    "batchgeneratecontent": "batch_generate_content", "asyncbatchembedcontent": "batch_generate_content",
}
# Where the model is named: `models/{m}`, a tuned model's `tunedModels/{m}`, and Vertex's
# `endpoints/{id}`, an endpoint that runs whatever model is deployed to it (no name here).
_GEMINI_MODELS = frozenset(("models", "tunedmodels", "endpoints"))


def _gemini_call(segments: list[str]) -> tuple[str, str | None, bool] | None:
    """(operation, model, whether the path asks for a stream) of a call to Gemini's own API,
    or None for any other path."""
    if len(segments) < 2 or ":" not in segments[-1] or (kind := segments[-2].lower()) not in _GEMINI_MODELS:
        return None
    model, action = _model_and_action(segments[-1])
    operation = _GEMINI_ACTIONS.get(action, "gemini")  # an action not known here still runs the model named
    named = None if kind == "endpoints" else model if kind == "models" else f"{segments[-2]}/{model}"
    return operation, named, action.startswith("stream")


def _cached_contents(segments: list[str]) -> bool | None:
    """Whether a path is one of Gemini's cached contents (`cachedContents/{id}`, Vertex's
    under its project and location), not the collection; None for any other path."""
    start = 0 if segments[:1] == ["cachedContents"] else 4 if [s.lower() for s in segments[0:4:2]] == ["projects", "locations"] else None
    if start is None or segments[start : start + 1] != ["cachedContents"]:
        return None
    return len(segments) > start + 1


# The endpoints past those billed by tokens that run a model, its default where a call names
# none: images, videos (a remix runs the model its video was made with), speech and transcription, moderation, the
# realtime WebSocket (`/realtime`), its WebRTC calls and sessions, transcription sessions;
# and a thread's run, the assistant's stored model (`*`: an id).
_RUNS_MODEL = frozenset((
    ("images", "generations"), ("images", "edits"), ("images", "variations"), ("videos",),
    ("audio", "speech"), ("audio", "transcriptions"), ("audio", "translations"), ("moderations",),
    ("realtime",), ("realtime", "calls"), ("realtime", "client_secrets"), ("realtime", "sessions"), ("realtime", "transcription_sessions"),
    ("threads", "runs"), ("threads", "*", "runs"),
    ("realtime", "calls", "*", "accept"),  # a SIP call accepted: its session runs a model, the API's default where it names none
))


# Where an operation's path begins after a model named in the path.
_MODEL_PATH_ENDS = frozenset(("chat", "completions", "embeddings", "responses", "images", "audio", "moderations", "messages"))


def _runs_model(segments: list[str]) -> bool:
    """The path's shape, its id (the second segment of three, the third of four) as `*`."""
    if len(segments) == 3:
        return (segments[0], "*", segments[2]) in _RUNS_MODEL
    if len(segments) == 4:
        return (segments[0], segments[1], "*", segments[3]) in _RUNS_MODEL
    return tuple(segments) in _RUNS_MODEL


_RUNS_WHAT = ("model", "deployment", "api-version")  # query parameters that say what runs


def _segments(path: str) -> list[str]:
    """The path's segments as the server resolves them: percent-decoded, with `.` and `..`
    applied, so that `/v1/chat/completions/../../embeddings` is embeddings and
    `deployments/gpt%2D4o` is gpt-4o to the policy as it is to the API. An encoded slash
    (`chat%2Fcompletions`) or a backslash separates segments, as Werkzeug, uvicorn and IIS
    read them (a firewall probe: to the proxy it was no operation it knew, so no rule
    for chat applied, and a server of your own ran a chat completion)."""
    out: list[str] = []
    for raw in path.split("/"):
        decoded = unquote(raw) if "%" in raw else raw
        for segment in _SEPARATORS.split(decoded) if "/" in decoded or "\\" in decoded else (decoded,):
            if segment == "..":
                if out:
                    out.pop()
            elif segment and segment != ".":
                out.append(segment)
    return out


_SEPARATORS = re.compile(r"[/\\]")


def _after_version(segments: list[str]) -> list[str]:
    """Segments after `/v1` (compatible servers mount it under prefixes like /api/v1)."""
    for index, segment in enumerate(segments):
        if re.fullmatch(r"v\d+(?:beta\d*)?", segment):
            return segments[index + 1 :]
    return segments


def _azure_parts(segments: list[str]) -> tuple[str | None, list[str]]:
    """The deployment and the operation's segments. Azure matches its paths without regard
    to case (`/OpenAI/Deployments/...`); a deployment's name is kept as written."""
    if len(segments) > 3 and [segment.lower() for segment in segments[:2]] == ["api", "projects"]:  # a Foundry project's endpoint
        segments = segments[3:]
    lowered = [segment.lower() for segment in segments]
    if lowered[:1] == ["models"] and len(segments) > 1:  # Azure AI Foundry's model inference (`/models/chat/completions`)
        return None, lowered[1:]
    if lowered[:1] != ["openai"]:
        return None, _after_version(lowered)
    rest = segments[1:]
    if len(rest) >= 2 and rest[0].lower() == "deployments":
        return rest[1], [segment.lower() for segment in rest[2:]]
    rest = [segment.lower() for segment in rest]
    return None, rest[1:] if rest[:1] == ["v1"] else rest


# The operations named with a dot; any other is a path's first segment (`files`, `batches`).
DOTTED_OPERATIONS = ("chat.completions", "messages.batches", "messages.count_tokens")
_OPERATION_SEGMENT = re.compile(r"[a-z_]+")


def names_an_operation(name: str) -> bool:
    """Whether `name` is what a route's operation can be (allowed_operations is checked)."""
    name = name.lower()
    return name in DOTTED_OPERATIONS or _OPERATION_SEGMENT.fullmatch(name) is not None


_OPENAI_OPERATIONS = {
    ("chat", "completions"): "chat.completions",
    ("completions",): "completions",
    ("embeddings",): "embeddings",
    ("responses",): "responses",
    ("images",): "images",
    ("audio",): "audio",
    ("moderations",): "moderations",
    ("models",): "models",
}


def _openai_segments(segments: list[str]) -> list[str]:
    """Those of the operation: an API mounted after the version without its mount: Gemini's
    `/v1beta/openai/...`, Vertex AI's `projects/{p}/locations/{l}/endpoints/{id}/...` (`openapi`,
    or an endpoint a model is deployed to: read as no operation, a chat call there had no usage
    nor cost)."""
    if segments[:1] == ["openai"]:
        return segments[1:]
    if len(segments) > 6 and [segment.lower() for segment in segments[0:6:2]] == ["projects", "locations", "endpoints"]:
        return segments[6:]
    return segments


# The operations whose calls run a model and are billed by its tokens, with the segments of
# each one's endpoint (a path with more goes past it) and the actions past it that run the
# model all the same (`POST /v1/responses/compact` summarises a conversation).
GENERATING_ENDPOINTS = {"chat.completions": 2, "completions": 1, "embeddings": 1, "responses": 1, "messages": 1, "generate_content": 2}
_GENERATING_ACTIONS = {"responses": (("compact",),)}


def _subresource(operation: str, segments: list[str]) -> bool:
    length = GENERATING_ENDPOINTS.get(operation)
    return length is not None and len(segments) > length and tuple(segments[length:]) not in _GENERATING_ACTIONS.get(operation, ())


def _openai_operation(segments: list[str]) -> str:
    if not segments:
        return "other"
    if segments[0] == "messages":  # Anthropic's Messages API, which servers of your own serve too (LiteLLM, vLLM)
        return _anthropic_operation(segments)
    if tuple(segments[:2]) in _OPENAI_OPERATIONS:
        return _OPENAI_OPERATIONS[tuple(segments[:2])]
    if (segments[0],) in _OPENAI_OPERATIONS:
        return _OPENAI_OPERATIONS[(segments[0],)]
    return segments[0] if _OPERATION_SEGMENT.fullmatch(segments[0]) else "other"


def _anthropic_operation(segments: list[str]) -> str:
    if not segments:
        return "other"
    if segments[0] == "messages":
        if segments[1:2] == ["count_tokens"]:
            return "messages.count_tokens"
        if segments[1:2] == ["batches"]:
            return "messages.batches"
        return "messages"
    if segments[0] == "complete":
        return "completions"
    if segments[:2] == ["chat", "completions"]:  # the OpenAI SDK compatibility endpoint: OpenAI's shapes
        return "chat.completions"
    return segments[0] if _OPERATION_SEGMENT.fullmatch(segments[0]) else "other"


# The paths of calls that run a file (`input_file_path`): the API's base, then the call.
_FILE_RUNNERS = re.compile(r"(?i)(.*/)(?:batches|evals/[^/]+/runs)/*")


def input_file_path(path: str, file_id: str) -> str | None:
    """Where the API serves a file a call runs, from the path of that call: a batch
    created at `/v1/batches` or an eval run at `/v1/evals/{id}/runs` reads
    `/v1/files/{id}/content`, Azure's query (`api-version`) kept. None for any other path."""
    path, mark, query = path.partition("?")
    found = _FILE_RUNNERS.fullmatch(path)
    if found is None:
        return None
    return f"{found.group(1)}files/{quote(file_id, safe='')}/content{mark}{query}"
