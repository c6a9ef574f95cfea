"""The Uni-MoE model on tiny randomly initialised LLMs built from configs (no download): MoE-fying the
FFNs of Llama / Qwen2 / Mistral / Gemma3 layouts, connectors, splicing and masking, save / load, generation."""

import pytest
import torch
from conftest import TINY_LLM, tiny_llm

from omnimoe.mllm import (
    IGNORE_INDEX,
    ConnectorSpec,
    MediaBatch,
    MoELLMConfig,
    MultimodalLLM,
    decoder_layers,
    expert_load,
    moefy,
    select_layers,
)
from omnimoe.mllm.connectors import MLPConnector, QFormerConnector
from omnimoe.mllm.moe_llm import MoEMLP

VOCAB = TINY_LLM["vocab_size"]
IMAGE_ID, AUDIO_ID = VOCAB - 2, VOCAB - 1
FAMILIES = ("llama", "qwen2", "mistral", "gemma3")


@pytest.mark.parametrize("family", FAMILIES)
def test_upcycled_moe_llm_equals_the_dense_llm_at_init(family):
    """Every expert a copy of the FFN and the top-k weights renormalised: the MoE-LLM computes the dense LLM."""
    llm = tiny_llm(family)
    ids = torch.randint(0, 90, (2, 12))
    with torch.no_grad():
        dense = llm(ids).logits
    layers = moefy(llm, MoELLMConfig(layers="all", num_experts=4, num_experts_per_tok=2))
    assert layers == [0, 1, 2, 3] and all(isinstance(b.mlp, MoEMLP) for b in decoder_layers(llm))
    with torch.no_grad():
        sparse = llm(ids).logits
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-4)
    assert set(expert_load(llm)) == {0, 1, 2, 3} and all(int(v.sum()) == 2 * 24 for v in expert_load(llm).values())


def test_layer_selection():
    assert select_layers("all", 4) == [0, 1, 2, 3]
    assert select_layers("every:2", 5) == [0, 2, 4] and select_layers("every:2:1", 5) == [1, 3]
    assert select_layers("0,-1", 6) == [0, 5]
    for bad in ("every:0", "7", "x,y", "every:a"):
        with pytest.raises(ValueError):
            select_layers(bad, 6)
    llm = tiny_llm()
    moefy(llm, MoELLMConfig(layers="every:2"))
    assert [isinstance(b.mlp, MoEMLP) for b in decoder_layers(llm)] == [True, False, True, False]
    with pytest.raises(ValueError, match="already has an MoE"):
        moefy(llm, MoELLMConfig(layers="0"))


def test_experts_from_a_list_of_ffns_keep_their_weights():
    """Uni-MoE stage 3: experts initialised from separately trained FFNs (here: FFNs of other models)."""
    base, a, b = tiny_llm(seed=0), tiny_llm(seed=1), tiny_llm(seed=2)
    ffns = {i: [decoder_layers(m)[i].mlp for m in (base, a, b)] for i in range(4)}
    moefy(base, MoELLMConfig(layers="all", num_experts_per_tok=1), ffns=ffns)
    experts = decoder_layers(base)[1].mlp.moe.experts
    gate_up = torch.cat([decoder_layers(a)[1].mlp.gate_proj.weight, decoder_layers(a)[1].mlp.up_proj.weight])
    torch.testing.assert_close(experts.gate_up_proj[1], gate_up)
    assert experts.gate_up_proj.shape[0] == 3


def spliced_batch(model: MultimodalLLM):
    """Two rows: row 0 has an image and an audio clip, row 1 an image; answers carry the labels."""
    img = MediaBatch(torch.randn(2, 6, 20), torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool))
    aud = MediaBatch(torch.randn(1, 9, 12), torch.ones(1, 9, dtype=torch.bool))
    n_img, n_aud = model.soft_tokens("image", img.mask), model.soft_tokens("audio", aud.mask)
    rows = [
        [1, 2] + [IMAGE_ID] * n_img[0] + [3] + [AUDIO_ID] * n_aud[0] + [4, 5, 6],
        [1] + [IMAGE_ID] * n_img[1] + [7, 8],
    ]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(attention == 0, IGNORE_INDEX)
    return ids, attention, labels, {"image": img, "audio": aud}


def build_mllm(family="llama"):
    llm = tiny_llm(family)
    connectors = {
        "image": ConnectorSpec("mlp", in_dim=20, out_dim=32, max_tokens=4),
        "audio": ConnectorSpec("qformer", in_dim=12, out_dim=32, num_queries=3, num_heads=4),
    }
    model = MultimodalLLM(llm, connectors, {"image": IMAGE_ID, "audio": AUDIO_ID})
    model.moefy(
        MoELLMConfig(layers="every:2", num_experts=4, num_experts_per_tok=2, noise_std=0.05),
        generator=torch.Generator().manual_seed(0),
        sources={0: ["base"] * 4},
    )
    return model


def test_splice_places_connector_tokens_and_masks_their_loss():
    model = build_mllm()
    ids, attention, labels, media = spliced_batch(model)
    assert model.soft_tokens("image", media["image"].mask) == [4, 4] and model.soft_tokens(
        "audio", media["audio"].mask
    ) == [3]
    embeds = model.embed(ids, media)
    soft_img, _ = model.connectors["image"](media["image"].tokens, media["image"].mask)
    soft_aud, _ = model.connectors["audio"](media["audio"].tokens, media["audio"].mask)
    torch.testing.assert_close(embeds[0, 2:6], soft_img[0])
    torch.testing.assert_close(embeds[0, 7:10], soft_aud[0])
    torch.testing.assert_close(embeds[1, 1:5], soft_img[1])
    torch.testing.assert_close(embeds[0, :2], model.llm.get_input_embeddings()(ids[0, :2]))
    out = model(ids, attention, labels, media)
    assert torch.isfinite(out.loss) and float(out.router_loss.detach()) > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.router_loss)
    # the loss ignores placeholder positions: changing the media changes the loss only through the context
    manual = labels.masked_fill((ids == IMAGE_ID) | (ids == AUDIO_ID), IGNORE_INDEX)
    ref = model.llm(inputs_embeds=embeds, attention_mask=attention, labels=manual).loss
    torch.testing.assert_close(out.lm_loss, ref)
    out.loss.backward()
    assert model.connectors["image"].net[0].weight.grad.abs().sum() > 0
    assert model.connectors["audio"].queries.grad.abs().sum() > 0
    assert decoder_layers(model.llm)[0].mlp.moe.router.weight.grad.abs().sum() > 0


def test_splice_refuses_mismatched_placeholders():
    model = build_mllm()
    ids, attention, _, media = spliced_batch(model)
    with pytest.raises(ValueError, match="audio placeholder tokens but no audio inputs"):
        model.embed(ids, {"image": media["image"]})
    with pytest.raises(ValueError, match="placeholder positions for"):
        model.embed(torch.cat([ids, torch.full((2, 1), IMAGE_ID)], 1), media)  # one image position too many


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_loss_on_labelled_positions_equals_the_full_lm_loss(family):
    """The head runs on labelled positions only; the loss is the Hugging Face LM loss of the spliced input."""
    model = build_mllm(family)
    ids, attention, labels, media = spliced_batch(model)
    out = model(ids, attention, labels, media)
    masked = labels.masked_fill(model._placeholder_mask(ids), IGNORE_INDEX)
    full = model.llm(inputs_embeds=model.embed(ids, media), attention_mask=attention, labels=masked)
    torch.testing.assert_close(out.lm_loss, full.loss)
    assert out.tokens == int((masked[:, 1:] != IGNORE_INDEX).sum())


def test_loss_per_sample_weighs_every_record_alike():
    """loss_per="sample": the mean over rows of each row's own mean token loss (the HF loss of each row
    alone), so a short answer weighs as much as a long one; rows without labels are left out."""
    model = build_mllm("llama")
    ids, attention, labels, media = spliced_batch(model)
    masked = labels.masked_fill(model._placeholder_mask(ids), IGNORE_INDEX)
    assert len({int((row[1:] != IGNORE_INDEX).sum()) for row in masked}) > 1  # rows with different answer lengths
    embeds = model.embed(ids, media)
    per_row = [
        model.llm(inputs_embeds=embeds[i : i + 1], attention_mask=attention[i : i + 1], labels=masked[i : i + 1]).loss
        for i in range(len(ids))
    ]
    out = model(ids, attention, labels, media, loss_per="sample")
    torch.testing.assert_close(out.lm_loss, torch.stack(per_row).mean())
    assert not torch.allclose(out.lm_loss, model(ids, attention, labels, media).lm_loss)
    labels_one_empty = labels.clone()
    labels_one_empty[0] = IGNORE_INDEX
    out = model(ids, attention, labels_one_empty, media, loss_per="sample")
    torch.testing.assert_close(out.lm_loss, torch.stack(per_row[1:]).mean())
    with pytest.raises(ValueError, match="loss_per"):
        model(ids, attention, labels, media, loss_per="word")


def test_padding_is_not_routed():
    model = build_mllm()
    ids, attention, labels, media = spliced_batch(model)
    model(ids, attention, labels, media)
    routed = sum(int(v.sum()) for v in expert_load(model.llm).values())
    assert routed == 2 * 2 * int(attention.sum())  # 2 MoE layers x top-2 x real tokens only


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_save_load_round_trip_and_generation(tmp_path, family):
    model = build_mllm(family)
    ids, attention, labels, media = spliced_batch(model)
    with torch.no_grad():
        before = model(ids, attention, media=media)
    model.save_pretrained(tmp_path / "m")
    text = (tmp_path / "m" / "config.json").read_text()
    assert str(tmp_path) not in text and '"expert_sources"' in text  # relative: nothing points outside the folder
    loaded = MultimodalLLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        after = loaded(ids, attention, media=media)
    torch.testing.assert_close(after.logits, before.logits)
    assert loaded.num_moe_layers() == 2 and loaded.config.expert_sources == {"0": ["base"] * 4}
    prompt = ids[1:, :7]  # row 1: text, image, text
    out = loaded.generate(
        prompt,
        media={"image": MediaBatch(media["image"].tokens[1:], media["image"].mask[1:])},
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
    )
    assert out.shape == (1, 5) and out.dtype == torch.long
    # the same tokens as a hand-written greedy loop: full forward over the prompt and the tokens so far, argmax
    # of the last position with the placeholders suppressed
    image = {"image": MediaBatch(media["image"].tokens[1:], media["image"].mask[1:])}
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(5):
            logits = loaded(seq, torch.ones_like(seq), media=image).logits[0, -1].float()
            logits[sorted(loaded.config.placeholder_ids.values())] = float("-inf")
            seq = torch.cat([seq, logits.argmax().view(1, 1)], 1)
    assert out[0].tolist() == seq[0, prompt.shape[1] :].tolist()
    # batched as evaluation runs it: left-padded prompts of different lengths (one with an image) generate
    # exactly what each generates alone
    long, short = ids[1, :7], torch.tensor([5, 9, 11])
    batch = torch.zeros(2, 7, dtype=torch.long)
    batch[0], batch[1, 4:] = long, short
    attention = torch.zeros_like(batch)
    attention[0], attention[1, 4:] = 1, 1
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    both = loaded.generate(batch, attention, media=image, **kw)
    alone = loaded.generate(short[None], media=None, **kw)
    assert both.sequences[0].tolist() == out[0].tolist() and both.sequences[1].tolist() == alone.sequences[0].tolist()
    for step_both, step_alone in zip(both.scores, alone.scores):  # the next-token scores, not just the argmax
        finite = torch.isfinite(step_alone[0])
        torch.testing.assert_close(step_both[1][finite], step_alone[0][finite], rtol=1e-4, atol=1e-4)


def test_connectors_shapes_and_pooling():
    mlp = MLPConnector(ConnectorSpec("mlp", in_dim=8, out_dim=16, max_tokens=5))
    tokens, mask = (
        torch.randn(3, 12, 8),
        torch.tensor([[1] * 12, [1] * 3 + [0] * 9, [1] * 7 + [0] * 5], dtype=torch.bool),
    )
    out, m = mlp(tokens, mask)
    assert out.shape == (3, 5, 16) and m.sum(1).tolist() == [5, 3, 5] == [mlp.num_tokens(n) for n in (12, 3, 7)]
    # pooling a row does not depend on how much padding its batch had
    alone, _ = mlp(tokens[2:, :7], mask[2:, :7])
    torch.testing.assert_close(out[2], alone[0])
    q = QFormerConnector(ConnectorSpec("qformer", in_dim=8, out_dim=16, num_queries=4, num_heads=2))
    out, m = q(tokens, mask)
    assert out.shape == (3, 4, 16) and bool(m.all())
    # the Q-Former ignores padded positions
    changed = tokens.clone()
    changed[1, 3:] = 100.0
    torch.testing.assert_close(q(changed, mask)[0][1], out[1])
    with pytest.raises(ValueError, match="connector kind"):
        ConnectorSpec("conv", 8, 16)


def test_soft_tokens_start_at_the_text_embedding_scale():
    """Connectors end in an RMS norm whose gain starts at the LM's embedding RMS: soft tokens enter the LM at
    the scale of its (Gemma-scaled) text embeddings, not ten times smaller; the gain trains."""
    from omnimoe.mllm.connectors import embedding_rms
    from omnimoe.mllm.llm import add_placeholders, load_llm
    from omnimoe.mllm.train import MLLMTrainConfig, connector_specs

    llm, tok = load_llm("tiny:gemma3", tiny_hidden=64)
    ids = add_placeholders(llm, tok, ["image", "audio"])
    vocab = llm.get_input_embeddings().weight.shape[0]
    text = llm.get_input_embeddings()(torch.arange(vocab))
    rms = embedding_rms(llm)
    assert abs(rms - float(text.pow(2).mean(-1).sqrt().median())) < 0.05 * rms
    assert rms > 3 * float(
        llm.get_input_embeddings().weight.pow(2).mean(-1).sqrt().median()
    )  # Gemma scales by sqrt(width)
    cfg = MLLMTrainConfig(
        llm="tiny:gemma3",
        connectors={"image": {"kind": "mlp"}, "audio": {"kind": "qformer", "num_queries": 3, "num_heads": 4}},
    )
    specs = connector_specs(cfg, {"image": 20, "audio": 12}, 64, ["image", "audio"], rms)
    model = MultimodalLLM(llm, specs, ids)
    for m, d in (("image", 20), ("audio", 12)):
        soft, mask = model.connectors[m](torch.randn(2, 5, d) * 0.01, torch.ones(2, 5, dtype=torch.bool))
        torch.testing.assert_close(soft.pow(2).mean(-1).sqrt(), torch.full(soft.shape[:2], rms), rtol=1e-3, atol=1e-3)
        gain = next(p for n, p in model.connectors[m].named_parameters() if n.endswith("gain"))
        soft.sum().backward()
        assert gain.grad is not None and gain.grad.abs().sum() > 0
    raw = connector_specs(MLLMTrainConfig(connectors={"image": {"norm": False}}), {"image": 20}, 64, ["image"], rms)[
        "image"
    ]
    assert raw.out_scale == 0.0 and not any(n.endswith("gain") for n, _ in MLPConnector(raw).named_parameters())
    with pytest.raises(ValueError, match="out_scale"):
        ConnectorSpec("mlp", 8, 16, out_scale=-1.0)


def test_global_token_is_the_mlp_of_the_whole_item():
    """global_token: one more soft token first, the MLP of the mean of the item's real encoder tokens
    (padding excluded), then the pooled regional tokens as before."""
    spec = ConnectorSpec("mlp", in_dim=8, out_dim=16, max_tokens=5, global_token=True)
    mlp = MLPConnector(spec)
    tokens, mask = torch.randn(2, 12, 8), torch.tensor([[1] * 12, [1] * 3 + [0] * 9], dtype=torch.bool)
    out, m = mlp(tokens, mask)
    assert m.sum(1).tolist() == [6, 4] == [mlp.num_tokens(12), mlp.num_tokens(3)]
    torch.testing.assert_close(out[1, 0], mlp.net(tokens[1, :3].mean(0)))
    torch.testing.assert_close(out[0, 0], mlp.net(tokens[0].mean(0)))
    plain = MLPConnector(ConnectorSpec("mlp", in_dim=8, out_dim=16, max_tokens=5))
    plain.load_state_dict(mlp.state_dict())
    torch.testing.assert_close(out[:, 1:][m[:, 1:]], plain(tokens, mask)[0][plain(tokens, mask)[1]])


@pytest.mark.parametrize("tied,bias", [(True, False), (False, False), (False, True)])
def test_placeholder_rows_are_the_libraries_resize_with_rows_at_the_mean(tmp_path, tied, bias):
    """grow_embeddings gives what the library's resize gives once its new rows (and output biases) are set to the
    mean: the same weights (output layer tied or not, with a bias or not), logits, config and saved model."""
    import copy

    from transformers import AutoModelForCausalLM

    from omnimoe.mllm.llm import byte_tokenizer, grow_embeddings, tiny_config

    torch.manual_seed(0)
    config = tiny_config("llama", len(byte_tokenizer()), 32, 2)
    config.tie_word_embeddings = tied
    base = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    if not tied:
        if bias:
            base.lm_head = torch.nn.Linear(32, config.vocab_size, bias=True)
        with torch.no_grad():
            base.lm_head.weight.normal_()
            if bias:
                base.lm_head.bias.normal_()
    rows, size = config.vocab_size, config.vocab_size + 3
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    grow_embeddings(ours, size)
    theirs.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        for table in {id(t): t for t in (theirs.get_input_embeddings(), theirs.get_output_embeddings())}.values():
            table.weight[rows:] = table.weight[:rows].mean(0)
            if getattr(table, "bias", None) is not None:
                table.bias[rows:] = table.bias[:rows].mean()
    assert (ours.get_output_embeddings().weight is ours.get_input_embeddings().weight) == tied
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    ids = torch.tensor([[1, 2, rows, rows + 2, 5]])
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=0)
    assert ours.config.vocab_size == theirs.config.vocab_size == size and ours.vocab_size == size
    assert ours.get_input_embeddings().num_embeddings == ours.get_output_embeddings().out_features == size
    if bias:  # the library's model class has no output bias to save
        return
    ours.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(again(ids).logits, theirs(ids).logits, rtol=0, atol=0)


def test_a_cached_base_gives_each_stage_its_own_model_and_one_tokenizer(tmp_path, monkeypatch):
    """load_llm_with_placeholders on a base read once per process: the model is a fresh copy each time (training
    one changes no other), the tokenizer with the placeholders is read once per set of modalities, and both equal
    what load_llm + add_placeholders give."""
    from omnimoe.mllm import llm as llm_module
    from omnimoe.mllm.llm import add_placeholders, byte_tokenizer, load_llm, load_llm_with_placeholders

    tiny_llm("llama").save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    monkeypatch.setattr(llm_module, "_LOADED", {})
    monkeypatch.setattr(llm_module, "_PLACED", {})
    name = f"hf:{tmp_path / 'base'}"
    first, tok, ids = load_llm_with_placeholders(name, ["image", "audio"])
    second, tok2, ids2 = load_llm_with_placeholders(name, ["image", "audio"])
    plain, plain_tok = load_llm(name)
    plain_ids = add_placeholders(plain, plain_tok, ["image", "audio"])
    assert ids == ids2 == plain_ids and tok is tok2 and len(tok) == len(plain_tok)
    assert first is not second and tok is not plain_tok
    for (_, a), (_, b) in zip(first.state_dict().items(), plain.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        first.get_input_embeddings().weight.add_(1.0)
    torch.testing.assert_close(second.get_input_embeddings().weight, plain.get_input_embeddings().weight)
    image_only, tok3, ids3 = load_llm_with_placeholders(name, ["image"])
    assert tok3 is not tok and ids3 == {"image": ids["image"]} and len(tok3) == len(tok) - 1
    assert image_only.get_input_embeddings().weight.shape[0] == len(tok3)
