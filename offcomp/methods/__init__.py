"""Built-in compression methods. Importing this package registers them (explicitly, one import
per file, so nothing depends on import order or subclass discovery)."""

from . import svd  # noqa: F401
