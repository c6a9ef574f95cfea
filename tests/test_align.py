import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from omnimoe.align import AltMoEConnector, ConnectorConfig, DirectionSchedule, LogitScale, info_nce, regression_loss

WIDTHS = {"text": 24, "image": 40, "audio": 16}


def make(**kw):
    torch.manual_seed(0)
    return AltMoEConnector(
        ConnectorConfig(
            modalities=dict(WIDTHS),
            hidden_size=32,
            contrastive_dim=16,
            num_experts=6,
            num_experts_per_tok=2,
            dropout=0.0,
            **kw,
        )
    ).eval()


def test_every_direction_among_three_modalities():
    c = make()
    assert len(c.config.directions) == 6 and "audio->image" in c.config.directions
    for d in c.config.directions:
        src, tgt = d.split("->")
        out = c(d, torch.randn(5, WIDTHS[src]))
        assert out.regression.shape == (5, WIDTHS[tgt]) and out.contrastive.shape == (5, 16)
        assert c.embed_target(d, torch.randn(5, WIDTHS[tgt])).shape == (5, 16)
        assert int(out.tokens_per_expert.sum()) == 2 * 5 * 2  # both task paths through the one MoE, k=2


def test_token_inputs_ignore_padding():
    c = make()
    x = torch.randn(2, 7, WIDTHS["text"])
    mask = torch.tensor([[1] * 4 + [0] * 3, [1] * 7], dtype=torch.bool)
    a = c("text->image", x, mask)
    x2 = x.clone()
    x2[0, 4:] = 1e3  # garbage in padded positions changes nothing
    b = c("text->image", x2, mask)
    torch.testing.assert_close(a.regression, b.regression)
    torch.testing.assert_close(a.contrastive, b.contrastive)
    single = c("text->image", x[:1, :4])
    torch.testing.assert_close(single.contrastive, a.contrastive[:1], atol=1e-5, rtol=1e-5)


def test_directions_share_the_moe_but_not_the_heads():
    c = make(directions=["text->image", "image->text"])
    out = c("text->image", torch.randn(3, WIDTHS["text"]))
    (out.regression.sum() + out.contrastive.sum()).backward()
    assert c.moe.experts.w_in.grad is not None
    assert c.regression_head["image_to_text"].weight.grad is None
    with pytest.raises(ValueError, match="not one of this connector's"):
        c("audio->text", torch.randn(1, 16))
    with pytest.raises(ValueError, match="source width 23"):
        c("text->image", torch.randn(1, 23))
    with pytest.raises(ValueError, match="names modality 'video'"):
        ConnectorConfig(modalities=dict(WIDTHS), directions=["video->text"])


def test_mlp_ablation_and_save_load(tmp_path):
    c = make(use_moe=False)
    assert c.moe.config.num_experts == 1
    c = make()
    c.save_pretrained(tmp_path / "conn")
    again = AltMoEConnector.from_pretrained(tmp_path / "conn").eval()
    x = torch.randn(4, WIDTHS["audio"])
    torch.testing.assert_close(again("audio->text", x).contrastive, c("audio->text", x).contrastive)


def test_info_nce_by_hand():
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    sims = (qn @ kn.t() * 10).tolist()

    def ce(rows):
        return sum(-row[i] + math.log(sum(math.exp(v) for v in row)) for i, row in enumerate(rows)) / len(rows)

    expected = (ce(sims) + ce([list(c) for c in zip(*sims)])) / 2
    assert info_nce(q, k, 10.0).item() == pytest.approx(expected, rel=1e-5)
    # gathered negatives: with only this rank's keys it is the same loss
    assert info_nce(q, k, 10.0, key_all=k, offset=0).item() == pytest.approx(expected, rel=1e-5)
    # more negatives make it harder
    assert info_nce(q, k, 10.0, key_all=torch.cat([k, torch.randn(12, 8)]), offset=0) > info_nce(q, k, 10.0) - 1e-6
    # perfectly aligned pairs at high scale: near zero
    assert info_nce(q, q, 100.0).item() < 1e-3


def test_regression_losses_and_logit_scale():
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    assert regression_loss(a, a).item() == 0 and regression_loss(a, b, "mse").item() == pytest.approx(
        F.mse_loss(a, b).item()
    )
    assert regression_loss(a, 2 * a, "cosine").item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="smooth_l1, mse or cosine"):
        regression_loss(a, b, "l3")
    assert LogitScale(0.03)().item() == pytest.approx(1 / 0.03, rel=1e-5)
    assert not list(LogitScale(0.03).parameters()) and len(list(LogitScale(0.07, learnable=True).parameters())) == 1
    assert LogitScale(0.001)().item() == pytest.approx(100, rel=1e-5)  # clamped


def test_schedules():
    dirs = ["text->image", "image->text", "text->audio"]
    alt = DirectionSchedule(dirs)
    assert [alt.directions_for(s)[0] for s in range(4)] == dirs + dirs[:1]
    assert [DirectionSchedule(dirs, steps_per_direction=2).directions_for(s)[0] for s in range(4)] == [
        dirs[0],
        dirs[0],
        dirs[1],
        dirs[1],
    ]
    assert DirectionSchedule(dirs, kind="joint").directions_for(7) == dirs
    ada = DirectionSchedule(dirs, kind="adaptive", seed=1)
    ada.update({"text->image": 0.9, "image->text": 0.2, "text->audio": 0.5})
    counts = Counter(ada.directions_for(s)[0] for s in range(2000))
    assert counts["image->text"] > counts["text->audio"] > counts["text->image"]
    state = ada.state_dict()
    first = [ada.directions_for(s)[0] for s in range(20)]
    ada.load_state_dict(state)
    assert [ada.directions_for(s)[0] for s in range(20)] == first  # resumable
    with pytest.raises(ValueError, match="alternate, adaptive or joint"):
        DirectionSchedule(dirs, kind="random")


@pytest.mark.parametrize("use_moe", [True, False])
def test_linear_path_starts_as_the_linear_two_tower_and_learns_on_top(use_moe, tmp_path):
    """With ``linear_path`` the connector at initialisation is the linear two-tower: a trained tower copied in
    (``load_linear``) gives the tower's queries and keys in both directions (padding ignored); the residuals
    (the MoE or MLP path's head, the target projections) receive gradients from the first step, and the MoE
    itself once its head has moved."""
    from omnimoe.align.connector import LinearTwoTower, load_connector

    torch.manual_seed(0)
    cfg = ConnectorConfig(modalities={"a": 12, "b": 10}, hidden_size=16, contrastive_dim=8, num_experts=4, num_experts_per_tok=2,
                          dropout=0.0, use_moe=use_moe, linear_path=True)  # fmt: skip
    model = AltMoEConnector(cfg)
    tower = LinearTwoTower({"a": 12, "b": 10}, 8)  # its own random weights, unlike the connector's
    model.load_linear(tower)
    tokens, mask = torch.randn(5, 4, 12), torch.tensor([[1, 1, 0, 0]] * 3 + [[1, 1, 1, 1]] * 2, dtype=torch.bool)
    query = model("a->b", tokens, mask).contrastive
    assert torch.allclose(query, tower("a->b", tokens, mask).contrastive, atol=1e-6)
    assert torch.allclose(
        model("a->b", tokens[:, :2], mask[:, :2]).contrastive[:3], query[:3], atol=1e-6
    )  # padding ignored
    target = torch.randn(5, 10)
    assert torch.allclose(model("b->a", target).contrastive, tower("b->a", target).contrastive, atol=1e-6)
    for d, tgt in (("a->b", target), ("b->a", tokens[:, 0])):
        assert torch.allclose(model.embed_target(d, tgt), tower.embed_target(d, tgt), atol=1e-6)
    without = AltMoEConnector(ConnectorConfig(**{**cfg.__dict__, "linear_path": False}))
    assert not hasattr(without, "linear")
    with pytest.raises(ValueError, match="no linear path"):
        without.load_linear(tower)
    with pytest.raises(ValueError, match="does not fit"):
        model.load_linear(LinearTwoTower({"a": 12, "b": 10}, 6))

    def step() -> None:
        q, k = (
            F.normalize(model("a->b", tokens, mask).contrastive, dim=-1),
            F.normalize(model.embed_target("a->b", target), dim=-1),
        )
        F.cross_entropy(q @ k.T / 0.1, torch.arange(5)).backward()

    step()
    head, key = model.contrastive_head["a_to_b"], model.target_proj["a_to_b"]
    assert head.weight.grad.abs().sum() > 0 and key.weight.grad.abs().sum() > 0  # the residuals learn at once
    inner = model.moe.experts.w_in
    assert inner.grad is None or inner.grad.abs().sum() == 0  # behind a zero head: nothing yet
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.step()
        opt.zero_grad()
        step()
    assert model.contrastive_head["a_to_b"].weight.abs().sum() > 0
    assert inner.grad.abs().sum() > 0  # and through the moved head, the MoE (or MLP) path itself
    model.save_pretrained(tmp_path / "c")
    again = load_connector(tmp_path / "c")
    assert again.config.linear_path and torch.allclose(
        again("a->b", tokens, mask).contrastive, model.eval()("a->b", tokens, mask).contrastive, atol=1e-6
    )


def test_pool_tokens_averages_runs_of_real_tokens():
    """Rows longer than ``most`` become ``most`` averages of consecutive real tokens (padding never enters);
    shorter rows are kept as they are; the run-length-weighted mean of a pooled row is the row's mean."""
    from omnimoe.align.data import pool_tokens

    torch.manual_seed(0)
    tokens = torch.randn(3, 10, 4)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    for i, n in enumerate((10, 7, 3)):
        mask[i, :n] = True
    tokens[~mask] = 1e6  # padding that must not leak in
    out, kept = pool_tokens(tokens, mask, 4)
    assert out.shape == (3, 4, 4) and kept.tolist() == [[True] * 4, [True] * 4, [True, True, True, False]]
    assert torch.allclose(out[0, 0], tokens[0, :2].mean(0)) and torch.allclose(out[0, 1], tokens[0, 2:5].mean(0))
    for i, n in enumerate((10, 7)):
        sizes = torch.tensor(
            [len(range(round(j * n / 4), round((j + 1) * n / 4))) for j in range(4)], dtype=torch.float
        )
        assert sizes.sum() == n and sizes.min() >= n // 4
        assert torch.allclose((out[i] * sizes[:, None]).sum(0) / n, tokens[i, :n].mean(0), atol=1e-5)
    assert torch.equal(out[2, :3], tokens[2, :3]) and out[2, 3].abs().sum() == 0
    same, same_mask = pool_tokens(tokens, mask, 0)
    assert same is tokens and same_mask is mask
    assert pool_tokens(tokens, mask, 10)[0] is tokens


def test_alignment_data_from_tensors_pools_tokens():
    from omnimoe.align.data import AlignmentData

    ids = ["a", "b", "c", "d"]
    splits = dict(zip(ids, ["train", "train", "val", "test"]))
    pooled = torch.randn(4, 6)
    toks, mask = torch.randn(4, 9, 6), torch.ones(4, 9, dtype=torch.bool)
    data = AlignmentData.from_tensors(splits, {"x": (ids, pooled), "y": (ids[::-1], pooled.flip(0))}, {"x": (toks, mask)},
                                      pooled_tokens=3)  # fmt: skip
    pairs = data.pairs("x->y", "train")
    assert pairs.ids == ["a", "b"] and pairs.tgt_rows.tolist() == [3, 2] and pairs.groups == ["a", "b"]
    source, m = data.inputs("x", pairs.src_rows, tokens=True)
    assert source.shape == (2, 3, 6) and m.all() and torch.allclose(source[0, 0], toks[0, :3].mean(0))
    with pytest.raises(ValueError, match="no token states for 'y'"):
        data.inputs("y", pairs.tgt_rows, tokens=True)


@pytest.mark.parametrize("linear_path", [False, True])
def test_padded_token_batches_give_each_rows_own_outputs_and_loss(linear_path):
    """Token inputs of different lengths, right-padded into one batch, give every row exactly the outputs (both
    heads) and the loss it has alone without padding: padding reaches neither the MoE nor the masked mean."""
    from omnimoe.align.data import pool_tokens
    from omnimoe.align.losses import info_nce

    torch.manual_seed(0)
    cfg = ConnectorConfig(modalities={"a": 12, "b": 10}, hidden_size=16, contrastive_dim=8, num_experts=4,
                          num_experts_per_tok=2, dropout=0.0, linear_path=linear_path)  # fmt: skip
    model = AltMoEConnector(cfg).eval()
    lengths = [5, 2, 7, 3]
    tokens = torch.randn(4, 7, 12)
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    tokens[~mask] = 50.0  # padding values that would show if they leaked
    target = torch.randn(4, 10)
    for toks, m in ((tokens, mask), pool_tokens(tokens, mask, 4)):
        batch = model("a->b", toks, m)
        alone = [model("a->b", toks[i : i + 1, : int(m[i].sum())]) for i in range(4)]
        for head in ("contrastive", "regression"):
            torch.testing.assert_close(getattr(batch, head), torch.cat([getattr(o, head) for o in alone]))
        keys = model.embed_target("a->b", target)
        loss = info_nce(batch.contrastive, keys, 20.0)
        torch.testing.assert_close(loss, info_nce(torch.cat([o.contrastive for o in alone]), keys, 20.0))
