"""Benchmarks (`make bench`): each scenario measures our figure beside a limit or a peer
measured in the same run, and writes its object into `bench/results/latest.json`."""
