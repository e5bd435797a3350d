"""A progress line on stderr for runs that take more than a second.

:class:`RunProgress` is a rich spinner with a one-line status ("1,000,000
instructions, round 3") and the elapsed time.  It appears only when stderr is a
terminal, only when asked for (commands pass ``enabled=not as_json``), and only
once the run has lasted ``delay`` seconds, so quick runs print nothing extra;
it is transient (erased when the run ends), so the report that follows is
what stays on screen.  The runner calls it between ``vcpu.run`` slices.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

__all__ = ["RunProgress"]


class RunProgress:
    """A lazily shown, transient status line on stderr.

    Use as a context manager; call :meth:`status` with the current text, or
    the instance itself as the runner's ``progress(instructions, rounds)``.
    """

    def __init__(self, title: str, *, enabled: bool = True, delay: float = 1.0,
                 console: Console | None = None) -> None:
        self.title = title
        self.console = console or Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self.delay = delay
        self._t0 = time.monotonic()
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> RunProgress:
        self._t0 = time.monotonic()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def shown(self) -> bool:
        """True once the status line is on screen."""
        return self._progress is not None

    def status(self, text: str) -> None:
        """Show ``title: text`` (starting the display if the run is past ``delay``)."""
        if not self.enabled:
            return
        description = f"{self.title}: {text}"
        if self._progress is None:
            if time.monotonic() - self._t0 < self.delay:
                return
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                      console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(description)
            return
        assert self._task is not None
        self._progress.update(self._task, description=description)

    def __call__(self, instructions: int, rounds: int) -> None:
        """The runner's callback: instructions executed and rounds closed so far."""
        self.status(f"{instructions:,} instructions, {rounds} round{'s' if rounds != 1 else ''} closed")

    def close(self) -> None:
        """Erase the status line (if it was shown)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
