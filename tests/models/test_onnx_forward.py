"""The exportable forward computes exactly the model: prefill, then cached decode steps."""

import torch

from models.config import MoEConfig
from models.moe import ElasticMoE
from models.onnx_forward import ExportableDecoder


def _prefill_then_decode(decoder: ExportableDecoder, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    past = decoder.empty_past(tokens.shape[0])
    logits, *past = decoder(tokens[:, :prefill], *past)
    outputs = [logits]
    for position in range(prefill, tokens.shape[1]):
        logits, *past = decoder(tokens[:, position : position + 1], *past)
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
    first, *past = decoder(tokens[:, :4], *past)
    rest, *_ = decoder(tokens[:, 4:], *past)
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
