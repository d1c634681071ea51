"""Host + path -> provider and operation."""

from __future__ import annotations

import re

import pytest

from llm_mitm.config import default_config, parse_config
from llm_mitm.providers import DOTTED_OPERATIONS, Provider, ProviderMatcher, route_for, shapes_of


@pytest.fixture
def matcher() -> ProviderMatcher:
    config = parse_config({"providers": {"vllm": {"api": "openai", "hosts": ["localhost:8000"]}}}, "test")
    return ProviderMatcher(config.enabled_providers)


@pytest.mark.parametrize(
    ("host", "port", "provider"),
    [
        ("api.openai.com", 443, "openai"),
        ("API.OpenAI.com", 443, "openai"),
        ("api.openai.com", 80, "openai"),
        ("myres.openai.azure.com", 443, "azure"),
        ("a.b.openai.azure.com", 443, "azure"),
        ("eastus.cognitiveservices.azure.com", 443, "azure"),
        ("api.anthropic.com", 443, "anthropic"),
        ("localhost", 8000, "vllm"),
        ("localhost", 8001, None),
        ("api.openai.com.", 443, "openai"),  # fully qualified: the same host
        ("api.openai.com.evil.net", 443, None),
        ("evilapi.openai.com", 443, None),
        ("xapi.anthropic.com", 443, None),
        ("openai.azure.com", 443, None),
        ("example.com", 443, None),
    ],
)
def test_hosts_are_matched_anchored(matcher: ProviderMatcher, host: str, port: int, provider: str | None) -> None:
    found = matcher.match(host, port)
    assert (found.name if found else None) == provider


def test_the_most_specific_host_pattern_takes_the_host() -> None:
    """A resource of your own under Azure's wildcard, a port under a host: yours took no
    call (the built-in came first), and its per-provider policy never applied."""
    config = parse_config({"providers": {
        "eu-gateway": {"api": "azure", "hosts": ["eu.openai.azure.com"]},
        "deep": {"api": "azure", "hosts": ["*.eu.openai.azure.com"]},
        "local-openai": {"api": "openai", "hosts": ["api.openai.com:8443"]},
    }}, "test")
    matcher = ProviderMatcher(config.enabled_providers)
    assert matcher.match("eu.openai.azure.com", 443).name == "eu-gateway"
    assert matcher.match("x.eu.openai.azure.com", 443).name == "deep"
    assert matcher.match("us.openai.azure.com", 443).name == "azure"
    assert matcher.match("api.openai.com", 8443).name == "local-openai"
    assert matcher.match("api.openai.com", 443).name == "openai"


def test_allowed_operations_are_names_an_operation_can_have() -> None:
    config = parse_config({"policy": {"allowed_operations": ["chat.completions", "Messages.Count_Tokens", "files", "responses", "chat.*"]}}, "test")
    assert config.policy.allowed_operations[-1] == "chat.*"
    # each of the dotted names is one a route gets
    matcher = ProviderMatcher(default_config().enabled_providers)
    assert {matcher.route("api.openai.com", 443, "/v1/chat/completions").operation,
            matcher.route("api.anthropic.com", 443, "/v1/messages/batches").operation,
            matcher.route("api.anthropic.com", 443, "/v1/messages/count_tokens").operation} == set(DOTTED_OPERATIONS)


def test_allow_hosts_regexes_are_anchored(matcher: ProviderMatcher) -> None:
    def allowed(target: str) -> bool:
        return any(re.search(rx, target, re.IGNORECASE) for rx in matcher.allow_hosts)

    assert allowed("api.openai.com:443")
    assert allowed("api.openai.com.:443")
    assert allowed("localhost:8000")
    assert not allowed("api.openai.com.evil.net:443")
    assert not allowed("localhost:80001")
    assert not allowed("127.0.0.1:443")


@pytest.mark.parametrize(
    ("host", "path", "operation", "deployment"),
    [
        ("api.openai.com", "/v1/chat/completions", "chat.completions", None),
        ("api.openai.com", "/v1/completions", "completions", None),
        ("api.openai.com", "/v1/embeddings", "embeddings", None),
        ("api.openai.com", "/v1/responses", "responses", None),
        ("api.openai.com", "/v1/responses/resp_1/input_items", "responses", None),
        ("api.openai.com", "/v1/images/generations", "images", None),
        ("api.openai.com", "/v1/audio/transcriptions", "audio", None),
        ("api.openai.com", "/v1/moderations", "moderations", None),
        ("api.openai.com", "/v1/models", "models", None),
        ("api.openai.com", "/v1/models/gpt-4o", "models", None),
        ("api.openai.com", "/v1/files", "files", None),
        ("api.openai.com", "/", "other", None),
        ("r.openai.azure.com", "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21", "chat.completions", "prod-4o"),
        ("r.openai.azure.com", "/openai/deployments/emb/embeddings?api-version=2024-10-21", "embeddings", "emb"),
        ("r.openai.azure.com", "/openai/v1/chat/completions", "chat.completions", None),
        ("r.openai.azure.com", "/openai/v1/responses", "responses", None),
        ("r.openai.azure.com", "/openai/responses?api-version=2025-04-01-preview", "responses", None),
        ("api.anthropic.com", "/v1/messages", "messages", None),
        ("api.anthropic.com", "/v1/messages/count_tokens", "messages.count_tokens", None),
        ("api.anthropic.com", "/v1/messages/batches", "messages.batches", None),
        ("api.anthropic.com", "/v1/complete", "completions", None),
        ("api.anthropic.com", "/v1/chat/completions", "chat.completions", None),  # the OpenAI SDK compatibility endpoint
        ("localhost", "/v1/chat/completions", "chat.completions", None),
        # As the server resolves the path: percent-decoded, dot segments applied (review).
        ("r.openai.azure.com", "/openai/deployments/gpt%2D4o/chat/completions?api-version=1", "chat.completions", "gpt-4o"),
        ("api.openai.com", "/v1/chat/completions/../../embeddings", "embeddings", None),
        ("api.openai.com", "/v1/chat/completions/%2e%2e/%2e%2e/embeddings", "embeddings", None),
        ("api.openai.com", "/v1/./chat//completions", "chat.completions", None),
        ("r.openai.azure.com", "/openai/realtime?api-version=2024-10-01-preview&deployment=rt-4o", "realtime", "rt-4o"),
        # Only realtime takes its deployment from the query: a v1 call's model is its body's (probe).
        ("r.openai.azure.com", "/openai/v1/chat/completions?deployment=prod-4o", "chat.completions", None),
        ("r.openai.azure.com", "/openai/deployments/prod-4o/chat/completions?deployment=other", "chat.completions", "prod-4o"),
        ("localhost", "/v1beta/openai/chat/completions", "chat.completions", None),  # Gemini's mount
        ("r.openai.azure.com", "/OpenAI/Deployments/Prod-4o/Chat/Completions?api-version=1", "chat.completions", "Prod-4o"),
        ("localhost", "/v1/organization/usage/completions", "organization", None),
        # OpenAI's data residency endpoints and Azure AI Foundry's resources (a secrets probe: they passed as tunnels)
        ("eu.api.openai.com", "/v1/chat/completions", "chat.completions", None),
        ("us.api.openai.com", "/v1/responses", "responses", None),
        ("r.services.ai.azure.com", "/models/chat/completions?api-version=2024-05-01-preview", "chat.completions", None),
        ("r.services.ai.azure.com", "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21", "chat.completions", "prod-4o"),
        ("r.services.ai.azure.com", "/openai/v1/responses", "responses", None),
        ("r.services.ai.azure.com", "/anthropic/v1/messages", "messages", None),  # Claude, in Anthropic's API
        # Azure matches every segment in any case (a firewall probe: these were no operation, unchecked)
        ("r.services.ai.azure.com", "/Models/Chat/Completions?api-version=2024-05-01-preview", "chat.completions", None),
        ("r.services.ai.azure.com", "/anthropic/V1/Messages/Batches", "messages.batches", None),
        # a Foundry project's endpoint, as the AzureOpenAI client builds its paths (a firewall probe: operation `api`)
        ("r.services.ai.azure.com", "/api/projects/p1/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21", "chat.completions", "prod-4o"),
        # LiteLLM's proxy serves Azure's and OpenAI's old paths: the model in the path runs (a firewall probe)
        ("localhost", "/openai/deployments/o1-pro/chat/completions", "chat.completions", "o1-pro"),
        ("localhost", "/engines/o1-pro/chat/completions", "chat.completions", "o1-pro"),
        ("localhost", "/engines/openai/o1-pro/chat/completions", "chat.completions", "openai/o1-pro"),  # a router's name (a review)
        ("localhost", "/openai/deployments/anthropic/claude-opus-4/completions", "completions", "anthropic/claude-opus-4"),
        ("localhost", "/deployments/d1/unknown/thing", "deployments", None),  # no operation after it: the body's model is judged
        ("localhost", "/v1/deployments", "deployments", None),
    ],
)
def test_operations(matcher: ProviderMatcher, host: str, path: str, operation: str, deployment: str | None) -> None:
    port = 8000 if host == "localhost" else 443
    route = matcher.route(host, port, path)
    assert route is not None
    assert route.operation == operation
    assert route.deployment == deployment


@pytest.mark.parametrize("path", ["/anthropic/v1/messages", "/Anthropic/v1/messages?beta=true"])
def test_claude_on_azure_speaks_anthropics_api(matcher: ProviderMatcher, path: str) -> None:
    route = matcher.route("r.services.ai.azure.com", 443, path)
    assert route is not None and (route.provider, route.api, route.operation) == ("azure", "anthropic", "messages")


def test_azure_api_version_is_kept(matcher: ProviderMatcher) -> None:
    route = matcher.route("r.openai.azure.com", 443, "/openai/deployments/d/chat/completions?api-version=2024-10-21")
    assert route is not None and route.api_version == "2024-10-21" and route.api == "azure"


@pytest.mark.parametrize(
    ("host", "path", "repeated"),
    [
        ("api.openai.com", "/v1/realtime?model=gpt-realtime&model=gpt-4o-realtime-preview", "model"),
        ("api.openai.com", "/v1/realtime?model=gpt-realtime&model=gpt-realtime", None),  # the same twice says one thing
        ("api.openai.com", "/v1/realtime?model=gpt-realtime&mod%65l=other", "model"),  # as the server decodes it
        ("r.openai.azure.com", "/openai/realtime?api-version=2024-10-01-preview&deployment=a&deployment=b", "deployment"),
        ("r.openai.azure.com", "/openai/deployments/d/chat/completions?api-version=2024-02-01&api-version=2024-10-21", "api-version"),
        ("r.openai.azure.com", "/openai/deployments/d/chat/completions?api-version=2024-10-21&x=1&x=2", None),
        ("api.anthropic.com", "/v1/messages?model=a&model=", "model"),
    ],
)
def test_a_parameter_saying_what_runs_given_twice_is_marked(matcher: ProviderMatcher, host: str, path: str, repeated: str | None) -> None:
    """Servers differ on which of two values counts (Starlette the last, Flask the first):
    the route says so, for the policy to refuse it (a firewall probe: the first was judged)."""
    route = matcher.route(host, 443, path)
    assert route is not None and route.repeated == repeated


@pytest.mark.parametrize(
    "path",
    ["/v1/chat%2Fcompletions", "/v1/chat%2fcompletions", "/v1/chat\\completions", "/v1/chat/completions#/../../embeddings",
     "/v1/embeddings%2F..%2F..%2Fchat/completions", "/v1/chat/completions#x?model=a&model=b"],
)
def test_a_path_is_read_as_servers_read_it(matcher: ProviderMatcher, path: str) -> None:
    """An encoded slash or a backslash separates segments (Werkzeug, uvicorn, IIS); a
    fragment is no part of the path (a firewall probe: these were other operations)."""
    route = matcher.route("api.openai.com", 443, path)
    assert route is not None and route.operation == "chat.completions" and route.repeated is None


def test_disabled_provider_is_not_matched() -> None:
    config = parse_config({"providers": {"openai": {"enabled": False}}}, "test")
    assert ProviderMatcher(config.enabled_providers).match("api.openai.com", 443) is None
    assert ProviderMatcher(default_config().enabled_providers).match("api.openai.com", 443) is not None


def test_a_port_that_is_not_a_number_is_no_port() -> None:
    from llm_mitm.providers import split_host

    assert split_host("api.openai.com:²", 443) == ("api.openai.com:²", 443)  # "²".isdigit(), but int() refuses it
    assert split_host("api.openai.com:8443", 443) == ("api.openai.com", 8443)


@pytest.mark.parametrize(
    ("path", "operation", "model"),
    [
        ("/v1beta/models/gemini-2.5-pro:generateContent", "generate_content", "gemini-2.5-pro"),
        ("/gemini/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", "generate_content", "gemini-2.5-pro"),
        ("/v1beta/models/gemini%2D2.5-pro:GenerateContent", "generate_content", "gemini-2.5-pro"),
        ("/v1beta/tunedModels/my-tune:generateContent", "generate_content", "tunedModels/my-tune"),
        ("/v1/projects/p/locations/us/publishers/google/models/imagen-3:predict", "predict", "imagen-3"),
        ("/v1beta/models/text-embedding-004:batchEmbedContents", "embed_content", "text-embedding-004"),
        ("/v1beta/models/gemini-2.5-pro:batchGenerateContent", "batch_generate_content", "gemini-2.5-pro"),
        ("/v1beta/models/gemini-2.5-pro:someNewAction", "gemini", "gemini-2.5-pro"),
        ("/v1beta/models/gemini-2.5-pro", "models", None),
        ("/v1/models/gpt-4o", "models", None),
    ],
)
def test_geminis_own_api_names_its_model_in_the_path(path: str, operation: str, model: str | None) -> None:
    """As gateways pass it through: read as OpenAI's, each was `models`, where no rule applied."""
    route = route_for(Provider("gateway", "openai", upgrade_http=False), path)
    assert (route.operation, route.deployment) == (operation, model)
    assert route.runs_a_model("POST") is (model is not None)
    assert route.generates("POST") is (operation == "generate_content")
    assert route.streams is ("streamGenerateContent" in path)


def test_a_vertex_endpoint_runs_a_model_it_does_not_name() -> None:
    """`endpoints/{id}` runs whatever model is deployed there (a review: read as `projects`, no rule applied)."""
    route = route_for(Provider("gateway", "openai", upgrade_http=False), "/v1/projects/p/locations/us/endpoints/123:streamGenerateContent")
    assert (route.operation, route.deployment, route.streams) == ("generate_content", None, True)
    assert route.runs_a_model("POST")
    assert route_for(Provider("gateway", "openai", upgrade_http=False), "/v1beta/models/m:asyncBatchEmbedContent").operation == "batch_generate_content"


VERTEX = "/vertex_ai/v1/projects/p/locations/us-east5/publishers/anthropic/models/"


@pytest.mark.parametrize(
    ("path", "operation", "model", "streams"),
    [
        (VERTEX + "claude-sonnet-4-5@20250929:rawPredict", "messages", "claude-sonnet-4-5@20250929", False),
        (VERTEX + "claude-sonnet-4-5@20250929:streamRawPredict", "messages", "claude-sonnet-4-5@20250929", True),
        (VERTEX.removeprefix("/vertex_ai") + "claude-opus-4-1@20250805:STREAMRAWPREDICT", "messages", "claude-opus-4-1@20250805", True),
        (VERTEX + "count-tokens:rawPredict", "messages.count_tokens", None, False),  # the anthropic SDK's: the body names the model
        (VERTEX + "claude-sonnet-4-5@20250929:countTokens", "messages.count_tokens", "claude-sonnet-4-5@20250929", False),
    ],
)
@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_claude_on_vertex_is_anthropics_messages_api(path: str, operation: str, model: str | None, streams: bool, api: str) -> None:
    """The model in the path, Anthropic's Messages API in the body and the answer (a shapes
    probe: read as Gemini's `predict`, a call was never charged and its stream misread)."""
    route = route_for(Provider("litellm", api, upgrade_http=False), path)  # type: ignore[arg-type]
    assert (route.operation, route.deployment, route.streams) == (operation, model, streams)
    assert shapes_of(route.api, route.operation) == "anthropic"
    assert route.generates("POST") is (operation == "messages")  # a count of tokens is not charged
    assert route_for(Provider("litellm", api, upgrade_http=False), VERTEX.replace("anthropic", "google") + "gemini-2.5-pro:rawPredict").operation != "messages"  # type: ignore[arg-type]


VERTEX_PARTNERS = "/v1/projects/p/locations/us-central1/publishers/"


@pytest.mark.parametrize(
    ("path", "model", "streams"),
    [
        (VERTEX_PARTNERS + "mistralai/models/mistral-large-2411:rawPredict", "mistral-large-2411", False),
        (VERTEX_PARTNERS + "mistralai/models/mistral-large@2407:streamRawPredict", "mistral-large@2407", True),
        ("/vertex_ai" + VERTEX_PARTNERS + "ai21/models/jamba-1.5-large@001:RAWPREDICT", "jamba-1.5-large@001", False),
    ],
)
def test_partners_models_on_vertex_are_chat_completions(path: str, model: str, streams: bool) -> None:
    """Mistral's and AI21's models on Vertex AI take and answer OpenAI's chat completions,
    the model named in the path (read as Gemini's `predict`, no usage nor cost was read and a
    budget never charged them); Google's own `rawPredict` stays Gemini's."""
    route = route_for(Provider("gateway", "openai", upgrade_http=False), path)
    assert (route.operation, route.deployment, route.streams) == ("chat.completions", model, streams)
    assert shapes_of(route.api, route.operation) == "openai" and route.generates("POST")
    google = route_for(Provider("gateway", "openai", upgrade_http=False), VERTEX_PARTNERS + "google/models/gemini-2.0-flash-001:rawPredict")
    assert google.operation == "predict"
    assert route_for(Provider("gateway", "openai", upgrade_http=False), VERTEX_PARTNERS + "mistralai/models/m:predict").operation == "predict"


@pytest.mark.parametrize(
    ("path", "operation", "streams"),
    [
        ("/v1/projects/p/locations/us-central1/endpoints/openapi/chat/completions", "chat.completions", False),
        ("/v1beta1/Projects/p/Locations/global/Endpoints/openapi/chat/completions?x=1", "chat.completions", False),
        ("/v1/projects/p/locations/us-central1/endpoints/1234/embeddings", "embeddings", False),  # a model deployed there
        ("/v1/projects/p/locations/us-central1/endpoints/1234:streamGenerateContent", "generate_content", True),
    ],
)
def test_vertex_openai_endpoint_is_read_past_its_mount(path: str, operation: str, streams: bool) -> None:
    """Vertex AI's OpenAI-compatible endpoint (`projects/{p}/locations/{l}/endpoints/openapi`,
    the base URL Google gives the openai SDK) is read by the operation after it: read as
    `projects`, a chat call had no usage nor cost, and its stream's usage was not asked for."""
    route = route_for(Provider("vertex", "openai", upgrade_http=False), path)
    assert (route.operation, route.streams, route.subresource) == (operation, streams, False)
    assert route.generates("POST")


@pytest.mark.parametrize(
    ("path", "one"),
    [("/gemini/v1beta/cachedContents", False), ("/v1beta/cachedContents/abc", True), ("/v1/projects/p/locations/l/cachedContents", False),
     ("/v1/projects/p/locations/l/cachedContents/123", True)],
)
def test_gemini_cached_contents_are_an_operation_of_their_own(path: str, one: bool) -> None:
    """Where a cache is made (Gemini's API, Vertex's under a project and location): its
    answer names the cache a later call may run on."""
    route = route_for(Provider("gateway", "openai", upgrade_http=False), path)
    assert (route.operation, route.subresource) == ("cached_contents", one)
    assert not route.generates("POST")


@pytest.mark.parametrize(
    ("batch_path", "expected"),
    [
        ("/v1/batches", "/v1/files/file-a%2Fb/content"),
        ("/api/v1/batches/", "/api/v1/files/file-a%2Fb/content"),
        ("/openai/batches?api-version=2024-10-21", "/openai/files/file-a%2Fb/content?api-version=2024-10-21"),
        ("/OpenAI/Batches?api-version=1", "/OpenAI/files/file-a%2Fb/content?api-version=1"),
        ("/v1/batches/batch_1/cancel", None),
        ("/v1/mybatches", None),
        ("/v1/evals/eval_1/runs", "/v1/files/file-a%2Fb/content"),
        ("/openai/Evals/eval_1/Runs/?api-version=1", "/openai/files/file-a%2Fb/content?api-version=1"),
        ("/v1/evals/eval_1/runs/run_1", None),
        ("/v1/evals", None),
    ],
)
def test_where_a_file_a_call_runs_is_read(batch_path: str, expected: str | None) -> None:
    from llm_mitm.providers import input_file_path

    assert input_file_path(batch_path, "file-a/b") == expected


@pytest.mark.parametrize(
    ("host", "path", "generates"),
    [
        ("api.openai.com", "/v1/chat/completions", True),
        ("api.openai.com", "/v1/chat/completions/chatcmpl-1", False),  # a stored completion (read, updated)
        ("api.openai.com", "/v1/chat/completions/chatcmpl-1/messages", False),
        ("api.openai.com", "/v1/responses", True),
        ("api.openai.com", "/v1/responses/resp_1", False),
        ("api.openai.com", "/v1/responses/resp_1/cancel", False),
        ("api.openai.com", "/v1/responses/input_tokens", False),  # counted, not generated
        ("api.openai.com", "/v1/responses/compact", True),  # runs the model to summarise
        ("api.openai.com", "/v1/responses/compact/", True),
        ("api.openai.com", "/v1/embeddings", True),
        ("api.openai.com", "/v1/files", False),  # no model runs
        ("api.openai.com", "/v1/batches", False),
        ("localhost", "/v1beta/openai/responses/resp_1", False),
        ("localhost", "/v1beta/openai/chat/completions", True),
        ("r.openai.azure.com", "/openai/deployments/prod-4o/chat/completions?api-version=1", True),
        ("r.openai.azure.com", "/openai/responses/resp_1?api-version=1", False),
        ("r.openai.azure.com", "/openai/v1/responses/resp_1", False),
        ("api.anthropic.com", "/v1/messages", True),
        ("api.anthropic.com", "/v1/messages/count_tokens", False),
        ("api.anthropic.com", "/v1/messages/batches", False),
    ],
)
def test_only_a_post_that_runs_a_model_generates(matcher: ProviderMatcher, host: str, path: str, generates: bool) -> None:
    route = matcher.route(host, 8000 if host == "localhost" else 443, path)
    assert route is not None and route.generates("POST") is generates
    assert not route.generates("GET")
