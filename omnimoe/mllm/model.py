"""The Uni-MoE model: frozen-encoder token states -> connectors -> soft tokens spliced into a causal LM
whose FFNs are (partly) sparse MoE layers.

A prompt names its media by placeholders (``<image>``, ``<audio>``, ``<video>``). Before the model sees it,
each placeholder is expanded to as many copies of its placeholder token as the connector makes soft
tokens for that item (``MultimodalLLM.soft_tokens``); ``forward`` then writes the connector outputs into
those positions of the input embeddings, in reading order, and never puts loss on them.

``save_pretrained`` writes one folder (relative paths only): ``config.json`` (the LLM's HF config, the MoE
recipe and per-layer expert counts, the connectors, the placeholder ids, where each expert came from) and
``model.safetensors``; ``from_pretrained`` rebuilds the structure from the config and loads the weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnimoe.config import from_dict
from omnimoe.io import atomic_path, read_json, write_json
from omnimoe.mllm.connectors import ConnectorSpec, build_connector
from omnimoe.mllm.moe_llm import MoELLMConfig, decoder_layers, empty_moe, moe_mlps, moefy, router_loss, set_token_mask
from omnimoe.runtime import is_rank0


def causal_lm(llm: nn.Module) -> nn.Module:
    """The Hugging Face causal LM under any PEFT wrapper."""
    get_base = getattr(llm, "get_base_model", None)
    return get_base() if callable(get_base) else llm


PLACEHOLDERS = {"image": "<image>", "audio": "<audio>", "video": "<video>"}
IGNORE_INDEX = -100
MODEL_TYPE = "omnimoe-unimoe"


@dataclass
class MediaBatch:
    """Encoder token states of every item of one modality in a batch, in reading order (row by row)."""

    tokens: torch.Tensor  # (N, L, D)
    mask: torch.Tensor  # (N, L) bool, real tokens first


@dataclass
class MLLMOutput:
    loss: torch.Tensor  # lm_loss + router_loss
    lm_loss: torch.Tensor  # mean cross-entropy over labelled tokens
    router_loss: torch.Tensor
    tokens: int  # labelled tokens in the batch


@dataclass
class MLLMConfig:
    llm: dict[str, Any]  # the causal LM's Hugging Face config (to_dict())
    connectors: dict[str, ConnectorSpec] = field(default_factory=dict)  # modality -> connector
    placeholder_ids: dict[str, int] = field(default_factory=dict)  # modality -> token id
    moe: MoELLMConfig | None = None
    moe_layers: list[int] = field(default_factory=list)
    experts_per_layer: dict[str, int] = field(default_factory=dict)  # str(layer) -> experts (JSON keys are strings)
    expert_sources: dict[str, list[str]] = field(default_factory=dict)  # str(layer) -> where each expert came from
    lora: dict[str, Any] | None = None  # the PEFT LoRA config of unmerged adapters (None: none, or merged)
    dense_layers: dict[str, int] = field(
        default_factory=dict
    )  # str(layer) -> widened dense FFN width (the dense baseline)


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tensors that share storage with an earlier one (tied embeddings): safetensors refuses aliases."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen and v.numel():
            continue
        seen.add(key)
        out[k] = v.contiguous()
    return out


def _tied_copy(model: nn.Module, key: str, state: dict[str, torch.Tensor]) -> bool:
    """Whether a missing ``key`` is a tied alias of a loaded tensor (the LM head of tied embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(key)
    return p is not None and any(q is p for k, q in params.items() if k in state)


class MultimodalLLM(nn.Module):
    def __init__(self, llm: nn.Module, connectors: dict[str, ConnectorSpec], placeholder_ids: dict[str, int]) -> None:
        super().__init__()
        missing = [m for m in connectors if m not in placeholder_ids]
        if missing:
            raise ValueError(f"no placeholder token id for modality {missing}")
        self.llm = llm
        self.connectors = nn.ModuleDict({m: build_connector(spec) for m, spec in connectors.items()})
        self.config = MLLMConfig(
            llm=llm.config.to_dict(), connectors=dict(connectors), placeholder_ids=dict(placeholder_ids)
        )

    # -- the MoE ------------------------------------------------------------------------------------------
    def moefy(
        self,
        config: MoELLMConfig,
        ffns: dict[int, list[nn.Module]] | None = None,
        sources: dict[int, list[str]] | None = None,
        generator: torch.Generator | None = None,
    ) -> list[int]:
        """Make the chosen FFNs sparse (see :func:`omnimoe.mllm.moe_llm.moefy`); ``sources`` records where
        each expert came from (e.g. the stage-2 run of each modality FFN)."""
        layers = moefy(self.llm, config, ffns, generator)
        blocks = decoder_layers(self.llm)
        self.config.moe, self.config.moe_layers = config, layers
        self.config.experts_per_layer = {str(i): blocks[i].mlp.moe.config.num_experts for i in layers}
        self.config.expert_sources = {str(i): list(v) for i, v in (sources or {}).items()}
        return layers

    # -- splicing -----------------------------------------------------------------------------------------
    def soft_tokens(self, modality: str, mask: torch.Tensor) -> list[int]:
        """How many soft tokens each item (rows of an encoder mask) becomes: the placeholder expansion."""
        connector = self.connectors[modality]
        return [connector.num_tokens(int(n)) for n in mask.sum(1).tolist()]

    def embed(self, input_ids: torch.Tensor, media: dict[str, MediaBatch] | None = None) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(input_ids)
        for modality, pid in self.config.placeholder_ids.items():
            where = input_ids == pid
            batch = (media or {}).get(modality)
            if batch is None:
                if where.any():
                    raise ValueError(
                        f"the input has {int(where.sum())} {modality} placeholder tokens but no {modality} inputs"
                    )
                continue
            soft, soft_mask = self.connectors[modality](
                batch.tokens.to(embeds.device, embeds.dtype), batch.mask.to(embeds.device)
            )
            values = soft[soft_mask]
            if len(values) != int(where.sum()):
                raise ValueError(
                    f"{modality}: {int(where.sum())} placeholder positions for {len(values)} soft tokens "
                    f"(expand each placeholder by MultimodalLLM.soft_tokens)"
                )
            embeds = embeds.masked_scatter(where.unsqueeze(-1), values.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        media: dict[str, MediaBatch] | None = None,
        loss_per: str = "token",
        **kwargs: Any,
    ) -> Any:
        """With ``labels``: a dict with ``loss`` = LM loss + MoE router losses (also ``lm_loss`` and
        ``router_loss`` apart). Only labelled positions go through the LM head (answers are a few tokens,
        and Gemma's head has 262k rows), so no full ``logits`` come back. Without labels: the LM output.
        Placeholder positions never carry loss. ``loss_per``: ``token`` averages over every labelled token of
        the batch (long answers weigh more); ``sample`` averages each row's tokens first, then the rows, so a
        one-word answer counts as much as a caption."""
        if loss_per not in ("token", "sample"):
            raise ValueError(f"loss_per must be 'token' or 'sample', got {loss_per!r}")
        set_token_mask(self.llm, attention_mask)
        embeds = self.embed(input_ids, media)
        try:
            if labels is None:
                return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
            labels = labels.masked_fill(self._placeholder_mask(input_ids), IGNORE_INDEX)
            lm = causal_lm(self.llm)
            hidden = lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs).last_hidden_state
            targets = labels[:, 1:].to(hidden.device)
            keep = targets != IGNORE_INDEX
            logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
            cap = getattr(lm.config, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            if not keep.any():
                lm_loss = hidden.sum() * 0.0
            elif loss_per == "token":
                lm_loss = F.cross_entropy(logits.float(), targets[keep])
            else:
                per_token = F.cross_entropy(logits.float(), targets[keep], reduction="none")
                counts = keep.sum(1)  # labelled tokens per row
                row_of = torch.arange(len(keep), device=keep.device).unsqueeze(1).expand_as(keep)[keep]
                weights = 1.0 / (counts[row_of].float() * int((counts > 0).sum()))
                lm_loss = (per_token * weights).sum()
            aux = router_loss(self.llm).to(lm_loss.device)
            return MLLMOutput(lm_loss + aux, lm_loss, aux, int(keep.sum()))
        finally:
            set_token_mask(self.llm, None)

    def _placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for pid in self.config.placeholder_ids.values():
            mask |= input_ids == pid
        return mask

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        media: dict[str, MediaBatch] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """New tokens only (B, T), from the spliced prompt (greedy unless sampling options are given)."""
        set_token_mask(self.llm, None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs.setdefault("suppress_tokens", sorted(self.config.placeholder_ids.values()))  # never emit a placeholder
        return self.llm.generate(inputs_embeds=self.embed(input_ids, media), attention_mask=attention_mask, **kwargs)

    # -- LoRA ---------------------------------------------------------------------------------------------
    def apply_lora(
        self,
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.05,
        target_modules: list[str] | None = None,
        target_parameters: list[str] | None = None,
    ) -> None:
        """PEFT LoRA on the LLM's ``target_modules`` (nn.Linear names, e.g. attention) and
        ``target_parameters`` (stacked expert weights, one adapter per expert). PEFT freezes everything
        else; the caller unfreezes what trains fully (router, connectors). PEFT's parameter LoRA has no
        dropout, so with expert targets the adapter runs without dropout."""
        from peft import LoraConfig, get_peft_model

        if self.config.lora is not None:
            raise ValueError("LoRA is already applied")
        cfg = {
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": 0.0 if target_parameters else dropout,
            "target_modules": list(target_modules or []),
            "target_parameters": list(target_parameters or []),
        }
        self.llm = get_peft_model(self.llm, LoraConfig(**cfg))
        self.config.lora = cfg

    def merge_lora(self) -> None:
        """Fold the adapters into the weights (a plain model again)."""
        if self.config.lora is None:
            return
        self.llm = self.llm.merge_and_unload()
        self.config.lora = None

    # -- persistence --------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, tokenizer: Any = None) -> Path:
        """One folder: ``config.json``, ``model.safetensors`` (and the tokenizer, when given). LoRA stays
        unmerged unless :meth:`merge_lora` ran first; either way ``from_pretrained`` rebuilds it."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.llm = causal_lm(self.llm).config.to_dict()
        state = self.state_dict()  # under expert parallelism every rank takes part (the experts are gathered)
        if not is_rank0():
            return folder
        with atomic_path(folder / "model.safetensors") as tmp:
            save_file(_untie(state), str(tmp), metadata={"format": "pt", "model_type": MODEL_TYPE})
        write_json(folder / "config.json", {"model_type": MODEL_TYPE, **dataclasses.asdict(self.config)})
        if tokenizer is not None:
            tokenizer.save_pretrained(folder / "tokenizer")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "MultimodalLLM":
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json: not a saved model folder")
        raw = read_json(folder / "config.json")
        if raw.pop("model_type", None) != MODEL_TYPE:
            raise ValueError(f"{folder} is not a saved {MODEL_TYPE} model")
        cfg = from_dict(MLLMConfig, raw)
        cfg.connectors = {
            m: v if isinstance(v, ConnectorSpec) else from_dict(ConnectorSpec, v) for m, v in cfg.connectors.items()
        }
        if isinstance(cfg.moe, dict):
            cfg.moe = from_dict(MoELLMConfig, cfg.moe)
        llm_cfg = dict(cfg.llm)
        llm = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(llm_cfg.pop("model_type"), **llm_cfg), attn_implementation="eager"
        )
        model = cls(llm, cfg.connectors, cfg.placeholder_ids)
        if cfg.dense_layers:
            from omnimoe.mllm.baselines import dense_equal_active

            dense_equal_active(llm, dataclasses.replace(cfg.moe, layers=",".join(cfg.dense_layers)))
        elif cfg.moe is not None:
            empty_moe(
                llm,
                dataclasses.replace(cfg.moe, layers=",".join(map(str, cfg.moe_layers))),
                {int(k): v for k, v in cfg.experts_per_layer.items()},
            )
        if cfg.lora is not None:
            lora = dict(cfg.lora)
            model.apply_lora(
                lora["r"], lora["lora_alpha"], lora["lora_dropout"], lora["target_modules"], lora["target_parameters"]
            )
        model.config = cfg
        state = load_file(str(folder / "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not _tied_copy(model, k, state)]
        if missing or unexpected:
            raise ValueError(
                f"{folder}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return model.eval()

    def num_moe_layers(self) -> int:
        return len(moe_mlps(self.llm))
