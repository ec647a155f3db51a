"""ocixfs: mount OCIX images read-only over FUSE with lazy, verified HTTP fetching."""

__version__ = "0.1.0"
