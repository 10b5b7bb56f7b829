"""Writes to org and catalog records over the API: IT's add/change permissions (governance.roles), validated
and audited by governance.audit.audited_save, as the admin's saves are."""
from django.core.exceptions import PermissionDenied
from rest_framework import mixins, serializers

from governance.audit import audited_save


class AuditedWrites(mixins.CreateModelMixin, mixins.UpdateModelMixin):
    """Create (POST) and change (PUT/PATCH) for IT; the serializer's `apply(instance, data)` sets the fields
    (and write-only secrets), then audited_save stores it."""

    def _require(self, action: str) -> None:
        opts = self.get_serializer_class().Meta.model._meta
        if not self.request.user.has_perm(f"{opts.app_label}.{action}_{opts.model_name}"):
            raise PermissionDenied(f"Only IT may {'add' if action == 'add' else 'change'} {opts.verbose_name_plural}.")

    def perform_create(self, serializer):
        self._require("add")
        serializer.instance = serializer.persist(serializer.Meta.model(), actor=self.request.user)

    def perform_update(self, serializer):
        self._require("change")
        serializer.instance = serializer.persist(serializer.instance, actor=self.request.user)


class AuditedInput(serializers.ModelSerializer):
    """A write serializer whose `persist` sets the validated fields and saves through audited_save; it answers
    with the resource's read serializer (`output`)."""

    output: type[serializers.Serializer]

    def persist(self, instance, *, actor):
        for field, value in self.validated_data.items():
            setattr(instance, field, value)
        return audited_save(instance, actor=actor)

    def to_representation(self, instance):
        return self.output(instance, context=self.context).data


class ReadOrWrite:
    """Reads answer with `serializer_class`, writes take `input_class`."""

    input_class: type[serializers.Serializer]

    def get_serializer_class(self):
        if self.request is not None and self.request.method not in ("GET", "HEAD", "OPTIONS"):
            return self.input_class
        return self.serializer_class
