"""Representation queries (PEMA) over HTTP: a thin adapter around `offsite.pema.owner`.

PEMA's data owner never receives a transformer block: for its prompts the owner answers the
context representations f(c) (the hidden state entering the final norm) and, optionally,
top-k next-token log-probabilities, also for the prompt extended by given tokens or by the
model's own greedy predictions. `offsite.pema.owner.RepresentationServer` computes that
in-process; `RepresentationSource` is what the service's endpoint calls: it loads the owner's
model once, bounds what one request may cost (prompts, tokens, greedy steps, and the size of
the answer, the padded batch and the log-probabilities), and runs one query at a time, taking
data owners in turn (round robin, at most `MAX_PENDING_PER_OWNER` waiting each: 429 past it), so
one owner's stream of queries cannot starve another's. On the data owner's side `client.RemoteOwner` offers the
same `represent`/`info` over HTTP, so PEMA's memory building and generation run unchanged
against a remote owner.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable

from ..pema.owner import RepresentationRequest, RepresentationServer, ServerLimits
from .errors import ServiceError

# What one HTTP request may ask for: PEMA builds memories in batches of 8 prompts of at most
# 512 + 64 tokens, far inside these bounds.
HTTP_LIMITS = ServerLimits(max_prompts=64, max_tokens=4096, max_steps=256, max_batch_tokens=32_768, max_logit_values=32_000_000)
MAX_TOP_K = 100
MAX_ANSWER_FLOATS = 4_000_000  # representation values in one answer (about 40 MB of JSON)
MAX_PENDING_PER_OWNER = 4  # queries of one data owner waiting for the model


class FairTurns:
    """One holder at a time; waiting callers are served one owner after another (round robin), each
    owner's own callers in arrival order. An owner with MAX_PENDING_PER_OWNER waiting gets a 429."""

    def __init__(self, max_pending: int = MAX_PENDING_PER_OWNER):
        self._cond = threading.Condition()
        self._busy = False
        self._queues: OrderedDict[str, deque] = OrderedDict()  # owner -> waiting tickets; order = whose turn next
        self._max_pending = max_pending

    def __call__(self, owner: str):
        return _Turn(self, owner)

    def acquire(self, owner: str) -> None:
        with self._cond:
            if not self._busy and not self._queues:
                self._busy = True
                return
            queue = self._queues.setdefault(owner, deque())
            if len(queue) >= self._max_pending:
                if not queue:
                    del self._queues[owner]
                raise ServiceError(429, f"{len(queue)} representation queries of yours are already waiting; retry later")
            ticket = object()
            queue.append(ticket)
            while not (not self._busy and self._next() is ticket):
                self._cond.wait()
            self._pop()
            self._busy = True

    def _next(self):
        for queue in self._queues.values():
            return queue[0]
        return None

    def _pop(self) -> None:
        owner, queue = next(iter(self._queues.items()))
        queue.popleft()
        del self._queues[owner]
        if queue:
            self._queues[owner] = queue  # back of the line: the other owners go first

    def release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()


class _Turn:
    def __init__(self, turns: FairTurns, owner: str):
        self.turns, self.owner = turns, owner

    def __enter__(self):
        self.turns.acquire(self.owner)

    def __exit__(self, *exc):
        self.turns.release()


class RepresentationSource:
    """The owner's model behind `offsite.pema`'s RepresentationServer, loaded on first use."""

    def __init__(self, load_model: Callable[[], tuple[object, str]], limits: ServerLimits = HTTP_LIMITS):
        self._load_model = load_model  # -> (model on its device, display name)
        self._limits = limits
        self._server: RepresentationServer | None = None
        self._lock = threading.Lock()  # loading the model
        self._turns = FairTurns()

    def _ready(self) -> RepresentationServer:
        with self._lock:
            if self._server is None:
                model, _ = self._load_model()
                self._server = RepresentationServer(model, self._limits)
            return self._server

    def info(self) -> dict:
        """Base-model fingerprint, model type, hidden and vocabulary size (a PEMA head checks them)."""
        return self._ready().info()

    def represent(self, body: dict, owner: str = "") -> dict:
        """Answer one request in PEMA's JSON form (`RepresentationRequest.to_dict`) with
        `RepresentationResponse.to_dict`; malformed or too costly requests raise (422), before
        waiting for the model; an owner with too many queries waiting gets 429."""
        request = RepresentationRequest.from_dict(body)
        server = self._ready()
        rows = _answer_rows(request)
        if rows * server.hidden_size > MAX_ANSWER_FLOATS:
            raise ServiceError(422, f"the answer would hold {rows} representations of size {server.hidden_size}, "
                                    f"over {MAX_ANSWER_FLOATS:,} values; split the request")
        forced, steps = request.per_prompt()
        server._check_request(request.prompts, forced, steps, request.log_probs)  # cheap: before the queue
        with self._turns(owner):
            return server.represent(request).to_dict()


def _answer_rows(request: RepresentationRequest) -> int:
    """Representations the answer holds: per prompt, 1 + forced tokens + greedy steps."""
    forced, steps = request.per_prompt()
    return sum(1 + len(f) + s for f, s in zip(forced, steps))
