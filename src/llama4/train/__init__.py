"""Training and fine-tuning: `llama4.train.run(config) -> output directory` (see docs/training.md)."""

from .checkpointing import checkpoints, latest_checkpoint
from .config import TrainConfig, config_from_dict, load_train_config
from .loop import Trainer, run

__all__ = ["TrainConfig", "Trainer", "checkpoints", "config_from_dict", "latest_checkpoint", "load_train_config",
           "run"]
