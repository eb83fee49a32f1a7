"""Per-family conversion tables: ``convert/rules/<family>.py`` defines ``rules(config_dict, source_keys) -> [Rule]``
with the ops of ``convert.ops`` (see DESIGN.md, "Rule ops"). The family record in paddlevl/models/<family> points its
``rules`` field at that function; the engine finds it through the registry, never by importing this package.
"""
from ..ops import Rule, cast, chain, drop, keep, regroup, reshape, split, transpose  # noqa: F401
