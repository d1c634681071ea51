"""Policy rules -> a decision, before anything goes upstream. Pure: no I/O, no mitmproxy."""

from __future__ import annotations

import fnmatch
import hashlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

from llm_mitm.config import INSTRUCTION_ROLES, ModelPatterns, PolicyConfig
from llm_mitm.literals import Literals
from llm_mitm.memo import Memo
from llm_mitm.forms import BATCH, UPLOADED_TEXT, batch_file_calls, json_lines
from llm_mitm.pricing import snapshot_bases
from llm_mitm.providers import Provider, Route, route_for, shapes_of
from llm_mitm.texts import (
    ROLE_ALIASES,
    SCHEMA_DEPTH,
    TooDeep,
    as_list,
    json_unescaped,
    normalize,
    prompt_text,
    read_request,
    speaker,
    squeeze,
    strings_in,
    tool_input_text,
    transcriptions,
)

# Output limits by name; `max_tokens_to_sample` is Anthropic's legacy Text Completions',
# `max_response_output_tokens` a realtime session's (beta; an integer or "inf").
# `max_completions_tokens` (so spelled) is a score_model grader's sampling limit. Servers of
# your own: llama.cpp's `n_predict` (it wins over max_tokens there, -1 is none), and in a
# holder of their own (`LIMIT_HOLDERS`) Ollama's `options.num_predict` and TGI's
# `parameters.max_new_tokens` (a firewall probe: they passed the cap); Gemini's
# `generationConfig.maxOutputTokens`.
MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "max_tokens_to_sample", "max_response_output_tokens",
                    "max_completions_tokens", "n_predict", "num_predict", "max_new_tokens", "maxOutputTokens")
LIMIT_HOLDERS = ("options", "parameters", "sampling_params", "generationConfig", "generation_config")  # Ollama's, TGI's, SGLang's, Gemini's
_LIMIT_FIELDS = frozenset(MAX_TOKEN_FIELDS)
_INNER_LIMITS = ("session", *LIMIT_HOLDERS)
_INNER_LIMIT_SET = frozenset(_INNER_LIMITS)
# Prompts as token ids, which no text check can read: SGLang's `input_ids`, Ollama's `context`
# (the conversation so far, as the server returned it: a client can send any).
_TOKEN_ID_PROMPTS = frozenset(("input_ids", "context"))
# A prompt given as its embeddings (vLLM's `prompt_embeds`, a tensor in base64; SGLang's
# `input_embeds`), which no text search can read (a firewall probe: they went unchecked).
_EMBEDDED_PROMPTS = frozenset(("prompt_embeds", "input_embeds"))
_LIMIT_HOLDER_SET = frozenset(LIMIT_HOLDERS)
V = TypeVar("V")
RoleText = tuple[str, str]


class TextMemo(Generic[V]):
    """What a policy found in a (role, text), remembered: a conversation sends its system
    prompt and every earlier turn again with each call, so most texts are ones the policy
    has read before. Texts up to 8192 characters are their own keys (512 of them, 4 MB of
    ASCII at the most); longer ones are remembered by a digest (4096 of them)."""

    SHORT = 8192

    def __init__(self, compute: Callable[[str, str], V]) -> None:
        self._short: Memo[RoleText, V] = Memo(lambda key: compute(*key), size=512)
        self._long: Memo[RoleText, V] = Memo(lambda key: compute(*key), size=4096, key=_digest)

    def __call__(self, role: str, text: str) -> V:
        return self._short((role, text)) if len(text) <= self.SHORT else self._long((role, text))


def _digest(key: RoleText) -> tuple[str, bytes]:
    """SHA-256: most CPUs of today hash it in hardware (0.6 ms a MB here, blake2b 1.6)."""
    return key[0], hashlib.sha256(key[1].encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True, slots=True)
class Violation:
    """Why a request is refused: the rule's code and a message naming the rule and value."""

    rule: str
    detail: str
    status: int = 403


class RequestView(NamedTuple):
    """What the policy looks at, taken from the exchange record (a tuple: made for every
    call, where a frozen dataclass sets each field through `object.__setattr__`)."""

    route: Route
    model: str | None
    body: Any  # parsed JSON, or None
    unparseable: bool = False
    method: str = "POST"
    media: str | None = None  # a body read otherwise than as JSON (`Body.media`): "form", "sdp"


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern), re.IGNORECASE | re.DOTALL)


class _ModelRule:
    """Model globs, for all providers (`"*"`) and per provider. `own_list_wins`: a
    provider's own list replaces `"*"` for it (what `allowed_models: {azure: [prod-*],
    "*": [gpt-4o*]}` means: on Azure only prod-*), else both apply (a model denied
    everywhere is denied on Azure too)."""

    def __init__(self, patterns: ModelPatterns, own_list_wins: bool) -> None:
        items = patterns.items() if isinstance(patterns, dict) else [("*", patterns)]
        self.by_provider = {name: [(p, _glob(p)) for p in globs] for name, globs in items}
        self.own_list_wins = own_list_wins

    def __bool__(self) -> bool:
        return any(self.by_provider.values())

    def applies(self, provider: str) -> bool:
        return provider in self.by_provider or "*" in self.by_provider

    def _lists(self, provider: str) -> tuple[str, ...]:
        return (provider,) if self.own_list_wins and self.by_provider.get(provider) else (provider, "*")  # an empty list: none

    def match(self, provider: str, model: str) -> str | None:
        for name in self._lists(provider):
            for pattern, regex in self.by_provider.get(name, ()):
                if regex.match(model):
                    return pattern
        return None

    def listing(self, provider: str) -> str:
        return ", ".join(p for name in self._lists(provider) for p, _ in self.by_provider.get(name, ()))


@dataclass(frozen=True, slots=True)
class _Instruction:
    pattern: str
    role: str | None
    regex: re.Pattern[str]
    search: bool = False
    phrase: str = ""  # what is searched for (a plain phrase's normal form)
    span: int = 0  # a searched phrase's length
    packed: str = ""  # a searched phrase without its spaces
    squeezed: str = ""  # ... and without anything between its words (`ignore_previous-instructions`)

    def matches(self, text: str) -> bool:
        return bool(self.regex.search(text) if self.search else self.regex.match(text))


class _PhraseSigns:
    """The forbidden-instruction rules that apply to one speaker, their plain phrases in
    one automaton (and their squeezed forms in another): a text is read once for all of
    them before any rule is tried, where a search per phrase read it once each (fifty
    phrases: 220 µs a call of new texts on the proxy's loop). Only a text that holds one
    is tried rule by rule, in order, so the rule reported is the first that matches."""

    def __init__(self, rules: list[_Instruction]) -> None:
        self.rules = rules
        phrases = [rule for rule in rules if rule.phrase]
        # A pass costs what a search or two does (callgrind: one phrase, 13k instructions more
        # a call of new texts than its search): it pays from three phrases on.
        self._filtered = len(phrases) >= 3
        self.others = [rule for rule in rules if not rule.phrase]  # globs (and an empty phrase): tried on every text
        self._phrases = Literals(_utf8(rule.phrase) for rule in phrases)
        self._squeezed = Literals(_utf8(rule.squeezed) for rule in phrases)

    def tried(self, normal: str) -> tuple[list[_Instruction], str | None]:
        """The rules to try on `normal`: all when a phrase may be in it (or too few to look
        for them first), else the globs; and its squeezed form, if made."""
        if not self._filtered:
            return self.rules, None
        if self._phrases.found_in(_utf8(normal)):
            return self.rules, None
        squeezed = squeeze(normal)
        if self._squeezed.found_in(_utf8(squeezed)):
            return self.rules, squeezed
        return self.others, squeezed


def _utf8(text: str) -> bytes:
    """Text as UTF-8, where a phrase's bytes are found exactly where the phrase is (an
    automaton of bytes takes a quarter of the time of its counterpart for text)."""
    return text.encode("utf-8", "surrogatepass")


def _instruction(pattern: str) -> _Instruction:
    role, sep, rest = pattern.partition(":")
    if sep and role.strip().lower() in INSTRUCTION_ROLES:
        role_name: str | None = speaker(role)
        glob = rest
    else:
        role_name, glob = None, pattern
    glob = normalize(glob)
    plain = not any(ch in glob for ch in "*?[")
    inner = glob[1:-1] if len(glob) > 2 and glob[0] == glob[-1] == "*" else glob
    if plain or (inner != glob and not any(ch in inner for ch in "*?[")):
        # A plain phrase (or *phrase*) matches anywhere: a substring search, which stays
        # linear where `.*phrase.*` would backtrack through a large body.
        return _Instruction(pattern, role_name, re.compile(re.escape(inner)), search=True, phrase=inner, span=len(inner),
                            packed=inner.replace(" ", ""), squeezed=squeeze(inner))
    return _Instruction(pattern, role_name, _glob(glob))


class Policy:
    """The policy section of the config, compiled once."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._allowed = _ModelRule(config.allowed_models, own_list_wins=True)
        self._denied = _ModelRule(config.denied_models, own_list_wins=False)
        self._operations = [(p, _glob(p)) for p in config.allowed_operations]
        self._instructions = [_instruction(p) for p in config.forbidden_instructions]
        self._model_verdicts: Memo[tuple[str, str], Violation | None] = Memo(lambda key: self._judge_model(*key))
        self._verdicts: TextMemo[_Instruction | None] = TextMemo(self._first_forbidden)
        # Each speaker a rule names has its own rules; every other speaker those for all.
        self._signs_for_all = _PhraseSigns([rule for rule in self._instructions if rule.role is None])
        self._signs_by_role = {role: _PhraseSigns([rule for rule in self._instructions if rule.role in (None, role)])
                               for role in {rule.role for rule in self._instructions if rule.role is not None}}
        # Where a phrase may span texts read in a row, only their edges matter to a search:
        # each text's normal form, its middle left out when long (see `_edges`).
        self._reach = max((rule.span for rule in self._instructions if rule.search), default=0)
        self._all_searches = all(rule.search for rule in self._instructions)
        self._edge_forms: TextMemo[tuple[str, str]] = TextMemo(lambda role, text: self._edges(text))
        # A text's JSON escapes read, once for its own verdict and the runs it is in (a review: twice, or more).
        self._unescape: TextMemo[str] = TextMemo(lambda role, text: json_unescaped(text))
        # Any rule a call can break (a batch's input file is read back from upstream only then).
        self.checks_calls = bool(self._allowed or self._denied or self._operations or self._instructions or config.max_tokens is not None)

    def check(self, request: RequestView) -> Violation | None:
        """The first rule the request breaks, or None."""
        route = request.route
        if violation := self._check_operation(route.operation):
            return violation
        if request.unparseable and self.config.on_unparseable == "reject":
            return Violation("unparseable_body", "the request body is not JSON the policy can read (on_unparseable: reject)", 400)
        if self.checks_calls and route.repeated is not None:
            return Violation("ambiguous_request", f"the query names {route.repeated!r} more than once, with different values (servers differ on "
                             "which one counts, so the policy cannot tell what runs): name it once", 400)
        if self.checks_calls and route.operation == "batches" and _unread_batch_input(request.body):
            return Violation("operation_not_allowed", "a batch's calls must come in a file (input_file_id) for the policy to check them; "
                             "a batch read from elsewhere (Azure's input_blob) cannot be checked")
        if self._instructions and route.operation == "evals" and (stored := _stored_items(request.body)) is not None:
            return Violation("forbidden_instruction", f"an eval run's items from {stored!r} (kept upstream) cannot be read here to check them "
                             "against forbidden_instructions: give them as a file (file_id) or inline (file_content)")
        if self.checks_calls and route.operation == "batch_generate_content":
            return Violation("operation_not_allowed", "a Gemini batch (batchGenerateContent) is not read call by call by the policy: "
                             "send its calls one by one, or allow them where no rule checks calls")
        # An unreadable body names no model: `on_unparseable: forward` has decided that case.
        # A transcription session names its model in its transcription settings only.
        unnamed = route.runs_a_model(request.method) and not request.unparseable and not _names_transcription_model(request.body)
        if violation := self._check_model(route, request.model, unnamed):
            return violation
        if route.operation == "realtime" and request.media is not None and (self._instructions or self.config.max_tokens is not None):
            return Violation("operation_not_allowed", "a WebRTC realtime call (an SDP offer) sends its events to the provider past the proxy, "
                             "where forbidden_instructions and max_tokens cannot reach them: connect over the WebSocket instead")
        if not isinstance(request.body, dict):
            return None
        if violation := self._check_call(route, request.body):
            return violation
        for call in batched_calls(route, request.body):  # each call of a batch, as if sent alone
            if violation := self._check_batched(call):
                return Violation(violation.rule, f"{call.name}: {violation.detail}", violation.status)
        return None

    def input_file(self, route: Route, body: Any) -> str | None:
        """The file, already upstream, whose lines a call runs, when the policy checks calls:
        an OpenAI batch's input file (its lines are calls) and an eval run's items
        (`data_source.source` of type `file_id`, filled into its template). Either may have
        reached upstream where the proxy did not read it (before the proxy was in the way,
        or in parts through the Uploads API)."""
        if not self.checks_calls or not isinstance(body, dict):
            return None
        if route.operation == "batches":
            file_id = body.get("input_file_id")
        elif route.operation == "evals":
            file_id = _items_file(body)
        else:
            return None
        return file_id if isinstance(file_id, str) else None

    def check_input_file(self, route: Route, body: dict[str, Any], file_id: str, data: bytes) -> Violation | None:
        """The file `input_file` named for this call, as upstream holds it."""
        if route.operation == "evals":
            return self._check_eval_items(route, body, file_id, data)
        return self._check_batch_file(route, file_id, data)

    def _check_batch_file(self, route: Route, file_id: str, data: bytes) -> Violation | None:
        """A batch's input file, each line checked as a call of its own. A file already
        uploaded cannot be clamped: with `max_tokens_action: clamp` a line that clamping
        would change (over the cap, or naming no limit) is refused."""
        calls = batch_file_calls(data)
        if calls is None:
            return self._unreadable_file("the batch's input file", file_id, "JSON lines of calls")
        cap = self.config.max_tokens if self.config.max_tokens_action == "clamp" else None
        for call in _file_calls(route, calls, f"input file {file_id!r}"):
            if violation := self._check_batched(call):
                return Violation(violation.rule, f"{call.name}: {violation.detail}", violation.status)
            field = _limit_field(call.route)
            if cap is not None and field is not None and self._clamped(cap, call.params, field, _copies(call.route, call.params)) is not None:
                return Violation("max_tokens_exceeded", f"{call.name}: its output limit is not within the cap of {cap} (max_tokens), and a "
                                 "file already uploaded cannot be clamped: upload it through the proxy, which clamps it")
        return None

    def _check_eval_items(self, route: Route, body: dict[str, Any], file_id: str, data: bytes) -> Violation | None:
        """An eval run's items file: each line's item filled into the run's template, checked
        as the call the run makes of it (its limits are the run's, clamped in the request)."""
        items = json_lines(data)
        if items is None:
            return self._unreadable_file("the eval run's items file", file_id, "JSON lines")
        for number, item in enumerate(items, 1):
            call = _data_source_call(body["data_source"], item, f"data_source file {file_id!r} line {number}", route)
            if violation := self._check_batched(call):
                return Violation(violation.rule, f"{call.name}: {violation.detail}", violation.status)
        return None

    def _unreadable_file(self, what: str, file_id: str, shape: str) -> Violation | None:
        if self.config.on_unparseable == "reject":
            return Violation("unparseable_body", f"{what} {file_id!r} is not {shape} the policy can read", 400)
        return None

    def _check_operation(self, operation: str) -> Violation | None:
        if self._operations and not any(rx.match(operation) for _, rx in self._operations):
            allowed = ", ".join(p for p, _ in self._operations)
            return Violation("operation_not_allowed", f"operation {operation!r} is not allowed (allowed_operations: {allowed})")
        return None

    def _check_batched(self, call: BatchedCall) -> Violation | None:
        if violation := self._check_operation(call.route.operation):
            return violation
        if violation := self._check_model(call.route, call.params.get("model"), call.route.runs_a_model("POST")):
            return violation
        return self._check_call(call.route, call.params)

    def _check_other_models(self, route: Route, body: dict[str, Any]) -> Violation | None:
        """Models a call runs beside its own, judged as its own (a firewall probe: denied ones
        ran so): a tool's (Responses' `image_generation` runs and bills gpt-image-1), a
        realtime session's transcription model."""
        if _OTHER_MODEL_KEYS.isdisjoint(body):  # most bodies: one look at their keys
            return None
        for where, model in _other_models(body):
            if violation := self._check_model(route, model, where.startswith("tools")):
                return Violation(violation.rule, f"{where}: {violation.detail}", violation.status)
        return None

    def _check_model(self, route: Route, model: Any, generating: bool) -> Violation | None:
        """The model's verdict; a call that runs a model without naming one (a Responses call
        with a stored prompt runs the prompt's model, a thread's run the assistant's, an image
        call its API's default, unseen here) fails closed where an allow list applies."""
        if isinstance(model, str):
            return self._model_verdicts((route.provider, model))
        if generating and self._allowed and self._allowed.applies(route.provider):
            return Violation("model_not_allowed", "the call names no model (a stored prompt's, say), so allowed_models cannot check it: "
                             f"name the model ({self._allowed.listing(route.provider)})")
        return None

    def _check_call(self, route: Route, body: dict[str, Any]) -> Violation | None:
        if violation := self._check_instructions(body):
            return violation
        if violation := self._check_other_models(route, body):
            return violation
        cap = self.config.max_tokens
        if cap is None:
            return None
        if self.config.max_tokens_action == "reject":
            return self._check_max_tokens(cap, route, body)
        if (copies := _copies(route, body)) > cap:  # not one token each: nothing to clamp to
            return Violation("max_tokens_exceeded", f"{_outputs(copies, route, body)} exceed the cap of {cap} (max_tokens) at one token each")
        return _unclampable(route, body, cap)

    def _judge_model(self, provider: str, model: str) -> Violation | None:
        denied = next(filter(None, (self._denied.match(provider, name) for name in model_readings(model))), None)
        if denied is not None:
            return Violation("model_not_allowed", f"model {model!r} is denied (denied_models: {denied})")
        if self._allowed and self._allowed.applies(provider) and self._allowed.match(provider, model) is None:
            return Violation("model_not_allowed", f"model {model!r} is not allowed (allowed_models: {self._allowed.listing(provider)})")
        return None

    def _check_instructions(self, body: dict[str, Any]) -> Violation | None:
        if not self._instructions:
            return None
        prompt = body.get("prompt")
        if isinstance(prompt, list) and not all(prompt_text(item) is not None for item in prompt):
            return Violation("forbidden_instruction", "a legacy prompt given as token ids cannot be checked against forbidden_instructions: "
                             "send it as text")
        if not _TOKEN_ID_PROMPTS.isdisjoint(body) and (key := next((key for key in sorted(_TOKEN_ID_PROMPTS) if _token_ids(body.get(key))), None)):
            return Violation("forbidden_instruction", f"a prompt given as token ids ({key!r}) cannot be checked against forbidden_instructions: "
                             "send it as text")
        if not _EMBEDDED_PROMPTS.isdisjoint(body) and (key := next((key for key in sorted(_EMBEDDED_PROMPTS) if body.get(key)), None)):
            return Violation("forbidden_instruction", f"a prompt given as embeddings ({key!r}) cannot be checked against forbidden_instructions: "
                             "send it as text")
        try:
            pieces, runs = read_request(body, extras=True, joined=True, whole=True)
            if isinstance(uploaded := body.get(UPLOADED_TEXT), str):  # an upload's text file, which a model reads later by its id
                pieces.append(("user", uploaded))
        except TooDeep:
            return Violation("forbidden_instruction", f"a text nested deeper than {SCHEMA_DEPTH} levels cannot be checked against "
                             "forbidden_instructions (a server would still write it into the prompt)")
        for role, text in pieces:
            role = ROLE_ALIASES.get(role, role)
            if (rule := self._verdicts(role, text)) is not None:
                return Violation("forbidden_instruction", f"{role} text matches forbidden_instructions pattern {rule.pattern!r}")
        for role, texts in runs:
            role = ROLE_ALIASES.get(role, role)
            if (rule := self._run_verdict(role, texts) or self._run_verdict(role, self._unescaped(texts))) is not None:
                return Violation("forbidden_instruction", f"{role} texts read in a row match forbidden_instructions pattern {rule.pattern!r}")
        return None

    def _first_forbidden(self, role: str, text: str) -> _Instruction | None:
        """The first forbidden-instruction rule that a (role, text) breaks, as written or
        with its JSON escapes read (a tool call's arguments, a tool's output)."""
        found = self._first_match(role, normalize(text))
        if found is None and "\\" in text:
            found = self._first_match(role, normalize(self._unescape("", text)))
        return found

    def _unescaped(self, texts: list[str]) -> list[str]:
        """Texts read in a row with their JSON escapes read; none when no text has one."""
        return [self._unescape("", text) for text in texts] if any("\\" in text for text in texts) else []

    def _first_match(self, role: str, normal: str) -> _Instruction | None:
        rules, squeezed = self._signs_by_role.get(role, self._signs_for_all).tried(normal)
        for rule in rules:
            if rule.matches(normal):
                return rule
            if rule.squeezed:  # the words run together, or joined by what a reader skips
                squeezed = squeeze(normal) if squeezed is None else squeezed
                if rule.squeezed in squeezed:
                    return rule
        return None

    def _run_verdict(self, role: str, texts: list[str]) -> _Instruction | None:
        """A phrase split between texts read in a row (a message's parts, one speaker's
        turns). Where one text ends the model may read a space or none, whichever the phrase
        needs: a search looks for its phrase without spaces in the texts joined without
        theirs (each text's edges suffice, remembered); a glob, matching the whole, is tried
        on the whole joined with nothing and with a space."""
        if self._all_searches:
            edges = [pair for pair in (self._edge_forms("", text) for text in texts) if pair[0]]
            forms, squeezed = [normal for normal, _ in edges], "".join(bare for _, bare in edges)
        else:
            forms = [form for form in map(normalize, texts) if form]
            squeezed = squeeze("".join(forms))
        if len(forms) < 2:
            return None
        packed = "".join(forms).replace(" ", "")
        for rule in self._instructions:
            if rule.role is not None and rule.role != role:
                continue
            if not rule.search:
                found = any(rule.matches(sep.join(forms)) for sep in ("", " "))
            else:  # a phrase of punctuation alone has no letters to squeeze
                found = rule.squeezed in squeezed if rule.squeezed else rule.packed in packed
            if found:
                return rule
        return None

    def _edges(self, text: str) -> tuple[str, str]:
        """A text's normal form and its squeezed form, each with its middle, which no phrase
        reaching past its edges can touch, cut out (a NUL, which no phrase holds, where it
        was). Squeezed before it is cut: punctuation padding a text's end pushed the rest of a
        phrase out of an edge cut first (a firewall probe)."""
        normal, reach = normalize(text), self._reach
        return _middle_cut(normal, reach), _middle_cut(squeeze(normal), reach)

    @staticmethod
    def _check_max_tokens(cap: int, route: Route, body: dict[str, Any]) -> Violation | None:
        copies = _copies(route, body)
        holders = [(body, "", copies)]
        if not _INNER_LIMIT_SET.isdisjoint(body):  # a realtime session's (`/realtime/client_secrets`), Ollama's options, TGI's parameters
            holders += [(inner, f"{name}.", 1.0 if name == "session" else copies) for name in _INNER_LIMITS if isinstance(inner := body.get(name), dict)]
        for holder, prefix, each in holders:
            for field, value in _limits_named(holder):
                limit = _token_limit(value)
                if limit is not None and limit * each > cap:
                    times = f" × {_outputs(each, route, body)}" if each > 1 else ""
                    return Violation("max_tokens_exceeded", f"{prefix}{field} {value!r}{times} exceeds the cap of {cap} (max_tokens)")
        return None

    def clamp(self, route: Route, body: Any) -> dict[str, Any] | None:
        """With `max_tokens_action: clamp`, the body with every limit at most the cap
        (and one set where the request names none); None when nothing changes."""
        cap = self.config.max_tokens
        if cap is None or self.config.max_tokens_action != "clamp" or not isinstance(body, dict):
            return None
        if _is_batch(route):
            requests = body.get("requests")
            if not isinstance(requests, list):
                return None
            clamped = [_with_params(item, self._clamped(cap, item["params"], "max_tokens")) if _has_params(item) else item for item in requests]
            return {**body, "requests": clamped} if clamped != requests else None
        if _is_batch_file(route, body):
            calls = [self._clamped_line(cap, route, call) for call in body[BATCH]]
            return {**body, BATCH: calls} if calls != body[BATCH] else None
        if route.operation in _NESTING_OPERATIONS:
            return self._clamped_nested(cap, body)
        if route.operation == "realtime":  # a session's limits, or an event's: those it names (it has its own default)
            session = body.get("session")
            inner = self._clamped(cap, session, None) if isinstance(session, dict) else None
            outer = self._clamped(cap, body, None)
            return None if inner is None and outer is None else {**(outer or body), **({"session": inner} if inner is not None else {})}
        # Elsewhere (an Assistants run, say) the limits a call names are lowered: none is
        # added where the API may not take one.
        return self._clamped(cap, body, _limit_field(route), _copies(route, body))

    def _clamped_nested(self, cap: int, body: dict[str, Any]) -> dict[str, Any] | None:
        """An eval run's and its graders' sampling limits (those they name: the APIs' own
        defaults stand where they name none)."""
        def clamped(holder: Any) -> Any:
            sampling = holder.get("sampling_params") if isinstance(holder, dict) else None
            lowered = self._clamped(cap, sampling, None) if isinstance(sampling, dict) else None
            holder = holder if lowered is None else {**holder, "sampling_params": lowered}
            inner = holder.get("graders") if isinstance(holder, dict) else None
            if isinstance(inner, dict):  # a multi grader: each of its graders (a review: their limits passed the clamp)
                graders = {name: clamped(grader) for name, grader in inner.items()}
                holder = holder if graders == inner else {**holder, "graders": graders}
            return holder

        changed = {key: clamped(body[key]) for key in ("data_source", "grader") if key in body}
        if isinstance(body.get("testing_criteria"), list):
            changed["testing_criteria"] = [clamped(item) for item in body["testing_criteria"]]
        if "grader" in (reinforcement := _reinforcement(body)):  # a reinforcement fine-tuning job's grader
            grader = clamped(reinforcement["grader"])
            if grader != reinforcement["grader"]:
                changed["method"] = {**body["method"], "reinforcement": {**reinforcement, "grader": grader}}
        return None if all(changed[key] == body[key] for key in changed) else {**body, **changed}

    def _clamped_line(self, cap: int, route: Route, call: dict[str, Any]) -> dict[str, Any]:
        line = _line_route(route, call["url"])
        field = _limit_field(line)
        body = None if field is None else self._clamped(cap, call["body"], field, _copies(line, call["body"]))
        return call if body is None else {**call, "body": body}

    @staticmethod
    def _clamped(cap: int, body: dict[str, Any], field: str | None, copies: float = 1.0) -> dict[str, Any] | None:
        """`body` with each limit it names at most its share of `cap` (the cap over the
        outputs it asks for, `n`), and `field` set to that where it names none (None: left
        so); None when nothing changes."""
        changed = dict(body)
        share = max(1, int(cap // copies)) if copies > 1 and copies != math.inf else cap
        present = {name: limit for name, value in _limits_named(body) if (limit := _token_limit(value)) is not None}
        for name, limit in present.items():
            if limit > share:
                changed[name] = share
        for name in LIMIT_HOLDERS if not _LIMIT_HOLDER_SET.isdisjoint(body) else ():  # Ollama's options, TGI's parameters: the limits they name
            inner = body.get(name)
            if isinstance(inner, dict) and (lowered := {key: share for key, value in _limits_named(inner) if (limit := _token_limit(value)) is not None and limit > share}):
                changed[name] = {**inner, **lowered}
                present[name] = share
        if not present and field is not None:
            changed[field] = share
        thinking = body.get("thinking")
        budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
        if isinstance(budget, int) and not isinstance(budget, bool) and budget >= share:
            # Anthropic refuses a thinking budget not below max_tokens: lowered with it
            changed["thinking"] = {**thinking, "budget_tokens": share - 1}
        return changed if changed != body else None


_LEAST_THINKING_BUDGET = 1024  # Anthropic's least budget_tokens, which must also stay below max_tokens
_LEAST_RESPONSES_OUTPUT = 16  # the Responses API's least max_output_tokens


def _unclampable(route: Route, body: dict[str, Any], cap: int) -> Violation | None:
    """A call the clamp would turn into one the API refuses: a thinking budget that must be
    at least 1,024 tokens and below max_tokens, or a Responses limit below its least, 16
    (a firewall probe: Anthropic answered the clamped call 400)."""
    thinking = body.get("thinking")
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    if shapes_of(route.api, route.operation) == "anthropic" and isinstance(budget, int) and budget >= cap and cap <= _LEAST_THINKING_BUDGET:
        return Violation("max_tokens_exceeded", f"extended thinking needs a budget of at least {_LEAST_THINKING_BUDGET} tokens below max_tokens, "
                         f"and the cap of {cap} (max_tokens) leaves none: lower budget_tokens below the cap, or turn thinking off")
    if route.operation == "responses" and not route.subresource and cap < _LEAST_RESPONSES_OUTPUT:  # not a count of input tokens
        return Violation("max_tokens_exceeded", f"the cap of {cap} (max_tokens) is below the least max_output_tokens the Responses API takes "
                         f"({_LEAST_RESPONSES_OUTPUT})")
    return None


def model_readings(model: str) -> list[str]:
    """A model name and the names of the model it runs, for `denied_models`: a router's
    provider prefix (`openai/gpt-4o`), a fine-tune's base (`ft:gpt-4o-mini:org::id`), a tag
    or version (`llama3:70b`, `claude-sonnet-4@20250514`; `llama3`, which Ollama runs as
    `llama3:latest`), a snapshot's date
    (`gpt-4o-2024-08-06`, `ft:gpt-4o-2024-08-06:org::id`, `claude-opus-4-1-20250805`) or
    spaces around it do not make a denied model another (a firewall probe: they passed
    `gpt-4o*`). The allow list takes the name as written."""
    readings = [model]
    model = model.strip()  # what a lenient server makes of " gpt-4o"
    for name in (model, model.rsplit("/", 1)[-1]):
        if name[:3].lower() == "ft:":
            name = name[3:]
        tagged = () if ":" in name else (f"{name}:latest",)  # Ollama runs a name without a tag as its `latest` (a providers probe)
        for base in (name, name.split(":", 1)[0], name.split("@", 1)[0], *tagged):
            for reading in snapshot_bases(base):
                if reading not in readings:
                    readings.append(reading)
    return readings


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, int) for item in value)


def _middle_cut(text: str, reach: int) -> str:
    return text if len(text) <= 2 * reach else f"{text[:reach]}\x00{text[-reach:]}"


_MANY_OUTPUTS = frozenset(("chat.completions", "completions", "generate_content", "gemini"))


def output_limit(route: Route, body: Any, unnamed: int | None = None) -> float | None:
    """The most output tokens a call allows itself: its largest limit times its outputs
    (`math.inf` where one of them is no number a server reads as such); where it names no
    limit, `unnamed` (the model's own maximum, if known) times its outputs, else None."""
    if not isinstance(body, dict):
        return None
    holders = [body]
    if not _LIMIT_HOLDER_SET.isdisjoint(body):
        holders += [inner for name in LIMIT_HOLDERS if isinstance(inner := body.get(name), dict)]
    limits = [limit for holder in holders for _, value in _limits_named(holder) if (limit := _token_limit(value)) is not None]
    if not limits and unnamed is not None:
        limits = [float(unnamed)]
    if not limits:
        return None
    return float(math.ceil(most)) if math.isfinite(most := max(limits) * _copies(route, body)) else math.inf


def _limits_named(holder: dict[str, Any]) -> list[tuple[str, Any]]:
    """(field, value) of each output limit a holder names (null is none), in the order of
    MAX_TOKEN_FIELDS: one look at its keys, where most name one limit or none."""
    named = _LIMIT_FIELDS.intersection(holder)
    fields = sorted(named, key=MAX_TOKEN_FIELDS.index) if len(named) > 1 else named
    return [(field, value) for field in fields if (value := holder[field]) is not None]


def _copies(route: Route, body: dict[str, Any]) -> float:
    """How many outputs a call generates, each up to its limit: chat's and completions' `n`,
    completions' `best_of` (all generated, one returned), for each of completions' prompts
    (a list of them: texts, or token lists); read as limits are, so what is no number
    counts as more than any cap. (An image call's `n` is no text output.)"""
    copies = 1.0
    if route.operation not in _MANY_OUTPUTS:
        return copies
    for field, value in _output_counts(route, body):
        if (count := _token_limit(value)) is not None and count > copies:
            copies = count
    return copies * _prompts(route, body)


def _output_counts(route: Route, body: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, value) of each count of outputs a call names: `n`, `best_of`, Gemini's
    `candidateCount` (in either spelling of its holder, both read: servers differ on which wins)."""
    if _OUTPUT_COUNT_KEYS.isdisjoint(body):  # most calls ask for one output: one look at their keys
        return []
    counts = [(field, body[field]) for field in ("n", "best_of") if body.get(field) is not None]
    for holder in ("generationConfig", "generation_config"):
        config = body.get(holder)
        if isinstance(config, dict):
            counts += [(f"{holder}.{name}", config[name]) for name in ("candidateCount", "candidate_count") if config.get(name) is not None]
    return counts


_OUTPUT_COUNT_KEYS = frozenset(("n", "best_of", "generationConfig", "generation_config"))


def _prompts(route: Route, body: dict[str, Any]) -> int:
    """Legacy completions' prompts: each is completed apart (a list of texts or of token
    lists; a list of numbers is one prompt's tokens)."""
    prompt = body.get("prompt") if route.operation == "completions" else None
    if isinstance(prompt, list) and prompt and not all(isinstance(item, int) for item in prompt):
        return len(prompt)
    return 1


def _outputs(copies: float, route: Route, body: dict[str, Any]) -> str:
    """`4 outputs (n 4)`, for a refusal."""
    fields = [f"{field} {value!r}" for field, value in _output_counts(route, body)]
    if (prompts := _prompts(route, body)) > 1:
        fields.append(f"{prompts} prompts")
    listed = ", ".join(fields)
    return f"{copies:g} outputs ({listed})" if copies != math.inf else f"a count of outputs that is no number ({listed})"


def _token_limit(value: Any) -> float | None:
    """An output limit as a server may read it: a number, integral or not (`500.0`, `1e3`),
    or a string of one (pydantic-based servers read `"5000"` as 5000); None when absent or
    null. Anything else, or NaN, counts as over every cap: the policy fails closed."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return math.inf
    if not isinstance(value, (int, float)):
        return math.inf
    # NaN; a negative limit: llama.cpp's and Ollama's for none (-1, -2), refused by the others
    return math.inf if value != value or value < 0 else float(value)


def _is_batch(route: Route) -> bool:
    """Anthropic's Message Batches: many `messages` calls in one body, each under `params`
    (whoever serves them: LiteLLM passes them through)."""
    return route.operation == "messages.batches"


def _is_batch_file(route: Route, body: dict[str, Any]) -> bool:
    """An OpenAI batch file, read from its upload (`forms.read_form`)."""
    return route.operation == "files" and isinstance(body.get(BATCH), list)


def _unread_batch_input(body: Any) -> bool:
    """A batch's creation that names its calls otherwise than by a file id to read back."""
    if not isinstance(body, dict):
        return False
    return "input_blob" in body or ("input_file_id" in body and not isinstance(body["input_file_id"], str))


def _line_route(route: Route, url: str) -> Route:
    """What a batch file's line would be sent alone (`/v1/chat/completions`; Azure's
    `/chat/completions`, its `model` the deployment)."""
    return route_for(Provider(route.provider, route.api, upgrade_http=False), url)


class BatchedCall(NamedTuple):
    name: str  # where it is, for the refusal: `requests[2] (custom_id 'a')`, `line 3 (...)`
    route: Route
    params: dict[str, Any]


def _has_params(item: Any) -> bool:
    return isinstance(item, dict) and isinstance(item.get("params"), dict)


def _with_params(item: dict[str, Any], params: dict[str, Any] | None) -> dict[str, Any]:
    return item if params is None else {**item, "params": params}


def batched_calls(route: Route, body: dict[str, Any]) -> list[BatchedCall]:
    """The calls a batch carries, each with the route it would have alone: an Anthropic
    Message Batch's `requests`, an OpenAI batch file's lines; and the model calls an eval
    run or a grader makes (none for any other request)."""
    if _is_batch_file(route, body):
        return _file_calls(route, body[BATCH], "batch file")
    if route.operation in _NESTING_OPERATIONS:
        return _nested_calls(route, body)
    requests = body.get("requests")
    if not _is_batch(route) or not isinstance(requests, list):
        return []
    alone = Route(route.provider, route.api, "messages")
    return [BatchedCall(f"requests[{index}]{_custom_id(item)}", alone, item["params"]) for index, item in enumerate(requests) if _has_params(item)]


# Where OpenAI's APIs take the model calls they will make in a body of their own: an eval
# run's `data_source` (its model, message template, sampling limits and the items filled
# into the template), an eval's graders (`testing_criteria`), a grader run or validated
# (`/fine_tuning/alpha/graders/...`), each a model with its input.
_NESTING_OPERATIONS = frozenset(("evals", "fine_tuning"))


def _nested_calls(route: Route, body: dict[str, Any]) -> list[BatchedCall]:
    calls = []
    source = body.get("data_source")
    if isinstance(source, dict):
        inline = source.get("source")
        items = inline.get("content") if isinstance(inline, dict) and inline.get("type") == "file_content" else None
        calls.append(_data_source_call(source, items, "data_source", route))
    graders = [("grader", body.get("grader")), ("method.reinforcement.grader", _reinforcement(body).get("grader"))]
    graders += [(f"testing_criteria[{index}]", item) for index, item in enumerate(as_list(body.get("testing_criteria")))]
    while graders:
        name, grader = graders.pop()
        if not isinstance(grader, dict):
            continue
        if isinstance(grader.get("graders"), dict):  # a multi grader: its graders by name
            graders.extend((f"{name}.graders.{key}", inner) for key, inner in grader["graders"].items())
        if "model" in grader or "input" in grader:
            sampling = grader.get("sampling_params")
            calls.append(BatchedCall(name, route, {**(sampling if isinstance(sampling, dict) else {}), "model": grader.get("model"),
                                                   "input": [*as_list(grader.get("input")), *strings_in(grader.get("labels"))]}))
    return calls


_TRANSCRIPTION_KEYS = frozenset(("session", "input_audio_transcription", "audio"))  # where a session's transcription settings are
_OTHER_MODEL_KEYS = _TRANSCRIPTION_KEYS | {"tools"}
_TOOLS_RUNNING_A_MODEL = frozenset(("image_generation",))


def _names_transcription_model(body: Any) -> bool:
    return (isinstance(body, dict) and not _TRANSCRIPTION_KEYS.isdisjoint(body)
            and any(where.endswith("transcription") for where, model in _other_models(body) if isinstance(model, str)))


def _other_models(body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(where, model) of each model a body names beside its own (see `_check_other_models`);
    a tool that runs its default where it names none (`image_generation`: gpt-image-1) with None."""
    for index, tool in enumerate(as_list(body.get("tools"))):
        if isinstance(tool, dict) and ("model" in tool or tool.get("type") in _TOOLS_RUNNING_A_MODEL):
            yield f"tools[{index}]", tool.get("model")
    for prefix, holder in (("", body), ("session.", body.get("session"))):
        if isinstance(holder, dict):
            for where, transcription in transcriptions(holder):
                if "model" in transcription:
                    yield f"{prefix}{where}", transcription["model"]


def _stored_items(body: Any) -> str | None:
    """The kind of an eval run's items kept upstream (`stored_completions`, `responses`):
    what the model reads of them is not in the call, nor in a file the proxy reads back."""
    source = body.get("data_source") if isinstance(body, dict) else None
    inner = source.get("source") if isinstance(source, dict) else None
    kind = inner.get("type") if isinstance(inner, dict) else None
    return kind if isinstance(kind, str) and kind not in ("file_id", "file_content") else None


def _items_file(body: dict[str, Any]) -> Any:
    """The file id an eval run takes its items from (`data_source.source`, type `file_id`)."""
    source = body.get("data_source")
    inner = source.get("source") if isinstance(source, dict) else None
    return inner.get("id") if isinstance(inner, dict) and inner.get("type") == "file_id" else None


def _data_source_call(source: dict[str, Any], items: Any, name: str, route: Route) -> BatchedCall:
    """The call an eval run's data source makes of its items (a list of them inline, or one
    line of its items file): its model, sampling limits and template, with the items'
    strings where the template puts them (see `_filled`)."""
    template = source.get("input_messages")
    messages = as_list(template.get("template")) if isinstance(template, dict) else []
    sampling = source.get("sampling_params")
    return BatchedCall(name, route, {**(sampling if isinstance(sampling, dict) else {}), "model": source.get("model"),
                                     "input": [*messages, *_filled(messages, template, items)]})


def _filled(messages: list[Any], template: Any, items: Any) -> list[Any]:
    """An eval's items as its template fills them in: an `item_reference` takes the item's
    messages whole (roles as written); a template's messages are written out with each
    item's values where they name them (`{{item.q}}`: a phrase completed only by the fill
    passed, a review), and the items' texts are also read in the role of each message that
    names an item however it does (a user's where none does)."""
    entries = items if isinstance(items, list) else [items]
    found: list[Any] = []
    if isinstance(template, dict) and template.get("type") == "item_reference":
        for entry in entries:
            found.extend(as_list(_referenced(entry, template.get("item_reference"))))
    naming = [message for message in messages if isinstance(message, dict)
              and any("item" in text and _NAMES_AN_ITEM.search(text) for text in strings_in(message.get("content")))]
    room = [_FILL_ROOM]  # what writing the items out may add, all told: a reference repeated to a large item grew without end (a review)
    for entry in entries:
        values = entry.get("item", entry) if isinstance(entry, dict) else entry
        found.extend(_written_out(message, values, SCHEMA_DEPTH, room) for message in naming)
    roles = sorted({message["role"] for message in naming if isinstance(message.get("role"), str)}) or ["user"]
    found.extend({"role": role, "content": text} for text in strings_in(items) for role in roles)
    return found


# `{{item.q}}`, `{{ item }}`, `{{item['q']}}`: a template's reference to its item. Bounded:
# an open `{{` with no end, repeated, made the unbounded form take quadratic time (a review:
# 40 KB of them held the event loop 22 s).
_NAMES_AN_ITEM = re.compile(r"\{\{[^{}]{0,200}?\bitem\b")
_ITEM_FIELD = re.compile(r"\{\{[ \t]{0,20}item((?:\.[\w-]+){0,20})[ \t]{0,20}\}\}")
_FILL_ROOM = 4 << 20  # characters writing out an eval's items may add to what the policy reads


def _written_out(value: Any, item: Any, depth: int, room: list[int]) -> Any:
    """A template's message with each `{{item.x}}` in its strings replaced by the item's
    value there (a text as it is, anything else as JSON), as the eval run writes it; once
    `room` is spent, the rest is left as written (the items' texts are read all the same)."""
    if isinstance(value, str):
        def fill(found: re.Match[str]) -> str:
            text = _as_text(_referenced(item, found.group(1)[1:]) if found.group(1) else item)
            if len(text) > room[0]:
                return found.group(0)
            room[0] -= len(text)
            return text

        return _ITEM_FIELD.sub(fill, value) if "{{" in value else value
    if depth <= 0:
        return value
    if isinstance(value, dict):
        return {key: _written_out(inner, item, depth - 1, room) for key, inner in value.items()}
    if isinstance(value, list):
        return [_written_out(inner, item, depth - 1, room) for inner in value]
    return value


def _as_text(value: Any) -> str:
    """An item's value as a template writes it in: a text as it is, anything else as JSON."""
    if value is None:
        return ""
    try:
        return tool_input_text(value)
    except TooDeep:
        return ""


def _referenced(item: Any, reference: Any) -> Any:
    """What a dotted reference (`item.messages`, `messages`) names in an item, or None."""
    if not isinstance(reference, str):
        return None
    value = item
    for part in reference.strip("{} ").split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _reinforcement(body: dict[str, Any]) -> dict[str, Any]:
    """A reinforcement fine-tuning job's method (`method.reinforcement`: its grader); {} for any other."""
    method = body.get("method")
    reinforcement = method.get("reinforcement") if isinstance(method, dict) else None
    return reinforcement if isinstance(reinforcement, dict) else {}


def _file_calls(route: Route, calls: list[dict[str, Any]], where: str) -> list[BatchedCall]:
    """An OpenAI batch file's lines as calls (`forms.batch_file_calls`), named by line."""
    return [BatchedCall(f"{where} line {number}{_custom_id(call)}", _line_route(route, call["url"]), call["body"])
            for number, call in enumerate(calls, 1)]


def _custom_id(item: dict[str, Any]) -> str:
    custom_id = item.get("custom_id")
    return f" (custom_id {custom_id!r})" if isinstance(custom_id, str) else ""


def _limit_field(route: Route) -> str | None:
    """The output limit field the API names for an operation that generates tokens (Anthropic's
    Messages API's whoever serves it: Claude on Vertex AI, a server of your own)."""
    if shapes_of(route.api, route.operation) == "anthropic":
        return {"messages": "max_tokens", "completions": "max_tokens_to_sample"}.get(route.operation)
    if route.operation == "responses":
        return "max_output_tokens"
    if route.operation == "chat.completions":
        # The older name where the newer is not known: Azure before 2024-09-01-preview, and a
        # server of your own (OpenAI-compatible servers take max_tokens; not all the other).
        newer = route.provider in ("openai", "azure") and route.azure_takes_2024_09_fields()
        return "max_completion_tokens" if newer else "max_tokens"
    if route.operation == "completions":
        return "max_tokens"
    return None
