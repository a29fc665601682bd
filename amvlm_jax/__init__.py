"""amvlm_jax: AMVLM vision-language pre-training and text-guided semi-supervised segmentation in JAX."""

__version__ = "0.1.0"
