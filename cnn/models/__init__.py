"""Models: layer specs, presets that expand to them, the Sequential module, ImageNet backbones and their weight
files, your own module, and a Keras-style summary."""

from cnn.models import backbones, layers, module, presets, weights
from cnn.models.module import record
from cnn.models.sequential import (Sequential, adapt, build_model, check_config, check_head, layer_outputs, layer_specs,
                                   output_shape, parse_stack)
from cnn.models.summary import summary
from cnn.models.weights import pretrained

__all__ = ["Sequential", "adapt", "backbones", "build_model", "check_config", "check_head", "layer_outputs",
           "layer_specs", "layers", "output_shape", "module", "parse_stack", "presets", "pretrained", "record",
           "summary", "weights"]
