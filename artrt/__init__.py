"""artrt: a lean runtime for two-expert text-to-image diffusion models.

The distribution maps three source folders to subpackages: ``export/`` is
``artrt.export`` (torch side), ``runtime/`` is ``artrt.runtime`` (torch-free) and
``engines/`` is ``artrt.engines`` (one module per backend).
"""

__version__ = "0.1.0"
