"""Data owner: generate with PEMA, interpolating its distribution with the model's.

At every step the owner answers one representation query (f of the current context) and the
data owner, holding the head bundle and the PEMA adapter, computes

    P_LM   = softmax(head(f))                      (bit-identical to the model's own logits)
    P_PEMA = softmax(head(h_pd(f)))
    P      = lambda_t P_PEMA + (1 - lambda_t) P_LM  (mixed in log space)

and picks the most likely token (greedy). With lambda_t = 0 the decision is the argmax of the
model's own logits, so generation is exactly the model's greedy decoding.

Gradual Unrolling (`unrolling_schedule`) lets PEMA steer the beginning of the output and hands
over to the model: with L the expected output length,

    lambda_0 = lambda_max,   lambda_t = (lambda_max (1 - t / L))^2 for 0 < t < L,   lambda_t = 0 for t >= L.

This is the reference implementation's schedule (its lambda_apply starts at lambda_max and
becomes lambda_cur^2 after each decrement of lambda_cur by lambda_max / L), with two changes:
L is an *estimate*, by default the mean target length (in tokens) of the training memory,
never the reference output's length, which the reference code reads from the test labels; and
lambda reaches 0 at t >= L (the reference keeps its last positive value, and stops decaying
for the whole batch once one sequence's would reach 0). Without Gradual Unrolling lambda_t =
lambda_max at every step.

`unroll_over` chooses L: "prompt+answer" (default, as the reference implementation: L is the
prompt's length plus the expected answer length, per prompt, so lambda decays slowly and is
still positive at the answer's expected end) or "answer" (L = the expected answer length alone:
PEMA steers only the first tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data import _ids
from ..errors import ConfigError
from .configs import GenerateConfig  # noqa: F401  (re-exported)
from ..progress import bars_disabled
from .head import LoadedHead
from .owner import StatelessSession
from .train import LoadedPemaAdapter




def unrolling_schedule(lambda_max: float, expected_length: float, steps: int, gradual: bool = True) -> list[float]:
    """lambda_t for t = 0..steps-1 (see the module docstring)."""
    if not gradual:
        return [lambda_max] * steps
    out = []
    for t in range(steps):
        if t == 0:
            out.append(lambda_max)
        elif t < expected_length:
            out.append((lambda_max * (1 - t / expected_length)) ** 2)
        else:
            out.append(0.0)
    return out


def prompt_ids(tokenizer, context: str, max_tokens: int) -> list[int]:
    """The prompt as the memory saw it: trailing spaces move to the answer (`encode_pair`), last tokens kept."""
    return _ids(tokenizer, context.rstrip(" "))[-max_tokens:]


@torch.no_grad()
def generate_ids(server, head: LoadedHead, prompts: list[list[int]], adapter: LoadedPemaAdapter | None = None,
                 config: GenerateConfig | None = None) -> list[list[int]]:
    """Greedy decoding of one batch of prompts (token ids); the generated ids of each, without EOS."""
    config = config or GenerateConfig()
    tokenizer, device = head.tokenizer, getattr(server, "device", torch.device("cpu"))
    logits_of = head.head.to(device)
    pema = adapter.adapter.to(device) if adapter is not None else None
    length = config.expected_length or (adapter.mean_target_length if adapter is not None else 1.0)
    lambda_max = config.lambda_max if pema is not None else 0.0
    schedules = [unrolling_schedule(lambda_max, length + (len(p) if config.unroll_over == "prompt+answer" else 0),
                                    config.max_new_tokens, config.gradual_unrolling) for p in prompts]
    lambdas = torch.tensor(schedules, dtype=torch.float32, device=device).T  # (steps, prompts)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    newline: dict[int, bool] = {}

    # In-process servers keep a KV cache between steps; any other `represent` gets the whole context each step.
    session = server.session(prompts) if hasattr(server, "session") else StatelessSession(server, prompts)
    f = session.prefill(1, with_logits=False)[0][:, -1]
    out: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for lam in lambdas:
        logits = logits_of(f)
        if bool((lam > 0).any()):
            lam_col = lam[:, None]
            mixed = torch.logaddexp(
                torch.log(lam_col) + torch.log_softmax(logits_of(pema.predict(f)).float(), -1),
                torch.log1p(-lam_col) + torch.log_softmax(logits.float(), -1),
            )
            # where lambda is 0 the choice is exactly the model's greedy one
            next_tokens = torch.where(lam > 0, mixed.argmax(-1), logits.argmax(-1))
        else:
            next_tokens = logits.argmax(-1)  # exactly the model's greedy choice
        next_tokens = next_tokens.masked_fill(finished, pad)
        for i, token in enumerate(next_tokens.tolist()):
            if finished[i]:
                continue
            if token == eos:
                finished[i] = True
                continue
            out[i].append(token)
            if config.stop_at_newline:
                if token not in newline:
                    newline[token] = "\n" in tokenizer.decode([token])
                if newline[token]:
                    finished[i] = True
        if bool(finished.all()):
            break
        f = session.step(next_tokens, with_logits=False)[0]
    return out


def generate_texts(server, head: LoadedHead, contexts: list[str], adapter: LoadedPemaAdapter | None = None,
                   config: GenerateConfig | None = None, progress: bool = True) -> list[str]:
    """Answers for `contexts`, in batches: the decoded generation up to its first line break, stripped."""
    config = config or GenerateConfig()
    texts = []
    for start in tqdm(range(0, len(contexts), config.batch_size), disable=bars_disabled(progress), desc="generate", unit="batch"):
        batch = [prompt_ids(head.tokenizer, c, config.max_prompt_tokens) for c in contexts[start : start + config.batch_size]]
        for ids in generate_ids(server, head, batch, adapter, config):
            texts.append(head.tokenizer.decode(ids, skip_special_tokens=True).split("\n", 1)[0].strip())
    return texts
