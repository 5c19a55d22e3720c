from lamina.config.io import (ConfigDeprecationWarning, apply_overrides, load_config, read_yaml, to_dict, to_yaml,
                              validate)
from lamina.config.schema import (DataConfig, LoggingConfig, ModelConfig, OptimizerConfig, RunConfig,
                                  ScheduleConfig, TaskConfig, TrainerConfig)

__all__ = ["RunConfig", "DataConfig", "ModelConfig", "TaskConfig", "OptimizerConfig", "ScheduleConfig",
           "TrainerConfig", "LoggingConfig", "load_config", "read_yaml", "apply_overrides", "validate",
           "to_dict", "to_yaml", "ConfigDeprecationWarning"]
