"""The label prior: an encoder's own classifier bridged into text space, alone and fused with a connector."""

import pytest
import torch
import torch.nn.functional as F

from omnimoe.align.connector import ConnectorConfig
from omnimoe.align.data import AlignmentData
from omnimoe.align.evaluate import fused_rows, prior_rows
from omnimoe.align.prior import BETAS, LabelPrior, build_label_priors, calibrate, fuse, pick_beta
from omnimoe.align.trainer import TrainConfig, build_model, evaluate
from omnimoe.data.manifest import write_manifest
from omnimoe.encoders.base import LabelHead
from omnimoe.latents.store import write_store

K = 60  # classes = samples: every caption is its own class


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Image latents whose (identity) classifier names the sample's class; text latents near that class's
    name vector. The prior alone therefore retrieves perfectly; a random connector does not."""
    folder = tmp_path_factory.mktemp("prior")
    g = torch.Generator().manual_seed(0)
    names = [f"thing {i}" for i in range(K)]
    label_vectors = F.normalize(torch.randn(K, 12, generator=g), dim=-1)
    image = 6 * torch.eye(K) + 0.3 * torch.randn(K, K, generator=g)  # dim K: the logits themselves
    text = label_vectors + 0.05 * torch.randn(K, 12, generator=g)
    ids = [f"s{i}" for i in range(K)]
    recs = [
        {"id": sid, "split": ("test", "val", "train", "train", "train")[i % 5], "text": f"caption {i}"}
        for i, sid in enumerate(ids)
    ]
    manifest = write_manifest(folder / "m.jsonl", recs)
    write_store(folder / "text", ids, text, {"encoder": "synthetic-text", "modality": "text"})
    write_store(
        folder / "image", ids[::-1], image.flip(0), {"encoder": "synthetic-image", "modality": "image"}
    )  # other row order
    data = AlignmentData(manifest, {"text": folder / "text", "image": folder / "image"})
    prior = LabelPrior("image", "text", LabelHead(torch.eye(K), torch.zeros(K), names), label_vectors)
    return data, prior, label_vectors


def test_bridge_lands_on_the_class_name(setup):
    data, prior, label_vectors = setup
    rows = torch.tensor([data.row["image"][f"s{i}"] for i in range(K)])
    bridged = prior.bridge(data.latents["image"][rows])
    torch.testing.assert_close(bridged.norm(dim=-1), torch.ones(K))
    assert (F.cosine_similarity(bridged, label_vectors, dim=-1) > 0.9).all()
    assert prior.applies_to("text->image") and prior.applies_to("image->text") and not prior.applies_to("text->audio")


def test_prior_scores_orientation_and_zero_shot_rows(setup):
    data, prior, _ = setup
    pairs = data.pairs("image->text", "test")
    forward, backward = (
        prior.scores(data, "text->image", data.pairs("text->image", "test")),
        prior.scores(data, "image->text", pairs),
    )
    torch.testing.assert_close(backward, forward.t())  # rows are always the queries
    rows = prior_rows(data, ["text->image", "image->text"], {"image": prior})
    assert [(r["query"], r["target"], r["head"]) for r in rows] == [
        ("text", "image", "prior"),
        ("image", "text", "prior"),
    ]
    assert all(r["R@1"] == 1.0 and r["n"] == len(pairs) for r in rows)
    assert prior_rows(data, ["text->image"], {}) == []


def test_calibration_sharpens_a_diffuse_classifier_on_the_train_split_alone(tmp_path):
    """A classifier that ranks the right label first but spreads its probability over all labels: the plain
    bridge blurs every image toward the mean label vector; keeping the top labels undoes it. The settings
    are chosen on train; the other splits are never read (NaN there changes nothing)."""
    import dataclasses

    g = torch.Generator().manual_seed(3)
    n, labels = 80, 400
    label_vectors = F.normalize(torch.randn(labels, 16, generator=g), dim=-1)
    own = torch.randperm(labels, generator=g)[:n]  # each sample's label
    logits = 0.6 * torch.randn(n, labels, generator=g)
    logits[torch.arange(n), own] += 2.5
    text = label_vectors[own] + 0.1 * torch.randn(n, 16, generator=g)
    ids = [f"s{i}" for i in range(n)]
    recs = [
        {"id": sid, "split": ("test", "val", "train", "train")[i % 4], "text": f"c{i}"} for i, sid in enumerate(ids)
    ]
    manifest = write_manifest(tmp_path / "m.jsonl", recs)
    write_store(tmp_path / "text", ids, text, {"encoder": "t", "modality": "text"})
    write_store(tmp_path / "image", ids, logits, {"encoder": "i", "modality": "image"})
    data = AlignmentData(manifest, {"text": tmp_path / "text", "image": tmp_path / "image"})
    plain = LabelPrior(
        "image",
        "text",
        LabelHead(torch.eye(labels), torch.zeros(labels), [str(i) for i in range(labels)]),
        label_vectors,
    )
    other = dataclasses.replace(
        plain, prompt="{}", label_vectors=F.normalize(torch.randn(labels, 16, generator=g), dim=-1)
    )
    chosen = calibrate({plain.prompt: {"image": plain}, "{}": {"image": other}}, data)["image"]
    assert chosen.prompt == plain.prompt and chosen.top_k > 0
    assert chosen.settings == {"prompt": plain.prompt, "temperature": chosen.temperature, "top_k": chosen.top_k}

    def train_r1(prior):
        return prior_rows(data, ["text->image"], {"image": prior}, split="train")[0]["R@1"]

    assert train_r1(chosen) > train_r1(plain) + 0.1
    held = [data.row["image"][sid] for sid in ids if data.split[sid] != "train"]
    data.latents["image"][held] = float("nan")
    assert calibrate({plain.prompt: {"image": plain}, "{}": {"image": other}}, data)["image"] == chosen
    write_store(tmp_path / "clean", ids, 10 * F.one_hot(own, labels).float(), {"encoder": "i", "modality": "image"})
    clean = AlignmentData(manifest, {"text": tmp_path / "text", "image": tmp_path / "clean"})
    assert calibrate({plain.prompt: {"image": plain}}, clean)["image"].settings == plain.settings  # all tie: plain


def test_pick_beta_uses_the_prior_only_when_it_helps():
    g = torch.Generator().manual_seed(1)
    groups = [str(i) for i in range(30)]
    informative = torch.eye(30) + 0.1 * torch.rand(30, 30, generator=g)
    noise = torch.rand(30, 30, generator=g)
    assert pick_beta(noise, informative, groups) > 0
    assert pick_beta(informative, noise, groups) == 0.0
    torch.testing.assert_close(fuse(noise, informative, 0.0), (noise - noise.mean()) / noise.std())


def test_fused_rows_rescue_an_untrained_connector(setup):
    data, prior, _ = setup
    directions = ["text->image", "image->text"]
    cfg = TrainConfig(method="linear")
    torch.manual_seed(0)
    model = build_model(cfg, data.widths, directions)  # random weights: the learned score is noise
    learned = {(r["query"], r["target"]): r["R@1"] for r in evaluate(model, data, directions, "test", cfg=cfg)}
    rows, betas = fused_rows(model, data, directions, {"image": prior}, cfg)
    assert sorted(betas) == sorted(directions) and all(b in BETAS and b > 0 for b in betas.values())
    for r in rows:
        assert r["head"] == "contrastive+prior" and r["R@1"] > learned[(r["query"], r["target"])] and r["R@1"] >= 0.9
    assert fused_rows(model, data, ["text->image"], {}, cfg) == ([], {})


def test_efficientnet_label_head_is_the_networks_own_classifier(tmp_path):
    import numpy as np
    from PIL import Image

    from omnimoe.encoders import EncoderOptions, load_encoder

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    enc = load_encoder("efficientnet-lite0", EncoderOptions(dtype="float32"))  # exact: no bf16 autocast
    head = enc.label_head()
    assert (
        head is not None
        and head.weight.shape == (1000, 1280)
        and len(head.names) == 1000
        and head.names[1] == "goldfish"
    )
    loaded = enc.load_item(tmp_path / "x.png")
    with torch.no_grad():
        expected = enc.model(loaded[None].to(enc.device)).float()  # the whole network, classifier included
    torch.testing.assert_close(head.logits(enc.encode([loaded]).pooled), expected, atol=2e-3, rtol=1e-3)


def test_build_label_priors_only_where_an_encoder_has_a_head():
    priors = build_label_priors({"text": "minilm", "image": "efficientnet-lite0"})
    assert list(priors) == ["image"] and priors["image"].label_vectors.shape == (1000, 384)
    torch.testing.assert_close(priors["image"].label_vectors.norm(dim=-1), torch.ones(1000))
    assert build_label_priors({"image": "efficientnet-lite0", "image2": "efficientnet-lite1"}) == {}  # no text modality


def test_training_on_top_of_the_prior(setup, tmp_path):
    """prior_weight > 0: the prior's cosines join the InfoNCE logits; early stopping and test use the sum."""
    from omnimoe.align.trainer import train

    data, prior, _ = setup
    directions = ["text->image", "image->text"]
    cfg = TrainConfig(
        method="linear",
        steps=40,
        eval_every=20,
        warmup_steps=5,
        batch_size=16,
        dtype="float32",
        prior_weight=1.0,
        select_on="R@1",
    )
    result = train(data, directions, cfg, tmp_path / "with", progress=False, priors={"image": prior})
    assert result["best_val"] == 1.0  # judged by learned + prior: the prior alone is perfect here
    from omnimoe.align.trainer import load_best

    rows, weights = fused_rows(
        load_best(cfg, data, directions, tmp_path / "with"), data, directions, {"image": prior}, cfg
    )
    assert weights == {d: 1.0 for d in directions} and all(r["R@1"] == 1.0 for r in rows)  # scored as trained
    plain = train(
        data,
        directions,
        TrainConfig(**{**cfg.__dict__, "prior_weight": 0.0}),
        tmp_path / "plain",
        progress=False,
        priors={"image": prior},
    )
    assert plain["best_val"] < 0.8  # without the prior 40 steps on 36 pairs learn little
    with pytest.warns(UserWarning, match="no label prior applies"):
        train(
            data, directions, TrainConfig(**{**cfg.__dict__, "steps": 2}), tmp_path / "none", progress=False, priors={}
        )


def test_token_inputs_train_on_top_of_the_prior(setup, tmp_path):
    """Token inputs feed the connector; the prior still reads the pooled latents of the same (mixed) rows."""
    import copy

    from omnimoe.align.trainer import load_best, train

    data, prior, _ = setup
    data = copy.copy(data)  # the module's fixture stays pooled-only
    g = torch.Generator().manual_seed(3)
    data.tokens = {}
    for m, x in data.latents.items():  # 3 tokens per row, the last padding: the masked mean is not the pooled vector
        noise = torch.randn(len(x), 1, x.shape[1], generator=g)
        tokens = torch.cat([x[:, None] + noise, x[:, None] - noise, torch.full_like(x[:, None], 50.0)], 1)
        data.tokens[m] = (tokens, torch.tensor([[True, True, False]]).repeat(len(x), 1))
    directions = ["text->image", "image->text"]
    cfg = TrainConfig(
        method="moe-alternating",
        steps=20,
        eval_every=10,
        warmup_steps=5,
        batch_size=16,
        dtype="float32",
        select_on="R@1",
        token_inputs=True,
        prior_weight=4.0,
        connector=ConnectorConfig(hidden_size=32, contrastive_dim=16, num_experts=4, num_experts_per_tok=2),
    )
    result = train(data, directions, cfg, tmp_path / "tok", progress=False, priors={"image": prior})
    assert result["best_val"] == 1.0  # the perfect prior (weighted to dominate) is in the selection score
    rows, weights = fused_rows(
        load_best(cfg, data, directions, tmp_path / "tok"), data, directions, {"image": prior}, cfg
    )
    assert weights == {d: 4.0 for d in directions} and all(r["R@1"] == 1.0 for r in rows)
    plain = train(
        data, directions, TrainConfig(**{**cfg.__dict__, "prior_weight": 0.0}), tmp_path / "plain", progress=False
    )
    assert plain["best_val"] < 0.8


def _prior_loss_worker(rank, world, q_all, k_all, prior):
    from omnimoe.align.losses import gather_rows, info_nce

    n = len(q_all) // world
    mine = slice(rank * n, (rank + 1) * n)
    q, k = q_all[mine].clone().requires_grad_(), k_all[mine]
    ka, offset = gather_rows(k)
    qa, _ = gather_rows(q)
    loss = info_nce(
        q, k, 10.0, key_all=ka, query_all=qa, offset=offset, prior_qk=prior[mine], prior_kq=prior[:, mine].t()
    )
    losses = torch.tensor([loss.item()])
    torch.distributed.all_reduce(losses)
    reference = info_nce(q_all, k_all, 10.0, prior_qk=prior, prior_kq=prior.t())
    assert abs(losses.item() / world - reference.item()) < 1e-5


@pytest.mark.slow
def test_prior_logits_with_gathered_negatives_equal_one_big_batch():
    from distributed import run_distributed

    from omnimoe.align.losses import info_nce

    g = torch.Generator().manual_seed(4)
    q, k, prior = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g), torch.rand(12, 12, generator=g)
    without = info_nce(q, k, 10.0)
    assert (
        info_nce(q, k, 10.0, prior_qk=10 * torch.eye(12), prior_kq=10 * torch.eye(12)) < without
    )  # a prior that knows the pairs helps
    run_distributed(_prior_loss_worker, 2, q, k, prior)


def test_a_fused_score_is_served_as_cos_plus_a_rescaled_prior():
    """z(learned) + beta * z(prior) orders each query's targets as learned + beta * std(learned) / std(prior) *
    prior (the serving weight of omnimoe.align.evaluate.serving_weights): one index can serve the fusion."""
    from omnimoe.align.prior import fuse

    g = torch.Generator().manual_seed(0)
    learned, prior = torch.rand(30, 50, generator=g) * 0.3, torch.rand(30, 50, generator=g) * 2
    for beta in (0.25, 1.0, 4.0):
        w = beta * learned.std() / prior.std()
        assert torch.equal(fuse(learned, prior, beta).argsort(1), (learned + w * prior).argsort(1))
        assert not torch.equal((learned + beta * prior).argsort(1), fuse(learned, prior, beta).argsort(1))
