"""fp16_triton: Triton kernels for mixed-precision training.

Fused unscale and non-finite check of scaled gradients, the global gradient norm, and
mixed-precision Adam/AdamW/SGD steps that keep fp32 master weights and write the fp16/bf16
parameters back, behind ``torch.optim``-compatible optimizers.
"""

from . import fp16_utils, functional
from .adam import Adam, AdamW
from .backend import BACKEND_ENV
from .checkpoint_files import CheckpointError
from .engine import Engine, initialize
from .fp16_optimizer import FP16Optimizer
from .loss_scaler import DynamicLossScaler, LossScaler, MinLossScaleError, get_loss_scaler
from .optimizer import FusedOptimizer
from .sgd import SGD

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "AdamW",
    "SGD",
    "FusedOptimizer",
    "FP16Optimizer",
    "LossScaler",
    "DynamicLossScaler",
    "MinLossScaleError",
    "get_loss_scaler",
    "Engine",
    "initialize",
    "CheckpointError",
    "BACKEND_ENV",
    "functional",
    "fp16_utils",
    "__version__",
]
