"""Verbs that build on the canonical form: one module per verb."""
