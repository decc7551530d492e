"""The service layer: what runs the janitor as a program (config files, schedules, CLI, daemon)."""
