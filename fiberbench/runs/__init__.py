"""Runs that last: a content-keyed results store and headless sweeps (local or on Ray) into it."""
