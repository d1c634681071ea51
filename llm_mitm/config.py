"""The pydantic model of config.yaml.

Every error names the file, the key path and what is wrong, in one line, because
mitmdump shows it as the reason it refused to start or refused a reload.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from pathlib import Path
from functools import cache
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

ApiKind = Literal["openai", "azure", "anthropic"]

TRACE_DESTINATION_ENV = "GATEWAY_TRACE_DESTINATION"
DEFAULT_CONFIG_FILE = "config.yaml"

_HOST_PATTERN = re.compile(
    r"^(?:\*\.)?(?:[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?::\d{1,5})?$"
    r"|^\[[0-9a-f:.]+\](?::\d{1,5})?$",
    re.IGNORECASE,
)
_PORT = re.compile(r":(\d+)$")  # a pattern's port, once it matched (an IPv6 address ends in `]`)


def _path_name(value: str) -> str:
    """`~` is the user's home, as in a shell; a NUL names no file (the OS refuses it later, with a traceback)."""
    if "\0" in value:
        raise ValueError("a path cannot hold a NUL character")
    return os.path.expanduser(value)


def _header_value(value: str) -> str:
    """What can go in an HTTP header as written: printable ASCII. A line break ended the
    headers early and made the rest the body, or a header of its own (a probe)."""
    if not (value.isascii() and value.isprintable()) or value != value.strip():
        raise ValueError(f"{value!r} cannot be a header's value: printable ASCII, no line breaks or surrounding spaces")
    return value


def _utf8(value: str) -> str:
    """Text UTF-8 can write; the error does not show it (the salt, a secret, is what has this check)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not text UTF-8 can write (a lone surrogate)") from None
    return value


# A file or folder named in the config.
PathName = Annotated[str, AfterValidator(_path_name)]
HeaderValue = Annotated[str, AfterValidator(_header_value)]


class ConfigError(Exception):
    """A config file that cannot be used; the message is one line, ready to show."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_section_is_its_defaults(cls, data: Any) -> Any:
        """A section or list whose entries are all commented out (`policy:` alone) is null
        in YAML: it means the defaults, as a file of only comments does (it was refused)."""
        if not isinstance(data, Mapping):
            return data
        return {key: value for key, value in data.items() if value is not None or not _defaults_when_null(cls, key)}

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic takes `true` as 1 for an int or float: `max_tokens: true` was a cap of
        one token, `usd_per_day: true` a $1 budget. Every number of every section refuses it."""
        if isinstance(value, bool) and info.field_name is not None and _is_number(cls.model_fields[info.field_name].annotation):
            raise PydanticCustomError("bool_for_number", "Input should be a number, not true or false")
        return value


def _defaults_when_null(model: type[BaseModel], key: str) -> bool:
    """A key whose default is a section, a mapping or a list, and where null means nothing else."""
    field = model.model_fields.get(key)
    return (field is not None and isinstance(field.default, (BaseModel, dict, list))
            and type(None) not in get_args(field.annotation))


@cache
def _is_number(annotation: Any) -> bool:
    """A field of an int or float (optional or not), not one that takes a bool as such."""
    kinds = get_args(annotation) or (annotation,)
    return bool not in kinds and any(kind in (int, float) for kind in kinds)


class ProviderConfig(_Section):
    """One API endpoint family: which hosts carry it and which API it speaks."""

    api: ApiKind
    hosts: list[str] = Field(min_length=1)
    upgrade_http: bool = False
    enabled: bool = True
    # Ask for `stream_options.include_usage` on streamed chat calls (usage.request_stream_usage):
    # on for the built-in providers; a server of your own may refuse the field (a 400 to a
    # call its client never made it), so there it is asked for only when turned on.
    stream_usage: bool = False
    # Set `OpenAI-Organization` / `OpenAI-Project` as the organization rules say: OpenAI's
    # own headers, on for it; a server of your own gets them only when turned on (a gateway
    # in front of OpenAI, say), else they would tell it of an organization it has no use for.
    organization_headers: bool = False

    @field_validator("hosts")
    @classmethod
    def _hosts_are_patterns(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not _HOST_PATTERN.match(host):
                raise ValueError(
                    f"invalid host pattern {host!r}: expected a host name, optionally with "
                    "a leading '*.' and a ':port' (like '*.openai.azure.com' or 'localhost:8000')"
                )
            port = _PORT.search(host)
            if port and not 1 <= int(port.group(1)) <= 65535:
                raise ValueError(f"invalid host pattern {host!r}: port {port.group(1)} is not in 1..65535 (no call goes to it)")
        return [host.lower() for host in hosts]


DEFAULT_PROVIDERS: dict[str, dict[str, Any]] = {
    # OpenAI's data residency endpoints (eu., us.); Azure AI Foundry's resources (services.ai)
    "openai": {"api": "openai", "hosts": ["api.openai.com", "eu.api.openai.com", "us.api.openai.com"], "upgrade_http": True, "stream_usage": True,
               "organization_headers": True},
    "azure": {
        "api": "azure",
        "hosts": ["*.openai.azure.com", "*.cognitiveservices.azure.com", "*.services.ai.azure.com"],
        "upgrade_http": True,
        "stream_usage": True,
    },
    "anthropic": {"api": "anthropic", "hosts": ["api.anthropic.com"], "upgrade_http": True, "stream_usage": True},
}


class TracesConfig(_Section):
    """Where exchanges are written."""

    destination: PathName | None = "traces.jsonl"
    directory: PathName | None = None
    bodies: Literal["full", "metadata", "none"] = "full"
    max_bytes: int | None = Field(default=None, gt=0)  # rotate the file past this size
    keep: int = Field(default=5, ge=1, le=1000)  # rotated files kept: traces.jsonl.1 .. .keep (each rotation looks at each)


# A header's or a parameter's name: an empty one names nothing (and would be found in every text).
Name = Annotated[str, Field(min_length=1)]


class RedactionConfig(_Section):
    """Additions to the built-in secret detection."""

    headers: list[Name] = []
    query_params: list[Name] = []
    patterns: list[str] = []
    fingerprint_salt: Annotated[str, AfterValidator(_utf8)] = ""

    @field_validator("patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
            found = [match.group() for match in compiled.finditer(_PATTERN_SAMPLE)]
            if compiled.match("") is not None or (found and not any(found)):  # `\b`, a lookahead: it only ever matches nothing
                raise ValueError(f"{pattern!r} matches the empty string: it would redact between every two characters")
        return patterns

    def redactor_options(self) -> dict[str, Any]:
        """Keyword arguments of `Redactor` (plain data: the trace writer process gets them too)."""
        return {
            "extra_headers": list(self.headers),
            "extra_params": list(self.query_params),
            "extra_patterns": list(self.patterns),
            "salt": self.fingerprint_salt,
        }


# Text with words, keys, digits and punctuation, where a pattern that can match nothing shows it.
_PATTERN_SAMPLE = "Authorization: Bearer sk-proj-Ab3_xY9 token=abc123&token=&key=\"q\" hello world 42 {\"api_key\": \"v\", \"api_key\": \"\"}\n é ∑"


class HeaderRule(_Section):
    """Which value an OpenAI header gets: the client's, a key's team value, or a default."""

    default: HeaderValue | None = None
    override: bool = False
    by_key: dict[str, HeaderValue] = {}

    @field_validator("by_key", mode="before")
    @classmethod
    def _keys_are_fingerprints(cls, by_key: Any) -> Any:
        """An entry is matched against the caller's key fingerprint (organization.py): one
        in no fingerprint's form never matches. Only what holds a fingerprint's `…` or `#`
        is shown in the error; any other entry is named by its value, as it may be a key
        (a secret in the file, not to be copied into logs). Before the values' types are
        checked, whose error would name the entry (a review: a raw key with a number for
        its value was printed whole)."""
        if not isinstance(by_key, Mapping):
            return by_key
        for entry, value in by_key.items():
            if not isinstance(entry, str) or _is_key_fingerprint(entry):
                continue
            if "…" in entry or "#" in entry:
                raise ValueError(f"{entry!r} is no key fingerprint: expected {_FINGERPRINT_FORMS}")
            looks_like_key = entry.startswith(_KEY_STARTS) or len(entry) >= 20
            why = "is a key itself, not its fingerprint: never put a key in the config" if looks_like_key else "is no key fingerprint"
            raise ValueError(f"the entry for {value!r} {why}; expected {_FINGERPRINT_FORMS}")
        return by_key


_FINGERPRINT_FORMS = ("a fingerprint as traces show it ('sk-proj-…a1b2#3f9c2e1d07b4a6c5', its '…' one character) "
                      "or the 16 lower-case hex digits after its '#'")
_KEY_STARTS = ("sk-", "eyJ")  # an OpenAI or Anthropic key, a JWT
_DIGEST = re.compile(r"[0-9a-f]{8}(?:[0-9a-f]{8})?")  # 16 hex digits, or 8 as fingerprints had before


def _is_key_fingerprint(entry: str) -> bool:
    """A full fingerprint or its hash: what `organization.configured_value` looks up."""
    from llm_mitm.redact import is_fingerprint  # the redactor's own definition of one

    _, sep, digest = entry.rpartition("#")
    return _DIGEST.fullmatch(digest) is not None and (not sep or is_fingerprint(entry))


class OrganizationConfig(HeaderRule):
    """`OpenAI-Organization` (the fields above) and `OpenAI-Project` (`project`)."""

    project: HeaderRule = HeaderRule()


Scope = Literal["api_key", "client", "global"]


class RateLimitConfig(_Section):
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    per: Scope = "api_key"

    @model_validator(mode="after")
    def _limits_something(self) -> RateLimitConfig:
        if self.requests_per_minute is None and self.tokens_per_minute is None:
            raise ValueError("a rate limit names no limit: set requests_per_minute or tokens_per_minute")
        return self


class BudgetConfig(_Section):
    usd_per_day: float | None = Field(default=None, gt=0)
    usd_per_month: float | None = Field(default=None, gt=0)
    per: Scope = "api_key"
    # Calls in flight hold what they may cost at most against the budget (false: spend alone
    # is checked, so more calls run at once near the limit, and a burst can pass it).
    hold_in_flight: bool = True

    @model_validator(mode="after")
    def _limits_something(self) -> BudgetConfig:
        if self.usd_per_day is None and self.usd_per_month is None:
            raise ValueError("a budget names no amount: set usd_per_day or usd_per_month")
        return self


ModelPatterns = list[str] | dict[str, list[str]]
# The roles a forbidden instruction may name (`system:*you are dan*`).
INSTRUCTION_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class PolicyConfig(_Section):
    """Rules decided before anything goes upstream."""

    allowed_models: ModelPatterns = []
    denied_models: ModelPatterns = []
    max_tokens: int | None = Field(default=None, gt=0)
    max_tokens_action: Literal["reject", "clamp"] = "reject"
    forbidden_instructions: list[str] = []
    allowed_operations: list[str] = []
    on_unparseable: Literal["reject", "forward"] = "reject"
    rate_limits: list[RateLimitConfig] = []
    budgets: list[BudgetConfig] = []

    @field_validator("forbidden_instructions")
    @classmethod
    def _instructions_name_a_phrase(cls, entries: list[str]) -> list[str]:
        """An empty phrase is found in every text, and a glob that matches an empty text
        (`*`, `user:*`) matches every one: every call would be refused."""
        for entry in entries:
            role, sep, phrase = entry.partition(":")
            if not (sep and role.strip().lower() in INSTRUCTION_ROLES):
                phrase = entry
            if not phrase.strip():
                raise ValueError(f"{entry!r} names no phrase: it would refuse every call")
            if any(ch in phrase for ch in "*?[") and fnmatch.fnmatchcase("", phrase.strip()):
                raise ValueError(f"{entry!r} matches every text: it would refuse every call")
        return entries


class ModelPrice(_Section):
    """USD per 1M tokens. Cached input and cache writes default to input, 1-hour cache
    writes to twice input (Anthropic's rule), audio to text; reasoning is billed as output.
    `max_output_tokens`, the most the model writes in one answer, is what a call naming no
    output limit holds against budgets and token limits (a name the shipped table knows
    keeps its maximum where the config prices it anew without one)."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    cache_write: float | None = Field(default=None, ge=0)  # 5-minute cache writes
    cache_write_1h: float | None = Field(default=None, ge=0)
    audio_input: float | None = Field(default=None, ge=0)
    audio_output: float | None = Field(default=None, ge=0)
    max_output_tokens: int | None = Field(default=None, gt=0)


class PricingConfig(_Section):
    models: dict[str, ModelPrice] = {}


class UsageConfig(_Section):
    """Metering: usage on streams, estimates, spend store, the periodic stats line."""

    request_stream_usage: bool = True
    estimate_missing: bool = True
    spend_db: PathName | None = None
    stats_interval: int = Field(default=300, ge=0)


class ReplayConfig(_Section):
    """Answer from recorded traces: off, on (a miss goes upstream), strict (a miss is an error)."""

    mode: Literal["off", "on", "strict"] = "off"
    source: PathName | None = None  # default: the trace file


class Config(_Section):
    """The whole config.yaml. Provider entries are merged key by key onto the defaults."""

    providers: dict[str, ProviderConfig] = {}
    traces: TracesConfig = TracesConfig()
    redaction: RedactionConfig = RedactionConfig()
    organization: OrganizationConfig = OrganizationConfig()
    policy: PolicyConfig = PolicyConfig()
    pricing: PricingConfig = PricingConfig()
    usage: UsageConfig = UsageConfig()
    replay: ReplayConfig = ReplayConfig()

    @model_validator(mode="before")
    @classmethod
    def _merge_default_providers(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        given = data.get("providers")
        given = {} if given is None else given  # `providers:` left empty; an empty list is an error of its own
        if not isinstance(given, Mapping):
            return data
        merged: dict[str, Any] = {name: dict(entry) for name, entry in DEFAULT_PROVIDERS.items()}
        for name, entry in given.items():
            entry = {} if entry is None else entry  # `anthropic:` with its keys commented out
            if isinstance(entry, Mapping) and name in merged:
                merged[name].update(entry)
            else:
                merged[name] = entry
        return {**data, "providers": merged}

    @property
    def enabled_providers(self) -> dict[str, ProviderConfig]:
        return {name: p for name, p in self.providers.items() if p.enabled}

    @property
    def intercepted_hosts(self) -> set[str]:
        """The host patterns of the enabled providers: what the proxy intercepts."""
        return {host for provider in self.enabled_providers.values() for host in provider.hosts}


def default_config() -> Config:
    return Config.model_validate({})


def parse_config(data: Any, source: str, allow_empty: bool = True) -> Config:
    """Validate already-loaded YAML data; `source` names the file in errors. An empty
    document (nothing, or only comments) is the built-in defaults, unless not allowed."""
    if data is None:
        if not allow_empty:
            raise ConfigError(f"{source}: the file is empty (write {{}} for the built-in defaults)")
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: top level: expected a mapping of sections, got {type(data).__name__}")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    problem = _unresolved_name(config) or _spend_store_on_traces(config)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    return config


def _unresolved_name(config: Config) -> str | None:
    """`key: why` for a value that validates alone but names nothing, so that a rule would
    quietly never apply (or refuse everything): a provider no provider is called, an
    operation no API has, a host two providers claim (the first would take its calls)."""
    from llm_mitm.providers import DOTTED_OPERATIONS, names_an_operation  # providers imports this module

    known = sorted(config.providers)
    for key in ("allowed_models", "denied_models"):
        patterns = getattr(config.policy, key)
        for name in patterns if isinstance(patterns, dict) else ():
            if name != "*" and name not in config.providers:
                return f"policy.{key}.{name}: no provider is called {name!r} (providers: {', '.join(known)}; \"*\": all)"
    for entry in config.policy.allowed_operations:
        if not any(mark in entry for mark in "*?[") and not names_an_operation(entry):
            return (f"policy.allowed_operations: {entry!r} is no operation (named with a dot: {', '.join(DOTTED_OPERATIONS)}; "
                    "any other is the path's first segment after the version: responses, messages, embeddings, files, ...)")
    claimed: dict[str, str] = {}
    for name, provider in config.enabled_providers.items():
        for host in provider.hosts:
            other = claimed.setdefault(host.lower(), name)
            if other != name:
                return f"providers.{name}.hosts: {host!r} is also {other}'s (set enabled: false on the one not meant)"
    return None


def _spend_store_on_traces(config: Config, environ: Mapping[str, str] = os.environ) -> str | None:
    """`usage.spend_db: why` when the spend store is a trace target: the trace file (as
    `trace_destination` has it), one it is rotated into, or the trace directory or a file
    in it. SQLite and the trace writer would write over each other, and every trace be lost."""
    if not config.usage.spend_db:
        return None
    spend = _real(config.usage.spend_db)
    destination, directory = trace_destination(config, environ), config.traces.directory
    key = _destination_key(environ)
    if destination and spend == _real(destination):
        return f"usage.spend_db: {config.usage.spend_db} is the trace file ({key}): the spend store would write over the traces"
    if destination and spend.parent == _real(destination).parent and re.fullmatch(re.escape(_real(destination).name) + r"\.\d+", spend.name):
        return f"usage.spend_db: {config.usage.spend_db} is a file the trace file ({key}) is rotated into: the spend store would write over the traces"
    if directory and (spend == _real(directory) or _real(directory) in spend.parents):
        return f"usage.spend_db: {config.usage.spend_db} is in traces.directory ({directory}): the spend store would sit among the traces"
    return None


def _real(path: str) -> Path:
    """A path as the OS will open it: absolute, `..` and symbolic links resolved (never raises)."""
    return Path(os.path.realpath(path))


def load_config(path: str | os.PathLike[str], allow_empty: bool = True) -> Config:
    """Read and validate one YAML file."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8 text") from None
    try:
        data = YAML(typ="safe", pure=True).load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise ConfigError(f"{source}: invalid YAML at {where}: {exc.problem}") from None
    except YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    return parse_config(data, source, allow_empty)


def resolve_config_path(option_value: str, cwd: Path | None = None) -> Path | None:
    """The file to load: the option when given, else ./config.yaml when there at all (a
    link to a file that is not there, a directory: loading it says why it cannot be read,
    where passing it over ran the proxy on the defaults, with no policy, and said nothing:
    a setup probe), else none."""
    if option_value:
        return Path(option_value).expanduser()
    candidate = (cwd or Path.cwd()) / DEFAULT_CONFIG_FILE
    return candidate if candidate.exists() or candidate.is_symlink() else None


def trace_destination(config: Config, environ: Mapping[str, str] = os.environ) -> str | None:
    """`GATEWAY_TRACE_DESTINATION` (local-gateway's name) wins over the config file."""
    override = environ.get(TRACE_DESTINATION_ENV)
    if override is not None:
        return os.path.expanduser(override) or None
    return config.traces.destination or None


def check_trace_targets(config: Config, source: str | None, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse, naming the file and key (or the variable), a trace file or directory that
    cannot be written: a directory where the file goes, a file where the directory goes, no
    write access. Taken, each record would be lost, with an error line at the first call,
    not at start. `source`: the config file, None for the built-in defaults."""
    where = f"{source}: " if source else "built-in defaults: "
    destination_key = _destination_key(environ, where)
    for key, path, folder in (
        (destination_key, trace_destination(config, environ), False),
        (f"{where}traces.directory", config.traces.directory, True),
    ):
        problem = _unwritable(Path(path), folder) if path else None
        if problem:
            raise ConfigError(f"{key}: {path}: {problem}")


def _destination_key(environ: Mapping[str, str], where: str = "") -> str:
    """What names the trace file in force: the variable, else the key (after `where`)."""
    return TRACE_DESTINATION_ENV if environ.get(TRACE_DESTINATION_ENV) is not None else f"{where}traces.destination"


def _unwritable(path: Path, folder: bool) -> str | None:
    """Why `path` cannot be written as a file (or as a directory, made if missing), or None."""
    try:
        return _why_unwritable(path, folder)
    except OSError as exc:  # a directory on the way that may not be looked into, say
        return f"cannot be checked: {exc.strerror or exc}"


def _why_unwritable(path: Path, folder: bool) -> str | None:
    if path.exists():
        if path.is_dir() != folder:
            return "is a file, not a directory" if folder else "is a directory, not a file"
        return None if os.access(path, os.W_OK | (os.X_OK if folder else 0)) else "not writable"
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        return f"{parent} is a file, not a directory"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot be made in {parent}: not writable"


def _describe(exc: ValidationError, source: str) -> str:
    """The first error, one line. A value of a union type (`allowed_models`: a list, or
    lists by provider) fails once per branch: the error of the branch that got furthest
    into the value is the one that fits what was written."""
    errors = exc.errors()
    stem = _before_branch(errors[0]["loc"])
    alternatives = [e for e in errors if e["loc"][: len(stem)] == stem] if stem is not None else errors[:1]
    error = max(alternatives, key=lambda e: len(e["loc"]))
    key = ".".join(str(part) for part in error["loc"] if not _is_branch(part)) or "top level"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required key is missing"
    elif "input" in error and error["type"] not in ("value_error",) and not isinstance(error["input"], (dict, list)) and key not in _SECRET_KEYS:
        message = f"{message} (got {error['input']!r})"
    more = len(errors) - len(alternatives)
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {key}: {message}{suffix}"


# Keys whose value is a secret: an error names them, never shows what was written (it goes
# to the console and the logs; a salt of digits, a number to YAML, was shown whole).
_SECRET_KEYS = frozenset({"redaction.fingerprint_salt"})

_BRANCH = re.compile(r"(?:list|dict)\[.*\]")


def _is_branch(part: int | str) -> bool:
    """A union's branch as pydantic names it in an error's location (`list[str]`), not a
    key of the user's that holds a bracket (`my-model[eu]`)."""
    return isinstance(part, str) and _BRANCH.fullmatch(part) is not None


def _before_branch(loc: tuple[int | str, ...]) -> tuple[int | str, ...] | None:
    """Where a union's value is, for an error in one of its branches; else None."""
    return next((loc[:i] for i, part in enumerate(loc) if _is_branch(part)), None)
