"""Representation queries (PEMA) over HTTP: a thin adapter around `offsite.pema.owner`.

PEMA's data owner never receives a transformer block: for its prompts the owner answers the
context representations f(c) (the hidden state entering the final norm) and, optionally,
top-k next-token log-probabilities, also for the prompt extended by given tokens or by the
model's own greedy predictions. `offsite.pema.owner.RepresentationServer` computes that
in-process; `RepresentationSource` is what the service's endpoint calls: it loads the owner's
model once, bounds what one request may cost (prompts, tokens, greedy steps, and the size of
the answer), and serialises queries. On the data owner's side `client.RemoteOwner` offers the
same `represent`/`info` over HTTP, so PEMA's memory building and generation run unchanged
against a remote owner.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..pema.owner import RepresentationRequest, RepresentationServer, ServerLimits
from .errors import ServiceError

# What one HTTP request may ask for: PEMA builds memories in batches of 8 prompts of at most
# 512 + 64 tokens, far inside these bounds.
HTTP_LIMITS = ServerLimits(max_prompts=64, max_tokens=4096, max_steps=256)
MAX_TOP_K = 100
MAX_ANSWER_FLOATS = 4_000_000  # representation values in one answer (about 40 MB of JSON)


class RepresentationSource:
    """The owner's model behind `offsite.pema`'s RepresentationServer, loaded on first use."""

    def __init__(self, load_model: Callable[[], tuple[object, str]], limits: ServerLimits = HTTP_LIMITS):
        self._load_model = load_model  # -> (model on its device, display name)
        self._limits = limits
        self._server: RepresentationServer | None = None
        self._lock = threading.Lock()

    def _ready(self) -> RepresentationServer:
        if self._server is None:
            model, _ = self._load_model()
            self._server = RepresentationServer(model, self._limits)
        return self._server

    def info(self) -> dict:
        """Base-model fingerprint, model type, hidden and vocabulary size (a PEMA head checks them)."""
        with self._lock:
            return self._ready().info()

    def represent(self, body: dict) -> dict:
        """Answer one request in PEMA's JSON form (`RepresentationRequest.to_dict`) with
        `RepresentationResponse.to_dict`; malformed or too costly requests raise (422)."""
        request = RepresentationRequest.from_dict(body)
        with self._lock:
            server = self._ready()
            rows = _answer_rows(request)
            if rows * server.hidden_size > MAX_ANSWER_FLOATS:
                raise ServiceError(422, f"the answer would hold {rows} representations of size {server.hidden_size}, "
                                        f"over {MAX_ANSWER_FLOATS:,} values; split the request")
            return server.represent(request).to_dict()


def _answer_rows(request: RepresentationRequest) -> int:
    """Representations the answer holds: per prompt, 1 + forced tokens + greedy steps."""
    forced, steps = request.per_prompt()
    return sum(1 + len(f) + s for f, s in zip(forced, steps))
