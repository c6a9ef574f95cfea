"""Expert parallelism in real multi-process gloo runs: parity with one process, checkpoints across world sizes."""

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distributed import run_distributed
from omnimoe.io import load_tensors, save_tensors
from omnimoe.moe import MoEConfig, MoELayer
from omnimoe.moe.parallel import ExpertParallelExperts, data_parallel, expert_parameter_names, parallelize_experts

pytestmark = pytest.mark.slow

H, F, E = 32, 64, 8


def make_layer(seed=0, backend="auto"):
    torch.manual_seed(seed)
    layer = MoELayer(
        MoEConfig(
            hidden_size=H,
            intermediate_size=F,
            num_experts=E,
            num_experts_per_tok=2,
            router_bias=True,
            backend=backend,
            expert_bias=True,
        )
    )
    with torch.no_grad():
        # Uneven load: expert 0 popular, experts 6 and 7 never chosen (so at 4 ranks rank 3 gets no token).
        layer.router.bias.copy_(torch.tensor([1.5, 0.5, 0.0, 0.0, 0.0, -0.5, -1e4, -1e4]))
    return layer


def rank_slices(world):
    sizes = [3 + 5 * r for r in range(world)]  # uneven token counts per rank
    starts = [sum(sizes[:r]) for r in range(world)]
    return [slice(s, s + n) for s, n in zip(starts, sizes)], sum(sizes)


def close(a, b, tol):
    assert (a.float() - b.float()).norm() <= tol * b.float().norm() + tol, (a - b).abs().max()


def _parity_worker(rank, world, dtype_name, backend):
    bf16 = dtype_name == "bfloat16"
    tol = 2e-2 if bf16 else 1e-5
    full = make_layer(backend=backend)
    ref = copy.deepcopy(full)
    ep = parallelize_experts(copy.deepcopy(full))
    assert isinstance(ep.experts, ExpertParallelExperts) and ep.experts.num_experts == E // world
    slices, n = rank_slices(world)
    torch.manual_seed(1)
    x, g = torch.randn(n, H), torch.randn(n, H)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    xr = x[slices[rank]].clone().requires_grad_(True)
    with autocast:
        out = ep(xr)
    (out.hidden_states.float() * g[slices[rank]]).sum().backward()

    xf = x.clone().requires_grad_(True)
    with autocast:
        ref_out = ref(xf)
    (ref_out.hidden_states.float() * g).sum().backward()

    close(out.hidden_states, ref_out.hidden_states[slices[rank]], tol)
    close(xr.grad, xf.grad[slices[rank]], tol)
    first, local = ep.experts.first_expert, ep.experts.num_experts
    for name, p in ep.experts.named_parameters():
        close(p.grad, getattr(ref.experts, name).grad[first : first + local], tol)
    # Replicated router: per-rank gradients sum to the single-process gradient.
    router_grad = ep.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    close(router_grad, ref.router.weight.grad, tol)
    # At 4 ranks, rank 3 holds experts 6 and 7, which no token chose: it computed nothing and still took part.
    assert ref_out.tokens_per_expert[6:].tolist() == [0, 0]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(
    "dtype_name,backend", [("float32", "grouped_mm"), ("float32", "loop"), ("bfloat16", "grouped_mm")]
)
def test_expert_parallel_equals_single_process(world, dtype_name, backend):
    run_distributed(_parity_worker, world, dtype_name, backend)


def _step(layer, x, g, lr=0.1, reduce_replicated=False):
    """One SGD step on loss = sum(out * g); replicated grads summed over ranks when asked."""
    out = layer(x)
    (out.hidden_states * g).sum().backward()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.grad is None:
                continue
            if reduce_replicated and not name.startswith("experts."):
                dist.all_reduce(p.grad)
            p -= lr * p.grad
            p.grad = None
    return out


def _checkpoint_worker(rank, world, src, dst, train):
    """Load the full checkpoint src at this world size, check it, optionally train a step, save to dst."""
    layer = make_layer(seed=1000 + world)  # different weights: everything must come from src
    if world > 1:
        parallelize_experts(layer)
    layer.load_state_dict(load_tensors(src))
    ref = make_layer(seed=7)
    ref.load_state_dict(load_tensors(src))
    slices, n = rank_slices(world)
    torch.manual_seed(2)
    x, g = torch.randn(n, H), torch.randn(n, H)
    with torch.no_grad():
        close(layer(x[slices[rank]]).hidden_states, ref(x).hidden_states[slices[rank]], 1e-5)
    if train:
        _step(layer, x[slices[rank]], g[slices[rank]], reduce_replicated=world > 1)
    state = layer.state_dict()  # collective: all-gathers the expert shards
    assert state["experts.gate_up_proj"].shape == (E, 2 * F, H)
    if rank == 0:
        save_tensors(dst, state)


def test_checkpoint_round_trip_across_world_sizes(tmp_path):
    ckpt = {w: tmp_path / f"w{w}.safetensors" for w in ("start", 1, 2, 4, "back")}
    start = make_layer(seed=0)
    save_tensors(ckpt["start"], start.state_dict())
    # 1 -> 2 (with a training step at 2 ranks) -> 4 -> 1, and 4 -> 2 again.
    run_distributed(_checkpoint_worker, 2, str(ckpt["start"]), str(ckpt[2]), True)
    run_distributed(_checkpoint_worker, 4, str(ckpt[2]), str(ckpt[4]), False)
    run_distributed(_checkpoint_worker, 2, str(ckpt[4]), str(ckpt["back"]), False)

    # The step taken at 2 ranks equals the same step in one process on the union of their batches.
    single = make_layer(seed=3)
    single.load_state_dict(load_tensors(ckpt["start"]))
    slices, n = rank_slices(2)
    torch.manual_seed(2)
    x, g = torch.randn(n, H), torch.randn(n, H)
    _step(single, x, g)
    at2 = load_tensors(ckpt[2])
    for name, value in single.state_dict().items():
        torch.testing.assert_close(at2[name], value, atol=1e-5, rtol=1e-5, msg=name)
    assert not torch.equal(at2["experts.down_proj"], load_tensors(ckpt["start"])["experts.down_proj"])
    # Saved at 4 and at 2 again: bit-identical to what was saved at 2.
    for other in (ckpt[4], ckpt["back"]):
        for name, value in load_tensors(other).items():
            assert torch.equal(value, at2[name]), name
    # And it loads in one plain process.
    plain = make_layer(seed=5)
    plain.load_state_dict(load_tensors(ckpt[4]))


class Block(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.moe = layer

    def forward(self, x):
        h = self.inp(x)
        return h + self.moe(h).hidden_states


def _ddp_worker(rank, world):
    torch.manual_seed(0)
    model = Block(make_layer(seed=0))
    ref = copy.deepcopy(model)
    parallelize_experts(model)
    assert set(expert_parameter_names(model)) == {
        "moe.experts.gate_up_proj",
        "moe.experts.down_proj",
        "moe.experts.gate_up_proj_bias",
        "moe.experts.down_proj_bias",
    }
    ddp = data_parallel(model)
    assert "moe._load_since_update" in ddp.parameters_to_ignore  # per-rank counters are not broadcast
    n = 6  # equal local batches, per-rank mean loss
    torch.manual_seed(3)
    x, g = torch.randn(world * n, H), torch.randn(world * n, H)
    mine = slice(rank * n, (rank + 1) * n)
    (ddp(x[mine]) * g[mine]).mean().backward()
    (ref(x) * g).mean().backward()
    params = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        got = params[name].grad
        if name.startswith("moe.experts."):
            ex = model.moe.experts
            want = p.grad[ex.first_expert : ex.first_expert + ex.num_experts]
        else:
            want = p.grad
        close(got, want, 1e-5)


def test_data_parallel_with_expert_parallel_matches_one_process():
    run_distributed(_ddp_worker, 2)


def test_parallelize_needs_distributed():
    with pytest.raises(RuntimeError, match="torch.distributed"):
        parallelize_experts(make_layer())


def test_torchrun_expert_parallel_training(tmp_path):
    """The user path: torchrun, 2 ranks, EP + DDP training; the checkpoint reloads in one process."""
    import os
    import subprocess
    import sys

    from omnimoe.io import read_json

    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]  # binds its own free port
    cmd = torchrun + ["-m", "omnimoe.demos.expert_parallel", "--out", str(tmp_path), "--steps", "60"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[:2000] + "\n...\n" + out.stderr[-3000:]
    assert "outlived destroy_process_group" not in out.stderr
    summary = read_json(tmp_path / "summary.json")
    assert summary["world_size"] == 2 and summary["experts_per_rank"] == 4
    assert summary["last_mse"] < 0.5 * summary["first_mse"]
    layer = MoELayer.from_pretrained(tmp_path / "moe_layer")
    assert layer.experts.gate_up_proj.shape[0] == 8
    assert torch.isfinite(layer(torch.randn(4, 64)).hidden_states).all()


_SHUTDOWN_PROBE = """
import os, sys
import torch
import torch.distributed as dist

late = sys.argv[1] == "late"
if late:  # the group opened before omnimoe.runtime is imported, as a user script might
    dist.init_process_group("gloo")
from omnimoe.runtime import finish_distributed, init_distributed, process_group_threads

init_distributed()
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 8))
opt = torch.optim.AdamW(model.parameters())  # imports the optimiser's dependencies after the group is open
for _ in range(3):
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    loss = torch.ones(())
    dist.all_reduce(loss)
before = process_group_threads()
del model, opt
finish_distributed()
print(f"rank {os.environ['RANK']} before {len(before)} after {len(process_group_threads())}", flush=True)
"""


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/task").is_dir(), reason="lists threads from /proc")
@pytest.mark.parametrize("order", ["runtime-first", "late"])
def test_torchrun_shutdown_joins_the_process_group_threads(tmp_path, order):
    """After ``finish_distributed`` no gloo thread is left to free a collective's tensors while the interpreter
    shuts down (which aborted ranks at exit now and then). Opened before ``omnimoe.runtime`` is imported, a
    group that torch itself keeps alive is reported instead of passing silently."""
    import os
    import re
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(_SHUTDOWN_PROBE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), order]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = re.findall(r"rank (\d) before (\d+) after (\d+)", out.stdout)  # the two ranks' lines may interleave
    assert sorted(r for r, _, _ in ranks) == ["0", "1"], out.stdout
    for rank, before, after in ranks:
        assert int(before) >= 2  # the group's threads were running
        assert (int(after) == 0) == (order == "runtime-first"), (rank, before, after)
    assert ("outlived destroy_process_group" in out.stderr) == (order == "late")
