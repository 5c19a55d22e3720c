from lamina.engine.callbacks import BatchNormRecalibration, Callback, EarlyStopping, LRMonitor, ModelCheckpoint
from lamina.engine.checkpoint import load_checkpoint, load_model_weights, read_meta, save_checkpoint
from lamina.engine.distributed import Distributed, ShardedLoader
from lamina.engine.loggers import CSVLogger, MLflowLogger, MLflowStore, TensorBoardLogger
from lamina.engine.optim import build_optimizer, build_scheduler
from lamina.engine.precision import Precision, select_device
from lamina.engine.seed import seed_everything
from lamina.engine.trainer import Trainer

__all__ = ["Trainer", "Callback", "BatchNormRecalibration", "ModelCheckpoint", "EarlyStopping", "LRMonitor", "CSVLogger",
           "TensorBoardLogger", "MLflowStore", "MLflowLogger", "build_optimizer", "build_scheduler", "Precision", "select_device",
           "seed_everything", "save_checkpoint", "load_checkpoint", "load_model_weights", "read_meta", "Distributed",
           "ShardedLoader"]
