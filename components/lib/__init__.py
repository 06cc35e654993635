"""The pipeline steps' library code: typed functions with no KFP decorators.

KFP runs a component's body in a process where ``kfp.dsl`` holds only the
runtime types, so the code a component calls must not define components
itself. Tests and ``dvc.yaml`` call these functions directly.
"""
