"""Request and response schemas, one module per resource, separate from the ORM classes."""
