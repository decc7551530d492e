"""`python -m worker` is `checkpoint-janitor`."""

from worker.cli import main

main()
