"""Fusions: passes that recognise what a subgraph computes and replace it by a canonical op."""
