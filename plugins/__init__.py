"""Built-in plugins: attention backends, routers, expert executors, MTP modules. Importing registers them."""

from . import attention, experts, mtp, routing  # noqa: F401
