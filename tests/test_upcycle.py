import pytest
import torch
from torch import nn

from omnimoe.moe import MoEConfig
from omnimoe.moe.upcycle import read_ffn, upcycle_from_dense, upcycle_from_ffns, upcycle_sliced

H, F = 16, 48


class LlamaStyleMLP(nn.Module):
    def __init__(self, act=None):
        super().__init__()
        self.gate_proj = nn.Linear(H, F, bias=False)
        self.up_proj = nn.Linear(H, F, bias=False)
        self.down_proj = nn.Linear(F, H, bias=False)
        self.act_fn = act or nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class FcMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(H, F)
        self.fc2 = nn.Linear(F, H)
        self.activation_fn = nn.GELU()

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


@pytest.mark.parametrize("make_ffn", [LlamaStyleMLP, FcMLP, lambda: LlamaStyleMLP(nn.GELU(approximate="tanh"))])
@pytest.mark.parametrize("k", [1, 2])
def test_identical_copies_equal_the_dense_ffn(make_ffn, k):
    torch.manual_seed(0)
    ffn = make_ffn()
    layer = upcycle_from_dense(ffn, num_experts=4, num_experts_per_tok=k, norm_topk_prob=True)
    x = torch.randn(2, 9, H)
    torch.testing.assert_close(layer(x).hidden_states, ffn(x), atol=1e-5, rtol=1e-5)
    # the activation was read from the module
    assert layer.config.hidden_act == read_ffn(ffn).hidden_act


def test_noise_makes_experts_differ_slightly():
    torch.manual_seed(0)
    ffn = LlamaStyleMLP()
    layer = upcycle_from_dense(ffn, num_experts=4, noise_std=0.01, generator=torch.Generator().manual_seed(1))
    w = layer.experts.gate_up_proj
    assert not torch.equal(w[0], w[1])
    rel = (w[0] - torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight])).norm() / w[0].norm()
    assert 0.001 < rel < 0.05


def test_one_ffn_per_expert():
    torch.manual_seed(0)
    ffns = [LlamaStyleMLP() for _ in range(3)] + []
    ffns.append(ffns[0])  # duplicates are allowed (Uni-MoE reuses the base FFN)
    layer = upcycle_from_ffns(ffns, num_experts_per_tok=2)
    assert layer.config.num_experts == 4
    x = torch.randn(5, H)
    for e, ffn in enumerate(ffns):
        counts = [0] * 4
        counts[e] = 5
        torch.testing.assert_close(layer.experts(x, counts), ffn(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="shapes"):
        bad = LlamaStyleMLP()
        bad.down_proj = nn.Linear(F, H + 1, bias=False)
        upcycle_from_ffns([ffns[0], bad])


@pytest.mark.parametrize("make_ffn", [LlamaStyleMLP, FcMLP])
def test_sliced_experts_sum_to_the_dense_ffn(make_ffn):
    torch.manual_seed(0)
    ffn = make_ffn()
    layer = upcycle_sliced(ffn, num_experts=4)
    assert layer.config.intermediate_size == F // 4
    x = torch.randn(6, H)
    every = layer.experts.forward_dense(x)
    torch.testing.assert_close(every.sum(0), ffn(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        upcycle_sliced(ffn, num_experts=5)


def test_config_and_unknown_layout():
    ffn = LlamaStyleMLP()
    base = MoEConfig(
        hidden_size=1, intermediate_size=1, num_experts=6, num_experts_per_tok=2, router_aux_loss_coef=0.01
    )
    layer = upcycle_from_dense(ffn, base)
    assert (layer.config.hidden_size, layer.config.intermediate_size, layer.config.num_experts) == (H, F, 6)
    assert layer.config.router_aux_loss_coef == 0.01

    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="gate_proj/up_proj/down_proj"):
        upcycle_from_dense(Weird())
