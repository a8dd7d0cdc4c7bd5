"""Swarm coordinator (issue #4): assigns stages, never on the data path."""
