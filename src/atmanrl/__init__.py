"""atmanrl: AtManRL (differentiable attention saliency as an RL reward for chain-of-thought) in pure PyTorch."""

__version__ = "0.1.0"
