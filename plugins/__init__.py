"""Built-in plugins: attention backends, routers, expert executors, MTP modules. Importing registers them."""

from . import attention, mtp, routing  # noqa: F401
