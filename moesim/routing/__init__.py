"""Routing semantics: popularity, token choices, capacity and overflow (shared with the
reference), one layer routed over the ranks. Uses layout, config."""
