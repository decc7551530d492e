"""The retention policy language: schema, YAML loading, matching and decisions.

Pure: nothing here opens a database. `worker` carries the decisions out.
"""
