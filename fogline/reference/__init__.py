"""The reference model, in one place, next to the bundle it builds.

- the packaged bundle (``manifest.json`` and the ONNX models in this folder, built by
  ``fogline model build-reference``): :data:`BUNDLE_DIR`, the bundle the commands run when
  none is configured;
- :mod:`._frames`: the camera-like frames of handwritten digits it reads;
- :mod:`._build`: training, export, quantization and the figures in the manifest (needs the
  ``tools`` extra), measured with the agent's own decision rule;
- :mod:`._mlp`: the deterministic MLP that ``fogline bench cloud`` serves.

This is the top floor: no component imports it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUNDLE_DIR"]

BUNDLE_DIR = Path(__file__).resolve().parent
