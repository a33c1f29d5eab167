"""timeexpert: train and serve expert-guided video temporal grounding models on Ray.

Importing the package starts nothing and downloads nothing; heavy modules are imported where used.
"""

__version__ = "0.1.0"
