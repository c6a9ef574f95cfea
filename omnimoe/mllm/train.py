"""The three Uni-MoE training stages, one recipe dataclass, one loop.

* **Stage 1** (connector alignment): only the connectors train; the LLM is frozen. Data: caption /
  transcription pairs and the instruction questions. ``prealign.steps > 0`` first fits the connectors in
  latent space (``omnimoe.mllm.prealign``: soft tokens onto the LM's embeddings of the answers, no LM
  forward). Output ``connectors.safetensors``.
* **Stage 2** (modality-specific experts): for every modality group of the data (``image``, ``speech``...),
  a fresh copy of the LLM trains the FFNs of the layers that will become MoE (connectors from stage 1, frozen)
  on that group's instruction data. Output ``<group>/ffn.safetensors``: the expert candidates.
* **Stage 3** (MoE + LoRA on mixed data): every chosen FFN becomes an MoE whose experts are the base FFN plus
  the stage-2 FFNs; PEFT LoRA goes on attention and on every expert; routers and connectors train fully;
  batches are grouped by modality. Output ``model/`` (``MultimodalLLM.save_pretrained`` plus the tokenizer),
  whose config records which stage-2 run every expert came from. ``dense: true`` trains the comparison
  instead: a dense FFN with the MoE's active parameters (``omnimoe.mllm.baselines``), same data and LoRA.

Every stage resumes from ``state.pt`` after a kill (same final weights as an uninterrupted run), shows a
progress bar, logs TensorBoard scalars under ``tb/``, and runs under torchrun (DDP; stage 3 can put the
experts in expert parallelism: each rank holds ``num_experts / world`` of them; the saved model is whole).
Paths a stage folder records (``stage.json``) are relative to it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from omnimoe.config import ConfigError, check_ranges, from_dict
from omnimoe.io import atomic_path, read_json, relative_path, write_json
from omnimoe.threads import ThreadPolicy, work_of
from omnimoe.runtime import (
    adamw,
    autocast_dtype,
    init_distributed,
    is_rank0,
    remove_temporaries,
    require_finite,
    resolve_device,
    restore_rng,
    rng_state,
    save_checkpoint,
    tensorboard,
    warmup_cosine,
)
from omnimoe.mllm.connectors import ConnectorSpec, embedding_rms
from omnimoe.mllm.data import ConversationData, MediaFeatures, read_conversations, report_bad, template_for
from omnimoe.mllm.llm import load_llm_with_placeholders
from omnimoe.mllm.model import MultimodalLLM, causal_lm
from omnimoe.mllm.moe_llm import MoELLMConfig, decoder_layers, select_layers
from omnimoe.mllm.prealign import PrealignRecipe, prealign


@dataclass
class ConnectorRecipe:
    kind: str = "mlp"  # mlp | qformer
    hidden_dim: int = 0
    max_tokens: int = 0
    num_queries: int = 32
    num_layers: int = 2
    num_heads: int = 8
    dropout: float = 0.0
    norm: bool = True  # soft tokens RMS-normalised to the LM's text-embedding scale (learnable gain)
    global_token: bool = False  # mlp: one more soft token from the mean of the item's encoder tokens

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "hidden_dim": "[0, inf)",
                "max_tokens": "[0, inf)",
                "num_queries": "[1, inf)",
                "num_layers": "[1, inf)",
                "num_heads": "[1, inf)",
                "dropout": "[0, 1)",
            },
        )


@dataclass
class LoRARecipe:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05  # on attention; PEFT's expert (parameter) LoRA has none
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    experts: bool = True  # one adapter per expert (and on the dense baseline's FFN)
    merge: bool = True  # fold the adapters into the saved model

    def __post_init__(self) -> None:
        check_ranges(self, {"r": "[1, inf)", "alpha": "(0, inf)", "dropout": "[0, 1)"})


@dataclass
class MLLMTrainConfig:
    stage: int = 1
    llm: str = "gemma3-270m"  # gemma3-270m | hf:<id or folder> | tiny:<llama|qwen2|mistral|gemma3>
    tiny_hidden: int = 64
    tiny_layers: int = 2
    encoders: dict[str, str] = field(default_factory=lambda: {"image": "efficientnet-lite0", "audio": "whisper-tiny"})
    connectors: dict[str, ConnectorRecipe] = field(  # modality -> its connector (YAML: a mapping of settings)
        default_factory=lambda: {
            "image": ConnectorRecipe(),
            "audio": ConnectorRecipe(max_tokens=32),
            "video": ConnectorRecipe(),
        }
    )
    template: str = "auto"  # chat template: auto | gemma | chatml | llama3 | vicuna
    data: str = ""  # training file (LLaVA-style JSON)
    eval_data: str = ""  # held-out file, scored at the end (omnimoe.mllm.evaluate)
    features: str = ""  # encoder feature cache; default: <data folder>/features
    init: str = ""  # stage 2/3: the stage-1 folder (its connectors)
    experts: dict[str, str] = field(
        default_factory=dict
    )  # stage 3: group -> stage-2 folder (its FFN becomes an expert)
    groups: list[str] = field(default_factory=list)  # stage 2: groups to train (default: every group in the data)
    moe: MoELLMConfig = field(default_factory=MoELLMConfig)  # stage 2: whose FFNs train; stage 3: the MoE
    dense: bool = False  # stage 3: the dense equal-active baseline instead of the MoE
    expert_parallel: bool = False  # stage 3 under torchrun: shard the experts over the ranks
    lora: LoRARecipe = field(default_factory=LoRARecipe)
    prealign: PrealignRecipe = field(default_factory=PrealignRecipe)  # stage 1: latent-space connector warm start
    steps: int = 200  # optimizer steps (per group in stage 2)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4  # LoRA / FFNs
    connector_lr: float = 1e-3  # connectors and routers
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    loss_per: str = (
        "token"  # token: mean over every answer token of a batch | sample: each record's answer weighs the same
    )
    grouped_batches: bool = True
    max_len: int = 512
    seed: int = 0
    dtype: str = "auto"  # auto (bf16 autocast where this CPU runs it fast, or on CUDA) | float32 | bfloat16
    device: str = "auto"
    save_every: int = 50
    log_every: int = 10
    eval_batch_size: int = 16
    eval_max_new_tokens: int = 24
    eval_limit: int = 0  # 0: every held-out record

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ConfigError(f"stage: {self.stage!r} is not one of 1, 2, 3")
        check_ranges(
            self,
            {
                "tiny_hidden": "[1, inf)",
                "tiny_layers": "[1, inf)",
                "steps": "[1, inf)",
                "batch_size": "[1, inf)",
                "grad_accum": "[1, inf)",
                "lr": "(0, inf)",
                "connector_lr": "(0, inf)",
                "weight_decay": "[0, inf)",
                "warmup_steps": "[0, inf)",
                "min_lr_ratio": "[0, 1]",
                "grad_clip": "[0, inf)",
                "max_len": "[2, inf)",
                "seed": "[0, inf)",
                "save_every": "[1, inf)",
                "log_every": "[1, inf)",
                "eval_batch_size": "[1, inf)",
                "eval_max_new_tokens": "[1, inf)",
                "eval_limit": "[0, inf)",
            },
        )
        connectors = {}
        for m, recipe in self.connectors.items():  # typed now: a bad key fails before any extraction
            if not isinstance(recipe, (dict, ConnectorRecipe)):
                raise ConfigError(f"connectors.{m}: expected a mapping of connector settings, got {recipe!r}")
            connectors[m] = (
                recipe
                if isinstance(recipe, ConnectorRecipe)
                else from_dict(ConnectorRecipe, dict(recipe), prefix=f"connectors.{m}.")
            )
        self.connectors = connectors
        if isinstance(self.moe, dict):
            self.moe = from_dict(MoELLMConfig, self.moe, prefix="moe.")
        if isinstance(self.lora, dict):
            self.lora = from_dict(LoRARecipe, self.lora, prefix="lora.")
        if isinstance(self.prealign, dict):
            self.prealign = from_dict(PrealignRecipe, self.prealign, prefix="prealign.")


# -- building -------------------------------------------------------------------------------------------------
def connector_specs(
    cfg: MLLMTrainConfig, dims: dict[str, int], width: int, modalities: list[str], embed_rms: float = 1.0
) -> dict[str, ConnectorSpec]:
    """The connectors of ``modalities``; those whose recipe has ``norm`` end at the LM's ``embed_rms``."""
    specs = {}
    for m in modalities:
        recipe = dataclasses.asdict(cfg.connectors.get(m) or ConnectorRecipe())
        scale = embed_rms if recipe.pop("norm") else 0.0
        specs[m] = ConnectorSpec(in_dim=dims[m], out_dim=width, out_scale=scale, **recipe)
    return specs


def features_for(cfg: MLLMTrainConfig, files: list[Path], progress: bool = True) -> MediaFeatures:
    cache = Path(cfg.features) if cfg.features else Path(files[0]).resolve().parent / "features"
    init_distributed()  # under torchrun the extraction is collective: every rank encodes its share of the shards
    return MediaFeatures.build(files, cfg.encoders, cache, progress=progress)


def base_model(cfg: MLLMTrainConfig, modalities: list[str], dims: dict[str, int]) -> tuple[MultimodalLLM, Any]:
    """The LLM with placeholders and fresh connectors for ``modalities`` (seeded: the same on every rank)."""
    llm, tokenizer, ids = load_llm_with_placeholders(
        cfg.llm, modalities, tiny_hidden=cfg.tiny_hidden, tiny_layers=cfg.tiny_layers, seed=cfg.seed
    )
    width = causal_lm(llm).get_input_embeddings().weight.shape[1]
    torch.manual_seed(cfg.seed)
    specs = connector_specs(cfg, dims, width, modalities, embedding_rms(causal_lm(llm)))
    return MultimodalLLM(llm, specs, ids), tokenizer


def _stage_modalities(dims: dict[str, int], cfg: MLLMTrainConfig) -> list[str]:
    return [m for m in ("image", "audio", "video") if m in dims and m in cfg.connectors]


def _load_connectors(model: MultimodalLLM, folder: Path) -> None:
    from safetensors.torch import load_file

    path = folder / "connectors.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: init must be a finished stage-1 folder")
    state = load_file(str(path))
    own = model.connectors.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise ValueError(
            f"{path}: the connectors do not match this recipe's modalities/encoders/LLM (stage 1 had "
            f"{sorted({k.split('.')[0] for k in state})})"
        )
    model.connectors.load_state_dict(state)


def _ffn_state(llm: nn.Module, layers: list[int]) -> dict[str, torch.Tensor]:
    blocks = decoder_layers(llm)
    return {f"{i}.{k}": v.detach().cpu().contiguous() for i in layers for k, v in blocks[i].mlp.state_dict().items()}


# -- the loop -------------------------------------------------------------------------------------------------
def _same_recipe(saved: dict[str, Any], cfg: MLLMTrainConfig) -> bool:
    """Whether a checkpoint's recipe is ``cfg`` (the device aside), read as a recipe: a connector written
    with only the settings it changed equals the full one."""
    try:
        before = from_dict(MLLMTrainConfig, {**saved, "device": cfg.device})
    except ConfigError:
        return False
    return before == cfg


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}


def train_loop(
    model: MultimodalLLM,
    data: ConversationData,
    groups: list[dict[str, Any]],
    cfg: MLLMTrainConfig,
    out: Path,
    desc: str,
    progress: bool = True,
    stop_at_step: int | None = None,
    pad_id: int = 0,
) -> dict[str, Any]:
    """AdamW over ``groups`` (param groups with their base ``lr``), warm-up + cosine, clipping, bf16
    autocast; resumes from ``out/state.pt``. Returns ``{"steps", "history"}`` (``interrupted_at`` when
    stopped by ``stop_at_step``). Threads follow :mod:`omnimoe.threads`: an LLM of the size of Gemma-3-270M
    is large work, a tiny one small."""
    with ThreadPolicy(work_of(model)) as threads:
        out.mkdir(parents=True, exist_ok=True)
        rank, world = init_distributed()
        device = resolve_device(cfg.device)
        model.to(device)
        dtype = autocast_dtype(cfg.dtype, device)
        module: nn.Module = model
        if world > 1:
            from omnimoe.moe.parallel import ExpertParallelExperts, data_parallel

            ids = [device.index] if device.type == "cuda" else None
            if any(isinstance(m, ExpertParallelExperts) for m in model.modules()):
                module = data_parallel(model, device_ids=ids, find_unused_parameters=True)
            else:
                module = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
        opt = adamw(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, device=device)  # fused: big expert tensors
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
        params = [p for g in groups for p in g["params"]]
        state_path = out / ("state.pt" if not cfg.expert_parallel or world == 1 else f"state-rank{rank}-of-{world}.pt")
        step, history = 0, []
        if rank == 0:
            remove_temporaries(out)  # of a run killed mid-write
        if state_path.is_file():
            state = torch.load(state_path, map_location="cpu", weights_only=False)
            if not _same_recipe(state["config"], cfg):
                raise ValueError(f"{state_path} was written with another recipe; use a new output folder")
            named = dict(model.named_parameters())
            with torch.no_grad():
                for k, v in state["trainable"].items():
                    named[k].copy_(v)
            opt.load_state_dict(state["optimizer"])
            restore_rng(state, device)
            step, history = state["step"], state["history"]
        per_epoch = (
            len(data.batches(cfg.batch_size, 0, cfg.seed, cfg.grouped_batches, world)) // world
        )  # steps (of every rank)
        if not per_epoch:
            raise ValueError(f"{data.path}: fewer records than one batch per rank")
        writer = tensorboard(out / "tb", step) if rank == 0 else None
        bar = tqdm(total=cfg.steps, initial=step, desc=desc, disable=not progress or rank != 0, dynamic_ncols=True)
        model.train()
        running: list[float] = []
        order, order_epoch = [], -1  # this epoch's batches (a function of seed and epoch only: resumable)
        while step < cfg.steps:
            if stop_at_step is not None and step >= stop_at_step:
                bar.close()
                return {"interrupted_at": step}
            threads.tick()
            scale = warmup_cosine(step, cfg.steps, cfg.warmup_steps, 1.0, cfg.min_lr_ratio)  # times each group's own lr
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
            opt.zero_grad(set_to_none=True)
            total, tokens = 0.0, 0
            for micro in range(cfg.grad_accum):
                n = step * cfg.grad_accum + micro  # the n-th batch of the run, wherever it resumed
                epoch, pos = divmod(n, per_epoch)
                if epoch != order_epoch:
                    order, order_epoch = (
                        data.batches(cfg.batch_size, epoch, cfg.seed, cfg.grouped_batches, world),
                        epoch,
                    )
                batch = data.collate(order[pos * world + rank], pad_id)  # rank r takes every world-th batch
                media = {
                    m: dataclasses.replace(b, tokens=b.tokens.to(device), mask=b.mask.to(device))
                    for m, b in batch["media"].items()
                }
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    res = module(
                        batch["input_ids"].to(device),
                        batch["attention_mask"].to(device),
                        batch["labels"].to(device),
                        media,
                        loss_per=cfg.loss_per,
                    )
                require_finite(
                    res.loss, f"step {step}, batch of records " + ", ".join(e.sample.id for e in batch["examples"][:8])
                )
                (res.loss / cfg.grad_accum).backward()
                total += res.lm_loss.item() / cfg.grad_accum
                tokens += res.tokens
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            running.append(total)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}")
            if step % cfg.log_every == 0 or step == cfg.steps:
                mean = sum(running) / len(running)
                history.append({"step": step, "loss": mean, "lr_scale": scale})
                running.clear()
                if writer is not None:
                    writer.add_scalar("train/loss", mean, step)
                    writer.add_scalar("train/lr", opt.param_groups[0]["lr"], step)
                    writer.flush()
            if step % cfg.save_every == 0 or step == cfg.steps:
                if rank == 0 or cfg.expert_parallel:
                    save_checkpoint(
                        state_path,
                        {
                            "config": dataclasses.asdict(cfg),
                            "trainable": _trainable_state(model),
                            "optimizer": opt.state_dict(),
                            **rng_state(device),
                            "step": step,
                            "history": history,
                        },
                    )
        bar.close()
        if writer is not None:
            writer.close()
        if world > 1:
            del module
            dist.barrier()
        model.eval()
        return {"steps": step, "history": history}


# -- the stages -----------------------------------------------------------------------------------------------
def _setup(cfg: MLLMTrainConfig, files: list[Path], progress: bool) -> tuple[MediaFeatures, dict[str, int]]:
    if not cfg.data:
        raise ValueError("the recipe names no training data (data: path/to/train.json)")
    features = features_for(cfg, files, progress)
    return features, features.dims()


def dataset_for(
    cfg: MLLMTrainConfig,
    path: Path,
    features: MediaFeatures,
    model: MultimodalLLM,
    tokenizer: Any,
    generation: bool = False,
    report: bool = True,
) -> ConversationData:
    data = ConversationData(
        path,
        features,
        tokenizer,
        template_for(tokenizer, cfg.template),
        model.config.placeholder_ids,
        lambda m, n: model.connectors[m].num_tokens(n),
        cfg.max_len,
        generation=generation,
    )
    if report and is_rank0():
        report_bad(path, data.bad)
    return data


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _write_stage(out: Path, cfg: MLLMTrainConfig, info: dict[str, Any]) -> None:
    if is_rank0():
        write_json(out / "stage.json", {"stage": cfg.stage, "recipe": dataclasses.asdict(cfg), **info})


@dataclass
class StageRun:
    """What every stage works with: the recipe, the output folder, the media features (and their widths)
    of the recipe's data, the modalities that have a connector, and how the loop reports and stops."""

    cfg: MLLMTrainConfig
    out: Path
    features: MediaFeatures
    dims: dict[str, int]  # modality -> encoder width
    modalities: list[str]
    progress: bool = True
    stop_at_step: int | None = None  # end early without finishing (tests of resumption)

    def base_model(self) -> tuple[MultimodalLLM, Any]:
        return base_model(self.cfg, self.modalities, self.dims)

    def dataset(self, model: MultimodalLLM, tokenizer: Any) -> ConversationData:
        return dataset_for(self.cfg, Path(self.cfg.data), self.features, model, tokenizer)

    def train(
        self,
        model: MultimodalLLM,
        data: ConversationData,
        groups: list[dict[str, Any]],
        desc: str,
        tokenizer: Any,
        folder: Path | None = None,
    ) -> dict[str, Any]:
        """:func:`train_loop` over ``groups`` into ``folder`` (default: the stage's folder)."""
        return train_loop(
            model,
            data,
            groups,
            self.cfg,
            folder or self.out,
            desc,
            self.progress,
            self.stop_at_step,
            _pad_id(tokenizer),
        )


def run_stage(
    cfg: MLLMTrainConfig, out: str | Path, progress: bool = True, stop_at_step: int | None = None
) -> dict[str, Any]:
    """Run ``cfg.stage`` into ``out``; returns the stage summary (also in ``out/stage.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.stage > 1 and not cfg.init:
        raise ValueError(f"stage {cfg.stage} needs init: the stage-1 folder (its connectors)")
    files = [Path(cfg.data)] + ([Path(cfg.eval_data)] if cfg.eval_data else [])
    features, dims = _setup(cfg, files, progress)
    run = StageRun(cfg, out, features, dims, _stage_modalities(dims, cfg), progress, stop_at_step)
    torch.manual_seed(cfg.seed)
    return {1: _stage1, 2: _stage2, 3: _stage3}[cfg.stage](run)


def _stage1(run: StageRun) -> dict[str, Any]:
    """Connectors only: the LLM frozen (after the optional latent-space pre-alignment)."""
    cfg, out = run.cfg, run.out
    model, tokenizer = run.base_model()
    for p in model.llm.parameters():
        p.requires_grad_(False)
    data = run.dataset(model, tokenizer)
    aligned = None
    if cfg.prealign.steps and not (out / "state.pt").is_file():  # a resumed run restores the connectors from state.pt
        torch.manual_seed(cfg.seed)
        aligned = prealign(
            model.connectors.to(resolve_device(cfg.device)),
            data,
            tokenizer,
            causal_lm(model.llm).get_input_embeddings(),
            cfg.prealign,
            cfg.seed,
            run.progress and is_rank0(),
        )
        if is_rank0():
            write_json(out / "prealign.json", aligned)
    groups = [{"params": list(model.connectors.parameters()), "lr": cfg.connector_lr}]
    result = run.train(model, data, groups, "stage 1: connectors", tokenizer)
    if "interrupted_at" in result:
        return result
    if aligned is None and (out / "prealign.json").is_file():
        aligned = read_json(out / "prealign.json")
    if is_rank0():
        from safetensors.torch import save_file

        with atomic_path(out / "connectors.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in model.connectors.state_dict().items()}, str(tmp))
    info = {
        "llm": cfg.llm,
        "modalities": run.modalities,
        "train": result,
        "bad_records": len(data.bad),
        **({"prealign": aligned} if aligned is not None else {}),
    }
    _write_stage(out, cfg, info)
    return {**info, "model": model, "tokenizer": tokenizer}


def _stage2(run: StageRun) -> dict[str, Any]:
    """One dense copy of the LLM's FFNs per modality group, each trained on its group's records alone."""
    cfg, out = run.cfg, run.out
    init = Path(cfg.init)
    full = None
    summaries = {}
    groups_present: list[str] = []
    for s in read_conversations(cfg.data)[0]:
        if s.group not in groups_present:
            groups_present.append(s.group)
    wanted = cfg.groups or sorted(groups_present)
    missing = [g for g in wanted if g not in groups_present]
    if missing:
        raise ValueError(f"groups {missing} have no records in {cfg.data} (present: {sorted(groups_present)})")
    for group in wanted:
        folder = out / group
        if (folder / "ffn.safetensors").is_file():
            summaries[group] = read_json(folder / "stage.json")["train"] if (folder / "stage.json").is_file() else {}
            continue
        model, tokenizer = run.base_model()
        _load_connectors(model, init)
        layers = select_layers(cfg.moe.layers, len(decoder_layers(model.llm)))
        for p in model.parameters():
            p.requires_grad_(False)
        ffn_params = [p for i in layers for p in decoder_layers(model.llm)[i].mlp.parameters()]
        for p in ffn_params:
            p.requires_grad_(True)
        if full is None:
            full = run.dataset(model, tokenizer)
        data = copy.copy(full)
        data.examples = [e for e in full.examples if e.sample.group == group]
        result = run.train(
            model, data, [{"params": ffn_params, "lr": cfg.lr}], f"stage 2: {group} FFNs", tokenizer, folder
        )
        if "interrupted_at" in result:
            return result
        if is_rank0():
            from safetensors.torch import save_file

            with atomic_path(folder / "ffn.safetensors") as tmp:
                save_file(
                    _ffn_state(model.llm, layers),
                    str(tmp),
                    metadata={"layers": ",".join(map(str, layers)), "group": group},
                )
            write_json(
                folder / "stage.json",
                {
                    "stage": 2,
                    "group": group,
                    "init": relative_path(init, folder),
                    "layers": layers,
                    "train": result,
                    "recipe": dataclasses.asdict(cfg),
                },
            )
        summaries[group] = result
    info = {"llm": cfg.llm, "init": relative_path(init, out), "groups": wanted, "train": summaries}
    _write_stage(out, cfg, info)
    return info


def _expert_ffns(
    cfg: MLLMTrainConfig, model: MultimodalLLM, out: Path
) -> tuple[dict[int, list[nn.Module]], dict[int, list[str]]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    blocks = decoder_layers(model.llm)
    layers = select_layers(cfg.moe.layers, len(blocks))
    ffns = {i: [blocks[i].mlp] for i in layers}
    sources = {i: [f"base:{cfg.llm}"] for i in layers}
    for group, folder in sorted(cfg.experts.items()):
        path = Path(folder) / "ffn.safetensors"
        if not path.is_file():
            raise FileNotFoundError(
                f"expert {group}: {path} missing (a finished stage-2 group folder, e.g. runs/stage2/{group})"
            )
        with safe_open(str(path), "pt") as f:
            trained = [int(x) for x in (f.metadata() or {}).get("layers", "").split(",") if x]
        if sorted(trained) != layers:
            raise ValueError(
                f"expert {group}: {path} trained layers {trained}, this MoE uses {layers} (use the same moe.layers)"
            )
        state = load_file(str(path))
        for i in layers:
            ffn = copy.deepcopy(blocks[i].mlp)
            ffn.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(i)})
            ffns[i].append(ffn)
            sources[i].append(f"stage2:{group}:{relative_path(Path(folder), out / 'model')}")
    return ffns, sources


def _stage3(run: StageRun) -> dict[str, Any]:
    """The MoE of the base FFN and the stage-2 experts (or the dense equal-active baseline), LoRA on
    attention and experts, connectors and routers trained fully, on the mixed data."""
    cfg, out = run.cfg, run.out
    rank, world = init_distributed()
    model, tokenizer = run.base_model()
    _load_connectors(model, Path(cfg.init))
    ffns, sources = _expert_ffns(cfg, model, out)
    moe_cfg = dataclasses.replace(cfg.moe, num_experts=len(next(iter(ffns.values()))))
    if cfg.dense:
        from omnimoe.mllm.baselines import dense_equal_active

        layers = dense_equal_active(model.llm, moe_cfg, ffns, generator=torch.Generator().manual_seed(cfg.seed))
        model.config.moe, model.config.dense_layers = moe_cfg, {str(i): 1 for i in layers}
        model.config.expert_sources = {str(i): v[: moe_cfg.num_experts_per_tok] for i, v in sources.items()}
    else:
        model.moefy(moe_cfg, ffns, sources, generator=torch.Generator().manual_seed(cfg.seed))
        if cfg.expert_parallel and world > 1:
            if not cfg.lora.merge:
                raise ValueError(
                    "expert_parallel needs lora.merge: true (the saved model gathers merged experts from every rank)"
                )
            from omnimoe.moe.parallel import parallelize_experts

            parallelize_experts(model.llm)
    targets = list(cfg.lora.targets)
    params_targets: list[str] = []
    if cfg.lora.experts:
        if cfg.dense:
            targets += sorted(
                {
                    n.rsplit(".", 1)[-1]
                    for n, m in decoder_layers(model.llm)[0].mlp.named_modules()
                    if isinstance(m, nn.Linear)
                }
            )
        else:
            from omnimoe.moe.experts import Experts

            kind = next(m for m in model.llm.modules() if isinstance(m, Experts))
            params_targets = [f"experts.{n}" for n, _ in kind.named_parameters(recurse=False) if n.endswith("proj")]
    model.apply_lora(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, targets, params_targets)
    routers = [p for n, p in model.llm.named_parameters() if ".router." in n or n.endswith("expert_bias")]
    for p in list(model.connectors.parameters()) + routers:
        p.requires_grad_(True)
    lora = [p for n, p in model.llm.named_parameters() if p.requires_grad and "lora_" in n]
    if cfg.expert_parallel and world > 1:
        for n, p in model.llm.named_parameters():  # expert adapters see every rank's tokens through the all-to-all
            if p.requires_grad and "experts" in n and "lora_" in n:
                p.register_hook(lambda g: g / world)
        _ignore_local_adapters(model)
    data = run.dataset(model, tokenizer)
    groups = [
        {"params": lora, "lr": cfg.lr},
        {"params": list(model.connectors.parameters()) + routers, "lr": cfg.connector_lr},
    ]
    result = run.train(model, data, groups, "stage 3: " + ("dense" if cfg.dense else "MoE") + " + LoRA", tokenizer)
    if "interrupted_at" in result:
        return result
    if cfg.lora.merge:
        model.merge_lora()
    model.save_pretrained(out / "model", tokenizer=tokenizer)
    info = {
        "llm": cfg.llm,
        "init": relative_path(Path(cfg.init), out),
        "experts": {g: relative_path(Path(f), out) for g, f in cfg.experts.items()},
        "dense": cfg.dense,
        "train": result,
        "bad_records": len(data.bad),
    }
    _write_stage(out, cfg, info)
    return {**info, "model": model, "tokenizer": tokenizer}


def _ignore_local_adapters(model: MultimodalLLM) -> None:
    """DDP must not average the per-rank expert adapters (each rank holds its own experts')."""
    names = [n for n, p in model.named_parameters() if "experts" in n and "lora_" in n]
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, existing + names)


# -- loading a stage's model ----------------------------------------------------------------------------------
def load_stage(folder: str | Path) -> tuple[MultimodalLLM, Any, MLLMTrainConfig]:
    """The model of any stage folder: stage 3's ``model/`` (or that folder itself), a stage-1 folder
    (base LLM + its connectors), or one stage-2 group folder (that group's FFNs in the base LLM). The
    tokenizer of a stage-1 or stage-2 folder is the process's shared one (:func:`load_llm_with_placeholders`):
    read it, do not change it."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        model_dir = folder
        folder = folder.parent
    else:
        model_dir = folder / "model"
    info = read_json(folder / "stage.json") if (folder / "stage.json").is_file() else None
    if info is None:
        raise FileNotFoundError(f"{folder} is not a stage folder (no stage.json)")
    cfg = from_dict(MLLMTrainConfig, info["recipe"])
    if info["stage"] == 3:
        return MultimodalLLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir / "tokenizer"), cfg
    from safetensors.torch import load_file

    stage1 = folder if info["stage"] == 1 else (folder / info["init"]).resolve()
    s1 = read_json(stage1 / "stage.json")
    dims = {}  # the encoder widths the saved connectors read
    state = load_file(str(stage1 / "connectors.safetensors"))
    for m in s1["modalities"]:
        first = next(k for k in state if k.startswith(f"{m}."))
        dims[m] = _connector_in_dim(state, m, first)
        normed = any(
            k.startswith(f"{m}.") and k.endswith("norm.gain") for k in state
        )  # saved before soft-token norms: none
        cfg.connectors = {
            **cfg.connectors,
            m: dataclasses.replace(cfg.connectors.get(m) or ConnectorRecipe(), norm=normed),
        }
    model, tokenizer = base_model(cfg, s1["modalities"], dims)
    model.connectors.load_state_dict(state)
    if info["stage"] == 2:
        if "group" not in info:
            raise ValueError(
                f"{folder} is the stage-2 parent folder: pass one group's folder ({', '.join(info.get('groups', []))})"
            )
        blocks = decoder_layers(model.llm)
        ffn = load_file(str(folder / "ffn.safetensors"))
        for i in info["layers"]:
            blocks[i].mlp.load_state_dict(
                {k.split(".", 1)[1]: v for k, v in ffn.items() if k.split(".", 1)[0] == str(i)}
            )
    return model.eval(), tokenizer, cfg


def _connector_in_dim(state: dict[str, torch.Tensor], modality: str, first: str) -> int:
    """The encoder width a saved connector reads (its first linear layer's input width)."""
    for key in (f"{modality}.net.0.weight", f"{modality}.inp.weight"):
        if key in state:
            return int(state[key].shape[1])
    if f"{modality}.queries" in state:
        return int(state[f"{modality}.queries"].shape[1])
    raise ValueError(f"cannot tell the input width of the saved {modality} connector ({first})")
