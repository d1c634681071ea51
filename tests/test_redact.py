"""Secrets become fingerprints, whole, wherever they are."""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Callable

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from llm_mitm.redact import Redactor

ALNUM = string.ascii_letters + string.digits


def token(n: int, alphabet: str = ALNUM + "_-") -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


KEYS = {
    "openai": "sk-" + token(48, ALNUM),
    "project": "sk-proj-" + token(120),
    "service": "sk-svcacct-" + token(100),
    "anthropic": "sk-ant-api03-" + token(93) + "AA",
    "azure": token(32, "0123456789abcdef"),
    "azure-annotated": token(52, ALNUM) + "JQQJ9" + token(1, "9DH") + token(1, ALNUM) + token(1, "ABCDEFGHIJKL")
    + token(16, ALNUM) + token(1, string.ascii_letters) + token(7, ALNUM),
    "google": "AIza" + token(35),
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0." + token(43),
    # other services' keys, and a JWT whose JSON has a space after the brace (a secrets probe)
    "jwt-spaced": "eyAidHlwIjogIkpXVCJ9.eyAic3ViIjogIjEyMyJ9." + token(43),
    "stripe": "sk_live_" + token(24, ALNUM),
    "huggingface": "hf_" + token(34, ALNUM),
    "groq": "gsk_" + token(52, ALNUM),
    "xai": "xai-" + token(80, ALNUM),
    "perplexity": "pplx-" + token(48, ALNUM),
    "slack": "xoxb-" + token(12, string.digits) + "-" + token(24, ALNUM),
    "aws": "AKIA" + token(16, string.ascii_uppercase + string.digits),
    "pem": "-----BEGIN PRIVATE KEY-----\n" + token(64, ALNUM) + "\n" + token(64, ALNUM) + "\n-----END PRIVATE KEY-----",
}


def assert_gone(secret: str, text: str) -> None:
    assert secret not in text
    # No 8-character window of the key's secret part survives (the kind prefix and
    # the 4-character tail are shown on purpose).
    public = re.match(r"sk-(?:ant-api\d\d-|proj-|svcacct-)?", secret)
    for i in range(public.end() if public else 0, len(secret) - 8):
        assert secret[i : i + 8] not in text, secret[i : i + 8]


@pytest.mark.parametrize("kind", list(KEYS))
def test_key_shapes_are_found_in_free_text(kind: str) -> None:
    redactor = Redactor()
    key = KEYS[kind]
    text = redactor.text(f"prefix {key} suffix, and again:{key}")
    assert_gone(key, text)
    assert text.count(redactor.fingerprint(key)) == 2
    assert text.startswith("prefix ") and text.endswith("suffix, and again:" + redactor.fingerprint(key))


def test_an_aws_secret_access_key_is_found_beside_its_key_id() -> None:
    """40 characters of no prefix: found where an access key id says what they are (a
    credentials CSV or an environment dump pasted into a prompt), in JSON text too."""
    redactor = Redactor()
    key_id, secret = KEYS["aws"], token(18, ALNUM) + "/" + token(10, ALNUM) + "+7aZ" + token(7, ALNUM)
    for text in (f"User name,Access key ID,Secret access key\ndeploy,{key_id},{secret}\n",
                 f"export AWS_ACCESS_KEY_ID={key_id}\\nexport AWS_SECRET={secret}",  # as JSON kept as text
                 f"{secret} (the secret) goes with {key_id}"):
        hidden = redactor.text(text)
        assert_gone(secret, hidden)
        assert_gone(key_id, hidden)
        assert hidden.count("#") == 2 and secret[-4:] in hidden
        assert redactor.secret_spans(text) and all(text[start:end] in (key_id, secret) for start, end in redactor.secret_spans(text))
    commit, words = "a" * 20 + "0123456789" * 2, "TheQuickBrownFoxJumpsOverTheLazyDogAgain"
    assert redactor.text(f"{commit} {words} with {key_id}").startswith(f"{commit} {words} with ")  # a hex hash; a word run, no digit
    assert redactor.text(f"{secret} alone") == f"{secret} alone"  # no key id: 40 characters could be anything


def test_fingerprint_shape_is_stable_and_per_key() -> None:
    redactor = Redactor()
    key = KEYS["project"]
    fp = redactor.fingerprint(key)
    assert fp.startswith("sk-proj-…" + key[-4:] + "#")
    assert len(fp.split("#")[1]) == 16  # 64 bits: a 32-bit one was matched by another key in minutes (a secrets probe)
    assert fp == Redactor().fingerprint(key)
    assert fp != redactor.fingerprint(KEYS["openai"])
    assert Redactor(salt="x").fingerprint(key) != fp
    assert redactor.fingerprint(KEYS["anthropic"]).startswith("sk-ant-…")
    assert redactor.text(fp) == fp


@pytest.mark.parametrize(
    ("name", "value", "secret"),
    [
        ("Authorization", f"Bearer {KEYS['project']}", KEYS["project"]),
        ("authorization", "Bearer opaque-token-value-123", "opaque-token-value-123"),
        ("api-key", KEYS["azure"], KEYS["azure"]),
        ("X-Api-Key", KEYS["anthropic"], KEYS["anthropic"]),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
        ("Cookie", "session=abcdefgh12345678", "abcdefgh12345678"),
        ("Set-Cookie", "__cf_bm=zzzzzzzzyyyyyyyy; path=/", "zzzzzzzzyyyyyyyy"),
    ],
)
def test_sensitive_headers_are_fingerprinted_whole(name: str, value: str, secret: str) -> None:
    redacted = Redactor().headers_dict([(name, value), ("Content-Type", "application/json")])
    assert_gone(secret, redacted[name.lower()])
    assert redacted["content-type"] == "application/json"
    if value.startswith("Bearer"):
        assert redacted[name.lower()].startswith("Bearer ")


@pytest.mark.parametrize(
    ("name", "credential"),
    [
        ("X-Portkey-Api-Key", True), ("x-litellm-api-key", True), ("X-Auth-Token", True), ("anthropic-api-key", True),
        ("X-Amz-Security-Token", True), ("x-client-secret", True), ("X-Goog-Api-Key", True), ("x-db-password", True),
        ("Helicone-Auth", True), ("x-portkey-virtual-key", True),
        ("Token", True), ("X-JWT", True), ("Authorization2", True), ("X-Access-Token", True), ("x-session-jwt", True),  # a secrets probe
        ("x-ratelimit-remaining-tokens", False), ("anthropic-ratelimit-input-tokens-limit", False), ("Idempotency-Key", False),
        ("x-api-key-id", False), ("openai-processing-ms", False), ("x-stainless-arch", False), ("x-request-id", False),
    ],
)
def test_a_header_named_like_a_credential_is_one(name: str, credential: bool) -> None:
    """Gateways take keys in headers of their own name: a value of no key shape there is
    still hidden whole, and a header that only counts tokens is left as it is."""
    value = "plainvalue0123456789"
    redacted = Redactor().headers_dict([(name, value)])[name.lower()]
    if credential:
        assert_gone(value, redacted)
        assert Redactor().sent_credentials([(name, value)], "https://h/") == {value: redacted}
    else:
        assert redacted == value


def test_configured_header_and_pattern() -> None:
    redactor = Redactor(extra_headers=["X-Tenant-Token"], extra_patterns=[r"corp_[0-9]{6}"])
    assert_gone("abc", redactor.header("x-tenant-token", "abcdefghijkl"))
    assert "corp_123456" not in redactor.text("id corp_123456 here")
    # a pattern that matches nothing somewhere (one the config's sample text did not show) hides nothing there
    assert Redactor(extra_patterns=[r"(?<=tok=)\w*"]).text("tok=; tok=abcdef") == f"tok=; tok={Redactor().fingerprint('abcdef')}"


def test_url_query_parameters() -> None:
    redactor = Redactor()
    azure = KEYS["azure"]
    url = f"https://r.openai.azure.com/openai/deployments/d/chat/completions?api-version=2024-10-21&api-key={azure}&key=shortsecret1&subscription-key=apimsecret2"
    redacted = redactor.url(url)
    assert_gone(azure, redacted)
    assert "shortsecret1" not in redacted and "apimsecret2" not in redacted  # the last: Azure API Management's
    assert "api-version=2024-10-21" in redacted
    path_key = KEYS["openai"]
    assert_gone(path_key, redactor.url(f"https://x/v1/{path_key}/chat"))


def test_json_bodies_nested_anywhere() -> None:
    redactor = Redactor()
    key = KEYS["anthropic"]
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": f"my key is {key}!"}]}],
        "metadata": {"api_key": "short-but-named", "list": [KEYS["jwt"]]},
        "error": {"code": "invalid_api_key"},
    }
    redacted = redactor.json(body)
    dumped = repr(redacted)
    assert_gone(key, dumped)
    assert_gone(KEYS["jwt"], dumped)
    assert "short-but-named" not in dumped
    assert redacted["error"]["code"] == "invalid_api_key"
    assert body["messages"][0]["content"][0]["text"].endswith(f"{key}!")  # original untouched


def test_deeply_nested_json_does_not_crash() -> None:
    key = KEYS["openai"]
    value: object = key
    for _ in range(5000):
        value = [value]
    redacted = Redactor().json(value)
    for _ in range(5000):
        assert isinstance(redacted, list) and len(redacted) == 1
        redacted = redacted[0]
    assert redacted == Redactor().fingerprint(key)


def test_log_lines() -> None:
    redactor = Redactor()
    key = KEYS["project"]
    assert_gone(key, redactor.log_line(f"    authorization: Bearer {key}"))
    assert_gone(key, redactor.log_line(f"    \x1b[34mx-api-key\x1b[0m: {key}"))
    assert "cookievalue12" not in redactor.log_line("    cookie: a=cookievalue12")
    assert_gone(KEYS["azure"], redactor.log_line(f"127.0.0.1:5: POST https://h/p?api-key={KEYS['azure']}"))
    assert redactor.log_line("    content-type: application/json") == "    content-type: application/json"


def test_ordinary_text_is_left_alone() -> None:
    text = "Ask the task-runner about sk-learn; id 1234abcd; model gpt-4o-2024-08-06"
    assert Redactor().text(text) == text


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(list(KEYS.values())),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
)
def test_property_key_in_any_context_disappears(key: str, before: str, after: str) -> None:
    # Separate the key from surrounding text as any tokenizer would.
    text = f"{before} {key} {after}"
    assert key not in Redactor().text(text)


def _every_pass(redactor: Redactor, text: str) -> str:
    """`Redactor.text` without its first tests: every shape's regex over the whole text."""
    from llm_mitm.redact import _BEARER, _SHAPES

    for _, shape in _SHAPES:
        text = shape.sub(lambda m: redactor.fingerprint(m.group(0)), text)
    return _BEARER.sub(lambda m: m.group(0)[: m.start(2) - m.start(0)] + redactor.fingerprint(m.group(2)), text)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(["0123456789abcdef", "ABCDEF", "9", "f", "x", " ", "-", "_", "sk-", "eyJ", ".", "bearer ",
                                 "BeArEr\t", "Bearer  ", "é", "ı", "ſ", "\u212a", "\ud800", "token1234", "AIza", "JQQJ9",
                                 "ey", "ew", "sk_live_", "hf_", "xoxb-", "AKIA", "PRIVATE KEY-----", "\u00a0",
                                 KEYS["google"], KEYS["azure-annotated"]]), max_size=40).map("".join))
def test_first_tests_never_skip_what_a_shape_finds(text: str) -> None:
    redactor = Redactor()
    assert redactor.text(text) == _every_pass(redactor, text)


@pytest.mark.parametrize("text", ["eyJabc.eyJdef.", "ewoabc.eyJdef.", "x://u:pw@h"])
def test_the_shortest_text_a_shape_finds_is_hidden(text: str) -> None:
    """`text` passes over texts too short to hold a secret: the shortest a shape finds
    (a JWT's, 14 characters) was one character under that length and went through whole,
    and a URL's password, shorter still, has a test of its own (hypothesis found the JWT)."""
    redactor = Redactor()
    hidden = redactor.text(text)
    assert hidden != text and redactor.secret_spans(text)


_JSON_TEXT = st.lists(st.sampled_from(["plain words", "0123456789abcdef" * 2, "ABCDEF0123456789", "sk-", "SK-", "eyJ", ".",
                                       "bearer ", "BeArEr\t", "token1234token1234", "é", "\u0130", "\u212a", "\"", "\\", "\n",
                                       "GITHUB_TOKEN=", "max_tokens=", "DB_PA", "\u017fS", "SWORD", ": ", "=", "\u0131", "pwd", "hunter2",
                                       "ghs_" + "Zq7" * 12, KEYS["openai"], KEYS["azure"], KEYS["google"], KEYS["azure-annotated"],
                                       KEYS["jwt-spaced"], KEYS["huggingface"], KEYS["slack"], "X-Amz-Signature=", "ABCDEF" * 4]),
                      max_size=6).map("".join)
_JSON_KEYS = st.sampled_from(["content", "role", "api_key", "API_KEY", "api\u212aey", "Password", "secret", "x", "code", "token"])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | _JSON_TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_JSON_KEYS, children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(_JSON)
def test_bodies_passed_over_as_clean_are_those_the_walk_leaves_alone(body: object) -> None:
    """The one-pass test over the serialised body never lets through what testing every
    string and key would change."""
    redactor = Redactor()
    assert redactor.json(body) == redactor._walk(body)


_SEAM_SECRETS = st.sampled_from([KEYS["azure"], KEYS["azure-annotated"], KEYS["jwt"], KEYS["google"], KEYS["pem"], KEYS["slack"], KEYS["aws"],
                                  "password=hunter2xyz", "GITHUB_TOKEN=" + "Zq7" * 8, "https://user:pw7Zq@host.example/x", "bearer " + "Zq7" * 8,
                                  "postgres://admin:" + "Zq7RmWvLpY" * 7 + "@db.internal/app"])
_FILLERS = st.sampled_from(["", "x", "the words around it " * 8])


@settings(max_examples=400, deadline=None)
@given(_SEAM_SECRETS, _FILLERS, _FILLERS, st.lists(st.integers(0, 300), max_size=5), st.sampled_from(["parts", "messages"]))
def test_runs_passed_over_as_clean_are_those_the_walk_leaves_alone(secret: str, before: str, after: str, cuts: list[int], shape: str) -> None:
    """A run of texts read joined is looked at only where one text meets the next (each
    text alone is in the body already looked at): that never lets through what the walk,
    which reads each run joined, would change, wherever the secret is cut, into short
    texts or long ones."""
    text = before + secret + after
    edges = [0, *sorted(cut % (len(text) + 1) for cut in cuts), len(text)]
    texts = [text[a:b] for a, b in zip(edges, edges[1:])]
    parts = [{"type": "text", "text": piece} for piece in texts]
    body = {"messages": [{"role": "user", "content": parts}]} if shape == "parts" else {
        "messages": [{"role": "user", "content": piece} for piece in texts]}
    redactor = Redactor()
    assert redactor.json(body) == redactor._walk(body)


@pytest.mark.parametrize("shape", ["parts", "messages"])
def test_a_url_password_whose_scheme_is_cut_between_texts_is_hidden(shape: str) -> None:
    """`://` formed only where one text meets the next, and the `@` after a long password far
    past that seam: a look at the seams alone saw one sign and not the other, and the
    password was traced in clear (a review)."""
    password = "Zq7RmWvLpYtNcGhJsXkBdFuQeAiOzRyTmVnWpLqKsJhGcXdZbNmQrTyUwEvPaSoIxLk"
    texts = ["connect with postgres:/", "/admin:" + password + "@db.internal/app"]
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": text} for text in texts]}]} if shape == "parts" else {
        "messages": [{"role": "user", "content": text} for text in texts]}
    written = orjson.dumps(Redactor().json(body)).decode()
    assert password not in written and password[:8] not in written, written


SPLIT_KEY = "sk-proj-" + "Qx7" * 20


@pytest.mark.parametrize("cuts", [(12,), (1,), (3, 30), (20, 21, 50), (len(SPLIT_KEY) - 1,)])
@pytest.mark.parametrize("shape", ["chat", "responses", "anthropic", "gemini"])
def test_a_key_cut_across_text_parts_is_hidden_in_every_part(cuts: tuple[int, ...], shape: str) -> None:
    """Each string was redacted by itself, so a key sent in pieces across a message's text
    parts (which the model reads as one) was traced whole, in pieces; cut inside its prefix,
    no look at the body found it at all. The part where it begins holds its fingerprint, the
    rest of it is gone; what is around it stays."""
    text = f"my key is {SPLIT_KEY} thanks"
    edges = [0, *(len("my key is ") + cut for cut in cuts), len(text)]
    pieces = [text[a:b] for a, b in zip(edges, edges[1:])]
    kind = {"chat": "text", "responses": "input_text", "anthropic": "text", "gemini": None}[shape]
    parts = [{"text": piece} if kind is None else {"type": kind, "text": piece} for piece in pieces]
    body = {"contents": [{"role": "user", "parts": parts}]} if shape == "gemini" else {"messages": [{"role": "user", "content": parts}]}
    redacted = Redactor().json(body)
    holder = redacted["contents"][0]["parts"] if shape == "gemini" else redacted["messages"][0]["content"]
    joined = "".join(part["text"] for part in holder)
    assert joined == f"my key is {Redactor().fingerprint(SPLIT_KEY)} thanks"
    assert all("Qx7Qx7" not in part["text"] for part in holder) and len(holder) == len(parts)


def test_what_is_cut_across_parts_by_a_configured_pattern_or_a_name_is_hidden() -> None:
    redactor = Redactor(extra_patterns=["ACME-[0-9A-F]{24}"])
    parts = [{"type": "text", "text": "code ACME-7F3A9C"}, {"type": "text", "text": "7F3A9C7F3A9C7F3A9C and password=hun"},
             {"type": "text", "text": "ter2 done"}]
    redacted = redactor.json({"messages": [{"role": "user", "content": parts}]})["messages"][0]["content"]
    written = orjson.dumps(redacted).decode()
    assert "7F3A9C" not in written and "hun" not in written and "ter2" not in written, written
    assert written.count("#") == 2 and redacted[2]["text"] == " done"


@pytest.mark.parametrize(("before", "secret", "after"), [
    ("my password=", "hunter2xyz", " done"),
    ("curl -H 'Authorization: Bearer ", "abcdEFGH1234ijklMNOP5678qrst", "' https://x"),
    ("postgres://admin:", "Sup3rS3cretPw", "@db.example/app"),
])
def test_a_secret_whole_in_a_part_but_named_in_the_part_before_is_hidden(before: str, secret: str, after: str) -> None:
    """The secret itself in one part, what makes it one (its name, `Bearer `, a URL's user)
    in the part before: alone, that part matched nothing, and it was traced in clear (a review)."""
    parts = [{"type": "text", "text": before}, {"type": "text", "text": secret + after}]
    written = orjson.dumps(Redactor().json({"messages": [{"role": "user", "content": parts}]})).decode()
    assert secret not in written and secret[:6] not in written, written


def test_overlapping_finds_across_parts_are_hidden_as_one() -> None:
    """A name's value that runs on past the key it begins with: the longer find was dropped
    and the rest of it traced (a review)."""
    parts = [{"type": "text", "text": "password=" + SPLIT_KEY[:20]}, {"type": "text", "text": SPLIT_KEY[20:] + "!Tail9secret rest"}]
    redacted = Redactor().json({"messages": [{"role": "user", "content": parts}]})["messages"][0]["content"]
    written = orjson.dumps(redacted).decode()
    assert "Qx7Qx7" not in written and "Tail9secret" not in written and written.endswith(' rest"}]'), written


def test_a_key_cut_across_messages_of_one_speaker_in_a_row_is_hidden() -> None:
    """Consecutive messages of one speaker are one turn to the model (Anthropic's rule, and
    the policy's): a key cut between two was traced whole in two halves (a review). A
    message of another speaker between them ends the run."""
    messages = [{"role": "user", "content": "key " + SPLIT_KEY[:20]}, {"role": "User", "content": SPLIT_KEY[20:] + " ok"}]
    written = orjson.dumps(Redactor().json({"messages": messages})).decode()
    assert "Qx7Qx7" not in written and written.count("#") == 1, written
    apart = [messages[0], {"role": "assistant", "content": "yes"}, messages[1]]
    assert Redactor()._parts_read_joined(apart) is apart


def test_parts_apart_or_keys_whole_in_one_part_are_as_before() -> None:
    """A part that is no text (an image) ends a run; a key whole in one part is that part's
    own; a list of prompts (strings) is no run of parts."""
    redactor = Redactor()
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    apart = [{"type": "text", "text": SPLIT_KEY[:12]}, image, {"type": "text", "text": SPLIT_KEY[12:]}]
    assert redactor._parts_read_joined(apart) is apart
    whole = [{"type": "text", "text": f"a {SPLIT_KEY}"}, {"type": "text", "text": " b"}]
    assert redactor._parts_read_joined(whole) is whole
    assert redactor.json({"messages": [{"role": "user", "content": whole}]})["messages"][0]["content"][0]["text"] == f"a {redactor.fingerprint(SPLIT_KEY)}"
    running_on = [{"type": "text", "text": f"a {SPLIT_KEY}"}, {"type": "text", "text": "b c"}]  # the model reads `...Qx7b`: one key
    joined = "".join(part["text"] for part in redactor.json({"messages": [{"role": "user", "content": running_on}]})["messages"][0]["content"])
    assert joined == f"a {redactor.fingerprint(SPLIT_KEY + 'b')} c"
    prompts = [SPLIT_KEY[:12], SPLIT_KEY[12:]]
    assert redactor._parts_read_joined(prompts) is prompts


def test_a_clean_body_is_returned_as_it_is_and_a_dirty_one_copied() -> None:
    redactor = Redactor()
    clean = {"model": "gpt-4o", "max_tokens": 9, "messages": [{"role": "user", "content": "Summarise the build log: tokens=5"}]}
    assert redactor.json(clean) is clean
    for dirty in ({"messages": [{"content": "use " + KEYS["azure"]}]}, {"api\u212aey": "short"}, {"x": ["Bearer abcdefgh12"]}):
        redacted = redactor.json(dirty)
        assert redacted is not dirty and redacted != dirty


@pytest.mark.parametrize("kind", ["project", "azure"])
@pytest.mark.parametrize("before", ["\\n", "\\t", "\\r", "%3D", "\\u00e9"])
def test_a_key_right_after_an_escape_is_found(kind: str, before: str) -> None:
    """JSON kept as text (a tool call's `arguments`: `"A=1\\nsk-..."`), a URL's `%3D`."""
    key = KEYS[kind]
    assert_gone(key, Redactor().text(f"X=1{before}{key}{before}Y"))
    arguments = '{"path": ".env", "content": "A=1\\n' + key + '\\n"}'
    assert_gone(key, str(Redactor().json({"function": {"arguments": arguments}})))


def test_a_percent_encoded_key_in_a_url_is_found() -> None:
    key = KEYS["project"]
    encoded = key.replace("-", "%2D")
    assert_gone(key, Redactor().url(f"https://api.openai.com/v1/x?q={encoded}&a=1").replace("%2D", "-"))
    assert_gone(key, Redactor().url(f"https://api.openai.com/v1/x?next=%3Fkey%3D{key}"))


def test_json_object_keys_are_redacted_too() -> None:
    key = KEYS["project"]
    redacted = Redactor().json({"metadata": {key: "x", "api_key": "a-short-one"}})
    assert_gone(key, str(redacted))
    assert "a-short-one" not in str(redacted)


def test_credentials_named_inside_json_strings() -> None:
    """A prompt, a tool's arguments or an echoed answer that names a credential: the value
    goes, whatever its shape, as in free text; as the name pattern folds case (the long s,
    the Kelvin sign)."""
    redactor = Redactor()
    body = {"messages": [{"role": "user", "content": 'GITHUB_TOKEN=ghpXYZZY1 and {"password": "XYZZY2"}'},
                         {"role": "assistant", "tool_calls": [{"function": {"arguments": '{"db_pa\u017f\u017fword": "XYZZY3"}'}}]}],
            "max_tokens": 5}
    redacted = redactor.json(body)
    assert "XYZZY" not in orjson.dumps(redacted).decode(), redacted
    assert redacted["messages"][0]["content"].startswith("GITHUB_TOKEN=…#")
    assert "XYZZY" in body["messages"][0]["content"]  # the original is left as it was


@pytest.mark.parametrize(
    ("names", "text"),
    [(["signature"], "SİGNATURE=XYZZY1"), (["session_id"], "sessİon_id=XYZZY2"), (["x_tokens"], "my x_tokens: XYZZY3"),
     (["straße"], "Straße=XYZZY4")],
)
def test_configured_names_are_found_inside_json_strings_however_written(names: list[str], text: str) -> None:
    """The first test never skips what the name pattern finds (a second review): the dotted
    capital I, a name ending in `tokens`, a name not in ASCII."""
    redactor = Redactor(extra_params=names)
    assert "XYZZY" not in redactor.json({"content": text})["content"]
    assert redactor.json({"content": text}) == redactor._walk({"content": text})


def test_credentials_named_in_free_text_and_output() -> None:
    """What mitmdump prints of a body, and text bodies: a value named like a credential
    goes whatever its shape."""
    redactor = Redactor()
    for line in ['    "api_key": "jsonfieldSECRETvalue1",', "password: multipartSECRETvalue3", "  'refresh_token' = 'respSECRET4'"]:
        assert "SECRET" not in redactor.log_line(line), line
    for line in ["GITHUB_TOKEN=ghpXYZZYvalue5", "export AWS_SECRET_ACCESS_KEY='awsXYZZY6'", 'passwd: "pwXYZZY7"', "x-auth-token: tXYZZY8",
                 "DB_PASS=XYZZY9", "DB_PWD=XYZZY10", "secret-key: XYZZY11", '{"accessToken": "XYZZY12", "clientSecret": "XYZZY13"}',
                 '{"secretKey": "XYZZY14", "privateKey": "XYZZY15", "awsSecretKey": "XYZZY16"}', "Server=x;Uid=sa;Pwd=XYZZY17;",
                 '"pwd": "XYZZY18"', "--pwd=XYZZY19", "password: 12XYZZY20"]:
        assert "XYZZY" not in redactor.free_text(line), line
    for line in ['{"token": "Hello", "logprob": -0.1}', "max_tokens=100", '"prompt_tokens": 12', 'tokenizer.eos_token = "</s>"',
                 '{"bos_token": "<s>", "pad_token": "<pad>", "sep_token": "[SEP]"}', '"next_token": "abc"', "PWD=/home/ana/src",
                 '"maxTokens": 5, "cacheKey": "k1"', "bypass=1", "PWD : C:\\Users\\ana", '{"boi_token": "<b>", "image_token": "<image>"}',
                 '"nextPageToken": "a", "NextToken": "b", "ContinuationToken": "c", "next_page_token": "d"', "hasPassword: false, useApiKey: true"]:
        assert redactor.free_text(line) == line
    text = redactor.free_text("client_secret=formfieldSECRETvalue2&grant_type=client_credentials")
    assert "SECRET" not in text and text.endswith("&grant_type=client_credentials")
    assert redactor.free_text('"code": "invalid_api_key"') == '"code": "invalid_api_key"'
    assert redactor.free_text(text) == text  # a fingerprint is left as it is


def test_passwords_and_cookies_show_no_characters_of_theirs() -> None:
    """Basic is base64 of user:password: its last characters are the password's."""
    redactor = Redactor()
    basic = "dXNlcjpXaW50ZXIyMDI0IQ=="
    for name, value, secret in [("authorization", f"Basic {basic}", basic), ("cookie", "session=abcdef0123456789", "session=abcdef0123456789")]:
        redacted = redactor.header(name, value)
        assert re.fullmatch(r"(Basic )?…#[0-9a-f]{16}", redacted), redacted
        assert secret[-4:] not in redacted
    assert redactor.header("authorization", "bearer\t" + KEYS["project"]) == "bearer " + redactor.fingerprint(KEYS["project"])
    # A password given by name, however it comes: a JSON field, a query or form parameter, a
    # name/value pair, a line of the printout (they kept their last four; a secrets probe).
    password = "correct-horse-battery-staple"
    hidden = [
        orjson.dumps(redactor.json({"password": password, "db": {"DB_PASS": password}, "env": [{"name": "DB_PASSWORD", "value": password}]})).decode(),
        redactor.url(f"https://h/v1/x?password={password}&n=1"),
        redactor.printout(f"    password: {password}"),
        redactor.sent_credentials([], f"https://h/v1/x?password={password}")[password],
        # a header named for a password, as traced and as found when echoed; a named object's value; a plural list
        redactor.header("X-Db-Password", password),
        redactor.sent_credentials([("X-Password", password)], "https://h/v1/x")[password],
        orjson.dumps(redactor.json({"password": {"value": password}})).decode(),
        orjson.dumps(redactor.json({"passwords": [password]})).decode(),
    ]
    for text in hidden:
        assert "aple" not in text and re.search(r"…#[0-9a-f]{16}", text), text
    assert redactor.json({"api_key": KEYS["project"]})["api_key"] == redactor.fingerprint(KEYS["project"])  # a key keeps its tail
    # a URL's password with no user, or holding `@`; a key after `_`, after Bearer and a no-break space;
    # a query's name in brackets; a signed link's signature (a secrets probe: each was kept whole)
    assert redactor.text("redis://:p4ssw0rd-xyz@cache:6379/0") == f"redis://:{redactor.opaque('p4ssw0rd-xyz')}@cache:6379/0"
    assert redactor.text("https://alice:p@ss-w0rd-xyz@host/x") == f"https://alice:{redactor.opaque('p@ss-w0rd-xyz')}@host/x"
    assert redactor.text("mail me at a@b.c or see https://user@host/x") == "mail me at a@b.c or see https://user@host/x"
    assert redactor.text(f"KEY_{KEYS['project']}") == f"KEY_{redactor.fingerprint(KEYS['project'])}"
    assert redactor.text(f"Bearer\u00a0{password}") == f"Bearer\u00a0{redactor.fingerprint(password)}"
    # the token on the line after `Bearer`, as written or escaped in a printed JSON string; a paragraph after is no token
    token = "nsOfake0123456789abcdef"
    for gap in ("\n", "\r\n", " \n  ", "\\n", "\\r\\n"):
        assert redactor.free_text(f"Authorization: Bearer{gap}{token} thanks") == f"Authorization: Bearer{gap}{redactor.fingerprint(token)} thanks"
        assert redactor.text(f"use Bearer{gap}{token}") == f"use Bearer{gap}{redactor.fingerprint(token)}"
    assert redactor.text("send a Bearer\n\nParagraphs follow here") == "send a Bearer\n\nParagraphs follow here"
    assert "s3cretvalue" not in redactor.url("https://x/y?api_key[]=s3cretvalue1&creds[api_key]=s3cretvalue2&page[size]=3")
    signed = orjson.dumps(redactor.json({"url": "https://b.s3.amazonaws.com/k?X-Amz-Signature=" + "f" * 64 + "&X-Amz-Date=1",
                                         "gcs": "https://storage.googleapis.com/b/o?X-Goog-Signature=" + "a" * 64})).decode()
    assert "f" * 16 not in signed and "a" * 16 not in signed and "X-Amz-Date=1" in signed
    # not a string: a list of keys, a number (their characters went whole)
    listed = redactor.json({"api_key": ["lk-opaque-0123456789abc"], "password": 123456789, "secret": [1, {"a": "plain"}]})
    assert "0123456789abc" not in orjson.dumps(listed).decode() and listed["password"].startswith("…#"), listed
    pins = [redactor.json({"password": value})["password"] for value in (12345678, "12345678", 1234)]
    assert len(set(pins)) == 3 and all(pin.startswith("…#") for pin in pins[::2])  # a number keeps no digit, and is not its digits as a string
    assert listed["secret"] == [1, {"a": "plain"}]  # a list that is not of strings is walked as it is
    plural = redactor.json({"secrets": ["a-plural-secret-1234"], "tokens": ["Hello", " world"], "keys": ["sort", "id"], "max_tokens": 5})
    assert plural["secrets"] == [redactor.fingerprint("a-plural-secret-1234")] and plural["tokens"] == ["Hello", " world"]
    assert plural["keys"] == ["sort", "id"] and plural["max_tokens"] == 5  # a tokenizer's words, a sort order are data


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ('"Authorization": "Bearer abcdefghijklmnop12345678"', "abcdefghijklmnop12345678"),  # the token, not the scheme
        ('curl -H "Authorization: Bearer abcdefghijklmnop12345678"', "abcdefghijklmnop12345678"),
        ('{"password": "correct horse battery staple"}', "horse battery staple"),  # a quoted value whole
        ("password=hunter2,moresecret", "moresecret"),
        ("client_secret: abc;defSECRET", "defSECRET"),
        ("{'password': 'pa\\'ssSECRET'}", "ssSECRET"),
        ("DB_PASSWORD=supersecretvalue", "supersecretvalue"),  # a prefixed name
        ("X-Api-Key: abcdef123456", "abcdef123456"),
        ('{\\"password\\": \\"escapedsecret\\"}', "escapedsecret"),  # JSON kept as text
    ],
)
def test_a_value_named_like_a_credential_goes_whole(text: str, secret: str) -> None:
    redactor = Redactor()
    assert secret not in redactor.free_text(text)
    assert secret not in redactor.log_line(text)


def test_percent_decoding_changes_nothing_but_the_keys() -> None:
    redactor = Redactor()
    azure = KEYS["azure"]
    plain = redactor.url(f"https://r.openai.azure.com/openai/deployments/gpt-4o/x?api-version=1&api-key={azure}")
    encoded = redactor.url(f"https://r.openai.azure.com/openai/deployments/gpt%2D4o/x?api-version=1&api-key={azure}")
    assert encoded.rpartition("api-key=")[2] == plain.rpartition("api-key=")[2]  # one key, one fingerprint
    assert redactor.url("https://x/v1/x?q=a%26b%3Dc") == "https://x/v1/x?q=a%26b%3Dc"  # %26 is not &


@pytest.mark.parametrize("indent", ["", "    "])
def test_a_private_key_block_is_found_across_the_printout_s_lines(indent: str) -> None:
    """A text body is printed a line at a time, and the block's armour and base64 are each a
    line of their own: the block is looked for in the whole first (it was printed whole)."""
    block = KEYS["pem"].replace("\n", "\n" + indent)
    printed = Redactor().printout(f"{indent}before\n{indent}{block}\n{indent}after")
    assert_gone(KEYS["pem"].split("\n")[1], printed)
    assert printed.startswith(f"{indent}before\n") and printed.endswith(f"\n{indent}after")
    coloured = Redactor().printout(f"\x1b[32m{indent}{block}\x1b[0m\n{indent}after")
    assert_gone(KEYS["pem"].split("\n")[2], coloured)


def test_cookies_in_the_printout_keep_none_of_their_characters() -> None:
    assert Redactor().log_line("    cookie: session=abcdefSECRETTAIL").endswith(": " + Redactor().opaque("session=abcdefSECRETTAIL"))


def test_free_text_stays_linear() -> None:
    """A long run of words joined by _ once took the name pattern quadratic time (27 s)."""
    import time

    started = time.perf_counter()
    Redactor().free_text("a_" * 16_000 + " x-" * 16_000)
    Redactor().log_line("GET https://api.openai.com/v1/x?q=" + "a_" * 16_000)
    assert time.perf_counter() - started < 1.0


def test_a_value_holding_a_key_and_more_goes_whole() -> None:
    redactor = Redactor()
    for text in ['password="sk-proj-TESTKEY0123456789abcdef hunter2secret"', '{"password": "Bearer abcdefghijkl hunter2secret"}',
                 'password="x…#hunter2secret"']:
        assert "hunter2secret" not in redactor.free_text(text), text


def test_escaped_urls_lose_their_keys_and_keep_the_rest() -> None:
    redactor = Redactor()
    tail = redactor.url("https://x/v1?q=sk-proj-TESTKEY0123456789%61bcdefXYZW")
    assert "bcdef" not in tail and "XYZW#" in tail  # the whole key, its escaped part too
    for name in ("api%2Dkey", "ap%69-key", "access%5Ftoken", "%6Bey"):
        assert "hunter2secret" not in redactor.url(f"https://x/v1?{name}=hunter2secret&a=1%26b"), name
    nested = redactor.url("https://x/v1?q=sk%2Dproj%2DABCDEFGH%2D0123456789abcdef%30123456789abcdef&next=KEEP_THIS_PARAM&z=1")
    assert nested.endswith("&next=KEEP_THIS_PARAM&z=1") and "0123456789abcdef" not in nested


# What mitmdump prints at flow_detail 3 and 4 (a review's findings D4 to D7).

@pytest.mark.parametrize("name", ["key", "token", "sig", "signature", "code", "api-key", "KEY", "subscription-key", "auth"])
def test_the_query_table_of_the_printout_hides_what_the_url_hides(name: str) -> None:
    """mitmdump lists a request's query as `name:   value` lines (padded; mitmproxy 12 as
    YAML, quoted or not): a value of no known shape goes as the same parameter in the URL
    goes, to the same fingerprint."""
    redactor = Redactor()
    value = "vllm-XYZZYnoShape0123"
    in_url = redactor.url(f"https://h/v1/models?{name}={value}").rpartition("=")[2]
    for line, printed in [(f"    {name}:        {value}\r", f"    {name}:        {in_url}\r"), (f"{name}: {value}", f"{name}: {in_url}"),
                          (f"{name}: '{value}'", f"{name}: '{in_url}'")]:
        assert redactor.log_line(line) == printed
    assert redactor.log_line("    api-version:  2024-10-21") == "    api-version:  2024-10-21"


def _hexdump_11(data: bytes) -> list[str]:
    """mitmproxy 11's hexdump lines (`strutils.hexdump`, as its Hex Dump view prints them)."""
    from mitmproxy.utils import strutils

    return [f"    {offset} {hexa}   {text}" for offset, hexa, text in strutils.hexdump(data)]


def _hexdump_12(data: bytes) -> list[str]:
    """mitmproxy 12's (the pretty_hex crate's, in mitmproxy_rs): `0000:   61 62 63 64  65 ...   abcde`."""
    lines = []
    for offset in range(0, len(data), 16):
        part = data[offset : offset + 16]
        groups = "  ".join(" ".join(f"{byte:02x}" for byte in part[i : i + 4]) for i in range(0, len(part), 4))
        text = "".join(chr(byte) if 32 <= byte < 127 else "." for byte in part)
        lines.append(f"{offset:04x}:   {groups:<50}   {text}")
    return lines


@pytest.mark.parametrize("dump", [_hexdump_11, _hexdump_12])
def test_a_hexdump_is_left_out_of_the_printout_whole(dump: Callable[[bytes], list[str]]) -> None:
    """A binary body's key, cut into 16-byte lines (in hex and as text), is in no line whole:
    no line-by-line reading finds it, so a hexdump is not printed at all (nor its hex
    column, which spells the key as well)."""
    key = "sk-proj-" + "XYZZY" * 12
    data = bytes(range(256))[:150] + key.encode() + b"\x00\xff" * 70
    lines = dump(data)
    printed = Redactor().printout("\r\n".join(["    {", *lines, "    }"]))
    for window in (key[i : i + 6] for i in range(8, len(key) - 6)):
        assert window not in printed and window.encode().hex() not in printed.replace(" ", "")
    assert printed.startswith("    {\r\n") and printed.endswith("\r\n    }")
    assert printed.count("\n") == 2 and f"{len(lines)} lines of hexdump" in printed
    coloured = [f"\x1b[34m{line[:14]}\x1b[0m{line[14:]}" for line in lines]
    assert "XYZZY" not in Redactor().printout("\n".join(coloured))


def test_ordinary_lines_are_not_taken_for_a_hexdump() -> None:
    text = "    2024: 12 items\n    0000:   12 items, 0000000000 of them\n    deadbeef00 is a word"
    assert Redactor().printout(text) == text


@pytest.mark.parametrize("line", [
    '    \x1b[32m        \x1b[0m"password"\x1b[32m: \x1b[0m"XYZZY-pw-1"\x1b[32m,\x1b[0m\r',  # mitmproxy 11's JSON view on a terminal
    '    \x1b[33m"client_secret"\x1b[0m: \x1b[32m"XYZZY-cs-2"\x1b[0m,',  # mitmproxy 12's highlighted chunks
    "\x1b[33mapi_key\x1b[0m:\x1b[32m XYZZY-ak-3\x1b[0m",
    "    \x1b[34mkey\x1b[0m:     \x1b[32mXYZZY-q-4\x1b[0m",
])
def test_colour_codes_between_a_name_and_its_value_hide_nothing(line: str) -> None:
    """On a terminal mitmdump colours names and values apart: the codes between them are
    looked through, and kept where the text around them is unchanged."""
    from llm_mitm.redact import _ANSI

    redactor = Redactor()
    printed = redactor.log_line(line)
    assert "XYZZY" not in printed
    assert _ANSI.sub("", printed) == redactor.log_line(_ANSI.sub("", line))
    assert printed.startswith(line[: line.index("\x1b") + 5]) and printed.endswith(line[line.rindex("\x1b") :])
    assert sorted(_ANSI.findall(printed)) == sorted(_ANSI.findall(line))
    assert redactor.log_line("\x1b[32m    plain text\x1b[0m") == "\x1b[32m    plain text\x1b[0m"
    assert redactor.log_line("a lone \x1b escape: password=XYZZY5") == "a lone \x1b escape: password=" + redactor.opaque("XYZZY5")


def test_the_credentials_a_request_sent_are_known_whatever_their_shape() -> None:
    """A key of no known shape that upstream echoes back (an error quoting it, a header) is
    found by its exact value: the value the request itself sent."""
    from llm_mitm.redact import replace_sent

    redactor = Redactor()
    bearer, azure, query, short = "vllm-XYZZY0bearer", "XYZZY1header-key", "XYZZY2query%2Fkey", "XYZZY3"
    sent = redactor.sent_credentials(
        [("Authorization", f"Bearer {bearer}"), ("api-key", azure), ("x-api-key", short), ("content-type", "application/json")],
        f"https://h/v1/chat?api-version=1&api-key={query}")
    assert sent == {bearer: redactor.fingerprint(bearer), azure: redactor.fingerprint(azure), "XYZZY2query/key": redactor.fingerprint("XYZZY2query/key")}
    assert redactor.header("authorization", f"Bearer {bearer}") == f"Bearer {sent[bearer]}"  # as the header is written
    assert redactor.sent_credentials([("Authorization", "Basic dXNlcjpYWVpaWTRwYXNz")], "https://h/") == {"dXNlcjpYWVpaWTRwYXNz": redactor.opaque("dXNlcjpYWVpaWTRwYXNz")}
    record = {"error": f"Incorrect API key provided: {bearer}", "headers": {"x-echo": f"key={azure}"},
              "body": [{"text": f"{short} and XYZZY2query/key", 3: None}], "n": 5}
    replaced = replace_sent(record, sent)
    assert "XYZZY0" not in str(replaced) and "XYZZY1" not in str(replaced) and "XYZZY2" not in str(replaced)
    assert "XYZZY3" in str(replaced)  # too short to be told from ordinary text
    assert replaced["error"] == f"Incorrect API key provided: {sent[bearer]}" and replaced["n"] == 5
    assert "XYZZY0" in record["error"]  # the original is left as it was
    clean = {"error": None, "body": {"text": "nothing sent is here"}}
    assert replace_sent(clean, sent) is clean


def test_a_realtime_key_sent_as_a_websocket_subprotocol_is_hidden() -> None:
    """A browser's realtime WebSocket names its key as a subprotocol (a review: a key of no
    known shape was traced whole, and the session had no caller)."""
    from llm_mitm.redact import replace_sent

    redactor = Redactor()
    value = "realtime, openai-insecure-api-key.XYZZY6noshape0123, openai-beta.realtime-v1"
    assert redactor.header("Sec-WebSocket-Protocol", value) == f"realtime, openai-insecure-api-key.{redactor.credential('XYZZY6noshape0123')}, openai-beta.realtime-v1"
    sent = redactor.sent_credentials([("Sec-WebSocket-Protocol", value)], "https://api.openai.com/v1/realtime?model=gpt-realtime")
    assert sent == {"XYZZY6noshape0123": redactor.credential("XYZZY6noshape0123")}
    assert "XYZZY6" not in str(replace_sent({"error": "bad key XYZZY6noshape0123"}, sent))
    assert "XYZZY6" not in redactor.log_line(f"    sec-websocket-protocol: {value}", sent)
    assert redactor.header("sec-websocket-protocol", "realtime") == "realtime"
    # one key the start of another: each hidden whole (a review: the longer one's rest was left)
    both = "openai-insecure-api-key.XYZZY8prefix0123, openai-insecure-api-key.XYZZY8prefix0123SECRETREST"
    assert "SECRETREST" not in redactor.header("Sec-WebSocket-Protocol", both)


def test_a_key_sent_in_a_parameter_named_like_a_credential_header_is_known_when_echoed() -> None:
    """`?x-api-key=` is no query parameter of the list, but `url` hides it as a named value:
    upstream quoting it back must find it hidden the same way."""
    from llm_mitm.redact import replace_sent

    redactor = Redactor()
    url = "https://h/v1/messages?x-api-key=XYZZY4noshape&x-goog-api-key=XYZZY5noshape&q=ordinaryvalue"
    sent = redactor.sent_credentials([], url)
    assert sent == {"XYZZY4noshape": redactor.opaque("XYZZY4noshape"), "XYZZY5noshape": redactor.opaque("XYZZY5noshape")}
    assert sent["XYZZY4noshape"] in redactor.url(url)  # as the URL is written in the trace
    echoed = replace_sent({"error": "bad key XYZZY4noshape, XYZZY5noshape"}, sent)
    assert "XYZZY" not in str(echoed)


@pytest.mark.parametrize("url", [
    "https://api.openai.com/v1/models?q=GITHUB_TOKEN=ghpXYZZYvalue1&a=1",
    "https://api.openai.com/v1/models?q=GITHUB_TOKEN%3DghpXYZZYvalue1&a=1",
    "https://api.openai.com/v1/models?q=GITHUB%5FTOKEN%3d%22ghpXYZZY%20value1%22&a=1",
    "127.0.0.1:5: GET https://api.openai.com/v1/models?q=db_password%3AghpXYZZYvalue1 HTTP/2.0",
])
def test_a_value_named_like_a_credential_in_a_url(url: str) -> None:
    """In the trace's URL and mitmdump's request line, percent-encoded or not."""
    redactor = Redactor()
    for redacted in (redactor.url(url), redactor.log_line(url)):
        assert "XYZZY" not in redacted, redacted
        assert redacted.startswith(url[:20]) and (redacted.endswith("&a=1") or redacted.endswith("HTTP/2.0"))
    assert redactor.url("https://h/v1?q=a%26b%3Dc&max_tokens=5") == "https://h/v1?q=a%26b%3Dc&max_tokens=5"


def test_a_form_body_is_read_as_its_server_reads_it() -> None:
    """application/x-www-form-urlencoded: its fields are a query's parameters (`key=`,
    `token=` of any shape), its text percent-decoded (`GITHUB_TOKEN%3D...`)."""
    redactor = Redactor()
    form = "grant_type=client_credentials&token=XYZZYtok1&q=GITHUB_TOKEN%3DghpXYZZY2+x&client_secret=XYZZY3&n=1"
    redacted = redactor.form(form)
    assert "XYZZY" not in redacted, redacted
    assert redacted.startswith("grant_type=client_credentials&token=") and redacted.endswith("&n=1")
    assert redactor.form("a=1&b=hello%20world") == "a=1&b=hello%20world"


def test_log_records_are_redacted_with_their_tracebacks() -> None:
    """The filter on the proxy's and the trace writer process's log handlers."""
    import logging

    from llm_mitm.redact import RedactingFilter

    redactor = Redactor()
    key = "sk-proj-" + "XYZZY" * 10
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "no price for model %r", (f"ft:{key}",), None)
    try:
        raise KeyError(f"GITHUB_TOKEN=XYZZYtb {key}")
    except KeyError:
        import sys

        record.exc_info = sys.exc_info()
    assert RedactingFilter(lambda: redactor).filter(record)
    text = logging.Formatter().format(record)
    assert "XYZZY" not in text and "no price for model 'ft:sk-proj-…" in text and "KeyError" in text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["\x1b[32m", "\x1b[0m", "\x1b[1m", '"password"', "password", ": ", "=", '"', " ", "key", "    ",
                                 "XYZZY-1", "hunter2XYZZY", KEYS["project"], "Bearer ", "token", "GITHUB_TOKEN", "%3D", "é", "\x1b", "["]),
                max_size=14).map("".join))
def test_colour_codes_change_nothing_but_where_they_stand(line: str) -> None:
    """A line with codes reads as the same line without them; the codes all stay. An escape
    character outside a code is not what mitmdump prints (it escapes every control character
    of a flow's text), and taking codes out around one can make another: "the same line
    without its codes" is then no one line."""
    from llm_mitm.redact import _ANSI

    assume("\x1b" not in _ANSI.sub("", line))
    redactor = Redactor()
    printed = redactor.log_line(line)
    assert _ANSI.sub("", printed) == redactor.log_line(_ANSI.sub("", line))
    assert sorted(_ANSI.findall(printed)) == sorted(_ANSI.findall(line))


def test_a_sent_credential_holding_another_goes_whole() -> None:
    from llm_mitm.redact import replace_sent

    redactor = Redactor()
    sent = redactor.sent_credentials([("api-key", "XYZZYabcd"), ("authorization", "Bearer XYZZYabcdTAIL1234")], "https://h/v1?key=XYZZYab")
    assert list(sent) == ["XYZZYabcdTAIL1234", "XYZZYabcd"]  # `key` is too short
    for text in (replace_sent({"e": "XYZZYabcdTAIL1234 XYZZYabcd"}, sent)["e"], redactor.log_line("e: XYZZYabcdTAIL1234 XYZZYabcd", sent)):
        assert "XYZZY" not in text and "TAIL" not in text, text


def test_a_sent_key_echoed_masked_keeps_no_more_of_it_than_its_fingerprint() -> None:
    """OpenAI's 401 quotes a wrong key with its first and last characters around stars
    (`sk-AbCdE*****WxYz`, a key of no shape `FaKe1234*****WxYz`): a secrets probe found those
    first characters traced and printed (flow_detail 3), more of the key than its fingerprint
    keeps. The masked echo of a key the request sent goes as that key's fingerprint."""
    from llm_mitm.redact import replace_sent

    redactor = Redactor()
    legacy, no_shape = "sk-" + "TESTKEYa" + _fake(size=40), "gwTESTKEY" + _fake(size=24)
    sent = redactor.sent_credentials([("Authorization", f"Bearer {legacy}"), ("x-api-key", no_shape)], "https://h/v1/chat")

    def masked(key: str, head: int) -> str:
        return key[:head] + "*" * 39 + key[-4:]

    error = (f"Incorrect API key provided: {masked(legacy, 8)}. You can find your API key at https://platform.openai.com/account/api-keys."
             f" Also {masked(no_shape, 8)}.")
    for text in (replace_sent({"error": error}, sent)["error"], redactor.log_line(f'    "message": "{error}",', sent)):
        assert "TESTK" not in text and "***" not in text, text
        assert f"provided: {sent[legacy]}. You can" in text and f"Also {sent[no_shape]}." in text
    # stars that are no key's echo stay as they are
    plain = {"text": "**bold** s*** and sk-*** rated ***** gw**** OPENAI_API_KEY=sk-TESTK*** or sk-***" + legacy[-1] + " " + no_shape[:8] + "***"}
    assert replace_sent(plain, sent) == plain
    # Markdown's stars, many of them, are passed over, and an echo among them still found
    markdown = "a rule\n\n***\n\nand ***some emphasis*** here, " * 500
    assert replace_sent({"text": markdown}, sent)["text"] == markdown
    assert replace_sent({"text": markdown + masked(legacy, 8)}, sent)["text"] == markdown + sent[legacy]


def _fake(prefix: str = "", size: int = 30) -> str:
    return prefix + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(size))


@pytest.mark.parametrize("name", ["DB_PASSWORD", "clientSecret", "OPENAI_API_KEY", "x-api-key", "auth_token", "passphrase", "credentials"])
def test_a_json_value_named_like_a_credential_is_hidden_as_free_text_would_hide_it(name: str) -> None:
    """A key's name is read as a header's or free text's is (a secrets probe: only exact
    field names were), whatever the nesting; and an object's `value` under such a name, or
    in a name/value pair."""
    secret = _fake()
    body = {"tool_use": {"input": {name: secret}}, "env": [{"name": name, "value": secret}], "client_secret": {"value": secret, "expires_at": 1}}
    out = orjson.dumps(Redactor().json(body)).decode()
    assert secret not in out and secret[-4:] in out
    assert Redactor().json({"usage": {"max_tokens": 5, "token": "Hello"}, "logprobs": [{"token": "Hi", "logprob": -1.0}]}) == \
        {"usage": {"max_tokens": 5, "token": "Hello"}, "logprobs": [{"token": "Hi", "logprob": -1.0}]}  # a token is a word


@pytest.mark.parametrize(
    "text",
    [
        "the realtime client secret ek_" + "a1B2c3D4" * 4,
        "git clone https://ghp_" + "x" * 36 + "@github.com/acme/app",
        "fine-grained github_pat_" + "A1_" * 10,
        # every GitHub token, not only ghp_: ghs_ is the GITHUB_TOKEN of Actions, pasted from CI logs (a secrets probe)
        *[f"git push says 403 with {prefix}" + "Zq7" * 12 for prefix in ("gho_", "ghu_", "ghs_", "ghr_")],
        "TOKEN:\\neyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",  # a JWT after an escape, as tool arguments hold it
        "callback?state=sk%2Dproj%2D" + "K" * 30,  # a key percent-encoded in a body
    ],
)
def test_more_secret_shapes_in_bodies(text: str) -> None:
    out = orjson.dumps(Redactor().json({"content": text})).decode()
    hidden = re.sub(r"%2D", "-", text).split()[-1]
    assert hidden[8:24] not in out, out


def test_a_password_in_a_url_and_a_signed_link_keep_nothing_of_their_secret() -> None:
    redactor = Redactor()
    url = redactor.json({"u": "postgres://admin:Hunter2Secret99@db:5432/x"})["u"]
    assert "Hunter2" not in url and "99@" not in url and url.startswith("postgres://admin:…#")
    assert redactor.json({"m": "mail bob@example.com, see https://x.com/@bob"}) == {"m": "mail bob@example.com, see https://x.com/@bob"}
    link = redactor.json({"data": [{"url": "https://a.blob.core.windows.net/c/i.png?sv=2021&sr=b&sig=LsNq7%2Bkd8Zp0aaaabbbbcc%3D"}]})
    assert "LsNq7" not in orjson.dumps(link).decode()
    assert redactor.header("location", "https://h/x?sv=1&sig=74bxyzxyzxyzxyz").endswith("sig=" + redactor.fingerprint("74bxyzxyzxyzxyz"))
    assert "kqGabc" not in redactor.header("x-debug", "session_token=kqGabcdefghij")
    assert redactor.header("content-type", "application/json; charset=utf-8") == "application/json; charset=utf-8"


@pytest.mark.parametrize("name", ["x-functions-key", "x-openai-key", "anthropic-key", "x-subscription-key", "x-credential", "Authentication", "x-key"])
def test_headers_named_for_a_key_are_credentials(name: str) -> None:
    secret = _fake()
    assert secret[:-4] not in Redactor().header(name, secret)
    assert Redactor().header("Idempotency-Key", "req-1234567890") == "req-1234567890"


def test_a_cookie_upstream_echoes_is_hidden_whole() -> None:
    redactor = Redactor()
    cookie = _fake()
    sent = redactor.sent_credentials([("Cookie", f"theme=dark; sid={cookie}")], "https://api.openai.com/v1/models")
    assert sent == {cookie: redactor.opaque(cookie)}  # `dark` is too short to look for anywhere


def test_a_secret_spelled_by_an_answers_logprobs_is_gone_from_them() -> None:
    """Logprobs give the answer a token (a few characters) at a time: a key the text hid was
    readable joined back from them (a secrets probe). Chat, Responses and legacy completions."""
    from llm_mitm.redact import without_spelled_secrets

    redactor, key = Redactor(), KEYS["project"]
    tokens = ["Your key: ", *(key[i : i + 4] for i in range(0, len(key), 4))]
    run = [{"token": t, "logprob": -0.5, "bytes": list(t.encode()), "top_logprobs": [{"token": t, "logprob": -0.5, "bytes": []}]} for t in tokens]
    chat = {"choices": [{"index": 0, "message": {"content": redactor.text("".join(tokens))}, "logprobs": {"content": run, "refusal": None}}]}
    responses = {"output": [{"type": "message", "content": [{"type": "output_text", "text": "x", "logprobs": run}]}]}
    legacy = {"choices": [{"text": "x", "logprobs": {"tokens": tokens, "token_logprobs": [-0.5] * len(tokens), "top_logprobs": [{}] * len(tokens)}}]}
    for body in (chat, responses, legacy):
        hidden = orjson.dumps(without_spelled_secrets(body, redactor, {})).decode()
        assert_gone(key, hidden.replace('","', ""))  # not even joined back
        assert "-0.5" in hidden and "Your key: " in hidden  # the numbers stay, and the tokens that spell no secret (a review)
    unknown = "opaque-team-credential-0123"  # a credential of no shape the request sent, spelled back
    spelled = {"choices": [{"logprobs": {"content": [{"token": unknown[:9]}, {"token": unknown[9:]}]}}]}
    assert unknown[:9] not in orjson.dumps(without_spelled_secrets(spelled, redactor, {unknown: "…#x"})).decode()
    clean = {"choices": [{"logprobs": {"content": [{"token": "Hello", "logprob": -0.1}]}}]}
    assert without_spelled_secrets(clean, redactor, {}) is clean


def test_a_form_field_named_like_a_credential_is_hidden_as_written_echoed_or_printed() -> None:
    """An upload's `api_key` or `password` field: its name and value are lines apart, where
    no `name: value` reading found them (a secrets probe: kept whole in an answer echoing the
    form, in the trace and in mitmdump's printout). Other fields, and a file, stay."""
    redactor = Redactor()
    key, password = "nsNfake" + "Q7wE9rT2yU4iO6pA8sD0", "hunter2-but-longer"
    form = ("--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--b\r\nContent-Disposition: form-data; name=\"api_key\"\r\n\r\n{key}\r\n"
            f"--b\r\ncontent-disposition: form-data; name=\"Password\"\r\nContent-Type: text/plain\r\n\r\n{password}\r\n"
            "--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\r\nsome text\r\n--b--\r\n")
    echoed = redactor.json({"error": {"message": f"could not read: {form}"}})["error"]["message"]
    printed = redactor.log_line("    " + orjson.dumps({"body": form}).decode())
    cut = redactor.free_text(form[: form.index(key) + len(key)])  # a sample cut right after the value
    for text in (redactor.free_text(form), echoed, printed, cut):
        assert key[4:] not in text and "…#" in text, text
    for text in (redactor.free_text(form), echoed, printed):
        assert password[4:] not in text and "batch" in text and "some text" in text, text
    assert redactor.free_text(form.replace("api_key", "model")).count(key) == 1  # a field of no credential's name is data


def test_a_secret_spelled_with_json_escapes_is_hidden_as_a_reader_reads_it() -> None:
    """In a tool call's arguments (JSON in a string) a key or a credential's name may be
    written with escapes a reader undoes: `\\u0073k-proj-...`, `"\\u0061pi_key"`, an escape
    in a key's middle, an escaped line break after `Bearer`, an echo deeper (a secrets probe:
    each was kept whole, or all but its start)."""
    redactor = Redactor()
    key, opaque = KEYS["project"], "nsMfake" + "Q7wE9rT2yU4iO6pA8sD0"
    arguments = [
        '{"key": "\\u0073' + key[1:] + '"}',
        '{"\\u0061pi_key": "' + opaque + '"}',
        "my key is " + key[:20] + "\\u0044" + key[21:],
        orjson.dumps(orjson.dumps({"command": f"curl -H 'Authorization: Bearer\n{opaque}'"}).decode()).decode(),
    ]
    for text in arguments:
        hidden = redactor.json({"tool_calls": [{"function": {"name": "f", "arguments": text}}]})
        printed = redactor.log_line("    " + orjson.dumps({"arguments": text}).decode())
        for shown in (orjson.dumps(hidden).decode(), printed):
            assert key[12:30] not in shown and opaque[4:] not in shown and "…" in shown, shown
    assert redactor.free_text('{"path": "C:\\\\Users\\\\me", "note": "a \\u00e9t\\u00e9"}') == '{"path": "C:\\\\Users\\\\me", "note": "a \\u00e9t\\u00e9"}'  # as written where nothing is hidden


def test_a_line_holding_a_byte_that_is_not_utf8_is_redacted_not_raised_on() -> None:
    """mitmproxy writes such a byte of a request target as a lone surrogate: the flow's
    printout raised on it, and its lines were never printed (a robustness probe)."""
    redactor = Redactor()
    line = "127.0.0.1:5: POST https://api.openai.com/v1/chat/completions?q=\udcff\udcfe&password=hunter2-longer"
    printed = redactor.printout(line)
    assert "\udcff\udcfe" in printed and "hunter2-longer" not in printed and "…#" in printed
    assert "hunter2" not in redactor.free_text("caf\udce9 password: hunter2-longer")
