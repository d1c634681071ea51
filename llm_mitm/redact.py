"""Secret detection and fingerprints for everything we write down.

A secret is replaced whole by a fingerprint such as `sk-proj-…a1b2#3f9c2e1d07b4a6c5`: the key's
kind, its last four characters (what provider dashboards show) and a hash, so traces
still group per key while no more of the key is kept than the dashboard shows.
Only what we write is redacted; what goes upstream is never touched.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

import orjson

from llm_mitm.literals import Literals
from llm_mitm.memo import Memo
from llm_mitm.texts import TEXT_PART_TYPES, json_unescaped, speaker

SENSITIVE_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "api-key",
        "x-api-key",
        "cookie",
        "set-cookie",
        "x-goog-api-key",
        "ocp-apim-subscription-key",
    }
)
# Body fields whose value is a credential whatever its shape.
SENSITIVE_FIELDS = frozenset(
    {
        "api_key",
        "apikey",
        "api-key",
        "access_token",
        "refresh_token",
        "id_token",
        "client_secret",
        "password",
        "passwd",
        "secret",
        "secret_key",
        "private_key",
        "authorization",
        "passphrase",
        "credential",
        "credentials",
    }
)
# Query parameters: the same, plus names too broad for bodies (error bodies carry
# "code": "invalid_api_key"), and Azure API Management's key (`?subscription-key=`).
SENSITIVE_PARAMS = SENSITIVE_FIELDS | {"key", "token", "sig", "signature", "code", "subscription-key", "auth",
                                      "x-amz-signature", "x-amz-security-token", "x-goog-signature"}  # S3's and Cloud Storage's signed links
# In free text (`GITHUB_TOKEN=...`, `DB_PASS=...`, `Pwd=...`, `AWS_SECRET_ACCESS_KEY=...`,
# `clientSecret:`) also these, as regex branches. A token or `pass` only after a prefix
# (`"token": "Hello"` is a logprob's word), and neither a tokenizer's special tokens nor a
# page cursor; `pwd` not when a path follows (`PWD=/home/ana`, `PWD : C:\Users`).
_NOT_SECRET_TOKENS = "".join(f"(?<!{prefix}_)" for prefix in (
    "eos", "bos", "pad", "unk", "sep", "cls", "mask", "eot", "boi", "eoi", "image", "video", "audio", "next", "stop", "page"))
_FREE_TEXT_NAMES = (
    rf"(?<=[A-Za-z0-9][_-]){_NOT_SECRET_TOKENS}token",
    r"(?<=[A-Za-z0-9][_-])pass",
    r"""pwd(?!(?:\\?["'])?[ \t]*[:=][ \t]*["']?(?:[/~]|[A-Za-z]:\\))""",
    "access_key", "access-key", "accesskey", "secret-key", "secretkey", "private-key", "privatekey",
)
_CAMEL_CASE_NAMES = r"(?-i:(?<=[a-z0-9])(?:(?<!Page)(?<!Next)(?<!Continuation)Token|Secret|SecretKey|PrivateKey|AccessKey|Password|ApiKey))"
# Every name above and in SENSITIVE_FIELDS holds one of these (`token` is tested apart:
# see `Redactor._names_something`); a configured name that holds none is added.
_NAME_STEMS = ("pass", "pwd", "secret", "key", "auth")
_NOT_A_SECRET = re.compile(r"(?i:true|false|null|none)")  # `hasPassword: false`, `first_pass: true` (a number may be a PIN)

_KEY_PREFIXES = ("sk-ant-", "sk-proj-", "sk-svcacct-", "sk-admin-", "sk-")
# A fingerprint's hash, hex digits of SHA-256: 64 bits. A fingerprint is a caller's identity
# (limits, budgets, replay, `by_key`): with 32 bits another key of the same fingerprint was
# found in minutes on one core, and it was given the first key's recorded answers (a secrets probe).
FINGERPRINT_HEX = 16
# Where one of the other services' keys (their shapes below) may start, in a text: substring
# searches in C.
_OTHER_KEY_MARKS = ("k_live_", "k_test_", "hf_", "gsk_", "xai-", "pplx-", "xox", "AKIA", "ASIA")


# The first look's signs of a secret case matters for: other services' keys, a JWT's `.ey`/`.ew`
# inside spaced JSON, an ephemeral key, a GitHub token (`ghs_`: the GITHUB_TOKEN of Actions,
# pasted from CI logs), a private key block.
_CASED_SIGNS = Literals([mark.encode() for mark in _OTHER_KEY_MARKS] + [b"PRIVATE KEY-----", b".ey", b".ew", b"ek_", b"github_pat_"]
                        + [b"gh%c_" % letter for letter in b"pousr"])
_TOKEN = Literals([b"token"])


def _names_a_token(folded: bytes) -> bool:
    """`token`, not as `tokens` (`max_tokens` is in nearly every body)."""
    return any(folded[end : end + 1] != b"s" for end in _TOKEN.ends_in(folded))


def _may_hold_other_key(text: str) -> bool:
    return any(mark in text for mark in _OTHER_KEY_MARKS)

# Every byte a hex digit ("x") or not (" "): a 32-hex key is then a run of 32 "x", found by
# one translate and one substring search, both C; the shape's regex tries every position.
_HEX_MARKS = bytes(0x78 if chr(byte) in string.hexdigits else 0x20 for byte in range(256))
_HEX_RUN = b"x" * 32


def _folded(text: str) -> bytes:
    """Text folded as a case-insensitive pattern matches it: `ſ` is an s, `K` (Kelvin) a k,
    `ı` and `İ` an i (casefold makes the dotted capital an i and a combining dot)."""
    if text.isascii():
        return text.encode("ascii").lower()
    # surrogatepass: mitmproxy writes a byte that is not UTF-8 (a request target's) as a lone
    # surrogate, which strict UTF-8 refuses (a robustness probe: the flow's printout raised)
    return text.replace("\u0130", "i").casefold().replace("\u0131", "i").encode("utf-8", "surrogatepass")


def _has_hex_run(text: str) -> bool:
    return _HEX_RUN in text.encode("utf-8", "surrogatepass").translate(_HEX_MARKS)  # non-ASCII: bytes >= 0x80, not hex


# Secret shapes, each with a test that every match passes, so that ordinary text costs
# a few passes of C instead of a regex pass per shape (20-30 times more for the hex shape).
# A secret starts where the text before it is not part of a word, or right after an escape
# that ends in a letter or digit: `\n` in JSON kept as text (a tool call's arguments), `%3D`
# in a URL, `\u00e9`.
_AFTER_ESCAPE = r"(?<=\\[nrtbf])|(?<=%[0-9A-Fa-f]{2})|(?<=\\u[0-9A-Fa-f]{4})"
# How a JSON object starts in base64: `{"` (eyJ), `{ ` (eyA), `{\n` (ewo), `{\r` (ew0), `{\t` (ewk); not `eyes`.
_JSON_OBJECT_B64 = "(?:ey[JAI]|ew[ok0])"
_AWS_KEY_ID = re.compile(r"(?:AKIA|ASIA)[0-9A-Z]{16}(?![0-9A-Za-z])")


class _Shape(Protocol):
    def sub(self, repl: Callable[[re.Match[str]], str], string: str) -> str: ...
    def finditer(self, string: str) -> Iterator[re.Match[str]]: ...


class _Beside:
    """A shape that is a secret only in a text that also holds `companion`: a key with no
    mark of its own, known by what it comes with."""

    def __init__(self, companion: re.Pattern[str], shape: re.Pattern[str]) -> None:
        self.companion, self.shape = companion, shape

    def sub(self, repl: Callable[[re.Match[str]], str], string: str) -> str:
        return self.shape.sub(repl, string) if self.companion.search(string) is not None else string

    def finditer(self, string: str) -> Iterator[re.Match[str]]:
        return self.shape.finditer(string) if self.companion.search(string) is not None else iter(())


# A private key, PEM-armoured: the whole block, once base64 follows its first line (and any
# `Proc-Type:` lines): a text that names the armour is no key (a review).
_PRIVATE_KEY_BLOCK = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:\s|\\[nr])*(?:[A-Za-z-]+: [^\n\\]*(?:\s|\\[nr])+)*[A-Za-z0-9+/=]{40}"
    r".*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.DOTALL)


def _may_hold_private_key(text: str) -> bool:
    return "PRIVATE KEY-----" in text


_SHAPES: tuple[tuple[Callable[[str], bool], _Shape], ...] = (
    # OpenAI (sk-, sk-proj-, sk-svcacct-, sk-admin-) and Anthropic (sk-ant-...) keys.
    (lambda text: "sk-" in text, re.compile(rf"(?:(?<![A-Za-z0-9-])|{_AFTER_ESCAPE})sk-[A-Za-z0-9_-]{{16,}}")),  # after `_` too: KEY_sk-proj-...
    # JSON web tokens: their header and claims are JSON objects, `{"` (eyJ), or with a space or a line break after the brace (eyAi, ewo).
    (lambda text: "eyJ" in text or ".ey" in text or ".ew" in text, re.compile(
        rf"(?:(?<![A-Za-z0-9])|{_AFTER_ESCAPE}){_JSON_OBJECT_B64}[A-Za-z0-9_-]{{3,}}\.{_JSON_OBJECT_B64}[A-Za-z0-9_-]{{3,}}\.[A-Za-z0-9_-]*")),
    # Google API keys (Gemini's OpenAI-compatible API takes them as bearer tokens).
    (lambda text: "AIza" in text, re.compile(rf"(?:(?<![A-Za-z0-9_-])|{_AFTER_ESCAPE})AIza[A-Za-z0-9_-]{{35}}(?![A-Za-z0-9_-])")),
    # Microsoft's annotated keys (Azure OpenAI and AI services keys made since 2024): 84
    # characters, their signature `JQQJ9` and kind at a fixed place.
    (lambda text: "JQQJ9" in text, re.compile(
        rf"(?:(?<![A-Za-z0-9])|{_AFTER_ESCAPE})[A-Za-z0-9]{{52}}JQQJ9[9DH][A-Za-z0-9][A-L][A-Za-z0-9]{{16}}[A-Za-z][A-Za-z0-9]{{7}}"
        r"(?:[A-Za-z0-9]{2}==)?(?![A-Za-z0-9])")),
    # OpenAI's ephemeral keys (a realtime session's client secret, `ek_...`).
    (lambda text: "ek_" in text, re.compile(rf"(?:(?<![A-Za-z0-9_-])|{_AFTER_ESCAPE})ek_[A-Za-z0-9_-]{{16,}}")),
    # GitHub's tokens (`ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_`, fine-grained `github_pat_`).
    (lambda text: "_" in text and ("gh" in text or "github_pat_" in text), re.compile(
        rf"(?:(?<![A-Za-z0-9_-])|{_AFTER_ESCAPE})(?:gh[pousr]_[A-Za-z0-9]{{36,}}|github_pat_[A-Za-z0-9_]{{22,}})")),
    # Azure OpenAI keys: 32 hex digits.
    (_has_hex_run, re.compile(rf"(?:(?<![0-9A-Za-z])|{_AFTER_ESCAPE})[0-9a-fA-F]{{32}}(?![0-9A-Za-z])")),
    # An AWS secret access key: 40 characters of base64 and no prefix of its own, so looked
    # for only in a text that holds an access key id, as they come (a credentials CSV, an
    # environment dump); with both cases and a digit, as one has but a hex hash or a word
    # run has not. Before the id's own shape, which takes the id away.
    (lambda text: "AKIA" in text or "ASIA" in text, _Beside(_AWS_KEY_ID, re.compile(
        rf"(?:(?<![A-Za-z0-9/+])|{_AFTER_ESCAPE})(?=[A-Za-z0-9/+]{{0,39}}[0-9])(?=[A-Za-z0-9/+]{{0,39}}[a-z])(?=[A-Za-z0-9/+]{{0,39}}[A-Z])"
        r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"))),
    # Other providers' and services' keys a prompt or a tool may carry (a secrets probe):
    # Stripe, Hugging Face, Groq, xAI, Perplexity, Slack, an AWS access key id.
    (_may_hold_other_key, re.compile(
        rf"(?:(?<![A-Za-z0-9])|{_AFTER_ESCAPE})(?:[sr]k_(?:live|test)_[A-Za-z0-9]{{16,}}|hf_[A-Za-z0-9]{{30,}}|gsk_[A-Za-z0-9]{{40,}}"
        r"|xai-[A-Za-z0-9]{40,}|pplx-[A-Za-z0-9]{40,}|xox[abprse]-[A-Za-z0-9-]{10,}|" + _AWS_KEY_ID.pattern + ")")),
    (_may_hold_private_key, _PRIVATE_KEY_BLOCK),
)
# Whatever follows "Bearer" is a credential, whatever its shape (not a fingerprint already).
# Only ASCII letters match "bearer" here, so its test is a substring of the lower-cased text.
# Between a scheme and its credential: spaces (a no-break space too), or one line break, as
# written or as a JSON string's escape, with spaces either side (a secrets probe: `Bearer`
# then the token on the next line kept the token whole, and fingerprinted `Bearer`).
_AUTH_GAP = r"(?:[ \t\u00a0]+(?:\r?\n|\\r\\n|\\n)?[ \t\u00a0]*|(?:\r?\n|\\r\\n|\\n)[ \t\u00a0]*)"
_BEARER = re.compile(rf"(?i:(bearer){_AUTH_GAP})([A-Za-z0-9._~+/=-]{{8,}}+)(?!…)")
# The shortest text a shape or "Bearer" finds: a JWT's `eyJ`, 3 characters, a dot, `eyJ`, 3, a
# dot (a URL's password, shorter, has a test of its own).
_SHORTEST_SECRET = 14
# In a name, what says its value is a password (`password`, `passwd`, `DB_PASS`, `pwd`).
_PASSWORD_WORDS = ("pass", "pwd")
# A password in a URL (`postgres://admin:pw@db`, `https://user:ghp_...@github.com`).
# The user may be empty (`redis://:pw@cache`), and the password may hold `@`: it ends at the last
# `@` before the host (a secrets probe: both were kept whole).
_USERINFO_PASSWORD = re.compile(r"(?<=://)([^/\s:@\"'<>]*:)([^/\s\"'<>]+)(?=@[^/\s@\"'<>]*(?:[/\s\"'<>]|$))")


# (8 hex digits: a trace written before fingerprints had 16)
_FINGERPRINT = re.compile(r"(?:(?:bearer|basic|token|digest) )?(?:sk-[a-z]*-?|jwt:)?…[A-Za-z0-9._~+/=-]{0,4}#[0-9a-f]{8}(?:[0-9a-f]{8})?", re.IGNORECASE)


_DIGEST = re.compile(r"…[^#\s]{0,12}#([0-9a-f]{16})")  # what a fingerprint hides, by its digest


def is_fingerprint(value: str) -> bool:
    """Exactly a fingerprint (a value holding one and more is not: the rest is its own)."""
    return _FINGERPRINT.fullmatch(value) is not None


# A browser's realtime WebSocket sends its key as a subprotocol, `openai-insecure-api-key.<key>`
# (no header can be set there): a no-shape key was traced and printed whole (a review).
SUBPROTOCOL_KEY = "openai-insecure-api-key."


def subprotocol_keys(value: str) -> list[str]:
    """The keys a `Sec-WebSocket-Protocol` header's list carries."""
    return [key for item in value.split(",") if (key := item.strip().removeprefix(SUBPROTOCOL_KEY)) != item.strip() and key]


def holds_fingerprint(value: str) -> bool:
    """Whether a redacted value hides something (a credential header as traced)."""
    return "…" in value and _FINGERPRINT.search(value) is not None


_SCHEME = re.compile(rf"(?i)(?:bearer|basic|token|digest){_AUTH_GAP}")
_UNQUOTED_END = re.compile(r"""[\s"'&\\]|\Z""")  # not `,` or `;`: a password may hold them


def _value_span(text: str, at: int) -> tuple[int, int]:
    """Where the value that starts at `at` is: inside its quotes when quoted (escaped
    quotes too), else up to a space, a quote or `&`, after an auth scheme if one leads."""
    quote = '\\"' if text.startswith('\\"', at) else text[at : at + 1]
    if quote in ('"', "'", '\\"'):
        start = at + len(quote)
        end = start
        while (end := text.find(quote, end)) != -1 and quote != '\\"' and text[end - 1] == "\\":
            end += 1
        return start, end if end != -1 else len(text)
    scheme = _SCHEME.match(text, at)
    start = scheme.end() if scheme else at
    end = _UNQUOTED_END.search(text, start)
    return start, end.start() if end else len(text)


# A form-data part: its headers, a blank line, its value up to the next boundary's line;
# as written, or within a JSON string as printed (quotes and line breaks escaped).
_FORM_LINE_END = r'(?:\r?\n|\\r\\n|\\n)'
_FORM_FIELD = re.compile(
    rf'Content-Disposition:(?:(?!{_FORM_LINE_END}).)*?\bname=\\?"(?P<name>[^"\\\r\n]*)\\?"(?:(?!{_FORM_LINE_END}).)*{_FORM_LINE_END}'
    rf'(?:(?:(?!{_FORM_LINE_END}).)+{_FORM_LINE_END})*?{_FORM_LINE_END}(?P<value>(?:(?!{_FORM_LINE_END}--).)*)', re.IGNORECASE | re.DOTALL)
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def _percent_decoded(text: str) -> tuple[str, Callable[[int], int]]:
    """`text` with its %XX escapes decoded (a byte a character), and a map from a place in
    the result to the same place in `text`."""
    escapes = [match.start() - 2 * number for number, match in enumerate(_ESCAPE.finditer(text))]  # where each lands
    decoded = _ESCAPE.sub(lambda match: chr(int(match.group(0)[1:], 16)), text)
    return decoded, lambda place: place + 2 * bisect.bisect_left(escapes, place)


def _may_hold_link(text: str) -> bool:
    """Whether text may hold a URL's parameters (`?...&sig=...`) or percent escapes."""
    return "%" in text or ("?" in text and "=" in text)


def split_scheme(value: str) -> tuple[str | None, str]:
    """`Bearer <token>` as ("Bearer", token), the scheme as written: an HTTP auth scheme is
    case-insensitive and any run of spaces or tabs may follow it. (None, value) when no
    known scheme leads."""
    parts = value.split(None, 1)
    if len(parts) == 2 and parts[0].lower() in ("bearer", "basic", "token", "digest"):
        return parts[0], parts[1].strip()
    return None, value.strip()


# A terminal's control sequences (mitmdump colours names and values apart on a terminal).
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A header line, or a query parameter or form field as mitmdump lists them (`name:   value`,
# padded; mitmproxy 12 as YAML, maybe quoted).
_NAMED_LINE = re.compile(r"(\s*)([A-Za-z0-9_-]+):([ \t]+)(.*)", re.DOTALL)
# A line of a hexdump: mitmproxy 11's (`0000000010 61 62 ... 6f   abc`, the hex column 47
# wide) or 12's (`0010:   61 62 63 64  65 ...   abcde`, the pretty_hex crate's).
_HEXDUMP_LINE = re.compile(r"\s*(?:[0-9a-f]{10} [0-9a-f ]{47}   |[0-9a-f]{4,16}:   [0-9a-f]{2}(?:  ?[0-9a-f]{2}){0,15}(?: {3}|\s*$))")
# Where a request's own credentials are looked for everywhere (`Redactor.sent_credentials`):
# shorter ones would be found in ordinary text.
SHORTEST_SENT = 8
_NOTHING_SENT: Mapping[str, str] = MappingProxyType({})


def _through_ansi(line: str, redact: Callable[[str], str]) -> str:
    """`redact` applied to the line's text without its control sequences (one between a name
    and its value would hide the pair), which are put back where the text around them is
    unchanged: those inside what was replaced come right after it, so the colour of the rest
    of the line is as it was. Nothing of the original text comes back, only the codes."""
    plain = _ANSI.sub("", line)
    redacted = redact(plain)
    if redacted == plain:
        return line
    head = 0
    while head < len(plain) and head < len(redacted) and plain[head] == redacted[head]:
        head += 1
    tail = 0
    while tail < len(plain) - head and tail < len(redacted) - head and plain[-1 - tail] == redacted[-1 - tail]:
        tail += 1
    shift, after = len(redacted) - len(plain), len(redacted) - tail  # `after`: where the change ends in `redacted`
    out, done, removed = [], 0, 0
    for code in _ANSI.finditer(line):
        at = code.start() - removed  # where it stood in `plain`
        removed += len(code.group(0))
        place = at if at <= head else after if at < len(plain) - tail else at + shift  # never decreasing
        out += [redacted[done:place], code.group(0)]
        done = place
    return "".join(out) + redacted[done:]


def _hexdump_left_out(lines: list[str]) -> str:
    """What stands for these lines of hexdump: one line, indented and ended as they are."""
    first = lines[0]
    indent = first[: len(first) - len(first.lstrip())]
    end = "\r" if first.endswith("\r") else ""
    return f"{indent}({len(lines)} lines of hexdump left out by llm-mitm: a key in binary content cannot be found){end}"


def without_spelled_secrets(body: Any, redactor: Redactor, sent: Mapping[str, str]) -> Any:
    """An answer whose logprobs spell a secret a token (a few characters) at a time, no
    piece of it a shape or a credential sent, with those tokens' texts gone (their numbers
    kept): chat's `logprobs.content` and `.refusal`, Responses' output text's `logprobs`,
    legacy completions' `tokens`. `body` itself when none does (a secrets probe: a key the
    text hid was readable, joined back from its tokens)."""
    if not isinstance(body, dict) or not ("choices" in body or "output" in body):
        return body
    changed = False

    def spelling(texts: list[Any]) -> list[bool]:
        """Which of the tokens `texts` spell part of a secret (none: an empty list)."""
        pieces = [text if isinstance(text, str) else "" for text in texts]
        joined = "".join(pieces)
        spans = redactor.secret_spans(joined) + [(at, at + len(value)) for value in sent for at in _occurrences(joined, value)]
        if not spans:
            return []
        marked, start = [], 0
        for piece in pieces:
            end = start + len(piece)
            marked.append(any(begin < end and start < finish for begin, finish in spans))
            start = end
        return marked

    def entries(run: Any) -> Any:
        nonlocal changed
        if not isinstance(run, list):
            return run
        marked = spelling([entry.get("token") if isinstance(entry, dict) else None for entry in run])
        if not any(marked):
            return run
        changed = True
        return [{**entry, "token": "", "bytes": None, "top_logprobs": []} if hide and isinstance(entry, dict) else entry
                for entry, hide in zip(run, marked)]

    choices = []
    for choice in body.get("choices") or ():
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        if isinstance(logprobs, dict):
            tokens = logprobs.get("tokens")
            if isinstance(tokens, list) and any(marked := spelling(tokens)):  # legacy completions
                changed = True
                tops = logprobs.get("top_logprobs")
                logprobs = {**logprobs, "tokens": ["" if hide else token for token, hide in zip(tokens, marked)],
                            "top_logprobs": [{} if hide else top for top, hide in zip(tops, marked)] if isinstance(tops, list) else tops}
            logprobs = {**logprobs, **{key: entries(logprobs[key]) for key in ("content", "refusal") if key in logprobs}}
            choice = {**choice, "logprobs": logprobs}
        choices.append(choice)
    output = []
    for item in body.get("output") or ():
        if isinstance(item, dict) and isinstance(item.get("content"), list):
            item = {**item, "content": [{**part, "logprobs": entries(part["logprobs"])} if isinstance(part, dict) and "logprobs" in part else part
                                        for part in item["content"]]}
        output.append(item)
    if not changed:
        return body
    return {**body, **({"choices": choices} if "choices" in body else {}), **({"output": output} if "output" in body else {})}


def _occurrences(text: str, value: str) -> list[int]:
    found, at = [], text.find(value)
    while at != -1:
        found.append(at)
        at = text.find(value, at + 1)
    return found


def replace_sent(value: Any, sent: Mapping[str, str]) -> Any:
    """`value` (plain data: a trace record) with every exact occurrence of a credential the
    request sent replaced by its fingerprint (`sent`, from `Redactor.sent_credentials`): a
    copy when one is there, else `value` itself. One serialisation and a substring search
    per credential tell, in C; nearly always none is there (the headers were redacted)."""
    if not sent:
        return value
    try:
        blob = orjson.dumps(value)
    except (TypeError, RecursionError):  # not JSON orjson writes: look everywhere
        present = list(sent.items())
    else:
        present = [(secret, hidden) for secret, hidden in sent.items() if orjson.dumps(secret)[1:-1] in blob]
        if b"***" in blob:  # maybe a masked echo (`_unmasked`): every credential is looked for
            present = list(sent.items())
    if not present:
        return value
    return _map_strings(value, lambda text: _replace_each(text, present))


def _replace_each(text: str, pairs: Iterable[tuple[str, str]]) -> str:
    """Each secret in `text` replaced by what hides it, in the order given (longest first),
    and then its masked echoes (`_unmasked`)."""
    pairs = list(pairs)
    for secret, hidden in pairs:
        text = text.replace(secret, hidden)
    return _unmasked(text, pairs) if "***" in text else text


_MASK = re.compile(r"\*{3,}")
_ECHO_HEAD, _ECHO_TAIL = 3, 4  # what OpenAI's 401 shows of a key at least: `sk-` and more, stars, its last four


def _unmasked(text: str, pairs: Sequence[tuple[str, str]]) -> str:
    """`text` with each masked echo of a secret of `pairs` (`sk-AbCdE*****WxYz`, as OpenAI's
    401 quotes a wrong key: its first and last characters around stars) replaced by what
    hides that secret: the characters shown around the stars are more of it than its
    fingerprint keeps (a secrets probe). An echo shows at least its first three characters
    and its last four, each part a word of its own: a placeholder in a model's answer
    (`OPENAI_API_KEY=sk-proj-***`) is no echo, and is left as written (a review: it was
    rewritten, with the key's last four characters, into the traced answer)."""
    out, done = [], 0
    for mask in _MASK.finditer(text):
        start, end = mask.span()
        if not start or text[start - 1].isspace():  # stars after a space or a line's start (Markdown's ***): no echo
            continue
        for secret, hidden in pairs:
            if not (head := _shown_head(text, start, secret)):
                continue
            tail = _shown_tail(text, end, secret)
            if head >= _ECHO_HEAD and tail >= _ECHO_TAIL and head + tail < len(secret) and start - head >= done:
                out += [text[done : start - head], hidden]
                done = end + tail
                break
    return "".join(out) + text[done:] if out else text


def _shown_head(text: str, at: int, secret: str) -> int:
    """How many of `secret`'s first characters stand in `text` right before `at`, a word's
    start: the longest (found from where its first character stands, not by trying each size)."""
    lowest = max(0, at - len(secret) + 1)
    start = text.find(secret[0], lowest, at)
    while start != -1:
        if (start == 0 or not text[start - 1].isalnum()) and text.startswith(secret[: at - start], start):
            return at - start
        start = text.find(secret[0], start + 1, at)
    return 0


def _shown_tail(text: str, at: int, secret: str) -> int:
    """How many of `secret`'s last characters stand in `text` from `at`, a word's end: the
    longest (found from where its last character stands)."""
    last = text.rfind(secret[-1], at, min(len(text), at + len(secret) - 1))
    while last != -1:
        end = last + 1
        if (end == len(text) or not text[end].isalnum()) and text.startswith(secret[at - end :], at):
            return end - at
        last = text.rfind(secret[-1], at, last)
    return 0


def _map_strings(value: Any, change: Callable[[str], str], change_key: Callable[[str], str] | None = None,
                named: Callable[[str, Any], Any] | None = None, reshape: Callable[[dict[Any, Any]], dict[Any, Any]] | None = None,
                relist: Callable[[list[Any]], list[Any]] | None = None) -> Any:
    """A copy of plain data with `change` applied to every string and `change_key` (else
    `change`) to every key; `named(key, value)` may decide a non-empty string by the key it
    is the value of, or give a container to walk instead (None: `change` does); `reshape`
    gives each object to walk in its place, `relist` each list. Iterative: nesting deeper
    than Python's recursion limit is no problem."""
    change_key = change_key or change
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(value, root, 0)]
    while stack:
        item, parent, slot = stack.pop()
        if isinstance(item, str):
            parent[slot] = change(item)
        elif isinstance(item, dict):
            copy: dict[Any, Any] = {}
            parent[slot] = copy
            if reshape is not None:
                item = reshape(item)
            for key, child in item.items():
                if isinstance(key, str):
                    decided = named(key, child) if named is not None and (child or not isinstance(child, str)) else None
                    key = change_key(key)
                    if isinstance(decided, str):
                        copy[key] = decided
                        continue
                    if decided is not None:  # a container to walk with its credentials hidden
                        child = decided
                copy[key] = None
                stack.append((child, copy, key))
        elif isinstance(item, (list, tuple)):
            if relist is not None and isinstance(item, list):
                item = relist(item)
            items: list[Any] = [None] * len(item)
            parent[slot] = items
            stack.extend((child, items, index) for index, child in enumerate(item))
        else:
            parent[slot] = item
    return root[0]


def _text_runs(items: list[Any]) -> list[tuple[int, int, str]]:
    """[start, end) and the field of each run of two or more texts in a row that the model
    reads as one: text parts (chat's, Responses' and Anthropic's `{"type": "text", "text":
    ...}`, Gemini's `{"text": ...}`), and messages of one speaker whose content is a text
    (Anthropic reads them as one turn, as the policy does)."""
    runs: list[tuple[int, int, str]] = []
    start, kind = 0, None
    for index, item in enumerate([*items, None]):
        this = _run_kind(item)
        if this != kind:
            if kind is not None and index - start > 1:
                runs.append((start, index, kind[0]))
            start, kind = index, this
    return runs


def _may_run(blob: bytes) -> bool:
    """Whether a serialised body holds two texts that may be read in a row (`_run_kind`:
    text parts, messages whose content is a text), by their keys as orjson writes them:
    most answers, and calls of one message, hold one at most."""
    return blob.count(b'"text":"') + blob.count(b'"content":"') > 1


def _run_kind(item: Any) -> tuple[str, str | None] | None:
    """("text", None) for a text part, ("content", its speaker) for a message whose content
    is a text, else None."""
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("text"), str) and item.get("type", "text") in TEXT_PART_TYPES:
        return ("text", None)
    role = item.get("role")
    if isinstance(item.get("content"), str) and isinstance(role, str):
        return ("content", speaker(role))
    return None


def _hidden_across(texts: list[str], spans: list[tuple[int, int, str]]) -> list[str]:
    """Each text with what of `spans` (in the texts joined) falls in it gone; a span's
    stand-in written where it begins."""
    out, offset = [], 0
    for text in texts:
        low, high, pieces, done = offset, offset + len(text), [], offset
        for start, end, stand_in in spans:
            if end <= low or start >= high:
                continue
            pieces.append(text[done - low : max(start, low) - low])
            if start >= low:
                pieces.append(stand_in)
            done = min(end, high)
        out.append("".join(pieces) + text[done - low :])
        offset = high
    return out


class RedactingFilter(logging.Filter):
    """Redacts every record a log handler writes, its traceback too: on the proxy's handlers
    (`addons.output`) and the trace writer process's. `redactor` follows config reloads."""

    def __init__(self, redactor: Callable[[], Redactor]) -> None:
        super().__init__("llm_mitm")
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = self.redactor()
        message = record.getMessage()
        redacted = redactor.printout(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:  # the text a formatter would write, redacted (it keeps it)
            record.exc_text = redactor.printout(logging.Formatter().formatException(record.exc_info))
        return True


# Header names of gateways' keys that name no credential word (`Helicone-Auth`,
# `x-portkey-virtual-key`).
_GATEWAY_KEY_ENDINGS = ("-auth", "_auth", "virtual-key")
# Header names that say "key" or "credential" without the words free text is read for
# (`x-functions-key`, `x-openai-key`, `x-subscription-key`, `Authentication`): a header
# carries what its name says.
_KEY_HEADER_ENDINGS = ("-key", "_key", "credential", "credentials")
_KEY_HEADER_NAMES = frozenset(("key", "authentication", "x-authentication", "token", "x-token", "jwt", "x-jwt"))
# A header named as one of these begins (`Authorization2`, `X-Authorization-Backup`), or ending so (`X-Session-JWT`, `X-Access-Token`).
_KEY_HEADER_STARTS = ("authorization", "x-authorization")
_KEY_HEADER_TAILS = ("-jwt", "_jwt", "-token", "_token")
_NOT_KEY_HEADERS = frozenset(("idempotency-key", "x-idempotency-key", "sec-websocket-key"))  # a request's own id, a handshake's nonce


class Redactor:
    """Replaces secrets in headers, URLs and bodies by stable fingerprints."""

    def __init__(
        self,
        extra_headers: Iterable[str] = (),
        extra_params: Iterable[str] = (),
        extra_patterns: Iterable[str] = (),
        salt: str = "",
    ) -> None:
        self.headers = SENSITIVE_HEADERS | {h.lower() for h in extra_headers}
        self.params = SENSITIVE_PARAMS | {p.lower() for p in extra_params}
        self.params_or_headers = self.params | self.headers  # named on a line of mitmdump's printout
        self.fields = SENSITIVE_FIELDS | {p.lower() for p in extra_params}
        # The first look's signs of a secret in a body lower-cased: key prefixes, a Bearer, a
        # signed link (`sig=`, X-Amz-Signature), a key percent-encoded (`sk%2d`), and any field
        # name as a key appears in JSON, quoted.
        self._signs = Literals([b"sk-", b"eyj", b"bearer", b"aiza", b"jqqj9", b"sig=", b"%2d", b"signature="]
                               + [b'"' + name.encode() + b'"' for name in self.fields])
        # The longest text a first test matches in one piece (a 32-digit hex run, a quoted field
        # name, a name as folded): what a look at the seam between two texts must reach either
        # side of it (`_looks_at_seams`; a URL's `@` and `://` are looked for apart).
        self._seam_reach = max(64, *(len(_folded(name)) + 2 for name in self.fields))
        self._salt = salt.encode()
        self._custom = [re.compile(p) for p in extra_patterns]
        self._query = re.compile(r"([?&;])([^=&#;]+)=([^&#;]*)")
        # A credential's name (also after a prefix: DB_PASSWORD, X-Api-Key), maybe quoted (also
        # as JSON inside a string: \"password\"), then `:` or `=`: its value follows.
        names = "|".join([re.escape(name) for name in sorted(self.fields, key=len, reverse=True)] + list(_FREE_TEXT_NAMES))
        self._assignment = re.compile(rf"""(?i)(?:(?<![A-Za-z0-9])(?:{names})|{_CAMEL_CASE_NAMES})(?:\\?["'])?[ \t]*[:=][ \t]*""")
        # What every such name holds (a stem; or `token`, looked for apart; or a configured name
        # that holds neither), for a first test before that (slow) pattern runs.
        self._name_signs = Literals([stem.encode() for stem in _NAME_STEMS] + [
            _folded(name) for name in self.fields if not any(stem in name for stem in _NAME_STEMS) and not _names_a_token(_folded(name))])
        self._fingerprints: Memo[str, str] = Memo(self._fingerprint)
        self._credentials: Memo[str, str] = Memo(self._credential)
        self._credential_headers: Memo[str, bool] = Memo(self._names_credential)
        self._callers: Memo[tuple[str, str], str] = Memo(lambda sent: self._caller(*sent))
        self._credential_keys: Memo[str, bool] = Memo(self._name_of_key)
        # What repeats from call to call in a trace record, redacted once.
        self._fields: Memo[str, str] = Memo(self.free_text)
        self._addresses: Memo[str, str] = Memo(self.url)
        self._header_values: Memo[tuple[str, str], str] = Memo(lambda pair: self._header(*pair))

    def fingerprint(self, secret: str) -> str:
        """`<kind>…<last 4>#<16 hex of sha256>`; the same secret always gives the same text."""
        return self._fingerprints(secret)

    def _fingerprint(self, secret: str) -> str:
        prefix = next((p for p in _KEY_PREFIXES if secret.startswith(p)), "")
        if not prefix and secret.startswith("eyJ"):
            prefix = "jwt:"
        tail = secret[-4:] if len(secret) >= 16 else ""
        return f"{prefix}…{tail}#{self._digest(secret)}"

    def _digest(self, secret: str) -> str:
        return hashlib.sha256(self._salt + secret.encode("utf-8", "surrogatepass")).hexdigest()[:FINGERPRINT_HEX]

    def opaque(self, secret: str) -> str:
        """`…#<hash>` with no characters of the secret: for passwords and cookies, whose
        last characters are a password's last characters (Basic is base64 of user:password)."""
        return f"…#{self._digest(secret)}"

    def text(self, value: str) -> str:
        if len(value) >= _SHORTEST_SECRET:
            for may_hold, shape in _SHAPES:
                if may_hold(value):
                    value = shape.sub(self._replace, value)
            if "bearer" in value.lower():
                value = _BEARER.sub(lambda m: m.group(0)[: m.start(2) - m.start(0)] + self.fingerprint(m.group(2)), value)
        if "://" in value and "@" in value:
            value = _USERINFO_PASSWORD.sub(lambda m: m.group(1) + (m.group(2) if is_fingerprint(m.group(2)) else self.opaque(m.group(2))), value)
        for pattern in self._custom:
            value = pattern.sub(self._replace, value)
        return value

    def secret_spans(self, value: str) -> list[tuple[int, int]]:
        """Where `text` finds secrets in `value`: key shapes, a Bearer's credential, a URL's
        password, the configured patterns (a text's own, unchanged places)."""
        spans = [(m.start(), m.end()) for may_hold, shape in _SHAPES if may_hold(value) for m in shape.finditer(value)]
        if "bearer" in value.lower():
            spans += [(m.start(2), m.end(2)) for m in _BEARER.finditer(value)]
        if "://" in value and "@" in value:
            spans += [(m.start(2), m.end(2)) for m in _USERINFO_PASSWORD.finditer(value)]
        return spans + [(m.start(), m.end()) for pattern in self._custom for m in pattern.finditer(value) if m.group()]

    def _replace(self, match: re.Match[str]) -> str:
        found = match.group(0)
        return self.fingerprint(found) if found else found  # a pattern that matches nothing somewhere (`\b`) hides nothing there

    def _first_look(self, blob: bytes) -> tuple[bool, bool]:
        """Whether any text or key in the JSON `blob` passes a first test of `text` or is a
        sensitive field name, and whether any names a credential (`GITHUB_TOKEN=`): a
        few passes of C and Rust over the serialised whole, instead of a walk that tests
        every string (a tenth of the time on a chat body). orjson writes text as it is but
        for quotes, backslashes and control characters, none of which is part of a secret
        shape or a name; Unicode lower-casing keeps the two characters that lower-case to
        ASCII letters (the Kelvin sign, a dotted capital I) found."""
        text = None if blob.isascii() else blob.decode("utf-8")
        lowered = blob.lower() if text is None else text.lower().encode("utf-8", "surrogatepass")
        names = self._names_something(lowered if text is None else _folded(text))
        shapes = ((b"@" in blob and b"://" in blob)  # maybe a password in a URL
                  or self._signs.found_in(lowered) or _CASED_SIGNS.found_in(blob)
                  or _HEX_RUN in blob.translate(_HEX_MARKS))
        return shapes, names

    def credential(self, value: str) -> str:
        """A whole header value that is a credential: keep the scheme, fingerprint the rest
        (remembered: a client sends the same key with every call)."""
        return self._credentials(value)

    def _credential(self, value: str) -> str:
        scheme, token = split_scheme(value)
        if scheme is None:
            return self.fingerprint(token)
        hidden = self.opaque(token) if scheme.lower() in ("basic", "digest") else self.fingerprint(token)
        return f"{scheme} {hidden}"

    def _hidden_as_named(self, name: str, value: str, hide: Callable[[str], str] | None = None) -> str:
        """A value hidden by the name it is given: a password's or a cookie's with none of its
        characters (their last ones are a password's), any other with `hide` (a key's
        fingerprint, its last four characters kept)."""
        lowered = name.lower()
        if lowered in ("cookie", "set-cookie") or any(word in lowered for word in _PASSWORD_WORDS):
            return self.opaque(value)
        return (hide or self.fingerprint)(value)

    def names_credential(self, name: str) -> bool:
        """Whether a header so named (lower-case) carries a credential; remembered."""
        return self._credential_headers(name)

    def _names_credential(self, name: str) -> bool:
        """Whether header `name` (lower-case) is a known credential header or named like a
        credential, as gateways name theirs (`X-Portkey-Api-Key`, `x-litellm-api-key`,
        `X-Auth-Token`): its value is a key whatever its shape."""
        if name in self.headers:
            return True
        if name.endswith(_GATEWAY_KEY_ENDINGS) or name in _KEY_HEADER_NAMES or name.startswith(_KEY_HEADER_STARTS):
            return True
        if name.endswith(_KEY_HEADER_TAILS) and name not in _NOT_KEY_HEADERS:
            return True
        if name.endswith(_KEY_HEADER_ENDINGS) and name not in _NOT_KEY_HEADERS:
            return True
        assigned = name + ":"  # as `_assignment` finds a name: given a value
        return any(match.end() == len(assigned) for match in self._assignment.finditer(assigned))

    def named_credential(self, name: str, value: str) -> str:
        """A credential sent under `name` (a header's, a custom header's): a password's
        with none of its characters kept, any other's as `credential` hides it."""
        return self._hidden_as_named(name, value, self.credential)

    def caller(self, name: str, value: str) -> str:
        """The identity of a caller who sent `value` under header `name`: as the header is
        traced (a password's with none of its characters), a Bearer token's whatever the case
        of its scheme (remembered: a client sends the same key with every call)."""
        return self._callers((name, value))

    def _caller(self, name: str, value: str) -> str:
        scheme, token = split_scheme(value)
        return self.named_credential(name, token if scheme is not None and scheme.lower() == "bearer" else value)

    def _subprotocol(self, item: str) -> str:
        """One item of a `Sec-WebSocket-Protocol` list, a key in it hidden (each item alone:
        one key may begin another, and the longer one's rest was left in clear, a review)."""
        keys = subprotocol_keys(item)
        return item.replace(keys[0], self.credential(keys[0])) if keys else item

    def header(self, name: str, value: str) -> str:
        """A header's value as traced (remembered: most of a client's headers, and of a
        provider's, are the same on every call, and redacting each was a third of the
        trace writer's time per record)."""
        return self._header_values((name.lower(), value))

    def _header(self, name: str, value: str) -> str:
        if name in ("cookie", "set-cookie"):
            return self.opaque(value.strip())
        if self._credential_headers(name):
            return self.named_credential(name, value)
        if name == "sec-websocket-protocol" and SUBPROTOCOL_KEY in value:
            return ",".join(self._subprotocol(part) for part in value.split(","))
        if "=" in value and ("?" in value or self._may_name_credential(value)):  # a URL's parameters (`Location: ...&sig=...`), `session_token=...`
            return self.url(value)
        return self.text(value)

    def headers_dict(self, pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
        """Header names lower-cased (as HTTP/2 has them), repeated headers joined."""
        out: dict[str, str] = {}
        for name, value in pairs:
            name = name.lower()
            redacted = self._header_values((name, value))
            out[name] = f"{out[name]}, {redacted}" if name in out else redacted
        return out

    def url(self, url: str) -> str:
        """A URL, or a line holding one: key-like query parameters, key shapes, and values
        given to a name like a credential's (`?q=GITHUB_TOKEN=...`), all also as the server
        reads them, percent-decoded (`GITHUB_TOKEN%3D...`)."""
        if "%" in url:
            return self._named_values(self.text(self._decoded_url(url)))

        def param(m: re.Match[str]) -> str:
            sep, name, value = m.groups()
            return f"{sep}{name}={self._hidden_as_named(name, value)}" if self._is_key_param(m) else m.group(0)

        return self._named_values(self.text(self._query.sub(param, url)))

    def _is_key_param(self, match: re.Match[str]) -> bool:
        """A query parameter (`_query`'s match) named like a key, whose value is not hidden yet."""
        value, name = match.group(3), match.group(2).lower()
        if name.endswith("]"):  # `api_key[]=`, `creds[api_key]=` (PHP's and Rails' forms): the innermost name
            name = name.rstrip("[]").rpartition("[")[2] or name.partition("[")[0]
        return name in self.params and bool(value) and not is_fingerprint(value)

    def address(self, url: str) -> str:
        """A request's URL, which repeats from call to call: `url`, remembered."""
        return self._addresses(url)

    def field(self, value: str) -> str:
        """A short text that repeats from call to call (a model's name, a deployment, a
        policy's reason): `free_text`, remembered."""
        return self._fields(value)

    def form(self, text: str) -> str:
        """An application/x-www-form-urlencoded body (or the start of one): its fields are a
        query's parameters, read as `url` reads them (the `&` put before the first makes it
        one as well)."""
        return self.url("&" + text)[1:]

    def _decoded_url(self, url: str) -> str:
        """A URL with escapes (`sk%2Dproj%2D...`, `api%2Dkey=`, `GITHUB_TOKEN%3D...`) read as
        the server reads it: parameters, key shapes and named values found in the decoded
        text, each replaced where it stands in the URL, which keeps its other escapes (`%26`
        is not `&`). A named value ends where the decoded text says (`%20`); `url` reads the
        text as written after this, which hides the rest of it."""
        decoded, original = _percent_decoded(url)
        spans = [(m.start(3), m.end(3), self.fingerprint) for m in self._query.finditer(decoded) if self._is_key_param(m)]
        spans += [(m.start(), m.end(), self.fingerprint) for may_hold, shape in _SHAPES if may_hold(decoded) for m in shape.finditer(decoded)]
        spans += [(start, end, self.opaque) for start, end in self._named_spans(decoded)]
        out, done = [], 0
        for start, end, hide in sorted(spans, key=lambda span: (span[0], -span[1])):
            if end > done:  # a span inside one already replaced is gone with it; one that overlaps it, its rest
                start = max(start, done)
                out += [url[original(done) : original(start)], hide(decoded[start:end])]
                done = end
        return "".join(out) + url[original(done) :]

    def free_text(self, value: str) -> str:
        """Text of no known structure (a text body, a line of output): secret shapes, and
        the value given to a name like a credential's (`"password": "..."`,
        `DB_PASSWORD=...`, `Authorization: Bearer ...`), quoted values whole; and where it
        may hold a URL's parameters or escapes, as `url` reads them (a signed link's `sig=`,
        `sk%2Dproj%2D...`)."""
        return self._through_escapes(value, self._written_text)

    def _written_text(self, value: str) -> str:
        return self.url(value) if _may_hold_link(value) else self._named_values(self.text(value))

    def _shapes(self, value: str) -> str:
        """`text`, and a URL's parameters and escapes where the text may hold them (`free_text`
        where no credential's name is anywhere)."""
        return self._through_escapes(value, lambda text: self.url(text) if _may_hold_link(text) else self.text(text))

    @staticmethod
    def _through_escapes(value: str, redact: Callable[[str], str]) -> str:
        """`redact(value)`; but where the text writes characters as JSON escapes (a tool
        call's arguments, JSON written in a string: `\\u0073k-proj-...`, `"\\u0061pi_key"`,
        an escaped line break between `Bearer` and its token, escapes an echo deeper), a
        secret they spell is looked for in the text as a reader reads it, and where one is
        found that text, redacted, is what is kept (a secrets probe: keys so written were
        kept whole, or all but their start)."""
        hidden = redact(value)
        if "\\" not in value:
            return hidden
        read = json_unescaped(value)
        read_hidden = redact(read)
        if read_hidden == read or set(_DIGEST.findall(read_hidden)) <= set(_DIGEST.findall(hidden)):
            return hidden  # the escapes hid nothing: the text as written
        return read_hidden

    def _named_values(self, value: str) -> str:
        """The values given to a credential's name, each hidden whole (see `free_text`)."""
        out, done = [], 0
        for start, end in self._named_spans(value):
            out += [value[done:start], self.opaque(value[start:end])]
            done = end
        return "".join(out) + value[done:] if out else value

    def _named_spans(self, value: str) -> list[tuple[int, int]]:
        """Where the values given to a credential's name are in `value`."""
        if not self._may_name_credential(value):
            return []
        spans: list[tuple[int, int]] = []
        for match in self._assignment.finditer(value):
            if spans and match.start() < spans[-1][1]:
                continue
            start, end = _value_span(value, match.end())
            secret = value[start:end]
            if secret and not is_fingerprint(secret) and _NOT_A_SECRET.fullmatch(secret.rstrip(",;}")) is None:
                spans.append((start, end))
        if "isposition" in value or "ISPOSITION" in value:  # a form's field: its name and value are lines apart
            spans = self._form_field_spans(value, spans)
        return spans

    def _form_field_spans(self, value: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """`spans` and the values of multipart/form-data fields named like a credential
        (`name="api_key"`, then the part's value after a blank line), as written or within
        a JSON string (a secrets probe: an upload's `api_key` field was kept whole)."""
        for match in _FORM_FIELD.finditer(value):
            start, end = match.span("value")
            secret = match.group("value")
            if (secret and not is_fingerprint(secret) and self._credential_keys(match.group("name"))
                    and not any(start < taken_end and taken_start < end for taken_start, taken_end in spans)):
                spans.append((start, end))
        return sorted(spans)

    def _may_name_credential(self, text: str) -> bool:
        """Whether `text` holds a credential's name at all (see `_names_something`)."""
        return self._names_something(_folded(text))

    def _names_something(self, folded: bytes) -> bool:
        """One pass for the signs of a name (`Literals`) and one for `token`, where the name
        pattern takes ~160 ns a character. `folded` as the pattern's IGNORECASE folds (the
        long s is an s, the Kelvin sign a k); a `token` is only one when it is not `tokens`
        (`max_tokens`, in nearly every body)."""
        return self._name_signs.found_in(folded) or _names_a_token(folded)

    def log_line(self, line: str, sent: Mapping[str, str] = _NOTHING_SENT) -> str:
        """A line of proxy output: a `name: value` line (a header, a query parameter or form
        field as mitmdump lists them) or free text with URLs, read through colour codes;
        then the credentials the request `sent` (`sent_credentials`), wherever they are."""
        if "\x1b" in line:
            return _through_ansi(line, lambda plain: self._plain_line(plain, sent))
        return self._plain_line(line, sent)

    def _plain_line(self, line: str, sent: Mapping[str, str]) -> str:
        match = _NAMED_LINE.match(line)
        line = self._listed(match) if match is not None and match.group(2).lower() in self.params_or_headers else self._through_escapes(line, self.url)
        return _replace_each(line, sent.items())  # after: a header's own value is a fingerprint already

    def _listed(self, match: re.Match[str]) -> str:
        """A credential header, or a parameter as `url` hides it (to the same fingerprint)."""
        indent, name, gap, rest = match.groups()
        value = rest.rstrip()
        if not value:
            return match.group(0)
        quote = value[0] if len(value) > 1 and value[0] in "'\"" and value[-1] == value[0] else ""  # YAML (mitmproxy 12) may quote it
        inner, lowered = value[len(quote) : len(value) - len(quote)], name.lower()
        hidden = self.header(lowered, inner) if lowered in self.headers else inner if is_fingerprint(inner) else self._hidden_as_named(lowered, inner)
        return f"{indent}{name}:{gap}{quote}{hidden}{quote}{rest[len(value):]}"

    def printout(self, text: str, sent: Mapping[str, str] = _NOTHING_SENT) -> str:
        """What mitmdump prints in one go (a flow's line, a header, a whole body), line by
        line as `log_line` reads it; but a hexdump (a binary body) is left out whole: a key
        in it is cut into 16-byte lines in both columns, and no line holds enough of it to be
        found (nor could a key in UTF-16 or compressed be found at all)."""
        if _may_hold_private_key(text):  # a key block spans lines, which are read one at a time below
            text = _PRIVATE_KEY_BLOCK.sub(self._replace, _ANSI.sub("", text) if "\x1b" in text else text)
        if "\n" not in text:  # a flow's line, a header: no hexdump (one line of it has 16 bytes, no whole key)
            return self.log_line(text, sent)
        plain = _ANSI.sub("", text) if "\x1b" in text else text
        if "0000000000 " not in plain and "0000:   " not in plain:  # every hexdump starts at offset 0: a search in C, not a test a line
            return "\n".join([self.log_line(line, sent) for line in text.split("\n")])
        out: list[str] = []
        hidden: list[str] = []
        for line in text.split("\n"):
            if _HEXDUMP_LINE.match(_ANSI.sub("", line) if "\x1b" in line else line) is not None:
                hidden.append(line)
                continue
            if hidden:
                out.append(_hexdump_left_out(hidden))
                hidden = []
            out.append(self.log_line(line, sent))
        if hidden:
            out.append(_hexdump_left_out(hidden))
        return "\n".join(out)

    def as_traced(self, text: str, headers: Iterable[Sequence[str]], url: str) -> str:
        """A short text of a call's (a model's name) as its trace shows it, for a log line:
        `field`, then the credentials the request sent (`sent_credentials`), whatever their shape."""
        return replace_sent(self.field(text), self.sent_credentials(headers, url))

    def sent_credentials(self, headers: Iterable[Sequence[str]], url: str) -> dict[str, str]:
        """The credentials a request carried (its credential headers, key-like query
        parameters), each with the fingerprint it is written as: a key that upstream echoes
        back (an error quoting it, a header) is then found whatever its shape. Only those of
        `SHORTEST_SENT` characters or more: a shorter one would be found in ordinary text.
        Longest first."""
        sent: dict[str, str] = {}
        for name, value in headers:
            name = name.lower()
            if name == "cookie":  # each cookie's value, hidden with nothing of it kept, as the header is
                for pair in value.split(";"):
                    cookie = pair.partition("=")[2].strip()
                    if len(cookie) >= SHORTEST_SENT:
                        sent[cookie] = self.opaque(cookie)
                continue
            if self._credential_headers(name) and name != "set-cookie":
                scheme, token = split_scheme(value)
                if len(token) >= SHORTEST_SENT:
                    sent[token] = self.opaque(token) if scheme is not None and scheme.lower() in ("basic", "digest") else self._hidden_as_named(name, token)
            elif name == "sec-websocket-protocol":
                sent.update((key, self.credential(key)) for key in subprotocol_keys(value) if len(key) >= SHORTEST_SENT)
        query = url.partition("?")[2]
        if query:
            decoded = _percent_decoded("&" + query.partition("#")[0])[0]
            for match in self._query.finditer(decoded):
                if len(value := match.group(3)) < SHORTEST_SENT or is_fingerprint(value):
                    continue
                if self._is_key_param(match):
                    sent[value] = self._hidden_as_named(match.group(2), value)
                elif self._credential_headers(match.group(2).lower()):  # `?x-api-key=`: `url` hides it as a named value
                    sent[value] = self.opaque(value)
        return dict(sorted(sent.items(), key=lambda item: -len(item[0])))  # one holding another goes whole

    def json(self, value: Any) -> Any:
        """A redacted copy of parsed JSON (the original is left as it is), or the value
        itself when nothing in it can need redacting (most bodies: see `_first_look`).

        Iterative, so that nesting deeper than Python's recursion limit is no problem.
        """
        if not self._custom:  # a pattern of the user's could match text only once decoded
            try:
                blob = orjson.dumps(value)
            except (TypeError, RecursionError):  # not JSON orjson writes (too deep, odd text): walk it
                pass
            else:
                shapes, names = self._first_look(blob)
                if not (shapes or names):
                    if not (_may_run(blob) and self._may_hide_across(value)):  # texts read joined, which no look at the blob does
                        return value
                    names = True
                return self._walk(value, names)
        return self._walk(value)

    def _walk(self, value: Any, names: bool = True) -> Any:
        """Every string and key of `value` tested, into a copy; each string also for the
        values given to a credential's name, unless none is named anywhere (`names`)."""
        return _map_strings(
            value,
            self.free_text if names else self._shapes,  # a prompt's `GITHUB_TOKEN=...` too
            change_key=self.text,  # a key can be a secret too (`{"sk-...": ...}`)
            named=self._named_value,
            reshape=self._named_pair,
            relist=self._parts_read_joined,
        )

    def _parts_read_joined(self, items: list[Any]) -> list[Any]:
        """A list whose runs of texts the model reads as one (`_text_runs`) have a secret
        found only when they are joined hidden: each string is redacted by itself (a key
        sent in two halves was traced whole in two halves, a password after its name in
        the part before was traced in clear)."""
        out = items
        for start, end, field in _text_runs(items):
            texts = [items[index][field] for index in range(start, end)]
            cut = self._cut_spans(texts)
            if not cut:
                continue
            if out is items:
                out = list(items)
            for offset, text in enumerate(_hidden_across(texts, cut)):
                out[start + offset] = {**items[start + offset], field: text}
        return out

    def _may_hide_across(self, value: Any) -> bool:
        """Whether a first look at any run of texts read joined in `value` finds something
        that the look at the whole body (`json`'s, before) did not: the containers walked,
        not the strings (a walk of every string costs ten times as much on an agent's body;
        `json` runs in the proxy for a replay too)."""
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                for child in item.values():
                    if isinstance(child, (dict, list)):
                        stack.append(child)
            elif isinstance(item, list):
                if len(item) > 1:
                    for start, end, field in _text_runs(item):
                        if self._looks_at_seams([item[index][field] for index in range(start, end)]):
                            return True
                for child in item:
                    if isinstance(child, (dict, list)):
                        stack.append(child)
        return False

    def _looks_at_seams(self, texts: list[str]) -> bool:
        """Whether the first look finds something where one text of a run ends and the next
        begins, read joined. Each text by itself is in the body the first look has seen, so
        only what spans a seam is new: each seam is looked at with `_seam_reach` characters
        either side (of the texts joined, so that a short text between two is spanned), not
        the run's every text again (which doubled the look at an agent's text parts). The one
        test of two signs apart, a URL's password, is made on the run: a `://` formed at a
        seam and an `@` anywhere in it, however far (a review: a long password was missed)."""
        joined, reach = "".join(texts), self._seam_reach
        windows: list[list[int]] = []
        seam = 0
        for text in texts[:-1]:
            seam += len(text)
            if windows and seam - reach <= windows[-1][1]:
                windows[-1][1] = seam + reach
            else:
                windows.append([max(0, seam - reach), seam + reach])
        seams = "\n".join(joined[start:end] for start, end in windows)  # a test matching across a break: a look too many, never one too few
        if "://" in seams and "@" in joined:
            return True
        shapes, names = self._first_look(orjson.dumps(seams))
        return shapes or names

    def _cut_spans(self, texts: list[str]) -> list[tuple[int, int, str]]:
        """(start, end, what stands for it) in the texts joined, of each secret found there
        and not in the text it lies in, read alone: a key's shape or a configured pattern
        (its fingerprint), a value given to a credential's name (its opaque digest); where
        they overlap, one span, opaque. A key at a part's end that runs on into the next
        (`...Qx7` then `b...`) is read as the model reads it: one key."""
        joined = "".join(texts)
        own: set[tuple[int, int]] = set()
        offset = 0
        for text in texts:
            own.update((offset + start, offset + end) for start, end in (*self.secret_spans(text), *self._named_spans(text)))
            offset += len(text)
        found = sorted([(start, end, False) for start, end in self.secret_spans(joined) if (start, end) not in own]
                       + [(start, end, True) for start, end in self._named_spans(joined) if (start, end) not in own])
        merged: list[list[Any]] = []
        for start, end, named in found:
            if merged and start < merged[-1][1]:  # overlapping: one span, covering both
                merged[-1][1], merged[-1][2] = max(merged[-1][1], end), True
            else:
                merged.append([start, end, named])
        return [(start, end, self.opaque(joined[start:end]) if opaque else self.fingerprint(joined[start:end])) for start, end, opaque in merged]

    def _name_of_key(self, key: str) -> bool:
        """Whether a JSON key names a credential as free text's names do (`DB_PASSWORD`,
        `clientSecret`, `x-api-key`) or a credential header's (`authorization`, `helicone-auth`);
        not every `..._key`, as headers' are: `prompt_cache_key` and `sort_key` are data."""
        lowered = key.lower()
        if lowered in self.headers or lowered.endswith(_GATEWAY_KEY_ENDINGS):
            return True
        return any(match.end() == len(key) + 1 for match in self._assignment.finditer(key + ":"))

    def _named_value(self, key: str, value: Any) -> Any:
        """A value hidden by its key's name: a string whole, a number (a PIN, a numeric
        password) or a list of strings (keys to rotate through) each; an object's `value` (a
        realtime client secret: `"client_secret": {"value": "ek_..."}`). None: walked as it is."""
        if isinstance(value, str):
            if not self._credential_keys(key):
                return None
            return self._hidden_as_named(key, value, self.credential)  # as the headers are
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # none of its digits kept (a PIN's last four are most of it), and told from the
            # same digits as a string (a review: two bodies differing so shared a replayed answer)
            return self.opaque(f"number:{value!r}") if self._credential_keys(key) else None
        if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
            return [self._hidden_as_named(key, item, self.credential) for item in value] if self._names_credentials(key) else None
        if isinstance(value, dict) and isinstance(value.get("value"), str) and value["value"] and self._credential_keys(key):
            return {**value, "value": self._hidden_as_named(key, value["value"], self.credential)}
        return None

    def _names_credentials(self, key: str) -> bool:
        """Whether a list's key names credentials, also in the plural (`passwords`,
        `api_keys`, `secrets`); not `tokens`, a tokenizer's words."""
        if self._credential_keys(key):
            return True
        lowered = key.lower()
        return lowered.endswith("s") and not lowered.endswith("tokens") and self._credential_keys(key[:-1])

    def _named_pair(self, item: dict[Any, Any]) -> dict[Any, Any]:
        """A name/value pair naming a credential (`{"name": "api-key", "value": "..."}`, as
        header lists and environments are written) with its value hidden."""
        value = item.get("value")
        if not isinstance(value, str) or not value:
            return item
        name = next((item[field] for field in ("name", "key") if isinstance(item.get(field), str)), None)
        return {**item, "value": self._hidden_as_named(name, value, self.credential)} if name is not None and self._credential_keys(name) else item
