"""Engines: checkpoint I/O, prediction, (later) training and evaluation loops."""
