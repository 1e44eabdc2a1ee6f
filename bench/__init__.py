"""Benchmarks (not part of `make test`): each script prints a table, writes JSON, ends with a RESULT line."""
