"""The alignment trainer on stored latents of a synthetic paired task (real store format, no encoders)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from omnimoe.align.connector import ConnectorConfig
from omnimoe.align.data import AlignmentData
from omnimoe.align.trainer import METHODS, TrainConfig, evaluate, load_best, lr_at, mean_r1, train, weight_decay_at
from omnimoe.data.manifest import write_manifest
from omnimoe.latents.store import StoreError, write_store

DIRS = ["a->b", "b->a"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """b is a fixed nonlinear function of a plus noise; 300 samples, captions unique, a test split."""
    folder = tmp_path_factory.mktemp("pairs")
    g = torch.Generator().manual_seed(0)
    n = 300
    a = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 24, generator=g)
    b = torch.tanh(a @ w) + 0.1 * torch.randn(n, 24, generator=g)
    ids = [f"s{i}" for i in range(n)]
    recs = [
        {"id": sid, "split": "test" if i % 5 == 0 else "train", "text": f"caption {i}"} for i, sid in enumerate(ids)
    ]
    manifest = write_manifest(folder / "m.jsonl", recs)
    write_store(folder / "a", ids, a, {"encoder": "synthetic-a", "modality": "a"}, shard_size=128)
    write_store(folder / "b", ids[::-1], b.flip(0), {"encoder": "synthetic-b", "modality": "b"})  # other row order
    return AlignmentData(manifest, {"a": folder / "a", "b": folder / "b"})


def small(**kw):
    base = dict(
        steps=150,
        batch_size=64,
        eval_every=50,
        warmup_steps=10,
        dtype="float32",
        lr=3e-3,
        select_on="R@1",
    )
    arch = dict(
        hidden_size=32, contrastive_dim=16, num_experts=4, num_experts_per_tok=2, dropout=0.0, linear_path=False
    )
    arch.update({k: kw.pop(k) for k in list(kw) if k in arch})
    return TrainConfig(**{**base, **kw}, connector=ConnectorConfig(**arch))


def test_pairs_and_validation_split(data):
    train, val, test = (data.pairs("a->b", s) for s in ("train", "val", "test"))
    assert len(test) == 60 and len(train) + len(val) == 240 and 10 < len(val) < 45
    assert not set(train.ids) & set(val.ids)
    i = train.ids.index("s7")
    # rows follow each store's own order: b was written reversed
    assert data.row["a"]["s7"] == int(train.src_rows[i]) == 7 and int(train.tgt_rows[i]) == 299 - 7
    with pytest.raises(ValueError, match="no latent store for modality 'c'"):
        data.pairs("a->c", "train")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns_the_pairing(data, method, tmp_path):
    result = train(data, DIRS, small(method=method), tmp_path, progress=False)
    model = load_best(small(method=method), data, DIRS, tmp_path)
    rows = evaluate(model, data, DIRS, "test")
    chance = 1 / 60
    assert mean_r1(rows) > 10 * chance, rows
    heads = {r["head"] for r in rows}
    assert heads == ({"contrastive"} if method == "linear" else {"contrastive", "regression"})
    assert (
        result["best_val"] > 0 and json.loads((tmp_path / "train.json").read_text())["best_step"] == result["best_step"]
    )


@pytest.mark.parametrize("method", ["moe-alternating", "mlp-alternating"])
def test_linear_start_begins_from_the_linear_method_and_can_keep_it(data, method, tmp_path):
    """``linear_start``: the connector starts from the ``linear`` method's own run (same settings and seed),
    judged on validation as step 0, and keeps it when no residual step beats it on validation (here the
    residuals cannot move: lr ~ 0); with the residuals free to learn, it ends at least as good on validation,
    its linear path unchanged (frozen)."""
    reference = train(data, DIRS, small(method="linear", min_lr=0.0), tmp_path / "linear", progress=False)
    for lr, folder in ((3e-3, "learns"), (1e-12, "still")):
        cfg = small(method=method, linear_path=True, linear_start=True, lr=lr, min_lr=0.0)
        result = train(data, DIRS, cfg, tmp_path / folder, progress=False)
        start = result["history"][0]
        linear = dataclasses.replace(cfg, method="linear", linear_start=False)
        tower = load_best(linear, data, DIRS, tmp_path / folder / "linear-start")
        assert (
            start["step"] == 0
            and start["val_score"] == train(data, DIRS, linear, tmp_path / folder / "linear-start")["best_val"]
        )
        model = load_best(cfg, data, DIRS, tmp_path / folder)
        for m, proj in tower.proj.items():  # frozen: the linear two-tower inside is the linear run's
            assert torch.equal(model.linear[m].weight, proj.weight)
        if folder == "learns":  # the linear method's own run (default lr schedule here)
            assert start["val_score"] == reference["best_val"] > 0.5 and result["best_val"] >= reference["best_val"]
            assert torch.equal(
                tower.proj["a"].weight,
                load_best(small(method="linear", min_lr=0.0), data, DIRS, tmp_path / "linear").proj["a"].weight,
            )
    # lr ~ 0: no residual step beat the linear start on validation, so it is kept, and tests as the tower does
    assert result["best_step"] == 0 and len(result["history"]) > 1
    rows, kept = (evaluate(m, data, DIRS, "test") for m in (tower, model))
    assert [r["R@1"] for r in rows] == [r["R@1"] for r in kept if r["head"] == "contrastive"]


def test_residual_per_direction_keeps_a_residual_only_where_validation_says_it_helps(data, tmp_path):
    """``residual_per_direction``: after training, a direction whose residual (MoE head + target projection)
    does not beat the linear path alone on validation is zeroed and then scores exactly as the linear
    two-tower; one that does is left as trained. A residual spoiled on purpose is dropped; the test split is
    never read (NaN there changes nothing)."""
    from omnimoe.align.evaluate import keep_residuals_that_help, selection_score

    cfg = small(method="moe-alternating", linear_path=True, linear_start=True, residual_per_direction=True)
    train(data, DIRS, cfg, tmp_path, progress=False)
    model = load_best(cfg, data, DIRS, tmp_path)
    tower = load_best(
        dataclasses.replace(cfg, method="linear", linear_start=False), data, DIRS, tmp_path / "linear-start"
    )
    with torch.no_grad():
        for p in model.residual_parameters("b->a"):
            p.add_(torch.randn_like(p) * 10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    own = {}
    for d in DIRS:
        with_residual = selection_score(evaluate(model, data, [d], "val", cfg=cfg), cfg.select_on)
        bare = load_best(cfg, data, DIRS, tmp_path)  # the same weights, the residual of d zeroed by hand
        if d == "b->a":
            bare.load_state_dict({n: v.clone() for n, v in before.items()}, strict=False)
        with torch.no_grad():
            for p in bare.residual_parameters(d):
                p.zero_()
        own[d] = with_residual > selection_score(evaluate(bare, data, [d], "val", cfg=cfg), cfg.select_on)
    test = [data.row["b"][sid] for sid in data.pairs("a->b", "test").ids]
    saved = data.latents["b"][test].clone()
    data.latents["b"][test] = float("nan")  # the fixture is shared: restored below
    try:
        kept = keep_residuals_that_help(model, data, DIRS, cfg)
    finally:
        data.latents["b"][test] = saved
    assert kept == own and kept["b->a"] is False
    for d in DIRS:
        residual = model.residual_parameters(d)
        assert all((p == 0).all() for p in residual) != kept[d]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "b_to_a" not in n or kept["b->a"])
    rows, alone = (evaluate(m, data, ["b->a"], "val") for m in (tower, model))
    assert [r["R@1"] for r in rows] == [r["R@1"] for r in alone if r["head"] == "contrastive"]
    assert keep_residuals_that_help(tower, data, DIRS, cfg) == {}  # the linear method has no residual


def test_linear_start_without_a_linear_path_does_nothing(data, tmp_path):
    result = train(data, DIRS, small(method="moe-alternating", linear_start=True, steps=50), tmp_path, progress=False)
    assert result["history"][0]["step"] > 0 and not (tmp_path / "linear-start").exists()  # no step-0 start


def test_resume_after_interruption_gives_the_same_result(data, tmp_path):
    cfg = small(method="moe-alternating", dropout=0.1)
    full = train(data, DIRS, cfg, tmp_path / "full", progress=False)
    assert train(data, DIRS, cfg, tmp_path / "cut", progress=False, stop_at_step=120) == {"interrupted_at": 120}
    assert (
        torch.load(tmp_path / "cut" / "state.pt", weights_only=False)["step"] == 100
    )  # steps 101-120 are lost, redone
    stale = tmp_path / "cut" / ".best.pt.x1y2.tmp"  # what a kill during a write leaves
    stale.write_bytes(b"half a checkpoint")
    resumed = train(data, DIRS, cfg, tmp_path / "cut", progress=False)
    assert resumed == full and not stale.exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def steps(folder):
        acc = EventAccumulator(str(folder / "tb"))
        acc.Reload()
        return {tag: [e.step for e in acc.Scalars(tag)] for tag in ("train/loss", "val/mean_R@1")}

    assert steps(tmp_path / "cut") == steps(tmp_path / "full")  # no step logged twice, none missing
    a = torch.load(tmp_path / "full" / "state.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "state.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="another config"):
        train(data, DIRS, small(method="moe-alternating", lr=1e-2), tmp_path / "full", progress=False)


def test_a_finished_run_called_again_trains_no_further(data, tmp_path):
    """Calling train on a finished run's folder (e.g. `omnimoe align` again with more seeds) returns its result;
    a run that stopped early must not wake up and train on."""
    cfg = small(method="mlp-alternating", eval_every=10, patience=2, lr=3e-2)
    first = train(data, DIRS, cfg, tmp_path / "run", progress=False)
    assert first["stopped_early"]
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert train(data, DIRS, cfg, tmp_path / "run", progress=False) == first
    again = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert again["step"] == state["step"] < cfg.steps and all(
        torch.equal(again["model"][k], v) for k, v in state["model"].items()
    )


def test_selection_score_reads_the_judged_head_and_metric():
    from omnimoe.align.evaluate import selection_score

    rows = [
        {"query": "text", "target": "image", "head": "contrastive", "R@1": 0.1, "R@5": 0.4, "R@10": 0.7},
        {"query": "text", "target": "image", "head": "contrastive+prior", "R@1": 0.3, "R@5": 0.6, "R@10": 0.9},
        {"query": "image", "target": "text", "head": "contrastive", "R@1": 0.2, "R@5": 0.5, "R@10": 0.5},
        {"query": "image", "target": "text", "head": "regression", "R@1": 0.9, "R@5": 0.9, "R@10": 0.9},
    ]
    assert selection_score(rows) == pytest.approx((0.3 + 0.2) / 2)  # +prior where present, never regression
    assert selection_score(rows, "R@10") == pytest.approx((0.9 + 0.5) / 2)
    assert selection_score(rows, "mean") == pytest.approx((0.6 + 0.4) / 2)
    with pytest.raises(ValueError, match="select_on"):
        selection_score(rows, "R@3")


def test_bad_select_on_fails_before_training():
    from omnimoe.config import ConfigError

    with pytest.raises(ConfigError, match="select_on: 'R@3' is not one of"):
        small(select_on="R@3")  # refused by the recipe, before any training or output folder


def test_lr_schedule_and_store_writer_checks(tmp_path):
    cfg = small(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    assert lr_at(cfg, 0) == pytest.approx(1e-4) and lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 100) == pytest.approx(1e-5) and lr_at(cfg, 55) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-3)
    # weight decay ramps linearly from weight_decay to weight_decay_end over the run, then stays
    wd = small(steps=100, weight_decay=0.05, weight_decay_end=0.5)
    assert [weight_decay_at(wd, s) for s in (0, 50, 100, 150)] == pytest.approx([0.05, 0.275, 0.5, 0.5])
    with pytest.raises(StoreError, match="NaN"):
        write_store(tmp_path / "s", ["x"], torch.tensor([[float("nan")]]), {"encoder": "e", "modality": "m"})
    with pytest.raises(StoreError, match="unique"):
        write_store(tmp_path / "s", ["x", "x"], torch.zeros(2, 3), {"encoder": "e", "modality": "m"})


def test_augmentation_keeps_pairs_aligned():
    from omnimoe.align.trainer import augment

    src = torch.arange(8, dtype=torch.float32).repeat(2, 1).t()  # row i = [i, i]
    tgt = 10 * src
    torch.manual_seed(0)
    s, t, _, _ = augment(small(mixup_alpha=0.5), src, tgt, torch.ones(2), torch.Generator().manual_seed(1))
    torch.testing.assert_close(t, 10 * s)  # source and target mixed with the same weights
    assert not torch.equal(s, src)
    s2, t2, _, _ = augment(
        small(input_noise=0.5, mixup_alpha=0.0), src, tgt, torch.ones(2), torch.Generator().manual_seed(1)
    )
    assert torch.equal(t2, tgt) and 0.2 < (s2 - src).std() < 0.8  # noise only on the source side
    tokens = src[:, None, :].repeat(1, 3, 1)  # (8, 3, 2) token inputs, row i's tokens all = i
    mask = torch.tensor([[1, 1, 0]] * 4 + [[1, 0, 0]] * 4, dtype=torch.bool)
    torch.manual_seed(0)
    s3, t3, m3, p3 = augment(
        small(mixup_alpha=0.5), tokens, tgt, torch.ones(2), torch.Generator().manual_seed(1), mask, src
    )
    torch.testing.assert_close(t3, 10 * s3[:, 0])  # same weights for every token and the target
    torch.testing.assert_close(p3, s3[:, 0])  # and for the pooled rows the label prior reads
    assert (m3 >= mask).all() and m3.shape == mask.shape  # the mixed row keeps the tokens of both


def _train_script(tmp_path, data, config: str, distributed: bool = False):
    """A script that trains on the fixture's stores with ``TrainConfig(<config>)``; returns (path, its first args)."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from omnimoe.align.data import AlignmentData\n"
        "from omnimoe.align.connector import ConnectorConfig\n"
        "from omnimoe.align.trainer import TrainConfig, train\n"
        "data = AlignmentData(sys.argv[1], {'a': sys.argv[2], 'b': sys.argv[3]})\n"
        f"cfg = TrainConfig({config})\n"
        "train(data, ['a->b', 'b->a'], cfg, sys.argv[4], progress=False)\n"
        + ("import torch.distributed as dist; dist.destroy_process_group()\n" if distributed else "")
    )
    folder = Path(str(data.manifest_path)).parent
    return script, [str(data.manifest_path), str(folder / "a"), str(folder / "b")]


SMALL = (
    "select_on='R@1', batch_size=32, eval_every=50, warmup_steps=10, dtype='float32', lr=3e-3, "
    "connector=ConnectorConfig(hidden_size=32, contrastive_dim=16, num_experts=4, num_experts_per_tok=2)"
)


def _gathered_loss_worker(rank, world, q_all, k_all):
    from omnimoe.align.losses import gather_rows, info_nce

    torch.manual_seed(0)
    proj = torch.nn.Linear(8, 8)
    n = len(q_all) // world
    q = proj(q_all[rank * n : (rank + 1) * n])
    k = k_all[rank * n : (rank + 1) * n]
    ka, offset = gather_rows(k)
    qa, _ = gather_rows(q)
    loss = info_nce(q, k, 10.0, key_all=ka, query_all=qa, offset=offset)
    loss.backward()
    grad = proj.weight.grad.clone()
    torch.distributed.all_reduce(grad)
    grad /= world  # what DDP does
    losses = torch.tensor([loss.item()])
    torch.distributed.all_reduce(losses)
    torch.manual_seed(0)
    ref = torch.nn.Linear(8, 8)
    ref_loss = info_nce(ref(q_all), k_all, 10.0)
    ref_loss.backward()
    assert abs(losses.item() / world - ref_loss.item()) < 1e-5
    torch.testing.assert_close(grad, ref.weight.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_gathered_negatives_equal_one_big_batch():
    from distributed import run_distributed

    g = torch.Generator().manual_seed(3)
    run_distributed(_gathered_loss_worker, 2, torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g))


@pytest.mark.slow
def test_torchrun_ddp_training(data, tmp_path):
    import subprocess
    import sys

    script, args = _train_script(tmp_path, data, f"steps=150, learnable_temperature=True, {SMALL}", distributed=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
        *args,
        str(tmp_path / "out"),
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "train.json").read_text())
    assert result["best_val"] > 0.2  # far above chance (1/~25 val pairs)
    state = torch.load(tmp_path / "out" / "state.pt", weights_only=False)
    assert state["step"] == 150 and "log_scale" in {k.split(".")[-1] for k in state["scale"]}


def test_tensorboard_scalars(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(data, DIRS, small(steps=60, eval_every=20), tmp_path, progress=False)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/mean_R@1", "train/loss/a->b", "val/contrastive/a->b/R@1"} <= tags
    assert [e.step for e in acc.Scalars("val/mean_R@1")] == [20, 40, 60]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    script, args = _train_script(tmp_path, data, f"steps=400, patience=100, {SMALL}")

    def cmd(out):
        return [sys.executable, str(script), *args, str(out)]

    assert subprocess.run(cmd(tmp_path / "full"), capture_output=True, timeout=600).returncode == 0
    proc = subprocess.Popen(cmd(tmp_path / "cut"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    state = tmp_path / "cut" / "state.pt"

    def reached() -> int:  # the step of the last checkpoint (written atomically: never seen half-written)
        return torch.load(state, weights_only=False)["step"] if state.exists() else -1

    while reached() < 50 and time.time() < deadline and proc.poll() is None:  # past the linear start's step 0
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = torch.load(tmp_path / "cut" / "state.pt", weights_only=False)["step"]
    assert 50 <= step < 400, "the kill must land mid-run"
    assert subprocess.run(cmd(tmp_path / "cut"), capture_output=True, timeout=600).returncode == 0
    a = torch.load(tmp_path / "full" / "state.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "state.pt", weights_only=False)
    assert a["history"] == b["history"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_adaptive_schedule_is_selectable(data, tmp_path):
    from omnimoe.align.trainer import schedule_for

    assert schedule_for(small(method="moe-alternating"), DIRS).kind == "alternate"
    assert schedule_for(small(method="moe-joint"), DIRS).kind == "joint"
    cfg = small(method="moe-alternating", schedule="adaptive", steps=100)
    assert schedule_for(cfg, DIRS).kind == "adaptive"
    result = train(data, DIRS, cfg, tmp_path, progress=False)
    assert result["best_val"] > 0.1
    with pytest.raises(ValueError, match="alternate, adaptive or joint"):
        train(data, DIRS, small(schedule="sometimes"), tmp_path / "bad", progress=False)


def test_device_option(data, tmp_path):
    """``device`` picks where training runs; a checkpoint written on one device resumes on another (the
    device is not part of the resumable config); asking for CUDA where there is none is a clear error."""
    from omnimoe.align.trainer import resolve_device

    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    cfg = small(method="moe-alternating", device="cpu")
    assert train(data, DIRS, cfg, tmp_path / "a", progress=False, stop_at_step=120) == {"interrupted_at": 120}
    resumed = train(data, DIRS, small(method="moe-alternating", device="auto"), tmp_path / "a", progress=False)
    assert resumed == train(data, DIRS, cfg, tmp_path / "b", progress=False)


def test_without_validation_pairs_the_last_weights_are_kept(data, tmp_path):
    """No val split (none in the manifest, none carved): early stopping has nothing to judge by, so it is
    off, the user is told, and best.pt holds the last weights, not the first evaluation's."""
    no_val = AlignmentData(
        data.manifest_path, {"a": data.manifest_path.parent / "a", "b": data.manifest_path.parent / "b"}, val_fraction=0
    )
    assert not len(no_val.pairs("a->b", "val"))
    cfg = small(method="linear", steps=60, eval_every=20, patience=1)
    with pytest.warns(UserWarning, match="no validation pairs"):
        result = train(no_val, DIRS, cfg, tmp_path / "run", progress=False)
    assert result["best_step"] == 60 and not result["stopped_early"]
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert best["step"] == 60 and all(torch.equal(best["model"][k], state["model"][k]) for k in best["model"])


@pytest.mark.slow
def test_one_rank_process_group_when_asked(tmp_path):
    """OMNIMOE_DISTRIBUTED=1 under torchrun with one process: the runtime opens the process group anyway (the
    GPU check uses it for NCCL on one GPU); without it, one process runs without a group."""
    import os
    import subprocess
    import sys

    script = tmp_path / "one.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from omnimoe.runtime import init_distributed, finish_distributed\n"
        "rank, world = init_distributed()\n"
        "print('group', dist.is_initialized(), world)\n"
        "if dist.is_initialized():\n"
        "    t = torch.ones(2); dist.all_reduce(t); print('sum', t.tolist())\n"
        "finish_distributed()\n"
    )
    root = Path(__file__).resolve().parents[1]
    for flag, expected in (("1", "group True 1"), ("0", "group False 1")):
        env = {**os.environ, "OMNIMOE_DISTRIBUTED": flag, "PYTHONPATH": str(root)}
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", str(script)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert done.returncode == 0 and expected in done.stdout, done.stdout + done.stderr[-2000:]
