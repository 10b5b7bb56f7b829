from django import forms

from budgets.models import Grant
from governance.models import Person


class DelegateForm(forms.Form):
    name = forms.CharField(max_length=120)
    scope = forms.ChoiceField(choices=[(Grant.Scope.PROJECT, "Project / feature"), (Grant.Scope.ENVIRONMENT, "Environment"),
                                       (Grant.Scope.PERSON, "Person")])
    project = forms.SlugField(max_length=80, required=False, help_text="For a project or feature grant.")
    environment = forms.CharField(max_length=40, required=False, help_text="For an environment grant.")
    person = forms.ModelChoiceField(queryset=Person.objects.filter(is_active=True), required=False,
                                    help_text="For a person grant: they become its owner.")
    limit_amount = forms.DecimalField(max_digits=14, decimal_places=2, min_value=0, label="Limit per period")
    purpose = forms.CharField(max_length=200, required=False)

    def __init__(self, *args, grant: Grant | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if grant is not None and grant.team_id:  # a person grant goes to someone of the grant's team
            self.fields["person"].queryset = Person.objects.filter(
                is_active=True, memberships__team_id=grant.team_id).distinct().order_by("username")
            self.fields["person"].help_text = f"For a person grant: someone of {grant.team}; they become its owner."
        if grant is not None:
            self.fields["limit_amount"].label = f"Limit {grant.period_phrase}"


class IncreaseForm(forms.Form):
    new_limit = forms.DecimalField(max_digits=14, decimal_places=2, min_value=0)
    reason = forms.CharField(max_length=300)
