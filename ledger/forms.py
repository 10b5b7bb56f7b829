from django import forms
from django.conf import settings
from django.utils import timezone

from gateway.models import Provider
from ledger.chargeback import GROUPS
from ledger.models import ProviderCostImport


def _month_bounds():
    today = timezone.localdate()
    first = today.replace(day=1)
    return first, today


class ChargebackForm(forms.Form):
    start = forms.DateField(widget=forms.DateInput(attrs={"type": "date"}), initial=lambda: _month_bounds()[0])
    end = forms.DateField(widget=forms.DateInput(attrs={"type": "date"}), initial=lambda: _month_bounds()[1])
    group_by = forms.MultipleChoiceField(choices=[(k, label) for k, (_, label) in GROUPS.items()],
                                         widget=forms.CheckboxSelectMultiple, initial=["cost_center", "team"])

    def clean(self):
        data = super().clean()
        if data.get("start") and data.get("end") and data["start"] > data["end"]:
            self.add_error("end", "The end is before the start.")
        return data


class AdjustmentForm(forms.Form):
    amount = forms.DecimalField(max_digits=14, decimal_places=8, help_text="Negative to credit, positive to charge.")
    reason = forms.CharField(max_length=200)


class CostImportForm(forms.Form):
    provider = forms.ModelChoiceField(queryset=None)
    source = forms.ChoiceField(choices=[], required=False, label="Kind",
                               help_text="Detected from the file; choose one only to insist on it.")
    file = forms.FileField(help_text="A cost or usage file: its lines are read in the background.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["provider"].queryset = Provider.objects.all()
        self.fields["source"].choices = [("", "Detect from the file"), *ProviderCostImport.Source.choices]

    def clean_file(self):
        file = self.cleaned_data["file"]
        limit = settings.TOLLGATE_COST_IMPORT_MAX_BYTES
        if file.size > limit:
            raise forms.ValidationError(f"The file is {file.size:,} bytes; the limit is {limit:,} (TOLLGATE_COST_IMPORT_MAX_BYTES).")
        return file


class ReconcileForm(forms.Form):
    provider = forms.ModelChoiceField(queryset=None)
    month = forms.DateField(widget=forms.DateInput(attrs={"type": "month"}), input_formats=["%Y-%m", "%Y-%m-%d"],
                            help_text="Any day of the month to reconcile.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["provider"].queryset = Provider.objects.all()
