"""matjax: JAX machine learning for condensed-matter and materials physics."""

__version__ = "0.1.0"
