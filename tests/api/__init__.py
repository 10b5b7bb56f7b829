"""The management REST API (/api/v1/), its tokens, its schema, and the relay's GET /v1/key."""
