"""The replay command's progress bar renders before the log's end is known (issue 11, item 7)."""

from rich.progress import Progress

from shared.progress import CountsColumn


def test_the_events_column_renders_an_unknown_total_and_then_the_known_one() -> None:
    progress = Progress(disable=True)
    task_id = progress.add_task("replay", total=None)
    column = CountsColumn()
    assert column.render(progress.tasks[0]).plain == "0/? events"
    progress.update(task_id, completed=5, total=10, rate=2.5, lag=5)
    assert column.render(progress.tasks[0]).plain == "5/10 events, 2 ev/s, lag 5"
