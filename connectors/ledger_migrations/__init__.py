"""Alembic migrations of the job ledger (``connectors.ledger_schema`` runs them).

``env.py`` is Alembic's environment, ``versions/`` the revisions, oldest first. A revision
defines its tables explicitly (never from ``pipeline.ledger``'s models, which move on), so it
means the same on every ledger it ever meets.
"""
