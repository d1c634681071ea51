"""Runs in the clients venv: one real SDK call described by JSON on stdin.

Prints a JSON result: what the SDK returned, the error class it raised, and for
streams the arrival time of every chunk (to check that chunks are not held back).
"""

import faulthandler
import json
import os
import sys
import time


def openai_call(a):
    import openai

    kwargs = {"api_key": a["api_key"], "base_url": a.get("base_url"), "max_retries": 0}
    if a.get("azure"):
        client = openai.AzureOpenAI(api_key=a["api_key"], azure_endpoint=a["azure"], api_version=a.get("api_version", "2024-10-21"), max_retries=0)
    else:
        client = openai.OpenAI(**{k: v for k, v in kwargs.items() if v is not None})
    extra = {"extra_headers": a.get("headers") or {}}
    op = a["op"]
    if op == "chat":
        params = dict(a["params"])
        if params.get("stream"):
            stream = client.chat.completions.create(**params, **extra)
            start, arrivals, text, usage, tool_args = time.monotonic(), [], [], None, []
            for chunk in stream:
                arrivals.append(time.monotonic() - start)
                if chunk.usage:
                    usage = chunk.usage.model_dump()
                for choice in chunk.choices:
                    if choice.delta.content:
                        text.append(choice.delta.content)
                    for call in choice.delta.tool_calls or ():
                        tool_args.append(call.function.arguments or "")
            return {"text": "".join(text), "arrivals": arrivals, "usage": usage, "tool_args": "".join(tool_args)}
        result = client.chat.completions.create(**params, **extra)
        return {"text": result.choices[0].message.content, "model": result.model, "usage": result.usage.model_dump()}
    if op == "responses":
        params = dict(a["params"])
        if params.get("stream"):
            start, arrivals, text = time.monotonic(), [], []
            for event in client.responses.create(**params, **extra):
                arrivals.append(time.monotonic() - start)
                if event.type == "response.output_text.delta":
                    text.append(event.delta)
            return {"text": "".join(text), "arrivals": arrivals}
        result = client.responses.create(**params, **extra)
        return {"text": result.output_text, "model": result.model}
    if op in ("chat_final", "responses_final"):  # a stream read by the SDK's helper, which rebuilds the answer from it
        params = {k: v for k, v in a["params"].items() if k != "stream"}
        helper = client.chat.completions if op == "chat_final" else client.responses
        snapshots = []
        with helper.stream(**params, **extra) as stream:
            for event in stream:
                if getattr(event, "type", "") == "response.output_text.delta":
                    snapshots.append(event.snapshot)
            final = stream.get_final_completion() if op == "chat_final" else stream.get_final_response()
        return {"final": final.model_dump(mode="json"), "snapshots": snapshots}
    if op == "embeddings":
        result = client.embeddings.create(**a["params"], **extra)
        return {"count": len(result.data)}
    if op == "raw":  # the SDK's own low-level call, with a body as given
        result = client.post(a["path"], content=a["content"].encode(), cast_to=object,
                             options={"headers": {"content-type": "application/json", **(a.get("headers") or {})}})
        return {"body": result}
    if op == "transcription":  # an upload: multipart/form-data as the SDK writes it
        result = client.audio.transcriptions.create(file=("a.wav", a["audio"].encode()), **a["params"], **extra)
        return {"text": result.text}
    if op == "file_upload":  # a file for the Batch API (purpose "batch") or another purpose
        content = a["content"].encode("latin-1") if a.get("binary") else a["content"].encode()
        result = client.files.create(file=(a.get("filename", "calls.jsonl"), content), purpose=a["purpose"], **extra)
        return {"id": result.id}
    if op == "batch_create":  # a batch from a file uploaded beforehand
        result = client.batches.create(input_file_id=a["file_id"], endpoint="/v1/chat/completions", completion_window="24h", **extra)
        return {"id": result.id, "input_file_id": result.input_file_id}
    if op == "models":
        return {"ids": [m.id for m in client.models.list()]}
    if op == "realtime":  # a realtime session over a WebSocket: each event sent, and the one answer to it
        replies = []
        with client.realtime.connect(model=a["model"], extra_headers=a.get("headers") or {}) as connection:
            for event in a["events"]:
                if isinstance(event, str):  # as written, not as the SDK would write it
                    connection.send_raw(event)
                else:
                    connection.send(event)
                replies.append(json.loads(connection.recv_bytes()))
        return {"replies": replies}
    if op == "method":  # any SDK method by its path (`beta.threads.messages.create`), as an application calls it
        target = client
        for name in a["method"].split("."):
            target = getattr(target, name)
        result = target(**a["params"], **extra)
        if a["params"].get("stream"):  # each chunk as the SDK parsed it
            return {"chunks": [chunk.model_dump() for chunk in result]}
        return {"body": result.model_dump() if hasattr(result, "model_dump") else None}
    raise ValueError(op)


def anthropic_call(a):
    import anthropic

    client = anthropic.Anthropic(api_key=a["api_key"], base_url=a.get("base_url"), max_retries=a.get("max_retries", 0))
    extra = {"extra_headers": a.get("headers") or {}}
    if a.get("op") == "file_upload":  # the Files API (beta): a file a message names later by its id
        result = client.beta.files.upload(file=(a["filename"], a["content"].encode(), "text/plain"), **extra)
        return {"id": result.id}
    params = dict(a["params"])
    if params.pop("stream", False):
        start, arrivals, text = time.monotonic(), [], []
        with client.messages.stream(**params, **extra) as stream:
            for event in stream:
                arrivals.append(time.monotonic() - start)
                if event.type == "content_block_delta" and event.delta.type == "text_delta":
                    text.append(event.delta.text)
            final = stream.get_final_message()
        return {"text": "".join(text), "arrivals": arrivals, "usage": final.usage.model_dump(), "final": final.model_dump(mode="json")}
    result = client.messages.create(**params, **extra)
    text = next((block.text for block in result.content if block.type == "text"), None)
    return {"text": text, "model": result.model, "usage": result.usage.model_dump(), "final": result.model_dump(mode="json")}


def requests_call(a):
    import requests

    response = requests.request(a["method"], a["url"], headers=a.get("headers"), json=a.get("json"), timeout=30)
    return {"status": response.status_code, "body": response.text}


def main():
    # A client that hangs says where before the test gives up on it (its stacks on stderr, exit 1).
    if (dump_after := os.environ.get("LLM_MITM_TEST_DUMP_AFTER")) is not None:
        faulthandler.dump_traceback_later(float(dump_after), exit=True)
    action = json.load(sys.stdin)
    kind = action["client"]
    try:
        result = {"openai": openai_call, "anthropic": anthropic_call, "requests": requests_call}[kind](action)
    except Exception as exc:  # report the SDK's own error class to the test
        result = {"error": type(exc).__name__, "message": str(exc)[:500], "status": getattr(exc, "status_code", None)}
    print(json.dumps(result))


main()
