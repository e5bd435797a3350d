"""A pagetrack plugin that cannot be imported, to show how broken plugins are reported.

``pagetrack plugins`` lists it as ``failed`` with the one-line error below, every
other plugin still loads, and a VM records ``plugin_load_failed`` in its audit log.
"""

raise ImportError("broken_tracker needs libgvt.so.1, which is not installed")
