"""Scoring (CoIN's scorers, a registry of them by name) and continual-learning metrics; no Ray."""
