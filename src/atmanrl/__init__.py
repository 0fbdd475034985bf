"""atmanrl: AtManRL (differentiable attention saliency as an RL reward for chain-of-thought) in pure PyTorch.

The packages form layers, each importing only those before it (``tests/test_layers.py`` keeps this true):

    errors, dist, progress -> model -> saliency -> config -> tasks -> eval -> rl -> toy -> experiments/, benchmarks/

This file is the one place above them all: it tells the model loader how to build the toy world's warm start
(``load("toyworld-sft")``), which lives in ``atmanrl.toy``, so that ``atmanrl.model`` never imports the toy package.
The builder is imported when the model is first asked for, not on every ``import atmanrl``.
"""

from pathlib import Path

from atmanrl.model.registry import register_built

__version__ = "0.1.0"


def _toyworld_sft() -> Path:
    from atmanrl.toy.sft import sft_model_dir  # on first use only: importing atmanrl must not load the toy world

    return sft_model_dir()


register_built("toyworld-sft", _toyworld_sft)
