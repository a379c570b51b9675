"""Inference: class probabilities and top classes from a trained run, and image conversion for it.

Exporting the model for other runtimes is cnn.inference.export (`from cnn.inference.export import export`).
"""

from cnn.inference.convert import INVERT, ImageFileError, convert, open_image
from cnn.inference.predict import as_run, input_dtype, input_shape, predict, probabilities, top_classes

__all__ = ["INVERT", "ImageFileError", "as_run", "convert", "input_dtype", "input_shape", "open_image", "predict",
           "probabilities", "top_classes"]
