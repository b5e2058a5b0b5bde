"""Process set-up every entry point shares, done at the first import of any of the project's packages.

- keras (which tensorflow imports) fixes its backend at its first import: the JAX backend, set before that.
- The full tensorflow wheel probes for CUDA when imported and prints its findings straight to the process's stderr
  (C++ logging before absl is initialised, which TF_CPP_MIN_LOG_LEVEL does not reach). The first imports of
  tensorflow and tensorflow_text run with file descriptor 2 pointed at /dev/null, so a command's output stays its
  own. Set JEST_NATIVE_LOGS=1 to see those lines.
- orbax's file operations on gs:// go through gcsfs, not TensorFlow's GCS client (EPATH_USE_TF=false; below).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# orbax reaches gs:// through etils' paths, which take TensorFlow's GCS client whenever TensorFlow is installed;
# that client has no endpoint setting, so no emulator can stand in for GCS in tests. With this, etils uses gcsfs
# (fsspec), which the tests run against the emulator (the array data goes through tensorstore's own GCS driver
# either way).
os.environ.setdefault("EPATH_USE_TF", "false")

_MUTED_MODULES = ("tensorflow", "tensorflow_text")


@contextlib.contextmanager
def muted_native_stderr():
    """File descriptor 2 to /dev/null for the block (Python's own sys.stderr is flushed first)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _MutedLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self._inner
        if module.__spec__ is not None:
            module.__spec__.loader = self._inner
        with muted_native_stderr():
            self._inner.exec_module(module)

    def __getattr__(self, name):  # get_resource_reader, is_package, ...
        return getattr(self._inner, name)


class _MutedImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _MUTED_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _MutedLoader(spec.loader)
        return spec


if os.environ.get("JEST_NATIVE_LOGS") != "1" and not any(isinstance(f, _MutedImportFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MutedImportFinder())


def keep_tensorflow_off_accelerators() -> None:
    """tf.data and keras-hub's preprocessing only: the accelerators belong to JAX. (Listing the GPUs makes the full
    wheel try cuInit and log its failure on a machine without one: muted too.)"""
    import tensorflow as tf

    with muted_native_stderr():
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TF already initialised its devices: too late to hide them, and nothing to do
            pass
