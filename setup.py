"""Builds the optional oneDNN extension, cnn/kernels/_onednn_ffi (everything else is in pyproject.toml).

The build needs gcc, oneDNN's headers and library (the onednn-devel-cpu-gomp
wheel, a build requirement on Linux x86-64) and jaxlib's XLA FFI headers
(jaxlib, also a build requirement). When any of them is missing, or the
compile fails, the install goes on without the extension and cnn uses its
XLA paths (cnn/kernels/onednn.py says why).
"""

import os
import sys
import sysconfig

from setuptools import Extension, setup


def _include_dirs() -> list[str] | None:
    """oneDNN's and XLA FFI's header folders, or None (and a note) when either is missing."""
    try:
        import jaxlib
    except ImportError:
        print("cnn: jaxlib is not importable at build time; building without the oneDNN extension", file=sys.stderr)
        return None
    prefixes = dict.fromkeys((sysconfig.get_path("data"), sys.prefix, sys.base_prefix))
    onednn = [os.path.join(p, "include") for p in prefixes if os.path.exists(os.path.join(p, "include", "dnnl.hpp"))]
    ffi = os.path.join(os.path.dirname(jaxlib.__file__), "include")
    if not onednn or not os.path.exists(os.path.join(ffi, "xla", "ffi", "api", "ffi.h")):
        print("cnn: oneDNN's or XLA FFI's headers are missing; building without the oneDNN extension",
              file=sys.stderr)
        return None
    return [onednn[0], ffi]


def _extensions() -> list[Extension]:
    if not (sys.platform == "linux" and os.environ.get("CNN_BUILD_ONEDNN", "1") != "0"):
        return []
    include_dirs = _include_dirs()
    if include_dirs is None:
        return []
    lib_dir = os.path.join(os.path.dirname(include_dirs[0]), "lib")
    return [Extension(
        "cnn.kernels._onednn_ffi", ["cnn/kernels/onednn_ffi.cc"], include_dirs=include_dirs, language="c++",
        library_dirs=[lib_dir], libraries=["dnnl"],
        extra_compile_args=["-std=c++17", "-O2", "-Wno-attributes", "-Wno-return-type"],
        # site-packages/cnn/kernels -> the venv's lib/, where onednn-cpu-gomp puts libdnnl.so.3; onednn.py also
        # loads it from there itself, which covers editable installs.
        extra_link_args=["-Wl,-rpath,$ORIGIN/../../../../../lib"],
        optional=True)]


setup(ext_modules=_extensions())
