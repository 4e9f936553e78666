"""The three expert compute paths (loop, grouped GEMM, ONNX-traceable export) agree numerically."""

import pytest
import torch

from models.config import MoEConfig
from models.moe import EXPERT_PATHS, ElasticMoE, experts_export, experts_grouped_mm, experts_loop
from models.subnet import SubnetSpec


def _routing(tokens: int, n_experts: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g).softmax(-1)
    return idx, weights


def _reference(x, idx, weights, gate_up, down) -> torch.Tensor:
    """Token by token, straight from the definition: sum_k w_k * SwiGLU_{e_k}(x)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(idx.shape[1]):
            e = idx[t, slot]
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            out[t] += weights[t, slot] * (down[e] @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("path", [experts_loop, experts_grouped_mm, experts_export])
def test_paths_match_the_definition(path, k: int) -> None:
    n_experts, d, f = 7, 16, 24
    x = torch.randn(40, d)
    gate_up, down = torch.randn(n_experts, 2 * f, d) * 0.2, torch.randn(n_experts, d, f) * 0.2
    idx, weights = _routing(40, n_experts, k, seed=k)
    idx[:, 0] = torch.where(idx[:, 0] == 6, 5, idx[:, 0])  # leave expert 6 without its first-slot tokens
    expected = _reference(x, idx, weights, gate_up, down)
    torch.testing.assert_close(path(x, idx, weights, gate_up, down), expected, atol=1e-5, rtol=1e-5)


def test_paths_handle_an_expert_with_no_tokens() -> None:
    x = torch.randn(5, 8)
    gate_up, down = torch.randn(4, 16, 8), torch.randn(4, 8, 8)
    idx = torch.tensor([[0], [0], [2], [2], [0]])  # experts 1 and 3 get nothing
    weights = torch.ones(5, 1)
    outs = [p(x, idx, weights, gate_up, down) for p in EXPERT_PATHS.values()]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)


def test_whole_model_agrees_across_paths(tiny_config: MoEConfig) -> None:
    models = {impl: ElasticMoE(tiny_config.model_copy(update={"expert_impl": impl})).eval() for impl in EXPERT_PATHS}
    state = models["loop"].state_dict()
    for model in models.values():
        model.load_state_dict(state)
    tokens = torch.randint(0, tiny_config.vocab_size, (3, 17))
    spec = SubnetSpec(layers=(0, 1, 3), experts=((), (0, 2, 4, 5), (1, 3, 5)), top_k=2)
    with torch.no_grad():
        for subnet in (None, spec):
            ref = models["loop"](tokens, subnet=subnet).logits
            for impl in ("grouped_mm", "export"):
                torch.testing.assert_close(models[impl](tokens, subnet=subnet).logits, ref, atol=1e-5, rtol=1e-5)


def test_loop_path_trains_every_routed_expert(tiny_config: MoEConfig) -> None:
    model = ElasticMoE(tiny_config.model_copy(update={"expert_impl": "loop"}))
    tokens = torch.randint(0, tiny_config.vocab_size, (4, 32))
    model(tokens).logits.sum().backward()
    grad = model.layers[1].mlp.experts.gate_up_proj.grad
    assert grad is not None and (grad.abs().sum(dim=(1, 2)) > 0).all()  # 128 tokens reach all 6 experts
    assert model.layers[1].mlp.gate.weight.grad.abs().sum() > 0  # the router learns through the weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 grouped-GEMM kernel needs a CUDA device")
def test_cuda_grouped_mm_matches_loop_in_bf16(tiny_config: MoEConfig) -> None:
    config = tiny_config.model_copy(update={"d_model": 64, "expert_ffn_dim": 64})
    loop = ElasticMoE(config.model_copy(update={"expert_impl": "loop"})).cuda().eval()
    grouped = ElasticMoE(config.model_copy(update={"expert_impl": "grouped_mm"})).cuda().eval()
    grouped.load_state_dict(loop.state_dict())
    tokens = torch.randint(0, config.vocab_size, (4, 64), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = loop(tokens).logits.float(), grouped(tokens).logits.float()
    assert (a - b).abs().max() < 5e-2


def test_paths_agree_on_gradients(tiny_config: MoEConfig) -> None:
    """Training may use any path: the gradients of all weights agree too (grouped GEMM backward included)."""
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 24))
    grads = {}
    state = ElasticMoE(tiny_config).state_dict()
    for impl in EXPERT_PATHS:
        model = ElasticMoE(tiny_config.model_copy(update={"expert_impl": impl}))
        model.load_state_dict(state)
        out = model(tokens)
        (out.logits.pow(2).mean() + out.aux_loss).backward()
        grads[impl] = {name: p.grad for name, p in model.named_parameters()}
    for impl in ("grouped_mm", "export"):
        for name, grad in grads["loop"].items():
            torch.testing.assert_close(grads[impl][name], grad, atol=1e-6, rtol=1e-4, msg=f"{impl}: {name}")


def test_the_cpu_path_trains_under_bf16_autocast(tiny_config: MoEConfig) -> None:
    """The small preset trains in bf16: on a CPU the experts' output (bf16) goes back into the fp32 residual
    stream (`trainonce pretrain --config small` on a CPU crashed in index_add_)."""
    torch.manual_seed(0)
    model = ElasticMoE(tiny_config)
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.float()[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
