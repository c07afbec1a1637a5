"""ssvt: semantic segmentation from imperfect labels on cached, frozen DINOv2 features.

Usage: ``ssvt demo`` for the tour; ``ssvt extract`` then ``ssvt train-head`` for real work.
"""

__version__ = "0.1.0"
