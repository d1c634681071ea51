"""Test-only addon: answers requests carrying `x-answer-locally` without going upstream.

Stands in for the policy and replay addons (which answer requests themselves) to show
that such a request opens no upstream connection.
"""

from mitmproxy import http


def request(flow: http.HTTPFlow) -> None:
    if "x-answer-locally" in flow.request.headers:
        flow.response = http.Response.make(
            200, b'{"answered": "locally"}', {"content-type": "application/json"}
        )
