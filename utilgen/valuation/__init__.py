"""TODV: task-oriented data valuation (METHOD.md, stage 1)."""
