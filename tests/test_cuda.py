"""What must hold on a GPU: the MoE backends against the dense oracle in bf16, connector training and its
resume, a Uni-MoE training step, and the NCCL process group as ``omnimoe.runtime`` opens it. Marked ``cuda``:
skipped where no GPU is present (``benchmarks/gpu_check.sh`` runs them with the GPU benchmarks)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)"),
]
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("expert_type,k", [("glu", 2), ("mlp", 4)])
def test_moe_backends_match_the_dense_oracle_in_bf16(expert_type, k):
    from omnimoe.moe import MoEConfig, MoELayer

    torch.manual_seed(0)
    cfg = MoEConfig(
        hidden_size=128, intermediate_size=256, num_experts=8, num_experts_per_tok=k, expert_type=expert_type
    )
    oracle = MoELayer(dataclass_replace(cfg, backend="dense")).to(CUDA)
    x = torch.randn(300, 128, device=CUDA, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = oracle(x).hidden_states.float()
    ref.square().sum().backward()
    ref_grad = oracle.experts.w_in.grad.clone()
    for backend in ("grouped_mm", "loop"):
        layer = MoELayer(dataclass_replace(cfg, backend=backend)).to(CUDA)
        layer.load_state_dict(oracle.state_dict())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x).hidden_states.float()
        out.square().sum().backward()
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)  # bf16 matmuls, other summation orders
        torch.testing.assert_close(layer.experts.w_in.grad, ref_grad, rtol=5e-2, atol=5e-2)
    cpu = MoELayer(dataclass_replace(cfg, backend="loop"))
    cpu.load_state_dict({k: v.cpu() for k, v in oracle.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(
            cpu(x.detach().cpu()).hidden_states, oracle(x.detach()).hidden_states.cpu(), rtol=1e-4, atol=1e-4
        )  # fp32: CUDA and CPU agree


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_connector_trains_and_resumes_on_cuda(tmp_path):
    """A connector trained on CUDA learns, and a run cut at step 40 resumes to the same result (the CUDA RNG
    state is in the checkpoint)."""
    from omnimoe.align.config import TrainConfig
    from omnimoe.align.connector import ConnectorConfig
    from omnimoe.align.data import AlignmentData
    from omnimoe.align.trainer import train
    from omnimoe.data.manifest import write_manifest
    from omnimoe.latents.store import write_store

    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g)
    b = torch.tanh(a @ torch.randn(16, 24, generator=g))
    ids = [f"s{i}" for i in range(200)]
    recs = [{"id": s, "split": "test" if i % 5 == 0 else "train", "text": f"c{i}"} for i, s in enumerate(ids)]
    manifest = write_manifest(tmp_path / "m.jsonl", recs)
    write_store(tmp_path / "a", ids, a, {"encoder": "a", "modality": "a"})
    write_store(tmp_path / "b", ids, b, {"encoder": "b", "modality": "b"})
    data = AlignmentData(manifest, {"a": tmp_path / "a", "b": tmp_path / "b"})
    cfg = TrainConfig(
        steps=80,
        eval_every=20,
        warmup_steps=5,
        batch_size=32,
        lr=3e-3,
        select_on="R@1",
        device="cuda",
        connector=ConnectorConfig(hidden_size=32, contrastive_dim=16, num_experts=4, num_experts_per_tok=2),
    )
    full = train(data, ["a->b", "b->a"], cfg, tmp_path / "full", progress=False)
    assert full["best_val"] > 0.3  # learnt (chance is about 1/40)
    train(data, ["a->b", "b->a"], cfg, tmp_path / "cut", progress=False, stop_at_step=40)
    resumed = train(data, ["a->b", "b->a"], cfg, tmp_path / "cut", progress=False)
    assert resumed["best_step"] == full["best_step"]
    assert resumed["best_val"] == pytest.approx(full["best_val"], abs=0.03)  # CUDA kernels may reorder sums


def test_uni_moe_training_step_on_cuda():
    """A tiny Uni-MoE LM (every FFN an MoE, a connector) takes fused-AdamW steps on CUDA in bf16 autocast and
    its loss falls."""
    from omnimoe.mllm import ConnectorSpec, MediaBatch, MoELLMConfig, MultimodalLLM, moefy
    from omnimoe.mllm.llm import add_placeholders, load_llm
    from omnimoe.runtime import adamw

    llm, tok = load_llm("tiny:llama", tiny_hidden=64, tiny_layers=2)
    ids = add_placeholders(llm, tok, ["image"])
    moefy(llm, MoELLMConfig(layers="all", num_experts=4, num_experts_per_tok=2, noise_std=0.01))
    model = MultimodalLLM(llm, {"image": ConnectorSpec(in_dim=16, out_dim=64)}, ids).to(CUDA)
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0, device=CUDA)
    x = torch.randint(0, 200, (4, 24), generator=torch.Generator().manual_seed(0)).to(CUDA)
    x[:, 2] = ids["image"]
    media = {"image": MediaBatch(torch.randn(4, 1, 16, device=CUDA), torch.ones(4, 1, dtype=torch.bool, device=CUDA))}
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, torch.ones_like(x), x.masked_fill(x == ids["image"], -100), media)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_nccl_process_group_through_the_runtime(tmp_path):
    """``omnimoe.runtime.init_distributed`` under torchrun on the GPU: the CPU and CUDA backends of one group
    (gloo and NCCL) both reduce, and the trainers' row gathering works on CUDA tensors."""
    script = tmp_path / "nccl.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from omnimoe.runtime import init_distributed, finish_distributed\n"
        "from omnimoe.align.losses import gather_rows\n"
        "rank, world = init_distributed()\n"
        "assert dist.is_initialized() and 'nccl' in str(dist.get_backend())\n"
        "t = torch.ones(3, device='cuda') * (rank + 1); dist.all_reduce(t); assert t.tolist() == [float(world * (world + 1) // 2)] * 3\n"
        "c = torch.ones(2) * (rank + 1); dist.all_reduce(c); assert c.tolist() == [float(world * (world + 1) // 2)] * 2\n"
        "rows, offset = gather_rows(torch.full((2, 4), float(rank), device='cuda')); assert rows.shape == (2 * world, 4) and offset == 2 * rank\n"
        "finish_distributed(); print('ok', world)\n"
    )
    env = {**os.environ, "OMNIMOE_DISTRIBUTED": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(torch.cuda.device_count()),
            str(script),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
