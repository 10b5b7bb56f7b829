"""Forms for the self-service pages."""
from django import forms
from django.utils import timezone

from gateway.models import ModelAlias
from governance.models import Team, UsageClass
from keys.models import DURATION_CHOICES, AcceptableUsePolicy, AccessRequest


class ModelChoiceWithPrice(forms.ModelMultipleChoiceField):
    def label_from_instance(self, alias: ModelAlias) -> str:
        deployment = alias.deployments.select_related("provider_model").first()
        price = deployment.provider_model.price_at(timezone.now()) if deployment else None
        cost = f" — ${price.input_per_mtok.normalize():f} in / ${price.output_per_mtok.normalize():f} out per million tokens" if price else ""
        tier = " (premium: needs approval)" if alias.tier == ModelAlias.Tier.PREMIUM else ""
        return f"{alias.name}{cost}{tier}"


class AccessRequestForm(forms.Form):
    team = forms.ModelChoiceField(queryset=Team.objects.none(), empty_label=None)
    aliases = ModelChoiceWithPrice(
        queryset=ModelAlias.objects.filter(is_active=True), widget=forms.CheckboxSelectMultiple, label="Models",
    )
    use_case = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), label="Business use case",
                               help_text="What will call the models, for whom, and why.")
    key_class = forms.ChoiceField(choices=UsageClass.choices, label="Class", initial=UsageClass.EXPERIMENTATION)
    environment = forms.ChoiceField(choices=AccessRequest.Environment.choices)
    project = forms.SlugField(max_length=64, required=False, label="Project or feature tag",
                              help_text="Letters, digits and dashes; used in chargeback reports.")
    duration_days = forms.TypedChoiceField(choices=DURATION_CHOICES, coerce=int, label="Expected duration")
    monthly_budget = forms.DecimalField(max_digits=12, decimal_places=2, min_value=0, required=False,
                                        label="Monthly budget (USD)", help_text="Empty: no key-level cap.")

    def __init__(self, *args, person, policy: AcceptableUsePolicy | None = None, **kwargs):
        """`policy`: the acceptable-use policy version the person has yet to accept (keys.services.aup_pending_for);
        the form then asks for its acceptance."""
        super().__init__(*args, **kwargs)
        self.fields["team"].queryset = Team.objects.filter(memberships__person=person, is_active=True).distinct()
        # Finance, auditors and new starters belong to no team: say so instead of "This field is required."
        self.in_no_team = not self.fields["team"].queryset.exists()
        if self.in_no_team:
            self.fields["team"].error_messages["required"] = (
                "You are in no team, and keys are issued to a team's members. Ask a team owner or IT to add you to a team.")
        if policy is not None:
            self.fields["accept_policy"] = forms.BooleanField(
                label=f"I have read and accept the acceptable-use policy (version {policy.version})",
                error_messages={"required": f"Accept the acceptable-use policy (version {policy.version}) to request a key."},
            )


class ReasonForm(forms.Form):
    reason = forms.CharField(max_length=300, widget=forms.TextInput(attrs={"size": 50}))


class ChangeRequestForm(forms.Form):
    kind = forms.ChoiceField(choices=[(AccessRequest.Kind.EXTENSION, "Extension"), (AccessRequest.Kind.BUDGET, "More budget")])
    duration_days = forms.TypedChoiceField(choices=DURATION_CHOICES, coerce=int, required=False)
    monthly_budget = forms.DecimalField(max_digits=12, decimal_places=2, min_value=0, required=False)
    use_case = forms.CharField(max_length=500, required=False, label="Why")
