"""maskdm-harness: gin-driven benchmarking of masked diffusion pretraining (MaskDM)."""

__version__ = "0.1.0"
