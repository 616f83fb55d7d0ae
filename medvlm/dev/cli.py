"""`medvlm dev ...`: start, stop and inspect the local development servers (Orthanc, FHIR R4).

A thin command layer over ``medvlm.dev.servers.DevServers``: it loads ``MedvlmSettings()`` once,
passes ``.dev`` down and prints tables. It never prints a password (only where it is stored).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from medvlm.errors import MedvlmError
from medvlm.settings import MedvlmSettings

if TYPE_CHECKING:  # imported by the sub-commands only: every ``medvlm`` command loads this module
    from medvlm.dev.servers import DevServers, ServerStatus

app = typer.Typer(
    name="dev",
    help="Local development servers (Orthanc PACS, FHIR R4), loopback only.",
    no_args_is_help=True,
)
_console = Console()


@app.callback()
def _load_settings(ctx: typer.Context) -> None:
    """Local development servers (Orthanc PACS, FHIR R4), loopback only."""
    from medvlm.dev.servers import DevServers, dev_settings_from

    try:
        ctx.obj = DevServers(dev_settings_from(MedvlmSettings()))
    except MedvlmError as exc:
        _fail(exc)
    ctx.call_on_close(ctx.obj.close)


def _fail(exc: MedvlmError) -> NoReturn:
    _console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
    raise typer.Exit(1)


def _table(rows: Sequence[ServerStatus], *, with_start: bool = False) -> Table:
    table = Table("server", "pid", "url", "healthy")
    if with_start:
        table.add_column("start")
    for row in rows:
        cells = [
            row.name,
            str(row.pid) if row.pid is not None else "-",
            row.url,
            "[green]yes[/]" if row.healthy else "[red]no[/]",
        ]
        if with_start:
            cells.append(
                f"started in {row.startup_s:.2f} s" if row.started and row.startup_s else "reused"
            )
        table.add_row(*cells)
    return table


@app.command()
def up(ctx: typer.Context) -> None:
    """Start the servers that are not running (running healthy ones are reused)."""
    servers: DevServers = ctx.obj
    try:
        rows = servers.up()
        orthanc = servers.orthanc
    except MedvlmError as exc:
        _fail(exc)
    _console.print(_table(rows, with_start=True))
    _console.print(f"Orthanc DICOMweb: {orthanc.dicomweb_url}", highlight=False)
    _console.print(
        f"Orthanc DIMSE:    {orthanc.aet}@{orthanc.dicom_host}:{orthanc.dicom_port}",
        highlight=False,
    )
    _console.print(
        f"Orthanc user:     {orthanc.username} "
        f"(password in {servers.workdir / 'credentials.json'})",
        highlight=False,
    )


@app.command()
def down(ctx: typer.Context) -> None:
    """Stop the servers by their recorded PIDs."""
    servers: DevServers = ctx.obj
    try:
        stopped = servers.down()
    except MedvlmError as exc:
        _fail(exc)
    from medvlm.orphans import stop_orphaned_prefect_servers

    names: list[str] = list(stopped)
    if orphans := stop_orphaned_prefect_servers(os.environ.get("PREFECT_HOME")):
        names.append(f"{orphans} Prefect temporary server(s) of killed runs")
    _console.print(f"stopped: {', '.join(names)}" if names else "nothing was running")


@app.command()
def status(ctx: typer.Context) -> None:
    """Show PID, URL and health of each server. Exit code 1 if any is not healthy."""
    servers: DevServers = ctx.obj
    rows = servers.status()
    _console.print(_table(rows))
    if not all(r.healthy for r in rows):
        raise typer.Exit(1)
