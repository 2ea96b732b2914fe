"""The data plane's exception tree: every error the endpoints raise on purpose is a
DataPlaneError (the consumer's own tree, ``dataplane.consumer.errors``, hangs below it)."""

from __future__ import annotations

from common.errors import DsnError


class DataPlaneError(DsnError):
    """A producer, a spool file, the synthetic camera or a consumer cannot go on as asked."""
