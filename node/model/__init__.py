"""Pure PyTorch ResBM: no transport, DHT or CLI imports below this package."""

from node.model.config import ModelConfig
from node.model.resbm import ResBM, Stage, stage_spans

__all__ = ["ModelConfig", "ResBM", "Stage", "stage_spans"]
