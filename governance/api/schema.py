"""The OpenAPI schema covers the management API only: the relay's endpoints have their own schema
(gateway/openapi/relay.yaml)."""


def only_management_api(endpoints, **kwargs):
    return [endpoint for endpoint in endpoints if endpoint[0].startswith("/api/v1/")]
