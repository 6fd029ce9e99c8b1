"""Benchmarks: layer and model throughput (throughput.py), FLOP counts (flops.py), kernel timings."""


def parse_choices(text, allowed, flag: str):
    """A comma-separated flag value checked against ``allowed`` (None stays None)."""
    if text is None:
        return None
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(
            f"--{flag}: unknown {bad or 'empty list'}; choose from {', '.join(allowed)}"
        )
    return items
