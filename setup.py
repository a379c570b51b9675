"""Builds the optional oneDNN extension, cnn/kernels/_onednn_ffi, and the preloaded cnn/_reuse_blocks library
(everything else is in pyproject.toml).

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


def _onednn_include() -> str | None:
    """The folder holding dnnl.hpp: from the onednn-devel wheel's file list, as pip's isolated build environment
    puts its data files under its own prefix, not sys.prefix; else an installed oneDNN under the prefixes."""
    try:
        from importlib import metadata
        files = metadata.distribution("onednn-devel-cpu-gomp").files or []
        header = next((f for f in files if str(f).replace("\\", "/").endswith("include/dnnl.hpp")), None)
        if header is not None:
            return os.path.dirname(os.path.abspath(str(header.locate())))
    except metadata.PackageNotFoundError:
        pass
    for prefix in dict.fromkeys((sysconfig.get_path("data"), sys.prefix, sys.base_prefix, "/usr")):
        if os.path.exists(os.path.join(prefix, "include", "dnnl.hpp")):
            return os.path.join(prefix, "include")
    return None


def _include_dirs() -> list[str] | None:
    """oneDNN's and XLA FFI's header folders, or None (and a note) when either is missing."""
    try:
        import jaxlib
    except ImportError:
        print("cnn: jaxlib is not importable at build time; building without the oneDNN extension", file=sys.stderr)
        return None
    onednn = _onednn_include()
    ffi = os.path.join(os.path.dirname(jaxlib.__file__), "include")
    if onednn is None or not os.path.exists(os.path.join(ffi, "xla", "ffi", "api", "ffi.h")):
        print("cnn: oneDNN's or XLA FFI's headers are missing; building without the oneDNN extension",
              file=sys.stderr)
        return None
    return [onednn, ffi]


def _reuse_blocks() -> list[Extension]:
    """cnn/_reuse_blocks: a C library, never imported, that commands preload (cnn/runtime.py says why)."""
    if sys.platform != "linux":
        return []
    return [Extension("cnn._reuse_blocks", ["cnn/reuse_blocks.c"], libraries=["dl"],
                      extra_compile_args=["-O2", "-std=c11"], optional=True)]


def _extensions() -> list[Extension]:
    if not (sys.platform == "linux" and os.environ.get("CNN_BUILD_ONEDNN", "1") != "0"):
        return _reuse_blocks()
    include_dirs = _include_dirs()
    if include_dirs is None:
        return _reuse_blocks()
    lib_dir = os.path.join(os.path.dirname(include_dirs[0]), "lib")
    return [Extension(
        "cnn.kernels._onednn_ffi", ["cnn/kernels/onednn_ffi.cc"], depends=["cnn/kernels/winograd.h"],
        include_dirs=include_dirs, language="c++",
        library_dirs=[lib_dir], libraries=["dnnl"],
        extra_compile_args=["-std=c++17", "-O3", "-fopenmp-simd", "-Wno-attributes", "-Wno-return-type"],
        # site-packages/cnn/kernels -> the venv's lib/, where onednn-cpu-gomp puts libdnnl.so.3; onednn.py also
        # loads it from there itself, which covers editable installs.
        extra_link_args=["-Wl,-rpath,$ORIGIN/../../../../../lib"],
        optional=True)] + _reuse_blocks()


setup(ext_modules=_extensions())
