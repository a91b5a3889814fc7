"""Foundations every stage uses: the error hierarchy, coordinate frames, atomic writes and the
input guard (no command writes over one of its inputs)."""
