"""A rich progress bar for the converters' `progress(done, total, name)` callbacks."""

from contextlib import contextmanager


@contextmanager
def step_bar(first: str = "starting", width: int = 32):
    """Yields a progress(done, total, name) callback drawing one bar; done=None relabels it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn(f"{{task.description:<{width}}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(first, total=None)

        def report(done, total, name):
            if done is None:  # relabel only
                bar.update(task, description=name)
            else:
                bar.update(task, completed=done, total=total, description=name)

        yield report
