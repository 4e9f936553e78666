"""KV-cache generation equals recomputing the prefix, for the full model and for sub-models."""

import pytest
import torch

from models.generate import greedy_generate
from models.moe import ElasticMoE, KVCache
from models.subnet import SubnetSpec


def test_cached_logits_equal_full_recompute(tiny_supernet: ElasticMoE) -> None:
    tokens = torch.randint(0, tiny_supernet.config.vocab_size, (2, 20))
    spec = SubnetSpec(layers=(0, 2, 3), experts=((), (1, 2, 5), (0, 3, 4)), top_k=1)
    with torch.no_grad():
        for subnet in (None, spec):
            full = tiny_supernet(tokens, subnet=subnet).logits
            cache = KVCache()
            prefill = tiny_supernet(tokens[:, :12], subnet=subnet, cache=cache).logits
            chunk = tiny_supernet(tokens[:, 12:15], subnet=subnet, cache=cache).logits  # several at once
            steps = [tiny_supernet(tokens[:, i : i + 1], subnet=subnet, cache=cache).logits for i in range(15, 20)]
            torch.testing.assert_close(torch.cat([prefill, chunk, *steps], dim=1), full, atol=1e-5, rtol=1e-5)
            assert cache.length == 20 and set(cache.layers) == set(subnet.layers if subnet else range(4))


def test_greedy_generation_with_and_without_cache_agree(tiny_supernet: ElasticMoE) -> None:
    prompt = torch.randint(0, tiny_supernet.config.vocab_size, (3, 5))
    for subnet in (None, SubnetSpec(layers=(1, 3), experts=((0, 1), (2, 3)), top_k=1)):
        cached = greedy_generate(tiny_supernet, prompt, 12, subnet=subnet)
        reference = greedy_generate(tiny_supernet, prompt, 12, subnet=subnet, use_cache=False)
        assert cached.shape == (3, 17) and torch.equal(cached, reference)
        assert torch.equal(cached[:, :5], prompt)


def test_generation_stops_at_eos_and_pads(tiny_supernet: ElasticMoE) -> None:
    prompt = torch.randint(0, tiny_supernet.config.vocab_size, (2, 4))
    free = greedy_generate(tiny_supernet, prompt, 6)
    eos = int(free[0, 5])  # the second token row 0 generates
    out = greedy_generate(tiny_supernet, prompt, 6, eos_id=eos)
    assert out[0, 5] == eos and (out[0, 6:] == eos).all()


def test_generation_past_max_seq_len_is_rejected(tiny_supernet: ElasticMoE) -> None:
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        greedy_generate(tiny_supernet, torch.zeros(1, 60, dtype=torch.long), 10)
