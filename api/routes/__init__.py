"""One router per resource; ``api.main`` assembles them."""
