"""Text towers: any Hugging Face text model (encoder such as MiniLM/BERT, or a causal LM such as Llama,
Qwen or Gemma, whose hidden states serve as features; the LM head is never run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from omnimoe.encoders.base import BadInput, EncoderOptions, EncoderOutput, FrozenEncoder, pool, select_layers


class HFTextEncoder(FrozenEncoder):
    modality = "text"

    def __init__(
        self, name: str, path: str | Path, options: EncoderOptions | None = None, gguf_file: str | None = None
    ) -> None:
        super().__init__(options)
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.name, self.path = name, str(path)
        kw: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        config = AutoConfig.from_pretrained(self.path, **kw)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, **kw)
        if self.tokenizer.pad_token is None:  # causal LMs often have none
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        model, info = AutoModel.from_pretrained(self.path, dtype=torch.float32, output_loading_info=True, **kw)
        unread = ("pooler.",)  # the pooler is never read
        # An encoder-decoder model (T5, BART) is read through its encoder; an encoder-only checkpoint of one
        # (sentence-T5 style) may say ``is_encoder_decoder: false`` and still be built whole.
        if getattr(config, "is_encoder_decoder", False) or all(
            isinstance(getattr(model, part, None), torch.nn.Module) for part in ("encoder", "decoder")
        ):
            model = model.get_encoder()
            unread += ("decoder.", "lm_head.")  # an encoder-only checkpoint (e.g. sentence-T5) has no decoder
        # Weights the checkpoint lacks would be random: refuse, naming them.
        if missing := sorted(k for k in info.get("missing_keys", ()) if not k.startswith(unread)):
            raise ValueError(
                f"text encoder {name!r} ({self.path}): the checkpoint lacks {len(missing)} of the model's weights "
                f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); they would be random"
            )
        self.model = model.eval().to(self.device)
        self.model.requires_grad_(False)
        self.store_linear_in_compute_dtype(self.model)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.dim = int(text_config.hidden_size)

    def preprocessing(self) -> dict[str, Any]:
        return {**super().preprocessing(), "max_length": self.options.max_length}

    def load_item(self, item: Any) -> str:
        if not isinstance(item, str):
            raise BadInput(f"text must be a string, got {type(item).__name__}")
        text = " ".join(item.split())
        if not text:
            raise BadInput("empty caption")
        return text

    @torch.no_grad()
    def encode(self, loaded: list[str]) -> EncoderOutput:
        batch = self.tokenizer(
            loaded, padding=True, truncation=True, max_length=self.options.max_length, return_tensors="pt"
        ).to(self.device)
        with self.autocast():
            out = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
            )
        tokens = select_layers(out.hidden_states, self.options.layers).float()
        mask = batch["attention_mask"].bool()
        return EncoderOutput(pool(tokens, mask, self.options.pooling).cpu(), tokens.cpu(), mask.cpu())
