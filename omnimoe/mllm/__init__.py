"""Uni-MoE: modality encoders + connectors feeding soft tokens into an LLM whose FFNs are sparse MoE layers."""

from omnimoe.mllm.connectors import ConnectorSpec, MLPConnector, QFormerConnector, build_connector
from omnimoe.mllm.model import IGNORE_INDEX, PLACEHOLDERS, MediaBatch, MLLMConfig, MultimodalLLM
from omnimoe.mllm.moe_llm import (
    MoELLMConfig,
    decoder_layers,
    expert_load,
    moefy,
    router_loss,
    select_layers,
    set_token_mask,
)

__all__ = [
    "IGNORE_INDEX",
    "PLACEHOLDERS",
    "ConnectorSpec",
    "MLLMConfig",
    "MLPConnector",
    "MediaBatch",
    "MoELLMConfig",
    "MultimodalLLM",
    "QFormerConnector",
    "build_connector",
    "decoder_layers",
    "expert_load",
    "moefy",
    "router_loss",
    "select_layers",
    "set_token_mask",
]
