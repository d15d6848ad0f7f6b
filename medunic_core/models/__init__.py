"""Model construction: :func:`create_model` is the one way to build a Med-UniC model."""

from medunic_core.models.factory import create_model, trainable_parameters
from medunic_core.models.medunic import MedUniC

__all__ = ["MedUniC", "create_model", "trainable_parameters"]
