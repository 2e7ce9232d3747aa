"""`python -m cli ...` is `cqrs ...` (how a supervisor starts its worker processes)."""

from cli.main import main

main()
