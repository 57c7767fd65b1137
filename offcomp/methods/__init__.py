"""Built-in compression methods. Importing this package registers them (explicitly, one import
per file, so nothing depends on import order or subclass discovery)."""

from . import (
    ae,  # noqa: F401
    ae_embedding,  # noqa: F401
    asvd,  # noqa: F401
    fwsvd,  # noqa: F401
    kronecker,  # noqa: F401
    prune,  # noqa: F401
    prune_structured,  # noqa: F401
    sparsegpt,  # noqa: F401
    svd,  # noqa: F401
    svd_llm,  # noqa: F401
    tucker,  # noqa: F401
)
