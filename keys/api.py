"""The management API for keys, access requests and API tokens. Parse, call a service, serialize: who may see a
key is VirtualKey.objects.visible_to, who may act on it the lifecycle services (manageable_by); who may decide
a request AccessRequest.objects.decidable_by, inside request_approve/request_deny. A secret appears in one
response only: the one that created it."""
from django.db.models import Q
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response

from gateway.models import ModelAlias
from governance.api import tokens
from governance.models import Person, Team, UsageClass
from keys import services
from keys.filters import AccessRequestFilter, ApiTokenFilter, VirtualKeyFilter
from keys.models import DURATION_CHOICES, AccessRequest, ApiToken, VirtualKey

NO_STORE = {"Cache-Control": "no-store"}


# --- Serializers ---------------------------------------------------------------------------------------


class KeyOutput(serializers.ModelSerializer):
    team = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    person = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    allowed_models = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)

    class Meta:
        model = VirtualKey
        fields = ["id", "name", "prefix", "team", "person", "key_class", "status", "allowed_models", "default_tags",
                  "monthly_budget", "rpm_limit", "rpd_limit", "tpm_limit", "tpd_limit", "ip_allowlist",
                  "expires_at", "last_used_at", "created_at", "approved_by_policy"]
        read_only_fields = fields


class KeyCreateInput(serializers.Serializer):
    name = serializers.CharField(max_length=120)
    team = serializers.SlugRelatedField(slug_field="slug", queryset=Team.objects.filter(is_active=True))
    person = serializers.SlugRelatedField(slug_field="username", queryset=Person.objects.filter(is_active=True),
                                          required=False, allow_null=True, help_text="Empty: a team's service key.")
    key_class = serializers.ChoiceField(choices=UsageClass.choices, default=UsageClass.EXPERIMENTATION)
    days = serializers.IntegerField(min_value=1, max_value=3650, required=False, allow_null=True)
    models = serializers.SlugRelatedField(slug_field="name", many=True, required=False,
                                          queryset=ModelAlias.objects.filter(is_active=True))
    monthly_budget = serializers.DecimalField(max_digits=12, decimal_places=2, min_value=0, required=False, allow_null=True)
    default_tags = serializers.DictField(child=serializers.CharField(max_length=64), required=False)


class KeyWithSecret(KeyOutput):
    secret = serializers.SerializerMethodField(help_text="Shown in this response only; never stored.")

    class Meta(KeyOutput.Meta):
        fields = [*KeyOutput.Meta.fields, "secret"]
        read_only_fields = fields

    def get_secret(self, key) -> str:
        return self.context["secret"]


class ReasonInput(serializers.Serializer):
    reason = serializers.CharField(max_length=300)


class OptionalReasonInput(serializers.Serializer):
    reason = serializers.CharField(max_length=300, required=False, allow_blank=True, default="")


def _with_secret(key: VirtualKey, secret: str, *, created: bool) -> Response:
    key = VirtualKey.objects.select_related("team", "person").prefetch_related("allowed_models").get(pk=key.pk)
    body = KeyWithSecret(key, context={"secret": secret}).data
    return Response(body, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK, headers=NO_STORE)


# --- Keys ----------------------------------------------------------------------------------------------


class KeyViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet):
    """Virtual keys: everyone sees their own and their managed teams' keys; IT, finance and auditors all."""

    scope_resource = "keys"
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    queryset = VirtualKey.objects.none()  # the schema's model; requests use get_queryset
    serializer_class = KeyOutput
    filterset_class = VirtualKeyFilter

    def get_queryset(self):
        return (VirtualKey.objects.visible_to(self.request.user).select_related("team", "person")
                .prefetch_related("allowed_models").order_by("-created_at", "-id"))

    @extend_schema(request=KeyCreateInput, responses={201: KeyWithSecret})
    def create(self, request):
        """Issue a key directly (IT: keys.add_virtualkey). Everyone else asks through access-requests."""
        if not request.user.has_perm("keys.add_virtualkey"):
            raise PermissionDenied("Only IT issues keys directly: submit an access request instead.")
        data = KeyCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        issued = services.key_issue(
            name=fields.pop("name"), team=fields.pop("team"), person=fields.pop("person", None), actor=request.user,
            key_class=fields.pop("key_class"), days=fields.pop("days", None), aliases=fields.pop("models", ()),
            **{name: value for name, value in fields.items() if value is not None},
        )
        return _with_secret(issued.key, issued.secret, created=True)

    @extend_schema(request=None, responses=KeyWithSecret)
    @action(detail=True, methods=["post"])
    def rotate(self, request, pk=None):
        """A new secret (in this response only); the old one works for the policy's grace period. Holder only."""
        key = self.get_object()
        if key.person_id != request.user.pk:
            raise PermissionDenied("Only the key's holder can rotate it.")
        issued = services.key_rotate(key=key, actor=request.user)
        return _with_secret(issued.key, issued.secret, created=False)

    @extend_schema(request=ReasonInput, responses=KeyOutput)
    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None):
        reason = ReasonInput(data=request.data)
        reason.is_valid(raise_exception=True)
        key = services.key_revoke(key=self.get_object(), actor=request.user, reason=reason.validated_data["reason"])
        return Response(KeyOutput(key).data)

    @extend_schema(request=ReasonInput, responses=KeyOutput)
    @action(detail=True, methods=["post"])
    def suspend(self, request, pk=None):
        reason = ReasonInput(data=request.data)
        reason.is_valid(raise_exception=True)
        key = services.key_suspend(key=self.get_object(), actor=request.user, reason=reason.validated_data["reason"])
        return Response(KeyOutput(key).data)


# --- Access requests -----------------------------------------------------------------------------------


class AccessRequestOutput(serializers.ModelSerializer):
    requester = serializers.SlugRelatedField(slug_field="username", read_only=True)
    team = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    models = serializers.SlugRelatedField(source="aliases", slug_field="name", many=True, read_only=True)
    key = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True)
    decided_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = AccessRequest
        fields = ["id", "kind", "requester", "team", "models", "use_case", "key_class", "environment", "project",
                  "duration_days", "monthly_budget", "status", "review_reasons", "key", "decided_by",
                  "decided_by_policy", "decided_at", "decision_reason", "created_at"]
        read_only_fields = fields


class AccessRequestInput(serializers.Serializer):
    team = serializers.SlugRelatedField(slug_field="slug", queryset=Team.objects.filter(is_active=True))
    models = serializers.SlugRelatedField(slug_field="name", many=True, queryset=ModelAlias.objects.filter(is_active=True))
    use_case = serializers.CharField(max_length=2000)
    key_class = serializers.ChoiceField(choices=UsageClass.choices, default=UsageClass.EXPERIMENTATION)
    environment = serializers.ChoiceField(choices=AccessRequest.Environment.choices,
                                          default=AccessRequest.Environment.DEVELOPMENT)
    project = serializers.SlugField(max_length=64, required=False, allow_blank=True, default="")
    duration_days = serializers.ChoiceField(choices=DURATION_CHOICES, default=30)
    monthly_budget = serializers.DecimalField(max_digits=12, decimal_places=2, min_value=0, required=False, allow_null=True,
                                              default=None)
    accept_policy = serializers.BooleanField(default=False, help_text="Accept the acceptable-use policy in force.")


class SubmittedOutput(serializers.Serializer):
    request = AccessRequestOutput()
    key = KeyWithSecret(allow_null=True, help_text="Set when policy provisioned the key at once (secret shown once).")


class AccessRequestViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                           viewsets.GenericViewSet):
    """Access requests: one's own, those one may decide, and all of them for IT, finance and auditors."""

    scope_resource = "access-requests"
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    queryset = AccessRequest.objects.none()
    serializer_class = AccessRequestOutput
    filterset_class = AccessRequestFilter

    def get_queryset(self):
        user = self.request.user
        requests = AccessRequest.objects.all()
        if not user.has_perm("keys.view_accessrequest"):
            decidable = AccessRequest.objects.decidable_by(user).values("pk")
            requests = requests.filter(Q(requester=user) | Q(pk__in=decidable))
        return requests.select_related("requester", "team", "decided_by").prefetch_related("aliases").order_by("-created_at", "-id")

    @extend_schema(request=AccessRequestInput, responses={201: SubmittedOutput})
    def create(self, request):
        """Submit a request as the caller; policy may provision the key at once (its secret is in this response)."""
        data = AccessRequestInput(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        submitted = services.request_submit(requester=request.user, aliases=fields.pop("models"), **fields)
        body = {"request": AccessRequestOutput(self.get_queryset().get(pk=submitted.request.pk)).data, "key": None}
        if submitted.issued:
            body["key"] = _with_secret(submitted.issued.key, submitted.issued.secret, created=True).data
        return Response(body, status=status.HTTP_201_CREATED, headers=NO_STORE)

    def _decided(self, pk) -> AccessRequest:
        return get_object_or_404(self.get_queryset(), pk=pk)

    @extend_schema(request=OptionalReasonInput, responses=AccessRequestOutput)
    @action(detail=True, methods=["post"])
    def approve(self, request, pk=None):
        reason = OptionalReasonInput(data=request.data)
        reason.is_valid(raise_exception=True)
        services.request_approve(access_request=self._decided(pk), actor=request.user, reason=reason.validated_data["reason"])
        return Response(AccessRequestOutput(self._decided(pk)).data)

    @extend_schema(request=ReasonInput, responses=AccessRequestOutput)
    @action(detail=True, methods=["post"])
    def deny(self, request, pk=None):
        reason = ReasonInput(data=request.data)
        reason.is_valid(raise_exception=True)
        services.request_deny(access_request=self._decided(pk), actor=request.user, reason=reason.validated_data["reason"])
        return Response(AccessRequestOutput(self._decided(pk)).data)

    @extend_schema(request=None, responses={201: KeyWithSecret})
    @action(detail=True, methods=["post"])
    def collect(self, request, pk=None):
        """The requester takes the key an approver granted; its secret is in this response only."""
        issued = services.request_collect(access_request=self._decided(pk), requester=request.user)
        return _with_secret(issued.key, issued.secret, created=True)


# --- API tokens ----------------------------------------------------------------------------------------


class ApiTokenOutput(serializers.ModelSerializer):
    person = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = ApiToken
        fields = ["id", "name", "kind", "person", "prefix", "scopes", "expires_at", "last_used_at", "revoked_at",
                  "created_at"]
        read_only_fields = fields


class ApiTokenInput(serializers.Serializer):
    name = serializers.CharField(max_length=120)
    scopes = serializers.DictField(child=serializers.ChoiceField(choices=tokens.LEVELS),
                                   help_text='Resource -> "read" or "write", e.g. {"keys": "write", "usage": "read"}.')
    days = serializers.IntegerField(min_value=1, max_value=365, default=90)


class ApiTokenWithSecret(ApiTokenOutput):
    secret = serializers.SerializerMethodField(help_text="Shown in this response only; never stored.")

    class Meta(ApiTokenOutput.Meta):
        fields = [*ApiTokenOutput.Meta.fields, "secret"]
        read_only_fields = fields

    def get_secret(self, token) -> str:
        return self.context["secret"]


class ApiTokenViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet):
    """One's own API tokens (IT sees everyone's). Managed from a browser session only: a token never issues or
    revokes tokens, so a narrow token cannot mint a broader one."""

    scope_resource = None  # no scope lets a token in (governance.api.permissions.TokenScope)
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    queryset = ApiToken.objects.none()
    serializer_class = ApiTokenOutput
    filterset_class = ApiTokenFilter

    def get_queryset(self):
        tokens_ = ApiToken.objects.select_related("person").order_by("-created_at", "-id")
        if self.request.user.has_perm("keys.change_apitoken"):
            return tokens_
        return tokens_.filter(person=self.request.user)

    @extend_schema(request=ApiTokenInput, responses={201: ApiTokenWithSecret})
    def create(self, request):
        data = ApiTokenInput(data=request.data)
        data.is_valid(raise_exception=True)
        issued = tokens.api_token_issue(person=request.user, actor=request.user, **data.validated_data)
        body = ApiTokenWithSecret(issued.token, context={"secret": issued.secret}).data
        return Response(body, status=status.HTTP_201_CREATED, headers=NO_STORE)

    @extend_schema(request=OptionalReasonInput, responses=ApiTokenOutput)
    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None):
        reason = OptionalReasonInput(data=request.data)
        reason.is_valid(raise_exception=True)
        token = tokens.api_token_revoke(token=self.get_object(), actor=request.user, reason=reason.validated_data["reason"])
        return Response(ApiTokenOutput(token).data)
