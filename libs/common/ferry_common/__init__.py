"""Shared building blocks of Ferry: messages, the bus, errors, clocks and settings."""
