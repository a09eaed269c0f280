"""Stage kinds: ``posttrain``, ``teacher`` and ``distill`` (``warmup`` is a distill stage)."""
