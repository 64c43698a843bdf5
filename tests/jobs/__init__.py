"""Recurring jobs: API, schedule, runner, CLI, processes."""
