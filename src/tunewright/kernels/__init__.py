"""Speed code, behind two entries: `training.training_kernels` (fit) and `prepacked.inference_kernels`
(generation, label scoring, serving).

Each path extends a library through a supported point (transformers' attention registry,
`torch.autograd.Function`) or checks on entry that the library still looks as expected, and falls
back to the stock path with one warning otherwise. switches.py says how to force each path.
This package imports nothing itself, so importing one entry does not load the other's code.
"""
