"""Evaluation: pure metric functions (`metrics`) and the evaluators that feed them (DESIGN.md section 9)."""
