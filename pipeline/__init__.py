"""clipline: batch CLIP embedding pipeline (download -> embed -> index -> dedup -> query)."""

__version__ = "0.1.0"
