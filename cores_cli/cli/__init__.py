"""Thin Typer commands: parse options, call plain functions from the library, print results."""
