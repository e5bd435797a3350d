"""Built-in trackers, each declared in the ``pagetrack`` entry-point group."""
