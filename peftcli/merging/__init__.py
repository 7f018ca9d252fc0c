"""Folding and combining φ into base weights: streaming merges, task arithmetic, TIES, DARE."""
