"""`ServerOptions`: the HTTP server's limits and security settings, one dataclass."""

from __future__ import annotations

from dataclasses import dataclass

MAX_REQUEST_BYTES = 4 << 20  # 4 MiB: a 128k-token prompt as JSON token ids is under 1 MiB
TOKENIZER_ROUTES = ("/tokenize", "/detokenize", "/tokenizer_info")  # vLLM's, at the root


@dataclass(frozen=True)
class ServerOptions:
    """How the HTTP front end guards the engine.

    Attributes:
        api_key: required as ``Authorization: Bearer KEY`` on every ``/v1`` route and its
            un-prefixed aliases, and the tokenizer routes (``/metrics`` too with
            ``protect_metrics``); None: no key. An empty
            key is refused: an unset shell variable must not turn authentication off.
        max_request_bytes: the largest request body; a larger one gets a 413.
        max_prompts: the most prompts one ``/v1/completions`` request may carry.
        enable_docs: serve ``/docs``, ``/redoc`` and ``/openapi.json`` (off: they describe the
            server to anyone who can reach it, key or not).
        log_requests: one access-log line per request (method, path, status, latency, request id).
        protect_metrics: ``/metrics`` needs the key too (it tells request counts and the KV
            cache's use; ``/health`` always answers without it).
    """

    api_key: str | None = None
    max_request_bytes: int = MAX_REQUEST_BYTES
    max_prompts: int = 1024
    enable_docs: bool = False
    log_requests: bool = True
    protect_metrics: bool = False

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty: give a key, or leave --api-key and HF_CB_API_KEY unset to serve "
                             "without one")
        for name in ("max_request_bytes", "max_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def protects(self, path: str) -> bool:
        """Whether ``path`` needs the key (when there is one)."""
        return (path.startswith("/v1/") or path in ("/completions", "/chat/completions", *TOKENIZER_ROUTES)
                or (self.protect_metrics and path == "/metrics"))
