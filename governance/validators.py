"""Field validators shared by apps."""
import ipaddress

from django.core.exceptions import ValidationError


def validate_cidr_list(value) -> None:
    if not isinstance(value, list):
        raise ValidationError("Enter a list of CIDRs, e.g. [\"10.0.0.0/8\", \"192.0.2.7/32\"].")
    for item in value:
        try:
            ipaddress.ip_network(str(item), strict=False)
        except ValueError:
            raise ValidationError(f"{item!r} is not an IP network (CIDR).") from None
