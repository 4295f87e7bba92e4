"""fogline: edge–cloud hybrid inference serving.

The components live in subpackages: :mod:`fogline.edge_agent`, :mod:`fogline.cloud_service`,
:mod:`fogline.compression`, :mod:`fogline.messaging`, :mod:`fogline.sync` and
:mod:`fogline.residency`. This package itself is the top floor: the ``fogline`` command,
the demo, the benchmarks, the fault harness and the reference model. No component imports
it; each reads the version from the distribution's metadata as this package does.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fogline")
except PackageNotFoundError:  # a tree run without installing: no metadata to read
    __version__ = "0+unknown"

__all__ = ["__version__"]
