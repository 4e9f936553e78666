"""The exportable forward computes exactly the model: prefill, then cached decode steps."""

import torch

from models.config import MoEConfig
from models.moe import ElasticMoE
from models.onnx_forward import ExportableDecoder


def _prefill_then_decode(decoder: ExportableDecoder, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    past = decoder.empty_past(tokens.shape[0])
    pad = decoder.no_padding(tokens.shape[0])
    logits, *past = decoder(tokens[:, :prefill], pad, *past)
    outputs = [logits]
    for position in range(prefill, tokens.shape[1]):
        logits, *past = decoder(tokens[:, position : position + 1], pad, *past)
        outputs.append(logits)
    return torch.cat(outputs, dim=1)


@torch.no_grad()
def test_matches_model_with_dense_layer_shared_expert_and_bias(tiny_supernet: ElasticMoE) -> None:
    decoder = ExportableDecoder(tiny_supernet).eval()
    tokens = torch.randint(0, tiny_supernet.config.vocab_size, (3, 12))
    expected = tiny_supernet(tokens).logits
    torch.testing.assert_close(_prefill_then_decode(decoder, tokens, 5), expected, atol=1e-5, rtol=1e-5)
    # several new tokens after a past (chunked prefill) use the end-aligned causal mask
    past = decoder.empty_past(3)
    first, *past = decoder(tokens[:, :4], decoder.no_padding(3), *past)
    rest, *_ = decoder(tokens[:, 4:], decoder.no_padding(3), *past)
    torch.testing.assert_close(torch.cat([first, rest], 1), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_untied_head_and_per_layer_expert_counts() -> None:
    config = MoEConfig(
        vocab_size=50,
        d_model=16,
        n_layers=3,
        n_heads=2,
        n_kv_heads=1,
        n_experts=4,
        top_k=2,
        expert_ffn_dim=8,
        tie_embeddings=False,
        layer_n_experts=(4, 2, 3),
        max_seq_len=32,
    )
    model = ElasticMoE(config).eval()
    decoder = ExportableDecoder(model).eval()
    tokens = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(_prefill_then_decode(decoder, tokens, 1), model(tokens).logits, atol=1e-5, rtol=1e-5)
    # the wrapper owns copies: the exported graph does not change if the model is trained further
    assert decoder.lm_head.data_ptr() != model.lm_head.weight.data_ptr()


@torch.no_grad()
def test_left_padded_rows_compute_what_they_compute_alone(tiny_supernet: ElasticMoE) -> None:
    """Rows of different lengths share calls (the server's batched decoding): a row padded on the left gets
    the logits it gets alone, at prefill and at every decode step."""
    decoder = ExportableDecoder(tiny_supernet).eval()
    vocab = tiny_supernet.config.vocab_size
    long, short = torch.randint(0, vocab, (1, 7)), torch.randint(0, vocab, (1, 4))
    steps = torch.randint(0, vocab, (2, 3))  # the next tokens of each row, fed one step at a time
    padded = torch.cat([long, torch.cat([torch.full((1, 3), 9), short], dim=1)])  # (2, 7); 9: any token
    pad = torch.tensor([0, 3])
    logits, *past = decoder(padded, pad, *decoder.empty_past(2))
    batched = [logits]
    for i in range(steps.shape[1]):
        logits, *past = decoder(steps[:, i : i + 1], pad, *past)
        batched.append(logits)
    together = torch.cat(batched, dim=1)  # (2, 10, V)
    for row, prompt in enumerate((long, short)):
        alone = tiny_supernet(torch.cat([prompt, steps[row : row + 1]], dim=1)).logits[0]
        torch.testing.assert_close(together[row, -alone.shape[0] :], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(together).all()  # padding queries see themselves: no NaN enters the cache
