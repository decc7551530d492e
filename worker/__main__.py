"""`python -m worker` is `checkpoint-janitor`."""

from worker.service.cli import main

main()
