"""KFP components of the training pipeline: validate -> split -> train -> evaluate -> register.

Each module holds one step: a typed library function that does the work (called
from tests, ``dvc.yaml`` and the component) and a thin ``@dsl.component`` that
only declares the interface and calls it. Components import their library
inside the function body, as KFP runs the body on its own.
"""
