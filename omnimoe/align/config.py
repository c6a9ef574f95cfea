"""What an alignment run is asked to do: the method, the connector's architecture and the training settings.

``TrainConfig`` holds the training settings; the connector's architecture is its ``connector`` section, a
:class:`~omnimoe.align.connector.ConnectorConfig` without modalities (the data supplies them). In YAML::

    method: moe-alternating
    steps: 800
    connector:
      hidden_size: 256
      num_experts: 12

Recipes written before the section existed, with the architecture at the top level (``hidden_size: 256``,
``--set num_experts=8``), are read into ``connector`` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from omnimoe.align.connector import ConnectorConfig
from omnimoe.config import ConfigError, check_ranges

Method = Literal["moe-alternating", "moe-joint", "mlp-alternating", "linear"]
METHODS: tuple[str, ...] = ("linear", "mlp-alternating", "moe-joint", "moe-alternating")
SELECT_ON: tuple[str, ...] = ("R@1", "R@5", "R@10", "mean")
# TrainConfig fields read only once training is over (when the best weights are loaded): runs that differ in
# these alone train identically, so a finished run is resumed, or shared by a sweep, whatever their values
AFTER_TRAINING: tuple[str, ...] = ("residual_per_direction",)

# architecture keys a recipe may still give at the top level (read into ``connector``)
_CONNECTOR_KEYS = (
    "hidden_size",
    "contrastive_dim",
    "num_experts",
    "num_experts_per_tok",
    "dropout",
    "router_aux_loss_coef",
    "linear_path",
)


@dataclass
class TrainConfig:
    """Defaults come from a sweep on the Tux Paint split (docs/history.md): small data wants a small,
    strongly regularised connector, latent mixup and early stopping."""

    method: Method = "moe-alternating"
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)  # the architecture (not the modalities)
    steps: int = 800  # direction-batches: alternating and joint schedules get the same data and compute
    batch_size: int = 128
    lr: float = 3e-4
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.05
    weight_decay_end: float = 0.5
    grad_clip: float = 1.0
    temperature: float = 0.05
    learnable_temperature: bool = False
    regression_loss: str = "smooth_l1"
    regression_weight: float = 0.5
    contrastive_weight: float = 0.5
    steps_per_direction: int = 1
    # where the connector has a linear path (connector.linear_path): train the linear two-tower first (the
    # ``linear`` method's run, same settings and seed, in ``out/linear-start``), start the connector from it, and
    # judge that start on validation before the first residual step, so early stopping keeps the linear
    # solution unless the MoE improves on it. Without a linear path it does nothing.
    linear_start: bool = True
    freeze_linear: bool = True  # with linear_start: the started linear path stays fixed; the residuals learn
    # where the connector has a linear path: after training, each direction keeps its residual (the MoE path's
    # head and its target projection) only where that beats the linear path alone on validation; elsewhere
    # the residual is zeroed and the direction is the linear path's (the linear two-tower's with linear_start
    # and freeze_linear); chosen at load, best.pt unchanged; the choices are in the run's residuals.json
    residual_per_direction: bool = True
    token_inputs: bool = False  # feed token states (MoE per token, masked mean) instead of pooled vectors
    pool_tokens: int = 0  # > 0, with token_inputs: each item's tokens averaged down to at most this many (cheaper)
    schedule: str = "auto"  # auto (alternate for *-alternating, joint for moe-joint/linear), alternate, adaptive, joint
    # Latent-space augmentation (the encoders are frozen, so augment the stored vectors):
    mixup_alpha: float = 0.4  # > 0: FuseMix-style mixup, source and target mixed with the same Beta(a, a) weight
    input_noise: float = 0.0  # > 0: Gaussian noise on source latents, as a fraction of each feature's std
    # > 0: learn on top of the label prior (omnimoe.align.prior) where one applies: its cosine times this weight
    # is added to the InfoNCE logits, and to the score used for early stopping and at test
    prior_weight: float = 0.0
    eval_every: int = 25
    patience: int = 10  # evaluations without improvement before stopping
    # validation score for early stopping and the best checkpoint: R@1, R@5, R@10, mean (of the three)
    select_on: str = "mean"
    dtype: str = "auto"
    device: str = "auto"  # auto: CUDA when available (cuda:LOCAL_RANK under torchrun), else CPU; or cpu, cuda, cuda:1
    seed: int = 0

    legacy_keys: ClassVar[dict[str, str]] = {k: "connector" for k in _CONNECTOR_KEYS}  # read by config.from_dict

    def __post_init__(self) -> None:
        if isinstance(self.connector, dict):
            from omnimoe.config import from_dict

            self.connector = from_dict(ConnectorConfig, self.connector, prefix="connector.")
        check_ranges(
            self,
            {
                "steps": "[1, inf)",
                "batch_size": "[2, inf)",
                "lr": "(0, inf)",
                "min_lr": "[0, inf)",
                "warmup_steps": "[0, inf)",
                "weight_decay": "[0, inf)",
                "weight_decay_end": "[0, inf)",
                "grad_clip": "[0, inf)",
                "temperature": "(0, inf)",
                "regression_weight": "[0, inf)",
                "contrastive_weight": "[0, inf)",
                "steps_per_direction": "[1, inf)",
                "pool_tokens": "[0, inf)",
                "mixup_alpha": "[0, inf)",
                "input_noise": "[0, inf)",
                "prior_weight": "[0, inf)",
                "eval_every": "[1, inf)",
                "patience": "[1, inf)",
                "seed": "[0, inf)",
            },
        )
        if self.regression_weight + self.contrastive_weight <= 0:
            raise ConfigError("regression_weight + contrastive_weight must be > 0 (nothing would be learned)")
        if self.select_on not in SELECT_ON:
            raise ConfigError(f"select_on: {self.select_on!r} is not one of {list(SELECT_ON)}")
        if self.connector.modalities or self.connector.directions:
            raise ConfigError("connector.modalities / connector.directions come from the data: leave them out")
        if not self.connector.use_moe:
            raise ConfigError("connector.use_moe: the method decides it (mlp-alternating is the dense MLP connector)")

    @property
    def reads_tokens(self) -> bool:
        """Whether the model reads token states (the linear two-tower projects pooled vectors)."""
        return self.token_inputs and self.method != "linear"


def flat(config: dict[str, Any]) -> dict[str, Any]:
    """A ``TrainConfig`` dict with the connector's keys at the top level (as recipes were once written)."""
    out = {k: v for k, v in config.items() if k != "connector"}
    return {**out, **{k: v for k, v in (config.get("connector") or {}).items()}}
