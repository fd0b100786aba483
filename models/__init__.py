"""Networks for the harness: torchvision ResNets with a replaceable head, and freezing by depth."""
from models.build import ModelError, build_model, load_pretrained, model_names
from models.heads import HEADS
from models.freeze import UNITS, FreezePlan, Layer, apply_unfreeze, layers, set_train_mode
from models.split import SplitModel as SplitModel, split_frozen as split_frozen  # re-exported

__all__ = [
    "HEADS", "ModelError", "build_model", "load_pretrained", "model_names",
    "UNITS", "FreezePlan", "Layer", "apply_unfreeze", "layers", "set_train_mode",
]
