"""Temporary: the shard modules are ``shard_format`` (the schema), ``shard_builder`` and ``shard_reader``.

``lm_mini/recipes/demo.py`` still imports ``build_shards`` from here while issue 19 edits it; it moves to
``lm_mini.data.shard_builder`` with that work, and this file goes."""
from lm_mini.data.shard_builder import build_shards  # noqa: F401
