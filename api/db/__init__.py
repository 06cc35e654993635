"""Database: ORM classes (models.py), engine and sessions (session.py), migrations (../migrations)."""
