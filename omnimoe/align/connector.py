"""The Alt-MoE connector: one sparse MoE shared by every direction between N frozen encoders.

For a direction ``src->tgt`` (e.g. ``text->image``), a source latent (pooled ``(B, D_src)`` or token states
``(B, L, D_src)`` with a mask) goes through:

1. the source modality's input projection to the hidden width ``h``, plus a learnable *direction
   embedding*, then GELU;
2. two task paths through the **same** MoE, each marked by a learnable task embedding (regression,
   contrastive): ``out = GELU(LayerNorm(MoE(x + task))) + (x + task)``, per token, then a masked mean over
   tokens;
3. per-direction heads: regression ``h -> D_tgt`` (predicts the target encoder's own latent) and
   contrastive ``h -> d``; the target side of the contrastive loss is a per-direction projection
   ``D_tgt -> d`` of the pooled target latent.

Both paths run in one MoE call (the two copies are concatenated along the batch), so the experts see
every direction and both tasks: that is what makes the MoE a *multi-directional* connector.

With ``linear_path`` the connector contains the linear two-tower (:class:`LinearTwoTower`): one linear
projection per modality, used for the queries of its source directions and the keys of its target
directions, plus two residuals that start at zero: the MoE path's contrastive head on the query side and the
per-direction target projection on the key side. At initialisation the connector *is* a linear two-tower
(``load_linear`` copies a trained one in); training adds what the MoE can add on top.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omnimoe.config import ConfigError, check_ranges, from_dict
from omnimoe.io import load_pretrained, save_pretrained
from omnimoe.moe import MoEConfig, MoELayer

TASKS = ("regression", "contrastive")


def direction_name(src: str, tgt: str) -> str:
    return f"{src}->{tgt}"


def parse_direction(direction: str) -> tuple[str, str]:
    src, sep, tgt = direction.partition("->")
    if not sep or not src or not tgt or src == tgt:
        raise ValueError(f"direction {direction!r} is not of the form 'source->target' with two different modalities")
    return src, tgt


@dataclass
class ConnectorConfig:
    """Modalities and widths, the MoE, and the heads. Directions default to every ordered pair.

    The defaults are the alignment recipe's (docs/results.md): small paired sets want a small, strongly
    regularised connector. A config without modalities is a recipe (``TrainConfig.connector``): it has the
    architecture, and the data supplies the modalities when the connector is built."""

    # modality -> encoder width, e.g. {"text": 384, "image": 1280}; empty in a training recipe (the data's
    # widths and directions fill it when the connector is built), at least two in a connector
    modalities: dict[str, int] = field(default_factory=dict)
    directions: list[str] = field(default_factory=list)  # "text->image", ...; empty = every ordered pair
    hidden_size: int = 256
    contrastive_dim: int = 256
    num_experts: int = 12
    num_experts_per_tok: int = 4
    expert_type: str = "mlp"
    hidden_act: str = "gelu"
    intermediate_size: int = 0  # 0 = hidden_size (the Alt-MoE expert is Linear(h, h)-GELU-Linear(h, h))
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    top_p: float = 0.0
    dropout: float = 0.5
    use_moe: bool = True  # False: one dense MLP of the same width in place of the MoE (the MLP ablation)
    # the linear two-tower inside: query = linear[src](pooled source) + the MoE path, key = linear[tgt](target)
    # + the direction's target projection; both residuals are zero at initialisation
    linear_path: bool = True

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "hidden_size": "[1, inf)",
                "contrastive_dim": "[1, inf)",
                "num_experts": "[1, inf)",
                "num_experts_per_tok": "[1, inf)",
                "intermediate_size": "[0, inf)",
                "router_aux_loss_coef": "[0, inf)",
                "router_z_loss_coef": "[0, inf)",
                "top_p": "[0, 1]",
                "dropout": "[0, 1)",
            },
        )
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok: {self.num_experts_per_tok} is more than num_experts ({self.num_experts})"
            )
        if not self.modalities and not self.directions:
            return  # a recipe: the modalities come with the data
        if len(self.modalities) < 2:
            raise ValueError(f"a connector needs at least two modalities, got {sorted(self.modalities)}")
        if not self.directions:
            self.directions = [direction_name(a, b) for a in self.modalities for b in self.modalities if a != b]
        for d in self.directions:
            src, tgt = parse_direction(d)
            for m in (src, tgt):
                if m not in self.modalities:
                    raise ValueError(f"direction {d!r} names modality {m!r}, not one of {sorted(self.modalities)}")

    def moe_config(self) -> MoEConfig:
        return MoEConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size or self.hidden_size,
            num_experts=self.num_experts if self.use_moe else 1,
            num_experts_per_tok=self.num_experts_per_tok if self.use_moe else 1,
            expert_type=self.expert_type,  # type: ignore[arg-type]
            hidden_act=self.hidden_act,
            expert_dropout=self.dropout,
            norm_topk_prob=self.norm_topk_prob if self.use_moe else True,
            router_aux_loss_coef=self.router_aux_loss_coef,
            router_z_loss_coef=self.router_z_loss_coef,
            top_p=self.top_p,
        )


@dataclass
class ConnectorOutput:
    regression: torch.Tensor  # (B, D_tgt): predicted target latent
    contrastive: torch.Tensor  # (B, d): query side of the contrastive space (not normalised)
    router_loss: torch.Tensor  # weighted MoE aux + z losses
    tokens_per_expert: torch.Tensor  # (E,) load of this call


def _key(direction: str) -> str:
    """ModuleDict keys cannot contain '.', and '->' reads badly in state-dict names."""
    return direction.replace("->", "_to_")


class AltMoEConnector(nn.Module):
    model_type = "omnimoe-altmoe-connector"

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        if len(config.modalities) < 2:
            raise ValueError(f"a connector needs at least two modalities, got {sorted(config.modalities)}")
        self.config = config
        h, d = config.hidden_size, config.contrastive_dim
        self.in_proj = nn.ModuleDict({m: nn.Linear(width, h) for m, width in config.modalities.items()})
        self.direction_embed = nn.ParameterDict({_key(x): nn.Parameter(torch.zeros(h)) for x in config.directions})
        self.task_embed = nn.ParameterDict({t: nn.Parameter(torch.randn(h) * 0.02) for t in TASKS})
        self.moe = MoELayer(config.moe_config())
        self.norm = nn.ModuleDict({t: nn.LayerNorm(h) for t in TASKS})
        self.regression_head = nn.ModuleDict(
            {_key(x): nn.Linear(h, config.modalities[parse_direction(x)[1]]) for x in config.directions}
        )
        self.contrastive_head = nn.ModuleDict({_key(x): nn.Linear(h, d) for x in config.directions})
        self.target_proj = nn.ModuleDict(
            {_key(x): nn.Linear(config.modalities[parse_direction(x)[1]], d) for x in config.directions}
        )
        if config.linear_path:  # the linear two-tower inside, the MoE and the target projections as residuals
            self.linear = nn.ModuleDict({m: nn.Linear(width, d) for m, width in config.modalities.items()})
            for head in [*self.contrastive_head.values(), *self.target_proj.values()]:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def _check(self, direction: str) -> tuple[str, str]:
        if direction not in self.config.directions:
            raise ValueError(f"direction {direction!r} is not one of this connector's {self.config.directions}")
        return parse_direction(direction)

    def forward(
        self, direction: str, source: torch.Tensor, mask: torch.Tensor | None = None, tasks: tuple[str, ...] = TASKS
    ) -> ConnectorOutput:
        """``source``: (B, D_src) pooled latents or (B, L, D_src) token states with ``mask`` (B, L).
        ``tasks``: the paths to run; retrieval needs only ``("contrastive",)`` (half the MoE work), and the
        output of a path not run is None."""
        if not tasks or any(t not in TASKS for t in tasks):
            raise ValueError(f"tasks {tasks!r}: choose from {TASKS}")
        src, _ = self._check(direction)
        width = self.config.modalities[src]
        if source.shape[-1] != width:
            raise ValueError(f"{direction}: source width {source.shape[-1]} != the {src} encoder's {width}")
        tokens = source if source.dim() == 3 else source.unsqueeze(1)
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        key = _key(direction)
        x = F.gelu(self.in_proj[src](tokens) + self.direction_embed[key])  # (B, L, h)
        paths = torch.cat([x + self.task_embed[t] for t in tasks])  # both tasks through one MoE call
        moe = self.moe(paths, attention_mask=mask.repeat(len(tasks), 1))
        outs = {}
        m = mask.unsqueeze(-1)
        for i, t in enumerate(tasks):
            part = moe.hidden_states[i * len(x) : (i + 1) * len(x)]
            residual = paths[i * len(x) : (i + 1) * len(x)]
            y = F.gelu(self.norm[t](part)) + residual
            outs[t] = (y * m.to(y.dtype)).sum(1) / m.to(y.dtype).sum(1).clamp(min=1)  # masked mean over tokens
        contrastive = self.contrastive_head[key](outs["contrastive"]) if "contrastive" in outs else None
        if contrastive is not None and self.config.linear_path:
            pooled = (tokens * m.to(tokens.dtype)).sum(1) / m.to(tokens.dtype).sum(1).clamp(min=1)
            contrastive = self.linear[src](pooled) + contrastive
        return ConnectorOutput(
            regression=self.regression_head[key](outs["regression"]) if "regression" in outs else None,  # type: ignore[arg-type]
            contrastive=contrastive,  # type: ignore[arg-type]
            router_loss=moe.router_loss,
            tokens_per_expert=moe.tokens_per_expert,
        )

    def embed_target(self, direction: str, target: torch.Tensor) -> torch.Tensor:
        """Pooled target latents (B, D_tgt) -> the contrastive space of ``direction`` (not normalised)."""
        _, tgt = self._check(direction)
        key = self.target_proj[_key(direction)](target)
        return self.linear[tgt](target) + key if self.config.linear_path else key

    def linear_parameters(self) -> list[nn.Parameter]:
        """The linear two-tower inside (``linear_path``): one projection per modality."""
        if not self.config.linear_path:
            raise ValueError("this connector has no linear path (ConnectorConfig.linear_path is off)")
        return list(self.linear.parameters())

    def residual_parameters(self, direction: str) -> list[nn.Parameter]:
        """What ``direction`` adds to the linear path (``linear_path``): the MoE path's contrastive head (query
        side) and the direction's target projection (key side). Zeroed, the direction is the linear two-tower's."""
        self.linear_parameters()
        self._check(direction)
        key = _key(direction)
        return [*self.contrastive_head[key].parameters(), *self.target_proj[key].parameters()]

    def load_linear(self, tower: "LinearTwoTower") -> None:
        """Copy a (trained) linear two-tower into the linear path: with the residuals still at zero, the
        connector's contrastive outputs are then the tower's."""
        self.linear_parameters()
        if tower.widths != self.config.modalities or tower.dim != self.config.contrastive_dim:
            raise ValueError(
                f"linear two-tower {tower.widths} -> {tower.dim} does not fit this connector's "
                f"{self.config.modalities} -> {self.config.contrastive_dim}"
            )
        for m, proj in tower.proj.items():
            self.linear[m].load_state_dict(proj.state_dict())

    def save_pretrained(self, folder: str | Path) -> Path:
        return save_pretrained(folder, self.model_type, dataclasses.asdict(self.config), self.state_dict())

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "AltMoEConnector":
        config, state = load_pretrained(folder, cls.model_type)
        config = {"linear_path": False, **config}  # connectors saved before the option had no linear path
        model = cls(from_dict(ConnectorConfig, config))
        model.load_state_dict(state)
        return model


class LinearTwoTower(nn.Module):
    """One linear projection per modality into a shared space (the CLIP-style reference point).

    It has the connector's interface (``forward(direction, source)``, ``embed_target``) so that training,
    evaluation and retrieval treat it like any other connector; it has no regression head."""

    model_type = "omnimoe-linear-two-tower"

    def __init__(self, widths: dict[str, int], dim: int) -> None:
        super().__init__()
        self.widths, self.dim = dict(widths), dim
        self.proj = nn.ModuleDict({m: nn.Linear(w, dim) for m, w in widths.items()})

    def forward(
        self, direction: str, source: torch.Tensor, mask: torch.Tensor | None = None, tasks: tuple[str, ...] = TASKS
    ) -> ConnectorOutput:
        src, _ = parse_direction(direction)
        if src not in self.proj:
            raise ValueError(f"direction {direction!r}: no projection for modality {src!r} (have {sorted(self.proj)})")
        if source.dim() == 3:  # token states: mean over the real tokens
            m = (
                (torch.ones(source.shape[:2], dtype=torch.bool) if mask is None else mask)
                .unsqueeze(-1)
                .to(source.dtype)
            )
            source = (source * m).sum(1) / m.sum(1).clamp(min=1)
        zero = source.new_zeros(())
        return ConnectorOutput(None, self.proj[src](source), zero, torch.zeros(0, dtype=torch.long))  # type: ignore[arg-type]

    def embed_target(self, direction: str, target: torch.Tensor) -> torch.Tensor:
        return self.proj[parse_direction(direction)[1]](target)

    def save_pretrained(self, folder: str | Path) -> Path:
        return save_pretrained(folder, self.model_type, {"widths": self.widths, "dim": self.dim}, self.state_dict())

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "LinearTwoTower":
        config, state = load_pretrained(folder, cls.model_type)
        model = cls(config["widths"], config["dim"])
        model.load_state_dict(state)
        return model


CONNECTOR_TYPES: dict[str, type] = {c.model_type: c for c in (AltMoEConnector, LinearTwoTower)}


def load_connector(folder: str | Path) -> nn.Module:
    """Any saved connector (Alt-MoE / MLP ablation, or the linear two-tower), by the ``model_type`` of its
    ``config.json``; returned in eval mode."""
    from omnimoe.io import CONFIG_NAME, read_json

    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a saved connector (no {CONFIG_NAME})")
    kind = read_json(path).get("model_type")
    if kind not in CONNECTOR_TYPES:
        raise ValueError(f"{folder}: model_type {kind!r} is not a connector ({sorted(CONNECTOR_TYPES)})")
    return CONNECTOR_TYPES[kind].from_pretrained(folder).eval()
