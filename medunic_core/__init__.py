"""medunic_core: Med-UniC (cross-lingual medical vision-language pre-training) without Flower.

Everything a site, a coordinator or a researcher needs to build, train and evaluate the
model lives here; ``server/``, ``client/`` and ``simulation/`` only adapt it.
"""

__version__ = "0.1.0"
