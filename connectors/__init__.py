"""Connectors: the project's only door to the outside (PACS, EHR, model endpoints, sample data).

Typed, small, retrying at the I/O edge. Nothing here decides clinical or model logic.
"""
