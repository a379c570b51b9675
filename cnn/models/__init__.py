"""Models: layer specs, presets that expand to them, the Sequential module, and its Keras-style summary."""

from cnn.models import layers, presets
from cnn.models.sequential import (Sequential, build_model, check_config, check_head, layer_outputs, layer_specs,
                                   output_shape, parse_stack)
from cnn.models.summary import summary

__all__ = ["Sequential", "build_model", "check_config", "check_head", "layer_outputs", "layer_specs", "layers", "output_shape",
           "parse_stack", "presets", "summary"]
