"""config.yaml: defaults, merging, one-line errors naming the file and key."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel, ValidationError

from llm_mitm.config import (
    Config,
    ConfigError,
    check_trace_targets,
    default_config,
    load_config,
    resolve_config_path,
    trace_destination,
)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_cover_the_three_providers() -> None:
    config = default_config()
    assert set(config.enabled_providers) == {"openai", "azure", "anthropic"}
    assert config.providers["azure"].hosts == ["*.openai.azure.com", "*.cognitiveservices.azure.com", "*.services.ai.azure.com"]
    assert config.providers["openai"].hosts == ["api.openai.com", "eu.api.openai.com", "us.api.openai.com"]
    assert config.traces.destination == "traces.jsonl"


def test_user_provider_is_added_and_defaults_merge_key_by_key(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            "providers:\n  vllm:\n    api: openai\n    hosts: ['localhost:8000']\n  anthropic:\n    enabled: false\n",
        )
    )
    assert config.providers["vllm"].hosts == ["localhost:8000"]
    ports = "providers:\n  vllm:\n    api: openai\n    hosts: ['localhost:1', 'localhost:65535', '[::1]', '[::1]:8080']\n"
    assert load_config(write(tmp_path, ports)).providers["vllm"].hosts == ["localhost:1", "localhost:65535", "[::1]", "[::1]:8080"]
    assert config.providers["vllm"].upgrade_http is False
    assert "anthropic" not in config.enabled_providers
    assert config.providers["anthropic"].hosts == ["api.anthropic.com"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("providers:\n  vllm:\n    api: openaii\n    hosts: [x]\n", "providers.vllm.api: Input should be"),
        ("providers:\n  vllm:\n    api: openai\n", "providers.vllm.hosts: required key is missing"),
        ("providers:\n  vllm:\n    api: openai\n    hosts: ['a b']\n", "providers.vllm.hosts: invalid host pattern 'a b'"),
        ("providers:\n  vllm:\n    api: openai\n    hosts: ['localhost:99999']\n", "providers.vllm.hosts: invalid host pattern 'localhost:99999': port 99999 is not in 1..65535"),
        ("providers:\n  vllm:\n    api: openai\n    hosts: ['[::1]:0']\n", "providers.vllm.hosts: invalid host pattern '[::1]:0': port 0 is not in 1..65535"),
        ("traces:\n  destinaton: x\n", "traces.destinaton: unknown key"),
        ("traces:\n  bodies: some\n", "traces.bodies: Input should be 'full', 'metadata' or 'none'"),
        ("redaction:\n  patterns: ['(']\n", "redaction.patterns: invalid regular expression '('"),
        # valid, but they would wreck every trace or refuse every call (a config probe)
        ("redaction:\n  patterns: ['x*']\n", "redaction.patterns: 'x*' matches the empty string"),
        ("policy:\n  forbidden_instructions: ['  ']\n", "policy.forbidden_instructions: '  ' names no phrase"),
        ("policy:\n  forbidden_instructions: [ok, 'user:']\n", "policy.forbidden_instructions: 'user:' names no phrase"),
        # what a second config probe passed: a pattern matching nothing somewhere, a glob matching
        # all, a header value that ends the headers, a path or salt no OS or encoder takes, rules of nothing
        ("redaction:\n  patterns: ['\\b']\n", "redaction.patterns: '\\\\b' matches the empty string"),
        ("redaction:\n  patterns: ['(?=sk-)']\n", "matches the empty string"),
        ("policy:\n  forbidden_instructions: ['*']\n", "policy.forbidden_instructions: '*' matches every text"),
        ("policy:\n  forbidden_instructions: ['user:*']\n", "policy.forbidden_instructions: 'user:*' matches every text"),
        ("organization:\n  default: |\n    org-abc\n", "organization.default: 'org-abc\\n' cannot be a header's value"),
        ("organization:\n  project:\n    by_key: {3f9c2e1d07b4a6c5: \"p\\r\\nX-Evil: 1\"}\n", "organization.project.by_key.3f9c2e1d07b4a6c5: "),
        ("usage:\n  spend_db: \"a\\0b\"\n", "usage.spend_db: a path cannot hold a NUL character"),
        ("traces:\n  destination: \"a\\0b\"\n", "traces.destination: a path cannot hold a NUL character"),
        ("redaction:\n  fingerprint_salt: \"\\ud800\"\n", "redaction.fingerprint_salt: "),
        ("traces:\n  keep: 1000000\n", "traces.keep: Input should be less than or equal to 1000"),
        ("policy:\n  rate_limits: [{}]\n", "policy.rate_limits.0: a rate limit names no limit"),
        ("policy:\n  budgets: [{per: global}]\n", "policy.budgets.0: a budget names no amount"),
        ("providers: []\n", "providers: Input should be a valid dictionary"),  # was taken as the defaults
        ("providers:\n  vllm:\n    api: openai\n    hosts:\n", "providers.vllm.hosts: Input should be a valid list"),  # no default to fall back on
        # valid alone, but naming nothing: the rule would quietly never apply, or refuse all
        ("policy:\n  allowed_models: {azur: [prod-*]}\n", "policy.allowed_models.azur: no provider is called 'azur' (providers: anthropic, azure, openai"),
        ("policy:\n  denied_models: {'*': [o1], opneai: [gpt-4]}\n", "policy.denied_models.opneai: no provider is called 'opneai'"),
        ("policy:\n  allowed_operations: [chat.completion]\n", "policy.allowed_operations: 'chat.completion' is no operation"),
        ("policy:\n  allowed_operations: [chat/completions]\n", "policy.allowed_operations: 'chat/completions' is no operation"),
        ("providers:\n  corp:\n    api: openai\n    hosts: [api.openai.com]\n", "providers.corp.hosts: 'api.openai.com' is also openai's"),
        ("tracez: 1\n", "tracez: unknown key"),
        ("- a\n- b\n", "top level: expected a mapping"),
        ("traces:\n  destination: [1\n", "invalid YAML at line"),
        # a list or lists by provider: the error of the form written, once
        ("policy:\n  allowed_models: {azure: prod-*}\n", "policy.allowed_models.azure: Input should be a valid list (got 'prod-*')"),
        ("policy:\n  denied_models: gpt-4o\n", "policy.denied_models: Input should be a valid list (got 'gpt-4o')"),
        ("policy:\n  allowed_models: [gpt-4o, 4]\n", "policy.allowed_models.1: Input should be a valid string (got 4)"),
        ("pricing:\n  models:\n    my-model[eu]: {input: -1, output: 1}\n", "pricing.models.my-model[eu].input: Input should be greater than or equal to 0"),
        # a YAML boolean is no number (pydantic took `true` as 1: a cap of one token, a $1 budget)
        ("policy:\n  max_tokens: true\n", "policy.max_tokens: Input should be a number, not true or false (got True)"),
        ("traces:\n  max_bytes: true\n", "traces.max_bytes: Input should be a number, not true or false (got True)"),
        ("policy:\n  budgets: [{usd_per_day: true}]\n", "policy.budgets.0.usd_per_day: Input should be a number, not true or false"),
        ("policy:\n  rate_limits: [{requests_per_minute: true}]\n", "policy.rate_limits.0.requests_per_minute: Input should be a number"),
        ("pricing:\n  models:\n    m: {input: 1, output: false}\n", "pricing.models.m.output: Input should be a number, not true or false (got False)"),
        ("redaction:\n  query_params: [token, '']\n", "redaction.query_params.1: String should have at least 1 character"),
    ],
)
def test_errors_name_file_key_and_problem_in_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message and "more error" not in message  # each of these is one error


@pytest.mark.parametrize("salt", ["739184620375913", "3.14159265358979", "\"\\ud800PWTESTKEYsalt\""])
def test_a_bad_fingerprint_salt_is_named_but_not_shown(tmp_path: Path, salt: str) -> None:
    """The salt is a secret (SECURITY.md: it keeps guessable keys from being confirmed
    against a trace): a salt of digits, which YAML reads as a number, was printed whole in
    the error mitmdump shows and logs (a secrets probe)."""
    path = write(tmp_path, f"redaction:\n  fingerprint_salt: {salt}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "redaction.fingerprint_salt: " in message
    assert "7391846" not in message and "3.14159" not in message and "PWTESTKEY" not in message, message


def _sections() -> list[type[BaseModel]]:
    """Every model of config.py, however deep: each holds its own fields."""
    found: list[type[BaseModel]] = []
    todo: list[type[BaseModel]] = [Config]
    while todo:
        model = todo.pop()
        if model not in found:
            found.append(model)
            todo.extend(model.__subclasses__())
            for field in model.model_fields.values():
                todo.extend(kind for kind in (field.annotation, *_deep_args(field.annotation)) if isinstance(kind, type) and issubclass(kind, BaseModel))
    return found


def _deep_args(annotation: object) -> list[object]:
    args = list(get_args(annotation))
    return [*args, *(inner for arg in args for inner in _deep_args(arg))]


def test_every_number_in_every_section_refuses_a_boolean() -> None:
    numbers = 0
    for model in _sections():
        for name, field in model.model_fields.items():
            kinds = get_args(field.annotation) or (field.annotation,)
            if bool in kinds or not any(kind in (int, float) for kind in kinds):
                continue
            numbers += 1
            for value in (True, False):
                with pytest.raises(ValidationError) as caught:
                    model.model_validate({name: value})
                assert any(e["loc"] == (name,) and e["type"] == "bool_for_number" for e in caught.value.errors()), f"{model.__name__}.{name}"
    assert numbers >= 15  # max_tokens, the rate limits and budgets, the prices, max_bytes, keep, stats_interval


def test_numbers_are_still_taken_as_before(tmp_path: Path) -> None:
    """An int where a float goes, an int written as a float or a string."""
    config = load_config(write(tmp_path, "policy:\n  max_tokens: 100.0\n  budgets: [{usd_per_day: 5}]\nusage:\n  stats_interval: '60'\n"))
    assert (config.policy.max_tokens, config.policy.budgets[0].usd_per_day, config.usage.stats_interval) == (100, 5.0, 60)


def test_a_pattern_that_matches_a_value_or_nothing_after_its_name_is_taken(tmp_path: Path) -> None:
    """Such a match of nothing redacts nothing (a review: they were refused)."""
    for pattern in ("(?<=token=)[^&\\s]*", '(?<=\"api_key\": \")[^\"]*'):
        assert load_config(write(tmp_path, f"redaction:\n  patterns: ['{pattern}']\n")).redaction.patterns == [pattern.replace("\\\\", "\\")]


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == default_config()


def test_a_section_left_empty_is_its_defaults(tmp_path: Path) -> None:
    """Its keys all commented out, YAML reads the section as null: the defaults, as for a
    file of only comments and for `providers:` (the others were refused)."""
    every = "".join(f"{section}:\n  # nothing\n" for section in ("providers", "traces", "redaction", "organization", "policy", "pricing", "usage", "replay"))
    assert load_config(write(tmp_path, every)) == default_config()
    nested = (
        "providers:\n  anthropic:\n    # enabled: false\n"
        "organization:\n  by_key:\n  project:\n"
        "policy:\n  allowed_models:\n  denied_models:\n  forbidden_instructions:\n  allowed_operations:\n  rate_limits:\n  budgets:\n"
        "pricing:\n  models:\n"
        "redaction:\n  headers:\n  query_params:\n  patterns:\n"
    )
    assert load_config(write(tmp_path, nested)) == default_config()
    # where null means something of its own, it still does
    assert load_config(write(tmp_path, "traces:\n  destination:\n")).traces.destination is None
    with pytest.raises(ConfigError, match="providers.vllm.api: required key is missing"):  # a provider of your own has none
        load_config(write(tmp_path, "providers:\n  vllm:\n"))


@pytest.mark.parametrize("entry", [
    "sk-proj-…a1b2#3f9c2e1d07b4a6c5", "3f9c2e1d07b4a6c5",  # a fingerprint as traces show it, its hash
    "sk-proj-…a1b2#3f9c2e1d", "3f9c2e1d",  # as fingerprints were, with 8 hex digits (organization.py still matches them)
    "…cdef#3eb1bd439947eb76", "Basic …#0e9d220616f08345", "Token …qrst#dd65eea0329dcb94", "jwt:….abc#38b930c605ce1182",
])
def test_by_key_takes_each_form_of_fingerprint(tmp_path: Path, entry: str) -> None:
    config = load_config(write(tmp_path, f"organization:\n  by_key: {{'{entry}': org-a}}\n"))
    assert config.organization.by_key == {entry: "org-a"}


@pytest.mark.parametrize(("entry", "expected"), [
    ("sk-proj-...a1b2#3f9c2e1d07b4a6c5", "organization.by_key: 'sk-proj-...a1b2#3f9c2e1d07b4a6c5' is no key fingerprint: expected a fingerprint"),
    ("sk-proj-…a1b2#3f9c2e1d07b4a6c", "organization.by_key: 'sk-proj-…a1b2#3f9c2e1d07b4a6c' is no key fingerprint"),
    ("sk-proj-…a1b2#3F9C2E1D07B4A6C5", "is no key fingerprint"),
    ("alice", "organization.by_key: the entry for 'org-a' is no key fingerprint; expected a fingerprint as traces show it"),
])
def test_by_key_refuses_an_entry_that_can_never_match(tmp_path: Path, entry: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"organization:\n  by_key: {{'{entry}': org-a}}\n"))
    assert expected in str(caught.value)


@pytest.mark.parametrize("key", ["sk-proj-Ab3xY9Ab3xY9Ab3xY9Ab3xY9Ab3xY9", "0123456789abcdef0123456789abcdef"])  # OpenAI's, Azure's
def test_by_key_refuses_a_key_itself_without_echoing_it(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"organization:\n  project:\n    by_key: {{{key}: proj-a}}\n"))
    message = str(caught.value)
    assert "organization.project.by_key: the entry for 'proj-a' is a key itself, not its fingerprint: never put a key in the config" in message
    assert key not in message and key[-8:] not in message
    # with a value of the wrong type too, whose error named the entry (a review: the key was printed whole)
    for value in ("12345", "[a, b]", "true"):
        with pytest.raises(ConfigError) as caught:
            load_config(write(tmp_path, f"organization:\n  by_key: {{{key}: {value}}}\n"))
        assert key[8:-8] not in str(caught.value) and "is a key itself" in str(caught.value)


def test_config_path_defaults_to_working_directory_file(tmp_path: Path) -> None:
    assert resolve_config_path("", tmp_path) is None
    write(tmp_path, "")
    assert resolve_config_path("", tmp_path) == tmp_path / "config.yaml"
    assert resolve_config_path("other.yaml", tmp_path) == Path("other.yaml")
    # there, but no file to read: named (loading it says why), not passed over for the defaults
    for folder, make in (("link", lambda path: path.symlink_to(tmp_path / "typo.yaml")), ("folder", Path.mkdir)):
        (tmp_path / folder).mkdir()
        make(tmp_path / folder / "config.yaml")
        assert resolve_config_path("", tmp_path / folder) == tmp_path / folder / "config.yaml"
        with pytest.raises(ConfigError, match=rf"{tmp_path / folder / 'config.yaml'}"):
            load_config(tmp_path / folder / "config.yaml")


def test_gateway_trace_destination_overrides_the_file() -> None:
    config = default_config()
    assert trace_destination(config, {}) == "traces.jsonl"
    assert trace_destination(config, {"GATEWAY_TRACE_DESTINATION": "/tmp/t.jsonl"}) == "/tmp/t.jsonl"


def test_paths_expand_the_home_directory(tmp_path: Path) -> None:
    home = str(Path.home())
    config = load_config(write(tmp_path, "traces:\n  destination: ~/t.jsonl\n  directory: ~/per\nusage:\n  spend_db: ~/s.db\nreplay:\n  source: ~/r.jsonl\n"))
    assert (config.traces.destination, config.traces.directory) == (f"{home}/t.jsonl", f"{home}/per")
    assert (config.usage.spend_db, config.replay.source) == (f"{home}/s.db", f"{home}/r.jsonl")
    assert trace_destination(default_config(), {"GATEWAY_TRACE_DESTINATION": "~/g.json"}) == f"{home}/g.json"


def test_trace_targets_that_cannot_be_written_are_refused_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("x")
    source = str(tmp_path / "config.yaml")

    def problem(text: str, environ: dict[str, str] | None = None, named: str | None = source) -> str | None:
        config = load_config(write(tmp_path, text))
        try:
            check_trace_targets(config, named, environ or {})
        except ConfigError as exc:
            return str(exc)
        return None

    assert problem(f"traces:\n  destination: {tmp_path}/new/deeper/t.jsonl\n  directory: {tmp_path}/per\n") is None  # made when first written
    assert problem(f"traces:\n  destination: {tmp_path}/a-file\n  directory: {tmp_path}/a-dir\n") is None  # the existing ones
    assert problem(f"traces:\n  destination: {tmp_path}/a-dir\n") == f"{source}: traces.destination: {tmp_path}/a-dir: is a directory, not a file"
    assert problem(f"traces:\n  directory: {tmp_path}/a-file/per\n") == f"{source}: traces.directory: {tmp_path}/a-file/per: {tmp_path}/a-file is a file, not a directory"
    assert problem("traces:\n  destination: null\n", {"GATEWAY_TRACE_DESTINATION": f"{tmp_path}/a-dir"}) == \
        f"GATEWAY_TRACE_DESTINATION: {tmp_path}/a-dir: is a directory, not a file"
    assert problem(f"traces:\n  destination: {tmp_path}/a-dir\n", {"GATEWAY_TRACE_DESTINATION": ""}) is None  # the variable turns the file off
    assert problem(f"traces:\n  destination: {tmp_path}/a-dir\n", named=None) == f"built-in defaults: traces.destination: {tmp_path}/a-dir: is a directory, not a file"


def test_a_spend_store_on_a_trace_target_is_refused_naming_both_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite would write over the traces (or they over it): every trace lost, silently."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GATEWAY_TRACE_DESTINATION", raising=False)
    (tmp_path / "link").symlink_to(tmp_path)

    def problem(text: str) -> str | None:
        try:
            load_config(write(tmp_path, text))
        except ConfigError as exc:
            return str(exc).removeprefix(f"{tmp_path / 'config.yaml'}: ")
        return None

    assert problem("usage:\n  spend_db: traces.jsonl\n") == \
        "usage.spend_db: traces.jsonl is the trace file (traces.destination): the spend store would write over the traces"
    assert problem(f"traces:\n  destination: ./t/../t.jsonl\nusage:\n  spend_db: {tmp_path}/link/t.jsonl\n") is not None  # the same file, however named
    assert problem("usage:\n  spend_db: traces.jsonl.3\n") == \
        "usage.spend_db: traces.jsonl.3 is a file the trace file (traces.destination) is rotated into: the spend store would write over the traces"
    assert problem("traces:\n  directory: per\nusage:\n  spend_db: per/2025-01-01/spend.db\n") == \
        "usage.spend_db: per/2025-01-01/spend.db is in traces.directory (per): the spend store would sit among the traces"
    assert problem("traces:\n  directory: per\nusage:\n  spend_db: per\n") is not None
    monkeypatch.setenv("GATEWAY_TRACE_DESTINATION", "g.jsonl")  # the file in force
    assert problem("usage:\n  spend_db: g.jsonl\n") == \
        "usage.spend_db: g.jsonl is the trace file (GATEWAY_TRACE_DESTINATION): the spend store would write over the traces"
    assert problem("usage:\n  spend_db: traces.jsonl\n") is None  # no trace file is written there now
    # beside the traces, or of a similar name, it is its own file
    monkeypatch.delenv("GATEWAY_TRACE_DESTINATION")
    for spend_db in ("spend.db", "traces.jsonl.db", "traces.jsonl.1x", "per-spend.db"):
        assert problem(f"traces:\n  directory: per\nusage:\n  spend_db: {spend_db}\n") is None


def test_a_trace_target_that_may_not_be_looked_into_is_a_reason_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`Path.exists` raises where a directory on the way may not be searched (an unprivileged
    user; the tests run as root, where none is refused, so the refusal is stood in for)."""
    def refused(self: Path) -> bool:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "exists", refused)
    config = load_config(write(tmp_path, f"traces:\n  destination: {tmp_path}/locked/t.jsonl\n"))
    with pytest.raises(ConfigError, match=r"traces.destination: .*/locked/t.jsonl: cannot be checked: Permission denied$"):
        check_trace_targets(config, "config.yaml", {})


def test_example_config_is_valid_and_documents_every_key() -> None:
    example = ROOT / "config.yaml.example"
    config = load_config(example)
    assert config == default_config()
    text = example.read_text()
    sections = {
        "traces": config.traces, "redaction": config.redaction, "organization": config.organization,
        "policy": config.policy, "pricing": config.pricing, "usage": config.usage, "replay": config.replay,
    }
    for section, model in sections.items():
        assert f"{section}:" in text
        for key in type(model).model_fields:
            assert f"{key}:" in text, f"{section}.{key} is not documented"
    for key in ("providers:", "organization:", "policy:", "pricing:", "api:", "hosts:", "upgrade_http:", "enabled:"):
        assert key in text
