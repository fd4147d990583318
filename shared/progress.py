"""Progress output of the operator commands (`replay`, `usage rebuild-cache`, ...).

`PROGRESS_OUTPUT` says when to draw it: `auto` (only on a terminal, rich's own
choice), `always` (also into a pipe or a log file, as a test or a CI job runs
the command), `never`. The bar goes to stderr, so stdout keeps only the result
lines a script may parse.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

MODES = ("auto", "always", "never")


class CountsColumn(ProgressColumn):
    """`done/total events, rate ev/s, lag n`; the total is `?` until the log's end is known."""

    def render(self, task: Task) -> Text:
        total = "?" if task.total is None else f"{task.total:.0f}"
        rate = task.fields.get("rate")
        lag = task.fields.get("lag")
        text = f"{task.completed:.0f}/{total} events"
        if rate is not None:
            text += f", {rate:.0f} ev/s"
        if lag is not None:
            text += f", lag {lag:.0f}"
        return Text(text)


def console(mode: str) -> Console:
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {MODES}, not {mode!r}")
    return Console(stderr=True, force_terminal=True if mode == "always" else None)


def event_bar(mode: str) -> Progress:
    """events done/total, events/s, what is left (the lag) and the ETA."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        CountsColumn(),
        TimeRemainingColumn(),
        console=console(mode),
        disable=mode == "never",
    )


def phase_spinner(mode: str) -> Progress:
    """One line that names the step a multi-step command is in."""
    from rich.progress import SpinnerColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console(mode),
        disable=mode == "never",
    )
