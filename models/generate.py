"""Generation with the KV cache, one forward step per new token: greedy, and a sampled group of answers to one
prompt (reinforcement learning)."""

from __future__ import annotations

import torch

from models.moe import ElasticMoE, KVCache
from models.sampling import Sampler
from models.subnet import SubnetSpec


@torch.no_grad()
def greedy_generate(
    model: ElasticMoE,
    prompt: torch.Tensor,
    max_new_tokens: int,
    subnet: SubnetSpec | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """prompt (B, T) -> (B, T + n) greedy continuation by the full model or the sub-model `subnet`.

    Stops early once every row has produced `eos_id`; rows that finished earlier are padded with it.
    `use_cache=False` recomputes the whole prefix each step (the reference the cache is tested against).
    """
    if prompt.shape[1] + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_seq_len={model.config.max_seq_len}"
        )
    cache = KVCache() if use_cache else None
    tokens = prompt
    step_input = prompt
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        logits = model(step_input if use_cache else tokens, subnet=subnet, cache=cache).logits[:, -1]
        next_token = logits.argmax(dim=-1)
        if eos_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, eos_id), next_token)
            finished |= next_token == eos_id
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        step_input = next_token[:, None]
        if eos_id is not None and finished.all():
            break
    return tokens


@torch.no_grad()
def sample_group(
    model: ElasticMoE, prompt: list[int], samplers: list[Sampler], max_new_tokens: int, end_ids: set[int]
) -> list[list[int]]:
    """One answer per sampler to the same prompt, decoded together (one row each) with the KV cache.

    Each row draws with its own sampler (models.sampling: the server's controls and seeds); a row ends after
    the first token in `end_ids`, which its answer keeps. Finished rows keep being fed that token (their answer
    no longer grows), so the batch stays rectangular without masks.
    """
    if len(prompt) + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len")
    device = next(model.parameters()).device
    cache = KVCache()
    step = torch.tensor([prompt] * len(samplers), device=device)
    answers: list[list[int]] = [[] for _ in samplers]
    for _ in range(max_new_tokens):
        logits = model(step, cache=cache).logits[:, -1].float().cpu().numpy()  # (G, V)
        for answer, sampler, row in zip(answers, samplers, logits, strict=True):
            if not (answer and answer[-1] in end_ids):
                answer.append(sampler.choose(row).token_id)
        if all(a[-1] in end_ids for a in answers):
            break
        step = torch.tensor([[a[-1]] for a in answers], device=device)
    return answers
