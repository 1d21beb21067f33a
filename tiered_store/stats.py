"""Statistics helpers shared by the store, the Engram pipeline and replay."""


def hit_ratio(hits: int, lookups: int) -> float:
    """Hits per lookup; 0.0 for no lookups."""
    return hits / lookups if lookups else 0.0
