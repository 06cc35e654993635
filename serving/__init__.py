"""KServe predictor for TaskVision model bundles (``model.py``), the on-demand model
repository (``repository.py``) and the model server entry point (``python -m serving``).

Serving imports only the core package: no training code, no torch.
"""
