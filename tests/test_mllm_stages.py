"""Uni-MoE data and the three training stages on a tiny randomly initialised LLM (no download) with the real
encoders and real Tux Paint media: chat template and masking, bad records, grouped batches, every stage,
resume after a kill, LoRA merged and unmerged, the dense baseline, torchrun with expert parallelism, chat."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omnimoe.mllm import MultimodalLLM
from omnimoe.mllm.data import (
    TEMPLATES,
    ConversationData,
    DataError,
    MediaFeatures,
    encode_turns,
    read_conversations,
    template_for,
)
from omnimoe.mllm.llm import add_placeholders, load_llm
from omnimoe.mllm.model import IGNORE_INDEX
from omnimoe.mllm.moe_llm import MoEMLP, decoder_layers
from omnimoe.mllm.train import MLLMTrainConfig, load_stage, run_stage

from conftest import TINY_RECIPE

pytestmark = pytest.mark.slow  # real Tux Paint tasks, three trained stages, torchrun
ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_RECIPE


@pytest.fixture(scope="module")
def tasks(tuxpaint_manifest, tmp_path_factory):
    """Task files of at most 3 records per task (the session's manifest: only a fetch failure may skip it,
    never on CI; any other error fails every test here)."""
    from omnimoe.mllm.tasks import build_tuxpaint_tasks

    root = tmp_path_factory.mktemp("unimoe")
    build_tuxpaint_tasks(tuxpaint_manifest[0], root / "tasks", max_per_task=3)
    return root / "tasks"


@pytest.fixture(scope="module")
def stages(tasks, tmp_path_factory):
    """Stages 1, 2 and 3 once (later tests read the folders)."""
    out = tmp_path_factory.mktemp("stages")
    r1 = run_stage(MLLMTrainConfig(stage=1, data=str(tasks / "stage1.json"), **TINY), out / "s1", progress=False)
    r2 = run_stage(
        MLLMTrainConfig(
            stage=2, data=str(tasks / "stage3.json"), init=str(out / "s1"), **{**TINY, "moe": {"layers": "1"}}
        ),
        out / "s2",
        progress=False,
    )
    experts = {g: str(out / "s2" / g) for g in r2["groups"]}
    r3 = run_stage(
        MLLMTrainConfig(
            stage=3,
            data=str(tasks / "stage3.json"),
            init=str(out / "s1"),
            experts=experts,
            **{**TINY, "moe": {"layers": "1", "num_experts_per_tok": 2}},
        ),
        out / "s3",
        progress=False,
    )
    return {"out": out, "r1": r1, "r2": r2, "r3": r3, "experts": experts}


def test_chat_template_masks_everything_but_the_answers():
    llm, tok = load_llm("tiny:llama")
    ids = add_placeholders(llm, tok, ["image"])
    template = template_for(tok, "gemma")
    turns = [
        ("system", "Be brief."),
        ("user", "<image>\nWhat is this?"),
        ("assistant", "A koala."),
        ("user", "Sure?"),
        ("assistant", "Yes."),
    ]
    enc = encode_turns(turns, tok, template, ids, {"image": [5]})
    assert enc.input_ids.count(ids["image"]) == 5 and len(enc.input_ids) == len(enc.labels)
    learnt = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])
    assert learnt == "A koala.<end_of_turn>\nYes.<end_of_turn>\n"
    text = tok.decode(enc.input_ids)
    assert text.startswith("<bos><start_of_turn>user\nBe brief.\n\n<image>") and "What is this?" in text
    gen = encode_turns(turns[:3], tok, template, ids, {"image": [5]}, generation=True)
    assert tok.decode(gen.input_ids).endswith("What is this?<end_of_turn>\n<start_of_turn>model\n") and all(
        lab == IGNORE_INDEX for lab in gen.labels
    )
    with pytest.raises(ValueError, match="more <image> placeholders"):
        encode_turns([("user", "<image><image>"), ("assistant", "x")], tok, template, ids, {"image": [5]})
    assert TEMPLATES["vicuna"].suffix("</s>") == "</s>"


def test_a_base_tokenizer_gets_the_plain_format_ending_in_eos():
    """No chat template (a base LM, as the packaged Gemma): USER/ASSISTANT text, loss on the answer and on
    <eos> only, although the vocabulary has Gemma's turn markers; a tokenizer with its own template gets it."""
    llm, tok = load_llm("tiny:llama")
    assert "<start_of_turn>" in tok.get_vocab() and not tok.chat_template
    ids = add_placeholders(llm, tok, ["image"])
    template = template_for(tok)
    assert template.name == "vicuna"
    enc = encode_turns(
        [("user", "<image>\nWhat is this?"), ("assistant", "A koala.")], tok, template, ids, {"image": [3]}
    )
    learnt = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert tok.decode(learnt) == "A koala.<eos>" and learnt[-1] == tok.eos_token_id
    assert tok.decode(enc.input_ids) == "<bos>USER: " + "<image>" * 3 + "\nWhat is this? ASSISTANT: A koala.<eos>"
    assert enc.labels[-len(learnt) :] == learnt and set(enc.labels[: -len(learnt)]) == {
        IGNORE_INDEX
    }  # the answer ends the text
    from omnimoe.mllm.evaluate import stop_ids

    assert stop_ids(tok) == [tok.eos_token_id]
    tok.chat_template = "{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
    assert template_for(tok).name == "gemma" and tok.convert_tokens_to_ids("<end_of_turn>") in stop_ids(tok)
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}"
    assert template_for(tok).name == "chatml"


def test_generation_stops_at_the_end_marker(tasks):
    """A tiny LM fitted on one answer (loss on the answer and <eos>) says exactly that answer and stops:
    the evaluation's decoded reply has nothing after the end marker, though max_new_tokens leaves room."""
    from omnimoe.mllm.evaluate import answer, stop_ids

    cfg = MLLMTrainConfig(stage=1, data=str(tasks / "stage1.json"), **TINY)
    features = MediaFeatures.build([tasks / "stage1.json"], cfg.encoders, tasks / "features", progress=False)
    from omnimoe.mllm.train import base_model

    model, tok = base_model(cfg, ["image", "audio"], features.dims())
    recs = [r for r in json.loads((tasks / "stage1.json").read_text()) if r["task"] == "caption-image"][:1]
    one = tasks / "one.json"
    one.write_text(
        json.dumps(
            [
                {
                    **recs[0],
                    "conversations": [recs[0]["conversations"][0], {"from": "gpt", "value": "A koala."}],
                    "answer": "A koala.",
                }
            ]
        )
    )
    template = template_for(tok)
    data = ConversationData(
        one, features, tok, template, model.config.placeholder_ids, lambda m, n: model.connectors[m].num_tokens(n)
    )
    batch = data.collate([0], 0)
    assert _overfit(model, batch, 150) < 0.05
    gen = ConversationData(
        one,
        features,
        tok,
        template,
        model.config.placeholder_ids,
        lambda m, n: model.connectors[m].num_tokens(n),
        generation=True,
    )
    rows = answer(model, tok, gen, max_new_tokens=40, progress=False)
    assert rows[0]["prediction"] == "A koala." and rows[0]["score"] == 1.0
    ids = model.generate(
        gen.collate([0], 0)["input_ids"],
        media=gen.collate([0], 0)["media"],
        max_new_tokens=40,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=stop_ids(tok),
    )
    assert ids[0].tolist().index(tok.eos_token_id) == len(tok("A koala.", add_special_tokens=False).input_ids)


def _overfit(model, batch, steps):
    """Adam on every weight of a tiny model over one batch; the last LM loss."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"])
        out.loss.backward()
        opt.step()
    return out.lm_loss.item()


def test_bad_records_are_reported_with_index_and_reason(tmp_path, tasks):
    good = json.loads((tasks / "stage1.json").read_text())[0]
    image = str((tasks / good["image"]).resolve()) if "image" in good else None
    records = [
        {
            "id": "ok",
            "image": image,
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}],
        },
        {
            "id": "missing",
            "image": "nope.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}],
        },
        {
            "id": "count",
            "image": image,
            "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A."}],
        },
        {"id": "noanswer", "conversations": [{"from": "human", "value": "Hi"}]},
        {"id": "speaker", "conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "A."}]},
        {"id": "empty", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  "}]},
        "not an object",
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    samples, bad = read_conversations(path)
    assert [s.id for s in samples] == ["ok"] and samples[0].group == "image"
    reasons = {b.index: b.reason for b in bad}
    assert "nope.png does not exist" in reasons[1] and "0 <image> placeholder(s) for 1 image" in reasons[2]
    assert (
        "no non-empty answer" in reasons[3]
        and "unknown speaker 'robot'" in reasons[4]
        and "no non-empty answer" in reasons[5]
    )
    assert "expected an object" in reasons[6] and str(bad[0]).startswith("record 1 (missing)")
    path.write_text(json.dumps(records[1:]))
    with pytest.raises(DataError, match="no usable record"):
        read_conversations(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_conversations(path)


def test_batches_are_grouped_by_modality_and_split_over_ranks(stages, tasks):
    model, tok = stages["r1"]["model"], stages["r1"]["tokenizer"]
    features = MediaFeatures.build(
        [tasks / "stage3.json"], MLLMTrainConfig().encoders, tasks / "features", progress=False
    )
    data = ConversationData(
        tasks / "stage3.json",
        features,
        tok,
        template_for(tok),
        model.config.placeholder_ids,
        lambda m, n: model.connectors[m].num_tokens(n),
    )
    batches = data.batches(2, epoch=0, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(len(data)))
    assert all(len({data.examples[i].sample.group for i in b}) == 1 for b in batches)
    assert batches == data.batches(2, epoch=0, seed=0) and batches != data.batches(2, epoch=1, seed=0)
    assert len(data.batches(2, 0, world=2)) % 2 == 0
    batch = data.collate(batches[0], pad_id=0)
    ex = data.examples[batches[0][0]]
    n_media = sum(len(v) for e in batch["examples"] for v in e.media.values())
    assert sum(len(b.tokens) for b in batch["media"].values()) == n_media
    assert (
        batch["input_ids"].shape == batch["labels"].shape
        and batch["input_ids"][0, : len(ex.input_ids)].tolist() == ex.input_ids
    )


def test_stage1_trains_only_the_connectors(stages):
    out, r1 = stages["out"], stages["r1"]
    base, _ = load_llm("tiny:llama", tiny_layers=2)
    model = r1["model"]
    trained = {k: v for k, v in model.llm.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in trained.items())  # the LLM is frozen
    saved = load_file(str(out / "s1" / "connectors.safetensors"))
    assert set(k.split(".")[0] for k in saved) == set(model.config.connectors)
    from omnimoe.mllm.train import base_model

    cfg = MLLMTrainConfig(stage=1, **TINY)  # the same seed: the connectors stage 1 started from
    fresh, _ = base_model(cfg, list(model.config.connectors), {m: c.spec.in_dim for m, c in model.connectors.items()})
    for m, connector in fresh.connectors.items():  # every connector moved (a no-op optimiser would leave them)
        moved = [k for k, v in connector.state_dict().items() if not torch.equal(v, saved[f"{m}.{k}"])]
        assert len(moved) >= len(connector.state_dict()) // 2, (m, moved)
    info = json.loads((out / "s1" / "stage.json").read_text())
    assert info["stage"] == 1 and info["train"]["steps"] == 4 and (out / "s1" / "tb").is_dir()


def test_stage2_trains_one_ffn_per_group_on_the_chosen_layers(stages):
    out, groups = stages["out"], stages["r2"]["groups"]
    assert groups == sorted(groups) and set(groups) <= {"image", "speech", "sound"} and len(groups) >= 2
    base, _ = load_llm("tiny:llama", tiny_layers=2)
    base_ffn = decoder_layers(base)[1].mlp.state_dict()
    for g in groups:
        ffn = load_file(str(out / "s2" / g / "ffn.safetensors"))
        assert {k.split(".")[0] for k in ffn} == {"1"}  # moe.layers = "1": only that layer's FFN is an expert candidate
        assert any(not torch.equal(ffn[f"1.{k}"], v) for k, v in base_ffn.items())  # it trained
        model, _, _ = load_stage(out / "s2" / g)
        torch.testing.assert_close(
            decoder_layers(model.llm)[1].mlp.state_dict()["down_proj.weight"], ffn["1.down_proj.weight"]
        )


def test_stage3_builds_the_moe_from_the_stage2_ffns_and_reloads(stages):
    out, r3 = stages["out"], stages["r3"]
    model = r3["model"]
    folder = out / "s3" / "model"
    cfg = json.loads((folder / "config.json").read_text())
    groups = sorted(stages["experts"])
    assert cfg["expert_sources"]["1"] == ["base:tiny:llama"] + [f"stage2:{g}:../../s2/{g}" for g in groups]
    assert cfg["lora"] is None and str(out) not in (folder / "config.json").read_text()  # merged; relative paths only
    loaded = MultimodalLLM.from_pretrained(folder)
    assert isinstance(decoder_layers(loaded.llm)[1].mlp, MoEMLP) and not isinstance(
        decoder_layers(loaded.llm)[0].mlp, MoEMLP
    )
    assert decoder_layers(loaded.llm)[1].mlp.moe.config.num_experts == 1 + len(groups)
    ids = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    again, tok, _ = load_stage(out / "s3")
    assert tok.convert_tokens_to_ids("<image>") == loaded.config.placeholder_ids["image"]
    summary = json.loads((out / "s3" / "stage.json").read_text())
    assert summary["experts"] == {g: f"../s2/{g}" for g in groups}


def test_stage3_with_unmerged_lora_and_the_dense_baseline(stages, tasks):
    out = stages["out"]
    common = dict(
        data=str(tasks / "stage3.json"),
        init=str(out / "s1"),
        experts=stages["experts"],
        **{**TINY, "steps": 2, "moe": {"layers": "1"}},
    )
    r = run_stage(MLLMTrainConfig(stage=3, lora={"merge": False}, **common), out / "s3-lora", progress=False)
    cfg = json.loads((out / "s3-lora" / "model" / "config.json").read_text())
    assert cfg["lora"]["r"] == 8 and cfg["lora"]["target_parameters"]
    loaded = MultimodalLLM.from_pretrained(out / "s3-lora" / "model")
    ids = torch.randint(0, 200, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, r["model"](ids).logits)
    d = run_stage(MLLMTrainConfig(stage=3, dense=True, **common), out / "s3-dense", progress=False)
    mlp = decoder_layers(d["model"].llm)[1].mlp
    assert not isinstance(mlp, MoEMLP) and sum(p.numel() for p in mlp.parameters()) == 2 * sum(
        p.numel() for p in decoder_layers(d["model"].llm)[0].mlp.parameters()
    )  # top-2 worth of FFN: equal active parameters
    reloaded = MultimodalLLM.from_pretrained(out / "s3-dense" / "model")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, d["model"](ids).logits)


def test_a_killed_stage_resumes_to_the_same_weights(tasks, tmp_path):
    cfg = MLLMTrainConfig(stage=1, data=str(tasks / "stage1.json"), **{**TINY, "steps": 4, "save_every": 2})
    whole = run_stage(cfg, tmp_path / "whole", progress=False)["model"]
    assert run_stage(cfg, tmp_path / "cut", progress=False, stop_at_step=2) == {"interrupted_at": 2}
    resumed = run_stage(cfg, tmp_path / "cut", progress=False)["model"]
    for (k, a), (_, b) in zip(whole.connectors.state_dict().items(), resumed.connectors.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    other = MLLMTrainConfig(
        stage=1, data=str(tasks / "stage1.json"), **{**TINY, "steps": 4, "save_every": 2, "lr": 1.0}
    )
    (tmp_path / "cut" / "connectors.safetensors").unlink()
    with pytest.raises(ValueError, match="another recipe"):
        run_stage(other, tmp_path / "cut", progress=False)


def test_prealign_points_soft_tokens_at_the_answers_embeddings(tasks, tmp_path):
    """Pre-alignment (no LM forward) makes each item's soft tokens point at the LM's embeddings of its own
    answers (captions, categories), more than at other items' answers; yes/no answers are never targets. In
    stage 1 it runs before the LM steps, is recorded, and a resumed run does not redo it."""
    import torch.nn.functional as F

    from omnimoe.mllm.model import causal_lm
    from omnimoe.mllm.prealign import PrealignRecipe, prealign, prealign_targets
    from omnimoe.mllm.train import base_model

    cfg = MLLMTrainConfig(stage=1, data=str(tasks / "stage1.json"), **TINY)
    features = MediaFeatures.build([tasks / "stage1.json"], cfg.encoders, tasks / "features", progress=False)
    model, tok = base_model(cfg, ["image", "audio"], features.dims())
    data = ConversationData(
        tasks / "stage1.json",
        features,
        tok,
        template_for(tok),
        model.config.placeholder_ids,
        lambda m, n: model.connectors[m].num_tokens(n),
    )
    emb = causal_lm(model.llm).get_input_embeddings()
    recipe = PrealignRecipe(steps=80, batch_size=8, tasks=["caption-image", "image-category"])
    items, target, _ = prealign_targets(data, tok, emb, recipe.tasks)["image"]
    records = json.loads((tasks / "stage1.json").read_text())
    used = {r["image"] for r in records if r["task"] in recipe.tasks}
    assert len(items) == len(used) >= 3 and set(prealign_targets(data, tok, emb, recipe.tasks)) == {"image"}
    answers = {r["answer"] for r in records if r["task"] in recipe.tasks}
    assert "Yes." not in answers and "No." not in answers
    # one item asked for its caption and its category: the target is the sum of both answers' unit directions
    from omnimoe.mllm.prealign import _answer_direction

    cap = next(r for r in records if r["task"] == "caption-image")
    two = tasks / "two.json"
    two.write_text(
        json.dumps(
            [
                cap,
                {
                    **cap,
                    "id": "x",
                    "task": "image-category",
                    "answer": "animals",
                    "conversations": [cap["conversations"][0], {"from": "gpt", "value": "animals"}],
                },
            ]
        )
    )
    pair = ConversationData(
        two,
        features,
        tok,
        template_for(tok),
        model.config.placeholder_ids,
        lambda m, n: model.connectors[m].num_tokens(n),
    )
    (one,), summed, _ = prealign_targets(pair, tok, emb, recipe.tasks)["image"]
    expected = _answer_direction(cap["answer"], tok, emb) + _answer_direction("animals", tok, emb)
    torch.testing.assert_close(summed[0], expected)
    assert one in [list(k) for k in items] and len({tuple(k) for k in items}) == len(items)  # one target per item

    def alignment():
        with torch.no_grad():
            from omnimoe.mllm.data import pad_items

            batch = pad_items([features.item("image", k) for k in items])
            soft, mask = model.connectors["image"](batch.tokens, batch.mask)
            cos = F.cosine_similarity(
                soft.mean(1, keepdim=True), F.normalize(target, dim=-1).unsqueeze(0), dim=-1
            )  # (item, target)
            own = cos.diagonal()
            return float(own.mean()), float((own.unsqueeze(1) - cos).sum() / (len(items) * (len(items) - 1)))

    from omnimoe.mllm.prealign import _connector_input

    raw = features.item("image", items[0])
    once = _connector_input(model.connectors["image"], raw)
    assert len(raw) > 8 and len(once) == 8  # pooled once up front (max_tokens 8) ...
    with torch.no_grad():  # ... to exactly what the connector computes from the raw tokens
        for x in (raw, once):
            out = model.connectors["image"](x.unsqueeze(0), torch.ones(1, len(x), dtype=torch.bool))[0]
            torch.testing.assert_close(
                out, model.connectors["image"](raw.unsqueeze(0), torch.ones(1, len(raw), dtype=torch.bool))[0]
            )
    assert _connector_input(model.connectors["audio"], raw) is raw  # a Q-Former reads every token
    before, margin_before = alignment()
    info = prealign(model.connectors, data, tok, emb, recipe, progress=False)
    after, margin = alignment()
    assert info["items"] == {"image": len(items)} and info["history"][-1]["loss"] < info["history"][0]["loss"]
    assert after > before + 0.3 and margin > max(0.05, margin_before + 0.05), (before, after, margin_before, margin)
    with pytest.raises(ValueError, match="no record of tasks"):
        prealign(model.connectors, data, tok, emb, PrealignRecipe(steps=1, tasks=["no-such-task"]), progress=False)

    staged = MLLMTrainConfig(
        stage=1, data=str(tasks / "stage1.json"), **{**TINY, "prealign": {"steps": 20, "batch_size": 4}}
    )
    assert run_stage(staged, tmp_path / "s1", progress=False, stop_at_step=2) == {"interrupted_at": 2}
    first = json.loads((tmp_path / "s1" / "prealign.json").read_text())
    (tmp_path / "s1" / "prealign.json").write_text(json.dumps({**first, "marker": 1}))
    info = json.loads(json.dumps(run_stage(staged, tmp_path / "s1", progress=False)["prealign"]))
    assert (
        info["marker"] == 1 and len(info["history"]) == 1 and set(info["items"]) == {"image", "audio"}
    )  # not redone on resume
    with pytest.raises(ValueError, match="prealign"):
        MLLMTrainConfig(stage=1, prealign={"steps": 5, "batch_size": 1})
    with pytest.raises(ValueError, match="prealign.stepz"):
        MLLMTrainConfig(stage=1, prealign={"stepz": 5})


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900, **kw)


def test_torchrun_stage3_with_expert_parallelism_saves_a_whole_model(stages, tasks, tmp_path):
    out = stages["out"]
    sets = [
        f"data={tasks / 'stage3.json'}",
        f"init={out / 's1'}",
        "llm=tiny:llama",
        "tiny_layers=2",
        "steps=2",
        "batch_size=2",
        "dtype=float32",
        "moe.layers=1",
        "expert_parallel=true",
        "connectors.audio.kind=qformer",
        "connectors.audio.num_queries=4",
        "connectors.audio.num_heads=4",
        "connectors.image.max_tokens=8",
    ] + [f"experts.{g}={p}" for g, p in stages["experts"].items()]
    groups = len(stages["experts"])
    if (1 + groups) % 2:
        sets.append(
            "experts.extra=" + stages["experts"][sorted(stages["experts"])[0]]
        )  # an even expert count for 2 ranks
    done = _cli(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "omnimoe.cli",
        "mllm",
        "train",
        "--stage",
        "3",
        "--out",
        str(tmp_path / "ep"),
        "--no-eval",
        *[a for s in sets for a in ("--set", s)],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "outlived destroy_process_group" not in done.stderr  # every rank's gloo threads joined before exit
    model = MultimodalLLM.from_pretrained(tmp_path / "ep" / "model")  # written at world size 2, loaded in one process
    moe = decoder_layers(model.llm)[1].mlp.moe
    assert (
        moe.experts.gate_up_proj.shape[0]
        == moe.config.num_experts
        == len(json.loads((tmp_path / "ep" / "model" / "config.json").read_text())["expert_sources"]["1"])
    )
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 200, (1, 6))).logits).all()


def test_chat_and_eval_from_the_command_line(stages, tasks, tmp_path):
    out = stages["out"]
    held_out = json.loads((tasks / "test.json").read_text())
    image = (tasks / next(r for r in held_out if "image" in r)["image"]).resolve()
    sound = next(r for r in held_out if "audio" in r)
    audio = (tasks / (sound["audio"][0] if isinstance(sound["audio"], list) else sound["audio"])).resolve()

    def chat(option, path, question):
        return _cli(
            "-m",
            "omnimoe.cli",
            "mllm",
            "chat",
            "--model",
            str(out / "s3"),
            option,
            str(path),
            "--max-new-tokens",
            "5",
            question,
        )

    from omnimoe.mllm.chat import ChatSession

    session = ChatSession(out / "s3")  # the command answers what the library answers, for an image and for audio
    done = chat("--image", image, "What is this?")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == session.ask("What is this?", images=[str(image)], max_new_tokens=5).strip()
    done = chat("--audio", audio, "What is said?")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == session.ask("What is said?", audios=[str(audio)], max_new_tokens=5).strip()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    done = chat("--image", bad, "What is this?")
    assert done.returncode == 2 and "bad.png" in done.stderr
    done = _cli(
        "-m",
        "omnimoe.cli",
        "mllm",
        "eval",
        "--model",
        str(out / "s3"),
        "--data",
        str(tasks / "test.json"),
        "--limit",
        "4",
        "--out",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert len(rows) == 4 and all(0.0 <= r["score"] <= 1.0 for r in rows)


def test_a_resumed_evaluation_reuses_the_same_models_scores_only(stages, tasks, tmp_path, monkeypatch):
    """eval.json carries a key over the weights, the records and the settings: the same model on the same
    records is not scored twice; one changed weight, record or setting scores again."""
    import omnimoe.mllm.evaluate as ev
    from omnimoe.mllm.train import load_stage

    model, tok, cfg = load_stage(stages["out"] / "s1")
    cfg.eval_data, cfg.eval_limit = str(tasks / "test.json"), 3
    first = ev.evaluate_folder(model, tok, cfg, tmp_path, progress=False)
    calls = []
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert ev.evaluate_folder(model, tok, cfg, tmp_path, progress=False) == first and calls == []
    cfg.eval_limit = 2  # another setting
    ev.evaluate_folder(model, tok, cfg, tmp_path, progress=False)
    assert calls == [1]
    with torch.no_grad():  # another weight
        next(model.connectors.parameters()).view(-1)[0] += 1.0
    ev.evaluate_folder(model, tok, cfg, tmp_path, progress=False)
    assert calls == [1, 1]
    ev.evaluate_folder(model, tok, cfg, tmp_path, progress=False)
    assert calls == [1, 1]


def test_media_swap_control_separates_seeing_from_guessing(tasks):
    """A model that reads its answer off the image scores 1.0 on its own records and loses it all when each
    record gets another record's image; the swap is a derangement within each task, same modality."""
    from omnimoe.mllm.evaluate import evaluate, swap_media
    from omnimoe.mllm.train import base_model

    records = json.loads((tasks / "stage3.json").read_text()) + json.loads((tasks / "test.json").read_text())
    by_answer = {}
    for r in records:
        if r["task"] == "image-category":
            by_answer.setdefault(r["answer"], r)
    picked = list(by_answer.values())[:4]
    assert len(picked) >= 3  # distinct answers: each swapped record holds another answer's image
    swapped = swap_media(picked, seed=0)
    assert [r["id"] for r in swapped] == [r["id"] for r in picked]
    assert all(s["image"] != r["image"] and s["answer"] == r["answer"] for s, r in zip(swapped, picked))
    assert sorted(s["image"] for s in swapped) == sorted(r["image"] for r in picked)  # a permutation of the same media
    mixed = picked + [r for r in records if r["task"] == "speech-what"][:3]
    assert all(("audio" in s) == ("audio" in r) for s, r in zip(swap_media(mixed), mixed))  # modality kept
    assert swap_media(picked, seed=0) == swapped  # fixed
    (tasks / "four.json").write_text(json.dumps(picked))
    (tasks / "four-swapped.json").write_text(json.dumps(swapped))

    cfg = MLLMTrainConfig(stage=1, data=str(tasks / "four.json"), **TINY)
    features = MediaFeatures.build([tasks / "four.json"], cfg.encoders, tasks / "features", progress=False)
    model, tok = base_model(cfg, ["image"], features.dims())
    template = template_for(tok)

    def load(name, generation):
        return ConversationData(
            tasks / name,
            features,
            tok,
            template,
            model.config.placeholder_ids,
            lambda m, n: model.connectors[m].num_tokens(n),
            generation=generation,
        )

    batch = load("four.json", False).collate(list(range(len(picked))), 0)
    assert _overfit(model, batch, 300) < 0.05
    result = evaluate(
        model, tok, load("four.json", True), load("four-swapped.json", True), max_new_tokens=16, progress=False
    )
    info = result["summary"]["tasks"]["image-category"]
    assert (
        info["mean"] == 1.0
        and info["swapped"] == 0.0
        and info["seeing_gain"] == 1.0
        and info["n_swapped"] == len(picked)
    )
    donors = {r["id"]: r["answer"] for r in picked}
    assert all(
        r["swapped_prediction"] == donors[s["swapped_from"]] for r, s in zip(result["rows"], swapped)
    )  # it says the donor's
    assert info["replies"] == {
        r["answer"]: 1 / len(picked) for r in picked
    }  # each reply names its own record's category
