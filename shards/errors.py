"""Errors users see. Each message names the numbers involved, never just "failed"."""


class ShardServeError(Exception):
    """Base for every error shardserve raises on purpose (the CLI prints these without a traceback)."""


class RangeError(ShardServeError, ValueError):
    """A layer range or shard count that cannot describe this model."""


class ModelSourceError(ShardServeError):
    """A model file or folder that is missing, corrupt, or of an unsupported architecture."""


class PlanError(ShardServeError):
    """No placement fits the given budgets."""


class KVCacheFull(ShardServeError):
    """A shard's KV pool has no free block; the router preempts instead of failing."""
