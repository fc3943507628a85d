"""Owner side of PEMA: answer representation queries; no transformer block ever leaves.

For a batch of prompts (token ids, from the tokenizer in the head bundle) the owner returns the
context representations f(c) (the hidden state entering the final norm, i.e. the output of the
last block) and, optionally, the model's next-token log-probabilities, for the prompt itself and
for the prompt extended by given tokens (teacher forcing) and/or by the model's own greedy
predictions. Requests and responses are small dataclasses of lists and numpy arrays, with
`to_dict`/`from_dict` for a JSON transport, so an HTTP endpoint can wrap `represent` as is.

`DecodingSession` is the in-process fast path for generation: it keeps the KV cache between
steps, and the caller (the data owner) chooses each next token. It feeds the model exactly what
`model.generate` feeds it (left padding, the same position ids and masks), so a session driven
by greedy choices reproduces greedy `generate` token for token. `StatelessSession` offers the
same steps over nothing but `represent`, for an owner reached over the network.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from ..bundle import model_fingerprint
from ..errors import ConfigError
from .head import representation_module


@dataclass
class RepresentationRequest:
    """What the data owner asks. Row j of prompt i's answer is the context prompt_i + extension_i[:j]."""

    prompts: list[list[int]]
    forced: list[list[int]] | None = None  # tokens appended as given (teacher forcing), one list per prompt
    greedy_steps: int | list[int] = 0  # then this many of the model's own greedy tokens (one count, or one per prompt)
    log_probs: int | None = 0  # 0: none; k > 0: the k most likely tokens per row; None: the whole distribution

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "forced": self.forced, "greedy_steps": self.greedy_steps, "log_probs": self.log_probs}

    def per_prompt(self) -> tuple[list, list]:
        """(forced tokens, greedy steps), one entry per prompt (unchecked: `represent` validates them)."""
        n = len(self.prompts) if isinstance(self.prompts, list) else 0
        forced = self.forced if self.forced is not None else [[] for _ in range(n)]
        steps = self.greedy_steps if isinstance(self.greedy_steps, list) else [self.greedy_steps] * n
        return forced, steps

    @classmethod
    def from_dict(cls, data: dict) -> "RepresentationRequest":
        if not isinstance(data, dict) or set(data) - {"prompts", "forced", "greedy_steps", "log_probs"}:
            raise ConfigError("a representation request is an object with prompts, forced, greedy_steps and log_probs only")
        return cls(**data)


@dataclass
class RepresentationResponse:
    """Per prompt: representations float32 (rows, d); the extension (forced then greedy tokens,
    rows - 1 of them); log-probabilities float32 (rows, V or k) and, for top-k, their token ids."""

    representations: list[np.ndarray]
    extension: list[list[int]]
    log_probs: list[np.ndarray] | None = None
    top_tokens: list[np.ndarray] | None = None

    def to_dict(self) -> dict:
        out = {"representations": [r.tolist() for r in self.representations], "extension": self.extension}
        if self.log_probs is not None:
            out["log_probs"] = [r.tolist() for r in self.log_probs]
        if self.top_tokens is not None:
            out["top_tokens"] = [r.tolist() for r in self.top_tokens]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RepresentationResponse":
        def arrays(key, dtype):
            return None if data.get(key) is None else [np.asarray(r, dtype=dtype) for r in data[key]]

        return cls(arrays("representations", np.float32), [list(map(int, e)) for e in data["extension"]],
                   arrays("log_probs", np.float32), arrays("top_tokens", np.int64))


@dataclass
class ServerLimits:
    """Bounds on one request, so a remote caller cannot make the owner allocate without limit."""

    max_prompts: int = 256
    max_tokens: int = 8192  # per prompt: prompt + forced + greedy steps
    max_steps: int = 1024
    # What a request costs in memory: the padded batch (prompts x longest sequence with its steps), and
    # next-token log-probabilities (rows x vocabulary) when they are computed (log_probs, greedy steps).
    max_batch_tokens: int = 65_536
    max_logit_values: int = 64_000_000  # float32: 256 MB


class RepresentationServer:
    """Answers representation queries about `model` (in-process; wrap `represent` for HTTP)."""

    def __init__(self, model: PreTrainedModel, limits: ServerLimits | None = None, base_fingerprint: str | None = None):
        self.model = model.eval()
        self.limits = limits or ServerLimits()
        self.tap = representation_module(model)
        self.hidden_size = model.get_output_embeddings().in_features
        self.vocab_size = model.get_output_embeddings().out_features
        self._fingerprint = base_fingerprint
        forward = set(inspect.signature(model.forward).parameters)
        self._position_ids = "position_ids" in forward
        self._logits_to_keep = "logits_to_keep" in forward

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model takes (None when its config sets no bound)."""
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def info(self) -> dict:
        """What a client checks before trusting answers: which model, which shapes."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return {"base_fingerprint": self._fingerprint, "model_type": self.model.config.model_type,
                "hidden_size": self.hidden_size, "vocab_size": self.vocab_size}

    def session(self, prompts: list[list[int]]) -> "DecodingSession":
        self._check_ids(prompts, "prompts")
        return DecodingSession(self, prompts)

    @torch.no_grad()
    def represent(self, request: RepresentationRequest) -> RepresentationResponse:
        prompts = request.prompts
        forced, steps = request.per_prompt()
        n = len(forced)
        self._check_request(prompts, forced, steps, request.log_probs)
        sequences = [p + f for p, f in zip(prompts, forced)]
        keep = max(len(f) for f in forced) + 1
        session = DecodingSession(self, sequences)
        reps, logits = session.prefill(keep, with_logits=request.log_probs != 0 or max(steps) > 0)
        rows_f = [[reps[i, -len(f) - 1:]] for i, f in enumerate(forced)]
        rows_l = [[logits[i, -len(f) - 1:]] for i, f in enumerate(forced)] if logits is not None else None
        extension = [list(f) for f in forced]
        last = logits[:, -1] if logits is not None else None
        for step in range(max(steps)):
            next_tokens = last.argmax(-1)
            for i in range(n):
                if step < steps[i]:
                    extension[i].append(int(next_tokens[i]))
            reps, last = session.step(next_tokens, with_logits=True)
            for i in range(n):
                if step < steps[i]:
                    rows_f[i].append(reps[i : i + 1])
                    rows_l[i].append(last[i : i + 1])
        out = RepresentationResponse([torch.cat(r).float().cpu().numpy() for r in rows_f], extension)
        if request.log_probs != 0:
            log_probs = [torch.log_softmax(torch.cat(r).float(), dim=-1) for r in rows_l]
            if request.log_probs is None:
                out.log_probs = [lp.cpu().numpy() for lp in log_probs]
            else:
                top = [lp.topk(min(request.log_probs, self.vocab_size), dim=-1) for lp in log_probs]
                out.log_probs = [t.values.cpu().numpy() for t in top]
                out.top_tokens = [t.indices.cpu().numpy() for t in top]
        return out

    # ------------------------------------------------------------ validation
    def _check_ids(self, sequences, what: str) -> None:
        if not isinstance(sequences, list) or not sequences or len(sequences) > self.limits.max_prompts:
            raise ConfigError(f"{what} must be a non-empty list of at most {self.limits.max_prompts} token-id lists")
        for seq in sequences:
            if not isinstance(seq, list) or not all(type(t) is int and 0 <= t < self.vocab_size for t in seq):
                raise ConfigError(f"{what} must hold lists of token ids in [0, {self.vocab_size})")

    def _check_request(self, prompts, forced, steps, log_probs) -> None:
        self._check_ids(prompts, "prompts")
        if not isinstance(forced, list) or len(forced) != len(prompts):
            raise ConfigError("forced must hold one token list per prompt")
        if forced and any(forced):
            self._check_ids([f for f in forced], "forced")
        if len(steps) != len(prompts) or not all(type(s) is int and 0 <= s <= self.limits.max_steps for s in steps):
            raise ConfigError(f"greedy_steps must be one integer in [0, {self.limits.max_steps}], or one per prompt")
        if any(not p for p in prompts):
            raise ConfigError("every prompt needs at least one token")
        lengths = [len(p) + len(f) + s for p, f, s in zip(prompts, forced, steps)]
        if any(n > self.limits.max_tokens for n in lengths):
            raise ConfigError(f"a prompt with its extension exceeds {self.limits.max_tokens} tokens")
        positions = self.max_positions
        if positions is not None and max(lengths) > positions:
            raise ConfigError(f"a prompt with its extension has {max(lengths)} tokens, more than the model's {positions} positions")
        if len(prompts) * max(lengths) > self.limits.max_batch_tokens:
            raise ConfigError(f"the request is {len(prompts)} prompts x {max(lengths)} tokens, over {self.limits.max_batch_tokens:,} "
                              "tokens in one batch; split it")
        if log_probs != 0 or max(steps) > 0:
            keep = max(len(f) for f in forced) + 1
            rows = max(len(prompts) * keep, sum(1 + len(f) + s for f, s in zip(forced, steps)))
            if rows * self.vocab_size > self.limits.max_logit_values:
                raise ConfigError(f"the request needs {rows} rows of {self.vocab_size:,} next-token log-probabilities, over "
                                  f"{self.limits.max_logit_values:,} values; split it or ask for log_probs=0")
        if log_probs is not None and (type(log_probs) is not int or log_probs < 0):
            raise ConfigError("log_probs must be 0 (none), a positive k (top-k) or None (all)")


@dataclass
class DecodingSession:
    """A batch of left-padded sequences decoded step by step with a KV cache (in-process)."""

    server: RepresentationServer
    sequences: list[list[int]]
    _state: dict = field(default_factory=dict, repr=False)

    def _forward(self, input_ids: torch.Tensor, keep: int, with_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        server, state = self.server, self._state
        kwargs = {"input_ids": input_ids, "attention_mask": state["mask"], "past_key_values": state["cache"], "use_cache": True}
        if server._position_ids:
            kwargs["position_ids"] = state["positions"][:, -input_ids.shape[1]:]
        if server._logits_to_keep:
            kwargs["logits_to_keep"] = keep if with_logits else 1
        captured = []
        hook = server.tap.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            out = server.model(**kwargs)
        finally:
            hook.remove()
        reps = captured[-1][:, -keep:]
        return reps, (out.logits[:, -keep:] if with_logits else None)

    @torch.no_grad()
    def prefill(self, keep: int = 1, with_logits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the sequences; representations (B, keep, d) and logits (B, keep, V) of their last `keep` positions."""
        server = self.server
        width = max(len(s) for s in self.sequences)
        pad = server.model.config.pad_token_id
        pad = 0 if pad is None else pad
        ids = torch.full((len(self.sequences), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(self.sequences):
            ids[i, width - len(seq):] = torch.tensor(seq)
            mask[i, width - len(seq):] = 1
        ids, mask = ids.to(server.device), mask.to(server.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        # As generate: without padding the mask is dropped (a different attention path, same result up to rounding).
        self._state = {"mask": None if bool(mask.all()) else mask, "positions": positions,
                       "cache": DynamicCache(config=server.model.config.get_text_config(decoder=True))}
        return self._forward(ids, keep, with_logits)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, with_logits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append one token per sequence; representations (B, d) and logits (B, V) of the new contexts."""
        state = self._state
        if not state:
            raise ConfigError("call prefill() before step()")
        tokens = tokens.to(self.server.device).long().view(-1, 1)
        if state["mask"] is not None:
            state["mask"] = torch.cat([state["mask"], torch.ones_like(tokens)], dim=-1)
        state["positions"] = torch.cat([state["positions"], state["positions"][:, -1:] + 1], dim=-1)
        reps, logits = self._forward(tokens, 1, with_logits)
        return reps[:, -1], (logits[:, -1] if logits is not None else None)


class StatelessSession:
    """The session interface over any `represent` (e.g. a client of a remote owner): every step
    re-sends the prompt with the tokens chosen so far as `forced`, so no state lives at the owner.
    Quadratic in the output length, which is fine for short answers; in-process, use `DecodingSession`."""

    def __init__(self, server, prompts: list[list[int]]):
        self.server, self.prompts = server, prompts
        self.chosen: list[list[int]] = [[] for _ in prompts]

    def _last_rows(self) -> torch.Tensor:
        response = self.server.represent(RepresentationRequest(self.prompts, forced=self.chosen))
        return torch.from_numpy(np.stack([r[-1] for r in response.representations]))

    def prefill(self, keep: int = 1, with_logits: bool = False) -> tuple[torch.Tensor, None]:
        if keep != 1 or with_logits:
            raise ConfigError("a stateless session returns the last representation of each prompt only")
        return self._last_rows()[:, None], None

    def step(self, tokens: torch.Tensor, with_logits: bool = False) -> tuple[torch.Tensor, None]:
        if with_logits:
            raise ConfigError("a stateless session returns representations only")
        for chosen, token in zip(self.chosen, tokens.tolist()):
            chosen.append(int(token))
        return self._last_rows(), None
