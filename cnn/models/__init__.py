"""Models: layer specs, presets that expand to them, the Sequential module, your own module, and a Keras-style summary."""

from cnn.models import layers, module, presets
from cnn.models.module import record
from cnn.models.sequential import (Sequential, adapt, build_model, check_config, check_head, layer_outputs, layer_specs,
                                   output_shape, parse_stack)
from cnn.models.summary import summary

__all__ = ["Sequential", "adapt", "build_model", "check_config", "check_head", "layer_outputs", "layer_specs", "layers", "output_shape",
           "module", "parse_stack", "presets", "record", "summary"]
