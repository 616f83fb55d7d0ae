"""Serving: Ray Serve applications around vLLM, and clients for model endpoints."""
