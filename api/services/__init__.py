"""What the routes call: the control plane's work, with no HTTP in it (see each module's docstring)."""
