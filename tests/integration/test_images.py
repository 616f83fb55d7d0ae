"""The flows image, built as a site builds it (scripts/build-images.sh: buildah on a debootstrapped
Debian bookworm base), checked from inside with ``buildah run --isolation chroot``: the CLI
starts, the image runs as UID 1000, it carries no model runtime, bash and wget are there (and
the venv is on PATH in a login shell too), and a dry run drafts a small folder site through a
stand-in model and writes nothing.

Slow: the first build debootstraps the base and installs the dependencies from the package index
(about 4–5 minutes on 2 loaded cores, measured); later builds reuse the base tarball cached in
~/.cache/medvlm/images and buildah's layers (seconds when only the code changed: the
dependencies have a layer of their own). The first build needs the network, which the suite's
loopback-only namespace does not have: scripts/test.sh builds it on the host network before it
starts pytest, so that the test's own build is a cache hit.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.ledger_store import LedgerStore, open_engine
from pipeline.ledger import JobState
from tests.integration.folder_site import (
    build_folder_site,
    folder_site_env,
    preliminary_drafts_per_order,
    stand_in_model,
)

REPO = Path(__file__).resolve().parents[2]
TAG = "integration-test"
IMAGE = f"{os.environ.get('MEDVLM_IMAGE_PREFIX', 'localhost/medvlm')}/flows:{TAG}"
DAY = "2026-11-02"
STUDIES = 3

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(
        shutil.which("buildah") is None,
        reason="buildah is not installed (apt-get install buildah debootstrap; "
        "scripts/install-servers.sh installs them)",
    ),
]


def _buildah(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def flows_container() -> Iterator[str]:
    """A working container of the freshly built flows image (removed at the end)."""
    build = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-images.sh"), "--flows-tag", TAG],
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert build.returncode == 0, (
        f"scripts/build-images.sh failed (exit {build.returncode}):\n"
        f"{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    )
    created = _buildah("from", IMAGE)
    assert created.returncode == 0, created.stderr
    container = created.stdout.strip()
    try:
        yield container
    finally:
        _buildah("rm", container)


def run_in(
    container: str,
    *command: str,
    env: dict[str, str] | None = None,
    volumes: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``command`` in the container, as the image's user (USER 1000:100), with ``env`` and
    ``volumes`` (``HOST:CONTAINER``)."""
    options = [f"--env={name}={value}" for name, value in (env or {}).items()]
    options += [f"--volume={volume}" for volume in volumes or ()]
    return _buildah("run", "--isolation", "chroot", *options, container, "--", *command)


def test_the_cli_starts(flows_container: str) -> None:
    result = run_in(flows_container, "medvlm", "--help")
    assert result.returncode == 0, result.stderr
    assert "run" in result.stdout


def test_it_runs_as_uid_1000_group_100_as_the_chart_does(flows_container: str) -> None:
    result = run_in(flows_container, "sh", "-c", "id -u; id -g")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1000", "100"]


def test_it_has_no_model_runtime(flows_container: str) -> None:
    for module in ("torch", "vllm"):
        result = run_in(flows_container, "python", "-c", f"import {module}")
        assert result.returncode != 0, f"{module} is installed in the flows image"
        assert f"No module named '{module}'" in result.stderr


def test_bash_and_wget_are_there_and_a_login_shell_finds_the_venv(
    flows_container: str,
) -> None:
    # Debian's /etc/profile resets PATH: the image's /etc/profile.d/medvlm.sh puts the venv back
    # (KubeRay runs its containers through `bash -lc`; the serving images rely on the same).
    result = run_in(
        flows_container,
        "bash",
        "-lc",
        "wget --version | head -n 1; command -v medvlm prefect",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("GNU Wget")
    assert lines[1:] == ["/opt/medvlm/bin/medvlm", "/opt/medvlm/bin/prefect"]


def test_a_dry_run_drafts_a_seeded_site_through_the_model_and_writes_nothing(
    flows_container: str, tmp_path: Path
) -> None:
    """`medvlm run --dry-run` in the image, as UID 1000, over a folder site of 3 studies built
    by the test and mounted at /site: Prefect's temporary server starts in the container, every
    study is drafted through the stand-in model on the test's loopback (the container shares
    the network namespace), the ledger records them, and the EHR receives no draft."""
    site = tmp_path / "site"
    build_folder_site(site, STUDIES, dt.date.fromisoformat(DAY), prefix="IMG")
    for path in (site, *site.rglob("*")):
        path.chmod(0o777 if path.is_dir() else 0o666)  # the image's user 1000 writes the ledger
    env = {
        **{
            name: value.replace(str(site), "/site") for name, value in folder_site_env(site).items()
        },
        "HOME": "/tmp/home",
        "MEDVLM_HOME": "/site/home",
        "PREFECT_HOME": "/tmp/home/prefect",
        "MEDVLM_JOB__MODEL_ENDPOINT": "http",
        "MEDVLM_MODEL__VERSION": "image-test",
        "COLUMNS": "160",
    }
    with stand_in_model(latency_s=0.0) as model_url:
        env["MEDVLM_JOB__MODEL_URL"] = model_url
        script = (
            f'mkdir -p "$PREFECT_HOME" && exec medvlm run --dry-run --since {DAY} --until {DAY}'
        )
        result = run_in(flows_container, "bash", "-c", script, env=env, volumes=[f"{site}:/site"])
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    jobs = LedgerStore(open_engine(f"sqlite:///{site / 'home' / 'ledger.db'}")).jobs("image-test")
    assert sorted(job.state for job in jobs) == [JobState.DRAFTED] * STUDIES, result.stdout
    assert not preliminary_drafts_per_order(site), "a dry run wrote drafts to the EHR"
