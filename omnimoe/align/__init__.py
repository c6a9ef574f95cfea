"""Alt-MoE: the multi-directional MoE connector, its losses and direction schedules."""

from omnimoe.align.connector import AltMoEConnector, ConnectorConfig, ConnectorOutput, direction_name, parse_direction
from omnimoe.align.losses import LogitScale, info_nce, regression_loss
from omnimoe.align.schedules import DirectionSchedule

__all__ = [
    "AltMoEConnector",
    "ConnectorConfig",
    "ConnectorOutput",
    "DirectionSchedule",
    "LogitScale",
    "direction_name",
    "info_nce",
    "parse_direction",
    "regression_loss",
]
