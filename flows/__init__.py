"""Flows: compose connectors, pipeline and serving into the jobs users run."""
