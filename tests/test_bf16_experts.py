"""Pure-bf16 expert weights (MoEConfig.expert_dtype) and the optimizer that trains them with float32 masters
(omnimoe.runtime.MasterAdamW)."""

import copy

import pytest
import torch

from omnimoe.moe import MoEConfig, MoELayer
from omnimoe.runtime import MasterAdamW, adamw

CPU = torch.device("cpu")


def layer(expert_dtype: str, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    cfg = MoEConfig(
        hidden_size=32, intermediate_size=48, num_experts=4, num_experts_per_tok=2, expert_dtype=expert_dtype
    )
    return MoELayer(cfg)


def test_bf16_experts_compute_what_fp32_experts_holding_the_same_values_compute():
    pure = layer("bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in pure.experts.parameters())
    assert pure.router.weight.dtype == torch.float32  # the router stays float32
    ref = copy.deepcopy(pure).to(torch.float32)  # the same (bf16-representable) values, stored as fp32
    assert ref.experts.w_in.dtype == torch.float32
    x = torch.randn(40, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = pure(x).hidden_states, ref(x).hidden_states
    assert torch.equal(a, b)  # under autocast fp32 weights are cast to exactly these bf16 values
    a.float().square().sum().backward()
    assert pure.experts.w_in.grad.dtype == torch.bfloat16 and pure.experts.w_in.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="expert_dtype"):
        MoEConfig(hidden_size=8, intermediate_size=8, expert_dtype="float16")


def test_a_model_cast_keeps_its_bf16_experts_when_asked():
    pure = layer("bfloat16").to(torch.float32)
    assert pure.experts.w_in.dtype == torch.float32  # .to() moves everything ...
    assert pure.keep_expert_dtype().experts.w_in.dtype == torch.bfloat16  # ... until the layer puts them back


def train_curve(expert_dtype: str, steps: int = 150) -> list[float]:
    """A short regression fit of the MoE layer under bf16 autocast; the optimizer from runtime.adamw."""
    model = layer(expert_dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    target = torch.nn.Linear(32, 32)
    opt = adamw(model.parameters(), lr=3e-3, weight_decay=0.0, device=CPU)
    assert isinstance(opt, MasterAdamW) == (expert_dtype == "bfloat16")
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 32, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = (out.hidden_states.float() - target(x).detach()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_pure_bf16_training_follows_fp32_master_training():
    fp32, bf16 = train_curve("float32"), train_curve("bfloat16")
    assert bf16[-1] < 0.5 * bf16[0]  # it learns
    assert abs(bf16[-1] - fp32[-1]) < 0.03 * fp32[-1]  # and ends where the fp32-master run ends
    assert max(abs(a - b) / b for a, b in zip(bf16, fp32)) < 0.03  # step by step (measured: < 1%)


def test_without_masters_bf16_weights_lose_small_updates():
    """What the masters are for: a plain AdamW step of lr 1e-4 on bf16 weights of size ~1 rounds away."""
    w = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
    plain = torch.optim.AdamW([w], lr=1e-4, weight_decay=0.0)
    w.grad = torch.ones_like(w)
    plain.step()
    assert torch.equal(w.detach(), torch.ones(1000, dtype=torch.bfloat16))  # nothing moved
    v = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
    opt = MasterAdamW([v], lr=1e-4, weight_decay=0.0)
    for _ in range(40):
        v.grad = torch.ones_like(v)
        opt.step()
    assert (v.detach() < 1).all()  # 40 small steps add up in the float32 master and show in bf16


def test_master_state_resumes_bit_identically():
    def run(steps: int, state=None):
        model = layer("bfloat16", seed=3)
        opt = adamw(model.parameters(), lr=1e-3, weight_decay=0.01, device=CPU)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        g = torch.Generator().manual_seed(4 + (state or {}).get("done", 0))
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(torch.randn(16, 32, generator=g)).hidden_states.float().square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model, opt

    whole, whole_opt = run(6)
    half, half_opt = run(3)
    state = {"model": copy.deepcopy(half.state_dict()), "opt": copy.deepcopy(half_opt.state_dict()), "done": 0}
    # the second half draws the same batches as steps 4-6 of the whole run
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        torch.randn(16, 32, generator=g)
    resumed = layer("bfloat16", seed=3)
    opt = adamw(resumed.parameters(), lr=1e-3, weight_decay=0.01, device=CPU)
    resumed.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = resumed(torch.randn(16, 32, generator=g)).hidden_states.float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(whole_opt.state_dict()["masters"], opt.state_dict()["masters"]))
    with pytest.raises(ValueError, match="float32 masters"):
        opt.load_state_dict({k: v for k, v in opt.state_dict().items() if k != "masters"})


def test_uni_moe_llm_with_bf16_experts_trains_lora_and_merges():
    """``moe.expert_dtype: bfloat16`` in a Uni-MoE recipe: the upcycled experts stay bf16 in the fp32 LLM,
    LoRA adapters on them are float32 and train, and merging keeps the experts bf16."""
    from omnimoe.mllm import ConnectorSpec, MoELLMConfig, MultimodalLLM, moefy
    from omnimoe.mllm.llm import add_placeholders, load_llm
    from omnimoe.moe.experts import Experts

    llm, tok = load_llm("tiny:llama", tiny_hidden=64, tiny_layers=2)
    ids = add_placeholders(llm, tok, ["image"])
    moefy(
        llm, MoELLMConfig(layers="all", num_experts=3, num_experts_per_tok=2, expert_dtype="bfloat16", noise_std=0.01)
    )
    experts = [m for m in llm.modules() if isinstance(m, Experts)]
    assert len(experts) == 2 and all(e.w_in.dtype == torch.bfloat16 for e in experts)
    assert llm.get_input_embeddings().weight.dtype == torch.float32
    model = MultimodalLLM(llm, {"image": ConnectorSpec(in_dim=16, out_dim=64)}, ids)
    names = [f"experts.{n}" for n, _ in experts[0].named_parameters(recurse=False) if n.endswith("proj")]
    model.apply_lora(4, 8, 0.0, ["q_proj", "v_proj"], names)
    trainable = [p for n, p in model.llm.named_parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    before = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "experts" in n and "lora_B" in n}
    opt = adamw(trainable, lr=1e-2, weight_decay=0.0, device=CPU)
    x = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.llm(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dict(model.llm.named_parameters())
    assert any(not torch.equal(after[n], b) for n, b in before.items())  # the expert adapters moved
    model.merge_lora()
    assert all(e.w_in.dtype == torch.bfloat16 for e in model.llm.modules() if isinstance(e, Experts))
