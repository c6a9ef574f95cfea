"""The NumPy query path (omnimoe.align.query) gives the connector's own contrastive query."""

import pytest
import torch

from omnimoe.align.connector import AltMoEConnector, ConnectorConfig
from omnimoe.align.query import QueryPath

WIDTHS = {"text": 24, "image": 40}


def connector(**kw) -> AltMoEConnector:
    torch.manual_seed(0)
    model = AltMoEConnector(
        ConnectorConfig(modalities=dict(WIDTHS), hidden_size=32, contrastive_dim=16, num_experts=6, **kw)
    )
    with torch.no_grad():  # trained-looking weights: no zero head, no unit norm, no zero embeddings
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"num_experts_per_tok": 2, "norm_topk_prob": True},
        {"expert_type": "glu", "hidden_act": "silu"},
        {"hidden_act": "gelu_new", "intermediate_size": 48},
        {"top_p": 0.5},
        {"use_moe": False},
        {"linear_path": True},
    ],
    ids=["default", "top2-renormalised", "glu-silu", "tanh-gelu", "top-p", "mlp-ablation", "linear-path"],
)
def test_query_path_equals_the_connector(kw):
    model = connector(**kw)
    x = torch.randn(5, WIDTHS["text"], generator=torch.Generator().manual_seed(1)) * 2
    for direction in ("text->image", "image->text"):
        source = x if direction.startswith("text") else torch.randn(3, WIDTHS["image"])
        with torch.no_grad():
            expected = model(direction, source, tasks=("contrastive",)).contrastive
        got = QueryPath(model, direction)(source)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_query_path_refuses_what_it_does_not_cover():
    model = connector()
    path = QueryPath(model, "text->image")
    with pytest.raises(ValueError, match=r"shape \(B, 24\)"):
        path(torch.randn(2, 40))
    with pytest.raises(ValueError, match="not one of this connector's"):
        QueryPath(model, "text->audio")
    model.moe.config.score_func = "sigmoid"
    with pytest.raises(ValueError, match="score_func"):
        QueryPath(model, "text->image")
