"""matjax: JAX machine learning for condensed-matter and materials physics."""

from matjax._malloc import keep_freed_memory

__version__ = "0.1.0"
MALLOC_TUNED = keep_freed_memory()
