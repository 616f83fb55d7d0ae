"""medvlm-pipeline: drafts of radiology reports by medical vision-language models.

This package holds what the four layers share: the settings tree, the error tree, the command
line and the local development servers. The layers themselves are the top-level packages
``connectors`` (I/O), ``pipeline`` (pure logic), ``serving`` (models) and ``flows`` (orchestration).
"""

__version__ = "0.1.0"
