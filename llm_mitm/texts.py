"""Every text an API will read from a request body, with its role, and a normal form.

The conversation: chat `messages` (string content or content-part arrays, tool messages),
Responses `instructions` and `input` (a string or items: messages and tool outputs),
Anthropic `system` (string or blocks) and `messages` (text, tool results, documents,
search results), the legacy `prompt` and `suffix`; Assistants' messages (one added to a
thread, a new thread's, a run's `additional_messages` and `additional_instructions`),
Conversations' `items`, and a realtime session's `instructions` and tools. Beside it,
what else the model reads (`extras`): the texts of tools' schemas and of a structured
output's (names, descriptions, titles, property names, enum and example values), a
predicted output, the arguments of earlier tool calls, a stored prompt's variables. And
for matching (`joined`), the runs of texts read in a row: a message's text parts, and
consecutive messages of one role (Anthropic reads them as one turn), so that a phrase
split in two is still one phrase.
"""

from __future__ import annotations

import base64
import binascii
import json
import mimetypes
import re
import unicodedata
from collections.abc import Iterator
from importlib import resources
from typing import Any

import orjson

from llm_mitm.memo import Memo

RoleText = tuple[str, str]
ROLE_ALIASES = {"developer": "system", "function": "tool"}  # roles the APIs read as another


def speaker(role: str) -> str:
    """Who a role is, as a lenient server reads it (`User` is the user) and as the APIs
    read its aliases (a developer is the system)."""
    role = role.strip().lower()
    return ROLE_ALIASES.get(role, role)


TEXT_PART_TYPES = frozenset(("text", "input_text", "output_text"))  # a message part that is text, by its type
# Responses items that are not messages: their text, whose it is, and whether it is part
# of the conversation (a tool's output) or beside it (a call's arguments).
_ITEM_TEXTS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "function_call_output": (("output", "tool", False),),
    "custom_tool_call_output": (("output", "tool", False),),
    "local_shell_call_output": (("output", "tool", False),),
    "shell_call_output": (("output", "tool", False),),
    "computer_call_output": (("output", "tool", False),),
    "mcp_call": (("arguments", "assistant", True), ("output", "tool", False)),
    "function_call": (("arguments", "assistant", True),),
    "custom_tool_call": (("input", "assistant", True),),
}
# Parts that are no text to read (media, references); any other part or item of a kind not
# named here (a hosted tool's call or result: code, logs, a fetched page, a patch, search
# results, an MCP server's tools) is read for every string in it: the model reads them, and
# each API adds such kinds faster than a list could follow.
_NOT_TEXT = frozenset(("image", "image_url", "input_image", "input_audio", "audio", "file", "input_file", "container_upload",
                       "item_reference", "redacted_thinking", "encrypted_content"))
# A chat message's own thinking, which servers of open models print into the prompt when it is
# given back (vLLM's `reasoning`, copied to `reasoning_content`, as Qwen3's template prints it;
# DeepSeek's `reasoning_content`; Ollama's `thinking`; OpenRouter's `reasoning_details`): a
# firewall probe put a forbidden phrase there, unread.
_REASONING_KEYS = ("reasoning", "reasoning_content", "thinking", "reasoning_details")
_REASONING_KEY_SET = frozenset(_REASONING_KEYS)
_NO_TEXT_KEYS = frozenset(("id", "type", "call_id", "tool_use_id", "status", "encrypted_content", "signature"))
SCHEMA_DEPTH = 64  # how deep a schema (or any value read whole) is read for its texts


class TooDeep(ValueError):
    """A text nested deeper than is read: a server writes it into the prompt all the same
    (a firewall probe: a tool description 33 levels deep was never read)."""


# The piece left where a value goes deeper than is read: the policy refuses a body with one
# (`read_request(whole=True)`); an estimate or a report reads the rest around it.
_UNREAD: tuple[str, str] = ("", "")
# What each JSON Schema keyword holds that the model reads (a schema is rendered into its
# prompt): a text; a name; a value (its strings, in lists and objects too: `enum` is how the
# model learns what to write); a schema or a list of them; schemas by name (the names are
# read too: a property's name tells the model what to write there). A tool's own keys (its
# `name`, `description`, `parameters`, Anthropic's `input_schema`) and a structured output
# format's (`name`, `description`, `schema`) read as a schema's, so one walk serves them all.
# Looked up per key a node has (a few), not per keyword known (two dozen).
_TEXT, _NAME, _VALUE, _SCHEMA, _MAP = range(5)
_SCHEMA_KEYS = {
    "description": _TEXT, "title": _TEXT, "name": _NAME,
    # an MCP tool's server; a custom tool's grammar (Responses: format.definition; chat: format.grammar.definition)
    "server_description": _TEXT, "definition": _TEXT, "format": _SCHEMA, "grammar": _SCHEMA,
    "enum": _VALUE, "const": _VALUE, "default": _VALUE, "examples": _VALUE,
    "parameters": _SCHEMA, "input_schema": _SCHEMA, "schema": _SCHEMA,
    # Gemini's tools: functions declared in a list, their parameters also as JSON Schema
    "functionDeclarations": _SCHEMA, "function_declarations": _SCHEMA, "parametersJsonSchema": _SCHEMA, "parameters_json_schema": _SCHEMA,
    "items": _SCHEMA, "prefixItems": _SCHEMA, "additionalProperties": _SCHEMA, "contains": _SCHEMA,
    "anyOf": _SCHEMA, "oneOf": _SCHEMA, "allOf": _SCHEMA, "not": _SCHEMA, "if": _SCHEMA, "then": _SCHEMA, "else": _SCHEMA,
    "properties": _MAP, "$defs": _MAP, "definitions": _MAP, "patternProperties": _MAP, "dependentSchemas": _MAP,
}
# Keywords whose strings are the schema's own words (`"type": "string"`) or names read as
# the properties' (`required`): nothing to read, and in every node of every schema.
_SCHEMA_WORDS = frozenset(("type", "required", "$schema", "$ref", "$id"))
# A body's keys for what the model reads beside the conversation.
# The prompt fields of servers' own endpoints, as their roles: TGI's `inputs` and SGLang's
# `text` (`/generate`), llama.cpp's `/infill` (the code around the gap, other files), and
# Ollama's `template`, which its prompt is written into (a firewall probe: none was read).
_NATIVE_PROMPTS = {"inputs": "user", "text": "user", "input_prefix": "user", "input_suffix": "user", "input_extra": "user", "template": "system"}
_NATIVE_PROMPT_KEYS = frozenset(_NATIVE_PROMPTS)
_EXTRA_KEYS = frozenset(("prompt", "tools", "functions", "response_format", "text", "output_config", "output_format", "prediction",
                         "documents", "chat_template", "chat_template_kwargs", "data_sources", "generationConfig", "generation_config"))
# Gemini's own API (`providers._gemini_call`): the conversation, its system instruction, an
# embedding's content, Imagen's and Veo's `instances`, the request whose tokens are counted.
_GEMINI_KEYS = frozenset(("contents", "systemInstruction", "system_instruction", "instances", "requests", "generateContentRequest",
                          "generate_content_request"))
# The keys `_Collector.body` reads beside `messages`, by where they are read.
_BEFORE_MESSAGES_KEYS = frozenset(("prompt", "suffix", "content", "system", "instructions", "additional_instructions",
                                   "input_audio_transcription", "audio", "role")) | _NATIVE_PROMPT_KEYS | _GEMINI_KEYS
_AFTER_MESSAGES_KEYS = frozenset(("additional_messages", "tool_outputs", "input", "items"))
_NESTED_BODY_KEYS = frozenset(("thread", "session"))
_GEMINI_ROLES = {"model": "assistant", "function": "tool"}
_GEMINI_BINARY = frozenset(("inlineData", "inline_data", "fileData", "file_data"))  # a part's media: its data is base64, its uri a name


def transcriptions(session: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """A realtime session's transcription settings: the beta's `input_audio_transcription`,
    the GA's `audio.input.transcription`."""
    beta = session.get("input_audio_transcription")
    if isinstance(beta, dict):
        yield "input_audio_transcription", beta
    audio = session.get("audio")
    given = audio.get("input") if isinstance(audio, dict) else None
    transcription = given.get("transcription") if isinstance(given, dict) else None
    if isinstance(transcription, dict):
        yield "audio.input.transcription", transcription


def prompt_text(item: Any) -> str | None:
    """A legacy completion prompt's text: a string, or llama.cpp's `{"prompt_string": ...}`;
    None for token ids (or anything else)."""
    if isinstance(item, dict):
        item = item.get("prompt_string")
    return item if isinstance(item, str) else None


RoleGroup = tuple[str, list[str]]  # texts of one role the model reads in a row


def request_texts(body: Any, extras: bool = False) -> list[RoleText]:
    """(role, text) for each piece of text in a request body, whatever the API: the
    conversation, and with `extras` what else the model reads."""
    return read_request(body, extras, joined=False)[0]


def read_request(body: Any, extras: bool, joined: bool, whole: bool = False) -> tuple[list[RoleText], list[RoleGroup]]:
    """The pieces of `request_texts`, and with `joined` the runs of pieces the model reads
    in a row: a message's parts, consecutive messages of one role (for matching a phrase
    split between them). With `whole`, TooDeep where a text is nested past what is read;
    else what was read up to it (an estimate, a report)."""
    collector = _Collector(extras, joined)
    if isinstance(body, dict):
        collector.body(body)
    if _UNREAD in collector.out:
        if whole:
            raise TooDeep
        collector.out = [piece for piece in collector.out if piece is not _UNREAD]
    return collector.out, collector.groups


class _Collector:
    """One pass over a body into a list (nested generators cost more than the work: this
    runs on every request)."""

    def __init__(self, extras: bool, joined: bool) -> None:
        self.out: list[RoleText] = []
        self.groups: list[RoleGroup] = []
        self.extras = extras
        self.joined = joined
        self._run: tuple[str, int, int] | None = None  # the speaker of the turns in a row, where their texts start, how many

    def body(self, body: dict[str, Any], nested: bool = False) -> None:
        """In the order a model reads them. Most bodies are a chat's (`model`, `messages`,
        sampling settings): one look at their keys passes over the readers of the rest."""
        if not _BEFORE_MESSAGES_KEYS.isdisjoint(body):
            self._before_messages(body, nested)
        for message in as_list(body.get("messages")):
            self.message(message)
        if not _AFTER_MESSAGES_KEYS.isdisjoint(body):
            self._after_messages(body)
        self.end_run()
        if self.extras and not _EXTRA_KEYS.isdisjoint(body):
            self._extras(body)
        if not nested and not _NESTED_BODY_KEYS.isdisjoint(body):  # a body within: a new thread's (`threads/runs`), a realtime session's; one level
            for key in ("thread", "session"):
                inner = body.get(key)
                if isinstance(inner, dict):
                    self.body(inner, nested=True)

    def _before_messages(self, body: dict[str, Any], nested: bool) -> None:
        """A legacy or native prompt, Gemini's conversation, the system and instructions."""
        if "prompt" in body or "suffix" in body:  # legacy completions
            for field in ("prompt", "suffix"):
                value = body.get(field)
                if isinstance(value, str):
                    self.out.append(("user", value))
                elif isinstance(value, (list, dict)):  # llama.cpp's too: `{"prompt_string": ...}`, alone or in the list
                    self.out.extend(("user", text) for item in ([value] if isinstance(value, dict) else value) if (text := prompt_text(item)) is not None)
        if not _NATIVE_PROMPT_KEYS.isdisjoint(body):
            self._native_prompt(body)
        if not _GEMINI_KEYS.isdisjoint(body) or _is_gemini_content(body.get("content")):
            self._gemini(body, nested)
        system = body.get("system")
        if system is not None:
            self.content("system", system)
        # Instructions are the system's first turn: a developer or system message after
        # them (Responses' input) is read right after (Assistants' runs add to the assistant's).
        for key in ("instructions", "additional_instructions"):
            instructions = body.get(key)
            if isinstance(instructions, str):
                self.turn("system", instructions)
        if "input_audio_transcription" in body or "audio" in body:  # a realtime session's: what its transcription model is told
            for _, transcription in transcriptions(body):
                if isinstance(transcription.get("prompt"), str):
                    self.turn("system", transcription["prompt"])
        if "role" in body and "content" in body:  # Assistants: one message added to a thread
            self.message(body)

    def _after_messages(self, body: dict[str, Any]) -> None:
        """Messages added to a run, tool outputs, Responses' input and Conversations' items."""
        for message in as_list(body.get("additional_messages")):
            self.message(message)
        for output in as_list(body.get("tool_outputs")):  # Assistants: a run's tool outputs, submitted
            if isinstance(output, dict):
                self.content("tool", output.get("output"))
        for key in ("input", "items"):  # Responses' input; Conversations' items, read the same
            items = body.get(key)
            for item in [items] if isinstance(items, str) else as_list(items):
                if isinstance(item, str):
                    self.turn("user", item)
                else:
                    self.message(item)

    def _native_prompt(self, body: dict[str, Any]) -> None:
        """The prompt of a server's own endpoint (see `_NATIVE_PROMPTS`)."""
        for key, role in _NATIVE_PROMPTS.items():
            value = body.get(key)
            for item in [value] if isinstance(value, str) else as_list(value):
                if isinstance(item, str):
                    self.out.append((role, item))
                elif isinstance(item, dict) and isinstance(item.get("text"), str):  # `input_extra`: files, `{"filename", "text"}`
                    self.out.append((role, item["text"]))

    def _gemini(self, body: dict[str, Any], nested: bool) -> None:
        """A body of Gemini's own API: `contents` (its roles `user`, `model`, `function`),
        `systemInstruction`, an embedding's `content` (batched: each of `requests`),
        Imagen's and Veo's `instances`, and a counted request within."""
        system = body.get("systemInstruction", body.get("system_instruction"))
        if system is not None:
            self.gemini_content("system", system)
        contents = body.get("contents")
        for item in [contents] if isinstance(contents, (str, dict)) else as_list(contents):
            role = item.get("role") if isinstance(item, dict) else None
            role = role.strip().lower() if isinstance(role, str) else "user"
            self.gemini_content(_GEMINI_ROLES.get(role, role), item)
        for request in [body] + [item for item in as_list(body.get("requests")) if isinstance(item, dict)]:
            if _is_gemini_content(request.get("content")):
                self.gemini_content("user", request["content"])
        _leaf_texts(self.out, "user", body.get("instances"), SCHEMA_DEPTH)
        inner = body.get("generateContentRequest", body.get("generate_content_request"))
        if isinstance(inner, dict) and not nested:
            self.body(inner, nested=True)

    def gemini_content(self, role: str, content: Any) -> None:
        """A Gemini `Content` (its `parts`; a lenient server takes a text or a list of parts)."""
        start = len(self.out)
        parts = content.get("parts") if isinstance(content, dict) else content
        for part in [parts] if isinstance(parts, (str, dict)) else as_list(parts):
            if isinstance(part, str):
                self.out.append((role, part))
            elif isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    self.out.append((role, part["text"]))
                rest = {key: value for key, value in part.items() if key != "text" and key not in _GEMINI_BINARY}
                if rest:  # a function's call or response, executable code and its result: what the model reads
                    _leaf_texts(self.out, role, rest, SCHEMA_DEPTH)
        if self.joined:  # the parts of one message are read in a row (a review: a phrase split between two passed)
            self._join(role, [text for who, text in self.out[start:] if who == role])
        self._ran(role, start)

    def _extras(self, body: dict[str, Any]) -> None:
        """What the model reads beside the conversation (the keys of `_EXTRA_KEYS`)."""
        prompt = body.get("prompt")
        if isinstance(prompt, dict) and isinstance(prompt.get("variables"), dict):  # Responses: a stored prompt's values
            for value in prompt["variables"].values():
                self.content("user", [value])
        for key in ("tools", "functions"):  # chat's deprecated `functions` are still read
            for tool in as_list(body.get(key)):  # what each tool, and each parameter, is for and may be
                if isinstance(tool, dict):
                    function = tool.get("function") or tool.get("custom")  # chat nests a tool's own keys
                    _schema_texts(self.out, function if isinstance(function, dict) else tool, SCHEMA_DEPTH)
        # The structured output's format and schema, read as a tool's are: chat's
        # `response_format.json_schema`, Responses' `text.format`, Anthropic's `output_format`
        # (beta) and `output_config.format`.
        for outer, inner in (("response_format", "json_schema"), ("text", "format"), ("output_config", "format"), ("output_format", None),
                             ("generationConfig", "responseSchema"), ("generationConfig", "responseJsonSchema"),
                             ("generation_config", "response_schema"), ("generation_config", "response_json_schema")):
            holder = body.get(outer)
            schema = holder.get(inner) if inner is not None and isinstance(holder, dict) else holder
            if isinstance(schema, dict):
                _schema_texts(self.out, schema, SCHEMA_DEPTH)
        prediction = body.get("prediction")
        if isinstance(prediction, dict):  # chat: the output the model is told to expect of itself, read as its own
            self.content("assistant", prediction.get("content"))
        # vLLM's and other servers' own: documents put in the prompt, and the template that
        # writes the prompt (its literal text is the model's to read, as the system's)
        _leaf_texts(self.out, "user", body.get("documents"), SCHEMA_DEPTH)
        if isinstance(body.get("chat_template"), str):
            self.out.append(("system", body["chat_template"]))
        # vLLM's and SGLang's values for the template, merged over its own (`tools`,
        # `documents`, any variable it prints): every text in them, as the system's
        _leaf_texts(self.out, "system", body.get("chat_template_kwargs"), SCHEMA_DEPTH)
        for source in as_list(body.get("data_sources")):  # Azure On Your Data: `role_information` is a system message
            parameters = source.get("parameters") if isinstance(source, dict) else None
            if isinstance(parameters, dict) and isinstance(parameters.get("role_information"), str):
                self.out.append(("system", parameters["role_information"]))

    def message(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        start = len(self.out)
        kind = message.get("type")
        fields = _ITEM_TEXTS.get(kind) if isinstance(kind, str) else None  # any JSON value may come here
        if fields is not None:
            self.end_run()
            for field, role, extra in fields:
                if self.extras or not extra:
                    self.content(role, message.get(field))
            return
        role = message.get("role")
        if isinstance(kind, str) and kind != "message":  # a hosted tool's call or output, given back
            self.end_run()
            if not isinstance(role, str):
                _leaf_texts(self.out, "tool", message, SCHEMA_DEPTH)
                return
            # with a role too: a lenient server may read its content as that speaker's (a firewall probe: the rest went unread)
            _leaf_texts(self.out, "tool", {key: value for key, value in message.items() if key not in ("content", "role")}, SCHEMA_DEPTH)
        # a role as a lenient server takes it (vLLM passes any to a chat template, which prints it): `User` is the user
        role = role.strip().lower() if isinstance(role, str) else "user"
        if not _REASONING_KEY_SET.isdisjoint(message):  # an earlier turn's thinking, given back: a chat template prints it before the content
            _leaf_texts(self.out, role, [message.get(key) for key in _REASONING_KEYS], SCHEMA_DEPTH)
        self.content(role, message.get("content"))
        if self.extras and isinstance(message.get("name"), str):  # chat: a participant's name, given to the model
            self.out.append((role, name_words(message["name"])))
        if self.extras and ("tool_calls" in message or "function_call" in message):  # chat: the assistant's earlier calls
            self.out.extend((role, text) for text in _call_texts(message, names=True))
        self._ran(role, start)

    def turn(self, role: str, text: str) -> None:
        """A turn that is one text."""
        self.out.append((role, text))
        self._ran(role, len(self.out) - 1)

    def _ran(self, role: str, start: int) -> None:
        """The turn whose texts begin at `start` is over: one more of its speaker's run, or a new run."""
        if self.joined:
            speaker = ROLE_ALIASES.get(role, role)
            if self._run is not None and self._run[0] == speaker:  # one more turn of the same speaker
                self._run = (speaker, self._run[1], self._run[2] + 1)
            else:
                self.end_run()
                self._run = (speaker, start, 1)

    def end_run(self) -> None:
        """Consecutive turns of one speaker (Anthropic reads them as one) are one run."""
        if self._run is not None and self._run[2] > 1:
            speaker, start, _ = self._run
            self._join(speaker, [text for who, text in self.out[start:] if ROLE_ALIASES.get(who, who) == speaker])
        self._run = None

    def content(self, role: str, content: Any) -> None:
        if isinstance(content, str):
            self.out.append((role, content))
            return
        start = len(self.out)
        for part in [content] if isinstance(content, dict) else as_list(content):  # one part alone (an eval's template item)
            if isinstance(part, str):
                self.out.append((role, part))
            elif isinstance(part, dict):
                kind = part.get("type")
                if isinstance(kind, str) and kind in TEXT_PART_TYPES:
                    text = part.get("text")
                    if isinstance(text, str):
                        self.out.append((role, text))
                elif kind == "tool_result":  # Anthropic: the tool's answer, string or blocks
                    self.content("tool", part.get("content"))
                elif kind == "refusal" and isinstance(part.get("refusal"), str):
                    self.out.append((role, part["refusal"]))
                elif kind in ("document", "search_result"):  # Anthropic: text the model is given to read
                    self._document(role, part)
                elif kind == "tool_use" and self.extras and "input" in part:  # Anthropic: an earlier call
                    try:
                        self.out.append((role, tool_input_text(part["input"])))
                    except TooDeep:
                        self.out.append(_UNREAD)
                elif kind in ("file", "input_file"):  # a text file given inline is read as text
                    self._inline_file(role, part.get("file") if kind == "file" else part)
                elif kind in ("input_audio", "audio") and isinstance(part.get("transcript"), str):  # a realtime item's audio, with its words
                    self.out.append((role, part["transcript"]))
                elif not isinstance(kind, str) or (kind not in _NOT_TEXT and kind != "tool_use"):  # untyped: a shell call's {stdout, stderr}
                    _leaf_texts(self.out, role, part, SCHEMA_DEPTH)
        if self.joined:
            self._join(role, [text for who, text in self.out[start:] if who == role])

    def _join(self, role: str, pieces: list[str]) -> None:
        if len(pieces) > 1:
            self.groups.append((role, pieces))

    def _document(self, role: str, block: dict[str, Any]) -> None:
        for key in ("title", "context"):
            if isinstance(block.get(key), str):
                self.out.append((role, block[key]))
        source = block.get("source")
        if isinstance(source, dict):
            if source.get("type") == "text" and isinstance(source.get("data"), str):
                self.out.append((role, source["data"]))
            elif source.get("type") == "content":
                self.content(role, source.get("content"))
            elif source.get("type") == "base64" and isinstance(source.get("data"), str):
                self._decoded(role, source["data"], source.get("media_type"))
        if block.get("type") == "search_result":
            self.content(role, block.get("content"))


    def _inline_file(self, role: str, file: Any) -> None:
        """Chat's `file` part and Responses' `input_file` with the file in it as a data URL
        (`data:text/plain;base64,...`): a text file's content is text the model reads."""
        data = file.get("file_data") if isinstance(file, dict) else None
        if not isinstance(data, str):
            return
        filename = file.get("filename")
        media, encoded = mimetypes.guess_type(filename)[0] if isinstance(filename, str) else None, data  # bare base64, as the API also takes it
        if data[:5].lower() == "data:":
            header, _, encoded = data[5:].partition(",")
            media, *params = header.split(";")  # `text/plain;charset=utf-8;base64`
            if not any(param.strip().lower() == "base64" for param in params):
                return
        self._decoded(role, encoded, media)

    def _decoded(self, role: str, encoded: str, media: Any) -> None:
        """A base64 file's text: by its media type, or, whatever the type says
        (`application/x-yaml`, none), when its bytes are UTF-8 text (a firewall probe: a
        text file under another type, or its data URL with a charset, went unread)."""
        if _is_binary_media(media):
            return
        try:
            raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4))  # unpadded too
        except (ValueError, binascii.Error):
            return  # not base64: the API refuses it too
        if _is_text_media(media):
            self.out.append((role, raw.decode("utf-8", "replace")))
            return
        if b"\0" in raw[:4096]:  # binary (a PDF's, an image's bytes): no text to read here
            return
        try:
            self.out.append((role, raw.decode("utf-8")))
        except UnicodeDecodeError:
            pass


def _is_gemini_content(value: Any) -> bool:
    """A Gemini `Content` where a body's `content` stands (an embedding's): one with `parts`."""
    return isinstance(value, dict) and "parts" in value


def _is_text_media(media: Any) -> bool:
    return isinstance(media, str) and media.strip().lower().startswith(("text/", "application/json", "application/xml"))


def _is_binary_media(media: Any) -> bool:
    """A type whose bytes are no text (a PDF's text is in its compressed streams, unread)."""
    return isinstance(media, str) and media.strip().lower().startswith(("application/pdf", "image/", "audio/", "video/", "application/zip"))


def _leaf_texts(out: list[RoleText], role: str, value: Any, depth: int, skip: frozenset[str] = _NO_TEXT_KEYS) -> None:
    """Every string in a value (bounded), but for those under the keys to `skip` (by
    default ids and such: a part or item of a kind read whole)."""
    if isinstance(value, str):
        out.append((role, value))
    elif isinstance(value, (dict, list)) and value and depth <= 0:
        out.append(_UNREAD)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in skip:
                _leaf_texts(out, role, item, depth - 1, skip)
    elif isinstance(value, list):
        for item in value:
            _leaf_texts(out, role, item, depth - 1, skip)


def strings_in(value: Any) -> list[str]:
    """Every string in a value (bounded): data the API fills into what a model reads."""
    found: list[RoleText] = []
    _leaf_texts(found, "user", value, SCHEMA_DEPTH)
    return [piece[1] for piece in found if piece is not _UNREAD]


def as_list(value: Any) -> list[Any]:
    """A JSON value as a list when it is one, else none: any value may stand where a list is due."""
    return value if isinstance(value, list) else []


def _call_texts(message: dict[str, Any], names: bool) -> Iterator[str]:
    """The arguments (a custom tool's input) of a chat message's tool calls and of its
    deprecated `function_call`, as the model wrote them; with `names`, their names too, as
    words (for the policy: the model reads them, a report shows none)."""
    calls = [call.get("function") or call.get("custom") if isinstance(call, dict) else None for call in as_list(message.get("tool_calls"))]
    for function in [*calls, message.get("function_call")]:
        if isinstance(function, dict):
            if names and isinstance(function.get("name"), str):
                yield name_words(function["name"])
            for key in ("arguments", "input"):
                if isinstance(function.get(key), str):
                    yield function[key]


def _schema_texts(out: list[RoleText], schema: dict[str, Any], depth: int) -> None:
    """Every text the model reads in a tool or output format and its schema, as the
    system's (the API writes them into its part of the prompt); bounded: a schema is data."""
    for key, value in schema.items():
        kind = _SCHEMA_KEYS.get(key)
        if kind is None:  # a keyword not listed (`$comment`, `pattern`, `x-*`, Anthropic's `input_examples`): the model reads it all the same
            if key in _SCHEMA_WORDS or isinstance(value, (bool, int, float)) or value is None:
                continue
            kind = _VALUE
        if kind == _TEXT:
            if isinstance(value, str):
                out.append(("system", value))
        elif kind == _NAME:
            if isinstance(value, str):
                out.append(("system", name_words(value)))
        elif kind == _VALUE:
            _leaf_texts(out, "system", value, depth, skip=frozenset())  # every string a schema's value holds (`enum`, `default`...)
        elif isinstance(value, (dict, list)) and value and depth <= 0:
            out.append(_UNREAD)
        else:
            if isinstance(value, dict):
                if kind == _MAP:
                    out.extend(("system", name_words(name)) for name in value)
                children = list(value.values()) if kind == _MAP else [value]
            else:
                children = as_list(value) if kind == _SCHEMA else []
            for child in children:
                if isinstance(child, dict):
                    _schema_texts(out, child, depth - 1)


# Where a name's words meet: separators, a lower-case letter or digit before a capital, a
# capital run before a word (`IGNOREPrevious`), a letter next to a digit.
_NAME_BREAKS = re.compile(r"[_\-.]+|(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|(?<=[A-Za-z])(?=[0-9])|(?<=[0-9])(?=[A-Za-z])")


def _name_words(name: str) -> str:
    return _NAME_BREAKS.sub(" ", name)


# A name as the words the model reads in it: `ignore_previous_instructions` and
# `ignorePreviousInstructions` say what `ignore previous instructions` says (tool names allow
# no spaces, so a phrase there is written this way). Remembered: a request's tool and
# property names come again with every call.
name_words: Memo[str, str] = Memo(_name_words)


def tool_input_text(value: Any) -> str:
    """A tool call's input as the text the model wrote (Anthropic gives it parsed); ""
    for one orjson cannot write (nested deeper than 255)."""
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # nested deeper than orjson writes (255)
        pass
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (RecursionError, TypeError, ValueError):
        raise TooDeep from None


def _look_alikes() -> dict[int, str]:
    """Letters of other scripts that look like Latin ones, and Latin letters that look like
    others (dotless i, script g, small capitals), each as the letter it passes for: Unicode's
    confusables, in `data/look_alikes.json`. A capital maps to its own look-alike (Greek Ν
    is an N, its small ν a v), so the table is applied before case folding, and after."""
    letters = json.loads(resources.files("llm_mitm").joinpath("data/look_alikes.json").read_text(encoding="utf-8"))["letters"]
    return str.maketrans(letters)


_HOMOGLYPHS = _look_alikes()
_LOOK_ALIKE = re.compile("[" + "".join(re.escape(chr(point)) for point in _HOMOGLYPHS) + "]")
# Marks that only decorate a letter (accents: the combining blocks of Latin, Greek and
# Cyrillic; Hebrew and Arabic vowel points, which the text is read without), variation
# selectors, and the Hangul fillers. Not every nonspacing mark: in Japanese, Indic and Thai
# text they make the letter (dakuten, vowel signs), and dropping them makes words equal.
_DECORATION = (
    "\u0300-\u036f\u0483-\u0489\u0591-\u05bd\u0610-\u061a\u064b-\u065f\u034f\u115f\u1160\u17b4\u17b5"
    "\u180b-\u180f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\u3164\ufe00-\ufe0f\ufe20-\ufe2f\uffa0\U000e0100-\U000e01ef"
)


def _invisible() -> re.Pattern[str]:
    """What no reader sees: every format control (zero-width, bidi, soft hyphen, BOM, tags)
    and enclosing mark by Unicode category, so that none left off a list can hide a match;
    control characters that are not whitespace; and the decorations above."""
    ranges: list[tuple[int, int]] = []
    for low, high in ((0, 0x20000), (0xE0000, 0xE1000)):  # where these categories are
        for point in range(low, high):
            char = chr(point)
            category = unicodedata.category(char)
            if category in ("Cf", "Me") or (category == "Cc" and not char.isspace()):
                if ranges and ranges[-1][1] == point - 1:
                    ranges[-1] = (ranges[-1][0], point)
                else:
                    ranges.append((point, point))
    listed = "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "") for a, b in ranges)
    return re.compile(f"[{listed}{_DECORATION}]")


_HIDDEN = _invisible()  # built once at import (~30 ms), not on a request
# The same for plain ASCII, as byte operations (this runs on every request's prompts):
# controls go, whitespace (tab, CR, LF, VT, FF and the separators 0x1c-0x1f) becomes
# spaces, capitals become small, then runs of spaces close up.
_ASCII_WHITESPACE = b"\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
_ASCII_HIDDEN = bytes(range(0x00, 0x09)) + bytes(range(0x0E, 0x1C)) + b"\x7f"
_ASCII_FOLD = bytes.maketrans(_ASCII_WHITESPACE + bytes(range(0x41, 0x5B)), b" " * len(_ASCII_WHITESPACE) + bytes(range(0x61, 0x7B)))
_ASCII_RUNS = re.compile(b"  +")  # a literal start: the engine skips to it (` {2,}` tries every place: 2-3 times the time)


def normalize(text: str) -> str:
    """A form in which case, compatibility forms, accents, invisible characters and
    look-alike letters cannot hide a match. Plain ASCII takes the short way."""
    if text.isascii():
        data = text.encode("ascii").translate(_ASCII_FOLD, _ASCII_HIDDEN)
        if b"  " in data:
            data = _ASCII_RUNS.sub(b" ", data)
        return data.strip(b" ").decode("ascii")
    return _normalize_unicode(text)


# Look-alikes that compatibility decomposition would turn into another letter first (the
# lunate sigma ϲ, which reads as c, into σ); and letters with no compatibility form, each
# as the ASCII it spells: tag characters (invisible, yet models read them: "ASCII
# smuggling"), negative circled and squared letters, regional indicators (a firewall probe).
_SPELLED = {
    0x03F2: "c", 0x03F9: "C",
    **{0xE0000 + point: chr(point) for point in range(0x20, 0x7F)},
    **{start + offset: chr(ord("a") + offset) for start in (0x1F150, 0x1F170, 0x1F1E6) for offset in range(26)},
}
_BEFORE_DECOMPOSING = str.maketrans(_SPELLED)
_DECOMPOSED_AWAY = re.compile("[\u03f2\u03f9\U000e0020-\U000e007e\U0001f150-\U0001f169\U0001f170-\U0001f189\U0001f1e6-\U0001f1ff]")


def _normalize_unicode(text: str) -> str:
    if _DECOMPOSED_AWAY.search(text):
        text = text.translate(_BEFORE_DECOMPOSING)
    decomposed = _HIDDEN.sub("", unicodedata.normalize("NFKD", text))
    composed = unicodedata.normalize("NFKC", decomposed)
    if _LOOK_ALIKE.search(composed):  # a table lookup per character costs ten times the search
        composed = composed.translate(_HOMOGLYPHS)
    folded = composed.casefold()
    if _LOOK_ALIKE.search(folded):  # what case folding made of the rest (Cherokee's small letters fold to capitals)
        folded = folded.translate(_HOMOGLYPHS)
    return " ".join(_HIDDEN.sub("", folded).split())  # runs of whitespace as one space


_BETWEEN_WORDS = re.compile(r"(?:[^\w\x00]|_)+")
_ASCII_BETWEEN_WORDS = bytes(b for b in range(1, 128) if not chr(b).isalnum())


_JSON_ESCAPE = re.compile(r'\\(?:u([0-9a-fA-F]{4})|(["\\/bfnrt]))')
_JSON_ESCAPED = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_unescaped(text: str, rounds: int = 3) -> str:
    """A text with its JSON escapes read (`\\n` a line break, `\\u0069` an i), as a model
    reads the JSON a tool call's arguments or a tool's output is written in: an escape
    between two words hid a phrase from a search of the raw text (a firewall probe). JSON
    written in a JSON string is read again (up to `rounds`). A text that is no JSON at all
    is read the same way: an escape anywhere is undone, whole JSON or not."""
    for _ in range(rounds):
        if "\\" not in text:
            break
        text = _JSON_ESCAPE.sub(lambda m: chr(int(m[1], 16)) if m[1] else _JSON_ESCAPED[m[2]], text)
    if _SURROGATE.search(text):  # a pair written as two escapes: the character they make
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def squeeze(normal: str) -> str:
    """A normal form's letters and digits alone: words run together, or joined by `_`, `-`,
    `.` or anything else that is no letter, still say the same to a model. A NUL stays: it
    marks where the policy cut a long text's middle out."""
    if normal.isascii():  # most text: one pass in C
        return normal.encode("ascii").translate(None, _ASCII_BETWEEN_WORDS).decode("ascii")
    return _BETWEEN_WORDS.sub("", normal)


def response_texts(body: Any) -> Iterator[str]:
    """The generated text of a (rebuilt) response: chat, completions, Responses, Anthropic, Gemini."""
    if not isinstance(body, dict):
        return
    for choice in as_list(body.get("choices")):
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):
            yield choice["text"]
        message = choice.get("message")
        if isinstance(message, dict):
            if isinstance(message.get("content"), str):
                yield message["content"]
            yield from _call_texts(message, names=False)
    for item in as_list(body.get("output")):
        if isinstance(item, dict):
            if isinstance(item.get("arguments"), str):
                yield item["arguments"]
            parts = _Collector(extras=False, joined=False)
            parts.content("assistant", item.get("content"))
            for piece in parts.out:
                if piece is not _UNREAD:  # an answer is counted, not policed: what could be read
                    yield piece[1]
    if body.get("type") == "completion" and isinstance(body.get("completion"), str):  # Anthropic's legacy Text Completions
        yield body["completion"]
    if body.get("type") == "message":
        for block in as_list(body.get("content")):
            if isinstance(block, dict):
                for key in ("text", "thinking"):
                    if isinstance(block.get(key), str):
                        yield block[key]
                if block.get("type") == "tool_use" and block.get("input") is not None:
                    try:
                        yield tool_input_text(block["input"])
                    except TooDeep:
                        pass
    for candidate in as_list(body.get("candidates")):  # Gemini's own API
        if isinstance(candidate, dict):
            collector = _Collector(extras=False, joined=False)
            collector.gemini_content("assistant", candidate.get("content"))
            yield from (piece[1] for piece in collector.out if piece is not _UNREAD)
