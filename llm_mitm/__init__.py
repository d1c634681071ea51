"""llm-mitm: mitmproxy addons that trace, redact and govern LLM API traffic."""

__version__ = "0.1.0"
