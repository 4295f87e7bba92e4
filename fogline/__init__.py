"""fogline: edge–cloud hybrid inference serving.

The components live in subpackages: :mod:`fogline.edge_agent`, :mod:`fogline.cloud_service`,
:mod:`fogline.compression`, :mod:`fogline.sync` and :mod:`fogline.residency`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
