import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from omnimoe.config import ConfigError, apply_overrides, from_dict, load_config, to_dict
from omnimoe.moe import MoEConfig


@dataclass
class Inner:
    width: int = 8
    act: Literal["gelu", "silu"] = "gelu"


@dataclass
class Outer:
    name: str = "x"
    lr: float = 1e-3
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    cap: Optional[float] = None


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\ninner:\n  width: 16\n")
    cfg = load_config(Outer, path, ["inner.act=silu", "lr=3", "tags=[a, b]", "cap=null"])
    assert cfg == Outer(name="run", lr=3.0, inner=Inner(width=16, act="silu"), tags=["a", "b"], cap=None)
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["inner.widht=3"], "inner.widht"),
        (["inner.width=abc"], "inner.width: expected an integer"),
        (["inner.act=tanh"], "inner.act: 'tanh' is not one of"),
        (["lr"], "not of the form"),
        (["inner.width=true"], "inner.width"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, listy)


def test_moe_config_from_overrides():
    cfg = load_config(
        MoEConfig, None, ["hidden_size=16", "intermediate_size=32", "num_experts=4", "capacity_factor=1.5"]
    )
    assert cfg.capacity_factor == 1.5 and cfg.num_experts == 4
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


def test_exponent_floats_from_yaml_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1e-3\n")
    assert load_config(Outer, tmp_path / "c.yaml").lr == 1e-3
    assert load_config(Outer, None, ["lr=3e-4"]).lr == 3e-4
    with pytest.raises(ConfigError, match="lr: expected a number"):
        load_config(Outer, None, ["lr=fast"])


def test_parse_encoders_reads_fields_and_names_bad_items():
    from omnimoe.align.pipeline import parse_encoders, parse_seeds

    assert parse_encoders("text=minilm, speech=whisper-tiny@audio,image=hf:some/model") == {
        "text": "minilm",
        "speech": "whisper-tiny@audio",
        "image": "hf:some/model",
    }
    for bad, message in (
        ("text=minilm", "at least two"),
        ("text=minilm,image", "'image' is not of the form"),
        ("text=minilm,=x", "'=x' is not of the form"),
        ("text=,image=e", "'text=' is not of the form"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_encoders(bad)
    assert parse_seeds(" 3, 1 ") == [3, 1]
    with pytest.raises(ValueError, match="listed twice"):
        parse_seeds("1,1")


def test_align_recipe_connector_section_and_the_flat_form(tmp_path):
    """The architecture lives in ``connector``; a recipe written with it at the top level reads the same."""
    from omnimoe.align.config import TrainConfig
    from omnimoe.align.trainer import _resumable

    shipped = load_config(TrainConfig, Path(__file__).parent.parent / "configs" / "align.yaml")
    assert shipped == TrainConfig()  # the file spells out the defaults
    nested = load_config(TrainConfig, None, ["connector.hidden_size=64", "connector.num_experts=6", "steps=10"])
    old = load_config(TrainConfig, None, ["hidden_size=64", "num_experts=6", "steps=10"])
    assert nested == old and old.connector.hidden_size == 64 and old.connector.num_experts == 6
    (tmp_path / "old.yaml").write_text("steps: 10\nhidden_size: 64\nnum_experts: 6\n")
    assert load_config(TrainConfig, tmp_path / "old.yaml") == old
    # a checkpoint's config written before the section existed still resumes under the new form
    flat_config = {**dataclasses.asdict(old), **dataclasses.asdict(old.connector)}
    del flat_config["connector"]
    assert _resumable(flat_config) == _resumable(dataclasses.asdict(old))
    assert _resumable(dataclasses.asdict(old)) != _resumable(dataclasses.asdict(TrainConfig()))
    # one written before the linear path, the linear start and token pooling existed: it was trained without
    # them, so it resumes under a config that turns them off, and is refused under the new defaults
    before = {
        k: v for k, v in flat_config.items() if k not in ("linear_path", "linear_start", "freeze_linear", "pool_tokens")
    }
    without = load_config(
        TrainConfig, None, ["hidden_size=64", "num_experts=6", "steps=10", "linear_path=false", "linear_start=false"]
    )
    assert _resumable(before) == _resumable(dataclasses.asdict(without)) != _resumable(dataclasses.asdict(old))
    for overrides, message in (
        (["hidden_size=64", "connector.hidden_size=32"], "hidden_size and connector.hidden_size are both given"),
        (["connector.hidden_sise=64"], "unknown config key\\(s\\) connector.hidden_sise"),
        (["num_experts_per_tok=20"], "num_experts_per_tok: 20 is more than num_experts"),
        (["connector.dropout=1.0"], "connector.dropout: 1.0 is outside"),
        (["connector.modalities={text: 384, image: 1280}"], "come from the data"),
        (["connector.use_moe=false"], "the method decides it"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(TrainConfig, None, overrides)


def test_mllm_connector_recipes_are_typed_when_the_recipe_loads():
    from omnimoe.mllm.train import ConnectorRecipe, MLLMTrainConfig, _same_recipe

    cfg = load_config(MLLMTrainConfig, None, ["connectors.image.max_tokens=8"])
    assert cfg.connectors["image"] == ConnectorRecipe(max_tokens=8)  # one key given, the rest defaults
    assert set(cfg.connectors) == {"image"}  # a connectors mapping given replaces the default one
    with pytest.raises(ConfigError, match="unknown config key\\(s\\) connectors.image.max_token "):
        load_config(MLLMTrainConfig, None, ["connectors.image.max_token=8"])
    with pytest.raises(ConfigError, match="connectors.video: expected a mapping"):
        load_config(MLLMTrainConfig, None, ["connectors.video=3"])
    # a checkpoint whose recipe spelled a connector by the settings it changed resumes under the typed form
    saved = {**to_dict(cfg), "connectors": {"image": {"max_tokens": 8}}}
    assert _same_recipe(saved, cfg)
    assert not _same_recipe({**saved, "connectors": {"image": {"max_tokens": 9}}}, cfg)
    assert not _same_recipe({**saved, "stepz": 3}, cfg)
