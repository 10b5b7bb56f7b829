"""The management REST API (/api/v1/): token authentication, scopes, pagination, errors and the router."""
