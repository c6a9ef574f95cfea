import dataclasses
import math

import pytest
import torch

from omnimoe.moe import MoEConfig, MoELayer, Router, update_expert_bias
from omnimoe.moe.experts import Experts

H, F, E = 32, 64, 4


def make_layer(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=H, intermediate_size=F, num_experts=E, num_experts_per_tok=2)
    cfg.update(kw)
    return MoELayer(MoEConfig(**cfg))


def oracle_of(layer):
    """The same weights run by the dense all-experts backend."""
    dense = MoELayer(dataclasses.replace(layer.config, backend="dense"))
    dense.load_state_dict(layer.state_dict())
    return dense


def run(layer, x, grad_out, **kw):
    x = x.clone().requires_grad_(True)
    out = layer(x, **kw)
    (out.hidden_states.float() * grad_out).sum().backward()
    grads = {n: p.grad.float().clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out, x.grad.float(), grads


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def close(a, b, tol):
    """Relative error below tol, with an absolute floor for tensors that are round-off noise around zero."""
    return (a.float() - b.float()).norm() <= tol * b.float().norm() + 2 * tol


def assert_same(a, b, tol):
    (out_a, gx_a, grads_a), (out_b, gx_b, grads_b) = a, b
    assert close(out_a.hidden_states, out_b.hidden_states, tol)
    assert close(gx_a, gx_b, tol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_b:
        if grads_b[name].norm() == 0:
            assert grads_a[name].norm() == 0, name
        else:
            assert close(grads_a[name], grads_b[name], tol), name


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("expert_type,act,bias", [("glu", "silu", False), ("mlp", "gelu", True)])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_backend_equals_dense_oracle(backend, dtype, expert_type, act, bias, k):
    layer = make_layer(
        backend=backend, expert_type=expert_type, hidden_act=act, expert_bias=bias, num_experts_per_tok=k
    )
    with torch.no_grad():  # make the biases non-trivial
        for p in layer.experts.parameters():
            if p.dim() == 2:
                p.normal_()
    oracle = oracle_of(layer)
    layer.to(dtype), oracle.to(dtype)
    torch.manual_seed(1)
    x = torch.randn(3, 8, H, dtype=dtype)
    g = torch.randn(3, 8, H)
    a = run(layer, x, g)
    b = run(oracle, x, g)
    assert a[0].hidden_states.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_same(a, b, tol)
    # Independent of the router's selection and of dispatch: top-k of the logits (the softmax keeps their
    # order), counted per expert, and the MoE output assembled token by token from the dense expert outputs.
    xt = x.reshape(24, H)
    logits = a[0].router_logits
    torch.testing.assert_close(logits, xt.float() @ layer.router.weight.float().t())
    top = logits.topk(k, dim=-1).indices
    assert a[0].tokens_per_expert.tolist() == torch.bincount(top.flatten(), minlength=E).tolist()
    with torch.no_grad():
        every = layer.experts.forward_dense(xt).float()  # (E, T, H)
    expected = torch.zeros(24, H)
    for t in range(24):
        w = logits[t].softmax(-1)[top[t]]
        for e, we in zip(top[t].tolist(), (w / w.sum()).tolist()):
            expected[t] += we * every[e, t]
    assert close(a[0].hidden_states.reshape(24, H), expected, tol)


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_experts_without_tokens(backend):
    layer = make_layer(backend=backend, router_bias=True, num_experts=8, num_experts_per_tok=2)
    with torch.no_grad():
        layer.router.bias[[1, 4, 5]] = -1e4  # never chosen
    oracle = oracle_of(layer)
    x, g = torch.randn(20, H), torch.randn(20, H)
    a, b = run(layer, x, g), run(oracle, x, g)
    assert a[0].tokens_per_expert[[1, 4, 5]].tolist() == [0, 0, 0]
    assert_same(a, b, tol=1e-5)
    # Experts that saw no token get exactly zero gradient.
    assert a[2]["experts.gate_up_proj"][[1, 4, 5]].abs().max() == 0


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_bf16_autocast_equals_oracle(backend):
    layer = make_layer(backend=backend)
    oracle = oracle_of(layer)
    x, g = torch.randn(40, H), torch.randn(40, H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = run(layer, x, g)
        b = run(oracle, x, g)
    assert a[0].hidden_states.dtype == torch.bfloat16
    assert a[0].router_logits.dtype == torch.float32  # routing stays fp32 under autocast
    assert layer.experts.gate_up_proj.grad.dtype == torch.float32
    assert_same(a, b, tol=2e-2)
    fp32 = run(layer, x, g)
    assert rel_err(a[0].hidden_states, fp32[0].hidden_states) < 2e-2


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_top_p_equals_oracle_and_selects_smallest_prefix(top_p, backend):
    layer = make_layer(backend=backend, top_p=top_p, num_experts_per_tok=E)
    x, g = torch.randn(64, H) * 3, torch.randn(64, H)
    a, b = run(layer, x, g), run(oracle_of(layer), x, g)
    assert_same(a, b, tol=1e-5)
    probs = a[0].router_logits.softmax(-1)
    n_used = int(a[0].tokens_per_expert.sum())
    expected = 0
    for p in probs:
        s, n = 0.0, 0
        for v in p.sort(descending=True).values.tolist():
            if n and s >= top_p:
                break
            s, n = s + v, n + 1
        expected += n
    assert n_used == expected
    assert 64 <= n_used < 64 * E  # top-p really varies the expert count


def test_top_p_mask_on_known_probabilities():
    cfg = MoEConfig(hidden_size=4, intermediate_size=8, num_experts=4, num_experts_per_tok=4, top_p=0.7)
    router = Router(cfg)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.9, 0.03, 0.02], [0.25, 0.25, 0.25, 0.25]])
    logits = probs.log()
    out = router.select(logits, probs, probs)
    assert out.topk_mask.sum(-1).tolist() == [2, 1, 3]
    assert out.topk_idx[0, :2].tolist() == [0, 1]
    # renormalised over the used experts
    torch.testing.assert_close(out.topk_weight[0, :2], torch.tensor([0.5, 0.3]) / 0.8)
    assert out.topk_weight[0, 2:].abs().max() == 0


def test_mixtral_routing_is_softmax_over_chosen_logits():
    layer = make_layer(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    x = torch.randn(16, H)
    r = layer.router(x)
    top_logits = r.logits.gather(-1, r.topk_idx)
    torch.testing.assert_close(r.topk_weight, top_logits.softmax(-1))
    layer_nonorm = make_layer(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
    r2 = layer_nonorm.router(x)
    torch.testing.assert_close(r2.topk_weight, r2.logits.softmax(-1).gather(-1, r2.topk_idx))
    assert (r2.topk_weight.sum(-1) < 1).all()


def test_sigmoid_scores():
    layer = make_layer(score_func="sigmoid", norm_topk_prob=False, num_experts_per_tok=2)
    x, g = torch.randn(16, H), torch.randn(16, H)
    a, b = run(layer, x, g), run(oracle_of(layer), x, g)
    assert_same(a, b, tol=1e-5)
    r = layer.router(x)
    torch.testing.assert_close(r.topk_weight, r.logits.sigmoid().gather(-1, r.topk_idx))
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(16))


def _hand_losses(logits, k, valid):
    rows = [row for row, v in zip(logits.tolist(), valid) if v]
    n, num_e = len(rows), len(rows[0])
    counts, psum, z = [0] * num_e, [0.0] * num_e, 0.0
    for row in rows:
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        s = sum(ex)
        for e in range(num_e):
            psum[e] += ex[e] / s
        for e in sorted(range(num_e), key=lambda e: -row[e])[:k]:
            counts[e] += 1
        z += (m + math.log(s)) ** 2
    aux = num_e * sum((counts[e] / n) * (psum[e] / n) for e in range(num_e))
    return aux, z / n


@pytest.mark.parametrize("k", [1, 2])
def test_aux_and_z_loss_equal_hand_computed(k):
    cfg = MoEConfig(
        hidden_size=3,
        intermediate_size=8,
        num_experts=3,
        num_experts_per_tok=k,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
    )
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(3))  # logits = inputs
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 3.0, 0.2], [1.0, 1.1, 0.9], [-2.0, 0.0, 4.0], [5.0, 5.0, -5.0]])
    valid = [True, True, False, True, True]
    out = layer(logits.unsqueeze(0), attention_mask=torch.tensor([valid]))
    aux, z = _hand_losses(logits, k, valid)
    assert out.aux_loss.item() == pytest.approx(aux, rel=1e-5)
    assert out.z_loss.item() == pytest.approx(z, rel=1e-5)
    assert out.router_loss.item() == pytest.approx(0.01 * aux + 0.001 * z, rel=1e-5)
    # padding: the masked token is neither computed nor counted, and comes out as zeros
    assert int(out.tokens_per_expert.sum()) == 4 * k
    assert out.hidden_states[0, 2].abs().max() == 0
    # without the mask the losses change
    unmasked = layer(logits.unsqueeze(0))
    assert unmasked.aux_loss.item() == pytest.approx(_hand_losses(logits, k, [True] * 5)[0], rel=1e-5)


def test_balance_loss_is_k_at_perfect_balance():
    cfg = MoEConfig(hidden_size=4, intermediate_size=8, num_experts=4, num_experts_per_tok=2)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.zero_()
    assert layer(torch.randn(32, 4)).aux_loss.item() == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize("backend", ["grouped_mm", "loop", "dense"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_drops_exactly_what_it_reports(backend, capacity_factor):
    k, T = 2, 48
    layer = make_layer(backend=backend, capacity_factor=capacity_factor, num_experts_per_tok=k, router_bias=True)
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([2.0, 1.0, 0.0, -1.0]))  # skewed load so dropping happens
    x = torch.randn(T, H)
    out = layer(x)
    with torch.no_grad():
        r = layer.router(x)
    cap = math.ceil(capacity_factor * T * k / E)
    # Independent reference: walk assignments first-choice-first, token order, fill each expert up to cap.
    filled, kept, dropped = [0] * E, [], 0
    for slot in range(k):
        for t in range(T):
            e = int(r.topk_idx[t, slot])
            if filled[e] < cap:
                filled[e] += 1
                kept.append((t, e, r.topk_weight[t, slot].item()))
            else:
                dropped += 1
    assert dropped > 0
    assert out.dropped_tokens == dropped
    assert out.tokens_per_expert.tolist() == filled
    every = layer.experts.forward_dense(x)
    expected = torch.zeros(T, H)
    for t, e, w in kept:
        expected[t] += w * every[e, t]
    torch.testing.assert_close(out.hidden_states, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_null_experts_skip_compute(backend):
    layer = make_layer(backend=backend, num_null_experts=2, num_experts_per_tok=2, router_bias=True)
    with torch.no_grad():
        layer.router.bias[E:] = 1.5  # null experts are popular
    x, g = torch.randn(40, H), torch.randn(40, H)
    x[:8] *= 0.01  # logits ~ router bias: both null experts (1.5) beat every real expert (~0)
    a, b = run(layer, x, g), run(oracle_of(layer), x, g)
    assert_same(a, b, tol=1e-5)
    r = layer.router(x)
    n_null = int((r.topk_idx >= E).sum())
    assert n_null > 0
    assert int(a[0].tokens_per_expert.sum()) == 40 * 2 - n_null
    assert a[0].router_logits.shape == (40, E + 2)
    # a token whose both choices are null outputs exactly zero (though any real expert would give it a nonzero output)
    both_null = (r.topk_idx >= E).all(-1)
    assert both_null[:8].all()
    assert a[0].hidden_states[both_null].abs().max() == 0
    assert layer.experts.forward_dense(x[both_null]).abs().amax(-1).min() > 0


def swiglu(x, w_in, w_down):
    """A plain SwiGLU MLP: gate rows first, then up rows (the stacked layout's order)."""
    gate, up = w_in.chunk(2, dim=0)
    return (torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())) @ w_down.t()


def test_shared_experts_add_a_dense_mlp():
    layer = make_layer(num_shared_experts=2, shared_intermediate_size=16)
    assert layer.shared_experts.w_in.shape == (1, 2 * 32, H)
    x = torch.randn(10, H)
    with torch.no_grad():
        out = layer(x).hidden_states
        # By hand: top-2 softmax-renormalised routed experts, plus the shared MLP on every token.
        logits = x @ layer.router.weight.t()
        expected = swiglu(x, layer.shared_experts.gate_up_proj[0], layer.shared_experts.down_proj[0])
        for t in range(10):
            top = logits[t].topk(2).indices.tolist()
            w = logits[t, top].softmax(-1).tolist()
            for e, we in zip(top, w):
                expected[t] += we * swiglu(x[t], layer.experts.gate_up_proj[e], layer.experts.down_proj[e])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_unaligned_shapes_fall_back_to_loop():
    layer = make_layer(hidden_size=30, intermediate_size=50)
    assert layer.experts.resolve_backend(torch.float32, torch.device("cpu")) == "loop"
    x, g = torch.randn(12, 30), torch.randn(12, 30)
    assert_same(run(layer, x, g), run(oracle_of(layer), x, g), tol=1e-5)
    forced = make_layer(hidden_size=30, intermediate_size=50, backend="grouped_mm")
    with pytest.raises(ValueError, match="grouped_mm cannot run"):
        forced(x)


def test_jitter_only_in_training():
    layer = make_layer(router_jitter_noise=0.5)
    x = torch.randn(64, H)
    layer.eval()
    torch.testing.assert_close(layer(x).router_logits, layer(x).router_logits)
    layer.train()
    assert not torch.equal(layer(x).router_logits, layer(x).router_logits)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_expert_bias_balancing_moves_load_toward_uniform(norm_topk_prob):
    layer = make_layer(
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob,
        router_bias_update_rate=0.05,
        router_bias=True,
    )
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([1.0, 0.0, 0.0, -1.0]))
    x = torch.randn(512, H)
    layer.train()
    first = layer(x).tokens_per_expert.float()
    update_expert_bias(layer)
    bias = layer.router.expert_bias
    assert bias[0] < 0 and bias[3] > 0  # overloaded expert pushed down, starved one up
    for _ in range(60):
        layer(x)
        update_expert_bias(layer)
    last = layer(x).tokens_per_expert.float()
    assert last.std() < 0.5 * first.std()
    # By hand: the bias decides which experts are chosen; the gate weights are the un-biased softmax scores.
    r = layer.router(x[:64])
    bias = bias.tolist()
    changed = 0
    for t, row in enumerate(r.logits.tolist()):
        ex = [math.exp(v - max(row)) for v in row]
        p = [v / sum(ex) for v in ex]
        chosen = sorted(range(E), key=lambda e: -(p[e] + bias[e]))[:2]
        changed += set(chosen) != set(sorted(range(E), key=lambda e: -p[e])[:2])
        weight = [p[e] / (sum(p[c] for c in chosen) if norm_topk_prob else 1.0) for e in chosen]
        assert r.topk_idx[t].tolist() == chosen
        assert r.topk_weight[t].tolist() == pytest.approx(weight, rel=1e-5)
    assert changed > 0


def test_save_and_load_pretrained(tmp_path):
    layer = make_layer(num_shared_experts=1, expert_bias=True, top_p=0.5, num_experts_per_tok=3)
    layer.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    again = MoELayer.from_pretrained(tmp_path / "m")
    assert again.config == layer.config
    x = torch.randn(7, H)
    torch.testing.assert_close(again(x).hidden_states, layer(x).hidden_states)
    with pytest.raises(ValueError, match="not a"):
        from omnimoe.io import load_pretrained

        load_pretrained(tmp_path / "m", "something-else")


def test_bad_config_and_inputs_are_named():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoEConfig(hidden_size=8, intermediate_size=8, num_experts=2, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="hidden_act"):
        MoEConfig(hidden_size=8, intermediate_size=8, hidden_act="tanhh")
    with pytest.raises(ValueError, match="top_p"):
        MoEConfig(hidden_size=8, intermediate_size=8, top_p=1.5)
    layer = make_layer()
    with pytest.raises(ValueError, match="attention_mask shape"):
        layer(torch.randn(2, 3, H), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="counts"):
        Experts(2, 8, 8)(torch.randn(3, 8), [3])


def test_auto_backend_policy():
    cpu = torch.device("cpu")
    assert make_layer(num_experts=8).experts.resolve_backend(torch.bfloat16, cpu) == "loop"
    assert make_layer(num_experts=32).experts.resolve_backend(torch.bfloat16, cpu) == "grouped_mm"
    assert make_layer(num_experts=32).experts.resolve_backend(torch.float64, cpu) == "loop"  # unsupported dtype
