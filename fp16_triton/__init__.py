"""fp16_triton: Triton kernels for mixed-precision training.

Fused unscale and non-finite check of scaled gradients, the global gradient norm, and
mixed-precision optimizer steps that keep fp32 master weights and write the fp16/bf16
parameters back, behind ``torch.optim``-compatible optimizers.
"""

# Importing an algorithm's host module registers it (fp16_triton/spec.py) and its classes are
# exported through __all__: the algorithm imports (adam, sgd, ...) are the registry, one line
# per algorithm.
from . import fp16_utils, functional
from .adam import Adam, AdamW  # noqa: F401
from .backend import BACKEND_ENV
from .checkpoint_files import CheckpointError
from .engine import Engine, initialize
from .fp16_optimizer import FP16Optimizer
from .lamb import Lamb  # noqa: F401
from .lion import Lion  # noqa: F401
from .loss_scaler import DynamicLossScaler, LossScaler, MinLossScaleError, get_loss_scaler
from .muon import Muon  # noqa: F401
from .optimizer import FusedOptimizer
from .sgd import SGD  # noqa: F401
from .spec import algorithms as _algorithms
from .state_export import to_fp32_state_dict

__version__ = "0.1.0"

__all__ = [
    *(cls.__name__ for algorithm in _algorithms().values() for cls in algorithm.classes),
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
    "to_fp32_state_dict",
    "__version__",
]
