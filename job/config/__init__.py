"""The run's configuration (README "Configuration"): ``sections`` holds the dataclasses,
``build`` resolves defaults, preset, file and ``--set`` into one ``Config``, ``checks``
refuses what no run could use. Importers name what they need from ``job.config``."""

from job.config.build import build_config, config_from_dict, diff_keys, get_value, set_value
from job.config.checks import validate
from job.config.sections import (
    MATH_SECTIONS,
    NOT_MATH_KEYS,
    SAMPLING_KEYS,
    STAGE2_MATH_SECTIONS,
    TRAJECTORY_CLASSES,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    Stage2Config,
    StorageConfig,
    TrainConfig,
    split_sizes,
    steps_per_epoch,
)

__all__ = [
    "MATH_SECTIONS", "NOT_MATH_KEYS", "SAMPLING_KEYS", "STAGE2_MATH_SECTIONS", "TRAJECTORY_CLASSES", "CheckpointConfig", "Config",
    "ConfigError", "DataConfig", "ModelConfig", "MonitorConfig", "OptimConfig", "Stage2Config", "StorageConfig",
    "TrainConfig", "build_config", "config_from_dict", "diff_keys", "get_value", "set_value", "split_sizes",
    "steps_per_epoch", "validate",
]
