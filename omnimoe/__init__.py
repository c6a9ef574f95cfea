"""omnimoe: multimodal models from frozen unimodal ones with Mixture-of-Experts (Alt-MoE, Uni-MoE)."""

__version__ = "0.1.0"
