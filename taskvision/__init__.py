"""TaskVision core: domain code shared by the control plane, training and serving.

This package must stay light (no web framework, no torch import at module
level) so that every deployable unit can depend on it.
"""

__version__ = "0.1.0"
