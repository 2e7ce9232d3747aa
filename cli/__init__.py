"""The console script `cqrs`: one entry point for every process and admin task."""
