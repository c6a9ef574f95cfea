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
from torch import nn

from omnimoe.config import from_dict
from omnimoe.io import atomic_path, read_json, write_json
from omnimoe.mllm.connectors import ConnectorSpec, build_connector
from omnimoe.mllm.moe_llm import MoELLMConfig, decoder_layers, empty_moe, moe_mlps, moefy, router_loss, set_token_mask

PLACEHOLDERS = {"image": "<image>", "audio": "<audio>", "video": "<video>"}
IGNORE_INDEX = -100
MODEL_TYPE = "omnimoe-unimoe"


@dataclass
class MediaBatch:
    """Encoder token states of every item of one modality in a batch, in reading order (row by row)."""

    tokens: torch.Tensor  # (N, L, D)
    mask: torch.Tensor  # (N, L) bool, real tokens first


@dataclass
class MLLMConfig:
    llm: dict[str, Any]  # the causal LM's Hugging Face config (to_dict())
    connectors: dict[str, ConnectorSpec] = field(default_factory=dict)  # modality -> connector
    placeholder_ids: dict[str, int] = field(default_factory=dict)  # modality -> token id
    moe: MoELLMConfig | None = None
    moe_layers: list[int] = field(default_factory=list)
    experts_per_layer: dict[str, int] = field(default_factory=dict)  # str(layer) -> experts (JSON keys are strings)
    expert_sources: dict[str, list[str]] = field(default_factory=dict)  # str(layer) -> where each expert came from


class MultimodalLLM(nn.Module):
    def __init__(self, llm: nn.Module, connectors: dict[str, ConnectorSpec], placeholder_ids: dict[str, int]) -> None:
        super().__init__()
        missing = [m for m in connectors if m not in placeholder_ids]
        if missing:
            raise ValueError(f"no placeholder token id for modality {missing}")
        self.llm = llm
        self.connectors = nn.ModuleDict({m: build_connector(spec) for m, spec in connectors.items()})
        self.config = MLLMConfig(llm=llm.config.to_dict(), connectors=dict(connectors), placeholder_ids=dict(placeholder_ids))

    # -- the MoE ------------------------------------------------------------------------------------------
    def moefy(self, config: MoELLMConfig, ffns: dict[int, list[nn.Module]] | None = None, sources: dict[int, list[str]] | None = None,
              generator: torch.Generator | None = None) -> list[int]:  # fmt: skip
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
                    raise ValueError(f"the input has {int(where.sum())} {modality} placeholder tokens but no {modality} inputs")
                continue
            soft, soft_mask = self.connectors[modality](batch.tokens.to(embeds.device, embeds.dtype), batch.mask.to(embeds.device))
            values = soft[soft_mask]
            if len(values) != int(where.sum()):
                raise ValueError(f"{modality}: {int(where.sum())} placeholder positions for {len(values)} soft tokens "
                                 f"(expand each placeholder by MultimodalLLM.soft_tokens)")  # fmt: skip
            embeds = embeds.masked_scatter(where.unsqueeze(-1), values.to(embeds.dtype))
        return embeds

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                media: dict[str, MediaBatch] | None = None, **kwargs: Any) -> Any:  # fmt: skip
        """The LM output; with ``labels``, ``loss`` is the LM loss plus the MoE router losses (also given
        apart as ``lm_loss`` and ``router_loss``). Placeholder positions never carry loss."""
        if labels is not None:
            labels = labels.masked_fill(self._placeholder_mask(input_ids), IGNORE_INDEX)
        set_token_mask(self.llm, attention_mask)
        out = self.llm(inputs_embeds=self.embed(input_ids, media), attention_mask=attention_mask, labels=labels, **kwargs)
        set_token_mask(self.llm, None)
        if labels is not None:
            aux = router_loss(self.llm).to(out.loss.device)
            out["lm_loss"], out["router_loss"] = out.loss, aux
            out["loss"] = out.loss + aux
        return out

    def _placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for pid in self.config.placeholder_ids.values():
            mask |= input_ids == pid
        return mask

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, media: dict[str, MediaBatch] | None = None,
                 **kwargs: Any) -> torch.Tensor:  # fmt: skip
        """New tokens only (B, T), from the spliced prompt (greedy unless sampling options are given)."""
        set_token_mask(self.llm, None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.llm.generate(inputs_embeds=self.embed(input_ids, media), attention_mask=attention_mask, **kwargs)

    # -- persistence --------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.llm = self.llm.config.to_dict()
        with atomic_path(folder / "model.safetensors") as tmp:
            save_model(self, str(tmp), metadata={"format": "pt", "model_type": MODEL_TYPE})  # handles tied embeddings
        write_json(folder / "config.json", {"model_type": MODEL_TYPE, **dataclasses.asdict(self.config)})
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "MultimodalLLM":
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = Path(folder)
        raw = read_json(folder / "config.json")
        if raw.pop("model_type", None) != MODEL_TYPE:
            raise ValueError(f"{folder} is not a saved {MODEL_TYPE} model")
        cfg = from_dict(MLLMConfig, raw)
        cfg.connectors = {m: v if isinstance(v, ConnectorSpec) else from_dict(ConnectorSpec, v) for m, v in cfg.connectors.items()}
        if isinstance(cfg.moe, dict):
            cfg.moe = from_dict(MoELLMConfig, cfg.moe)
        llm_cfg = dict(cfg.llm)
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(llm_cfg.pop("model_type"), **llm_cfg))
        model = cls(llm, cfg.connectors, cfg.placeholder_ids)
        if cfg.moe is not None:
            empty_moe(llm, dataclasses.replace(cfg.moe, layers=",".join(map(str, cfg.moe_layers))),
                      {int(k): v for k, v in cfg.experts_per_layer.items()})  # fmt: skip
        model.config = cfg
        load_model(model, str(folder / "model.safetensors"))
        return model.eval()

    def num_moe_layers(self) -> int:
        return len(moe_mlps(self.llm))
