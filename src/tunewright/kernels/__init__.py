"""Speed code, behind two entries: `training_kernels` (fit) and `inference_kernels` (generation, scoring).

Each path extends a library through a supported point (transformers' attention registry,
`torch.autograd.Function`) or checks on entry that the library still looks as expected, and falls
back to the stock path with one warning otherwise. switches.py says how to force each path.
"""

from tunewright.kernels.prepacked import prepacked_linears as inference_kernels
from tunewright.kernels.training import TrainingKernels, training_kernels

__all__ = ["TrainingKernels", "inference_kernels", "training_kernels"]
