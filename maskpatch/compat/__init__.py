"""Upstream compatibility: one module per upstream difference (a version, a renamed keyword, a moved module)."""
