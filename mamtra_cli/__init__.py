"""MamTra: hybrid Mamba-Transformer speech LMs distilled from CosyVoice 2 style teachers."""

__version__ = "0.1.0"
