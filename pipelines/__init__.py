"""The training pipeline (``training.py``), its compiler entry point and its two runners."""
