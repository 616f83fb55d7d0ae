"""Real sample DICOM shipped in registry packages (pydicom's test files, ``pydicom-data``).

The one accessor for bundled sample data, used by the demo and the tests. Files are found
locally in installed packages; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from medvlm.errors import ConfigurationError

CHEST_RADIOGRAPH = "RG1_UNCR.dcm"
"""A real PA chest radiograph (CR, 1955x1841, uncompressed) from ``pydicom-data``."""


def sample_file(name: str) -> Path:
    """Path of a sample file by name; raises ``ConfigurationError`` if the package is missing."""
    from pydicom.data import get_testdata_file

    try:
        found = get_testdata_file(name, download=False)
    except (ValueError, OSError) as exc:
        raise ConfigurationError(f"sample file {name} not available: {exc}") from exc
    if found is None:
        raise ConfigurationError(
            f"sample file {name} not found; install the `pydicom-data` package"
        )
    return Path(str(found))
