"""The MoE-LLM throughput benchmark and its dense baseline: ``dense_equal_active`` keeps the model at init and
matches the MoE's active parameters; the benchmark's Hugging Face eager MoE block computes our MoE layer;
the quick form writes its three rows. No timing is asserted here."""

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLM, tiny_llm

from omnimoe.mllm import MoELLMConfig, decoder_layers, moefy
from omnimoe.mllm.baselines import dense_equal_active, moe_active_parameters
from omnimoe.moe import MoEConfig, MoELayer

ROOT = Path(__file__).resolve().parents[1]
SMALL = TINY_LLM
FAMILIES = ("llama", "qwen2", "gemma3")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_mllm", ROOT / "benchmarks" / "mllm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_equal_active_keeps_the_model_at_init_with_the_moe_active_parameters(family):
    llm = tiny_llm(family)
    cfg = MoELLMConfig(layers="every:2", num_experts=4, num_experts_per_tok=2)
    original = type(decoder_layers(llm)[0].mlp)
    moe = copy.deepcopy(llm)
    moefy(moe, cfg)
    ids = torch.randint(0, 90, (2, 12))
    with torch.no_grad():
        before = llm(ids).logits
    assert dense_equal_active(llm, cfg) == [0, 2]
    with torch.no_grad():
        after = llm(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    blocks, moe_blocks = decoder_layers(llm), decoder_layers(moe)
    h, f, k = SMALL["hidden_size"], SMALL["intermediate_size"], cfg.num_experts_per_tok
    for i in (0, 2):
        mlp = blocks[i].mlp
        assert type(mlp) is original and mlp.intermediate_size == k * f
        assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (
            k * f,
            k * f,
            k * f,
        )
        params = sum(p.numel() for p in mlp.parameters())
        assert params == moe_active_parameters(moe_blocks[i].mlp.moe) == k * 3 * h * f
    assert blocks[1].mlp.gate_proj.out_features == f  # layers moefy would not choose keep their FFN


def test_dense_equal_active_from_ffns_is_their_mean_and_sizes_shared_experts():
    base, a, b = tiny_llm("llama", 0), tiny_llm("llama", 1), tiny_llm("llama", 2)
    x = torch.randn(3, 5, SMALL["hidden_size"])
    fa, fb = decoder_layers(a)[0].mlp, decoder_layers(b)[0].mlp
    with torch.no_grad():
        mean = (fa(x) + fb(x)) / 2
    dense_equal_active(
        base, MoELLMConfig(layers="0", num_experts_per_tok=2), ffns={0: [fa, fb, decoder_layers(base)[0].mlp]}
    )
    with torch.no_grad():
        torch.testing.assert_close(decoder_layers(base)[0].mlp(x), mean, atol=1e-5, rtol=1e-5)
    shared = tiny_llm("llama")
    cfg = MoELLMConfig(layers="1", num_experts=4, num_experts_per_tok=2, num_shared_experts=1)
    moe = copy.deepcopy(shared)
    moefy(moe, cfg)
    dense_equal_active(shared, cfg)
    mlp = decoder_layers(shared)[1].mlp
    assert mlp.down_proj.in_features == 3 * SMALL["intermediate_size"]
    assert sum(p.numel() for p in mlp.parameters()) == moe_active_parameters(decoder_layers(moe)[1].mlp.moe)
    with pytest.raises(ValueError, match="at least 2"):
        dense_equal_active(tiny_llm("llama"), MoELLMConfig(layers="0"), ffns={0: [fa]})


def test_hf_eager_block_computes_our_moe_layer():
    bench = load_bench()
    torch.manual_seed(0)
    layer = MoELayer(
        MoEConfig(hidden_size=32, intermediate_size=48, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
    )
    block = bench.HFEagerSparseMoeBlock.from_moe(layer)
    x = torch.randn(2, 20, 32)
    ours, hf = layer(x).hidden_states, block(x)
    torch.testing.assert_close(hf, ours, atol=1e-5, rtol=1e-5)
    assert len({e.w1.weight.sum().item() for e in block.experts}) == 4  # distinct experts: the check means something
    ours.sum().backward()
    hf.sum().backward()
    torch.testing.assert_close(block.gate.weight.grad, layer.router.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(block.experts[1].w2.weight.grad, layer.experts.down_proj.grad[1], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_mllm_benchmark_quick_writes_three_rows(tmp_path):
    out = tmp_path / "bench-mllm.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mllm.py"), "--quick", "--threads", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "check moe vs moe-hf-eager" in done.stdout
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["moe", "dense-equal-active", "moe-hf-eager"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["ffn_active_params"] == rows[1]["ffn_active_params"] == rows[2]["ffn_active_params"]
