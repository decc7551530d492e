"""Shared test helpers: graph scenarios, one adapter per backend, the throwaway Postgres
cluster, app processes.

Tests import them as `helpers.<module>` (pytest puts tests/ on sys.path through
the rootdir conftest); none of them holds tests.
"""
