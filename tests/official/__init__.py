"""Parity checks of our models against the papers' official code (run as scripts; see README.md)."""
