"""Data-residency policies: what may leave a site and where it may go."""

from fogline.residency.errors import ResidencyError

__all__ = ["ResidencyError"]
