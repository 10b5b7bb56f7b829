import factory
from factory.django import DjangoModelFactory

from governance.models import CostCenter, Department, Membership, Person, Team


class DepartmentFactory(DjangoModelFactory):
    class Meta:
        model = Department
        django_get_or_create = ["slug"]

    name = factory.Sequence(lambda n: f"Department {n}")
    slug = factory.Sequence(lambda n: f"dept-{n}")


class CostCenterFactory(DjangoModelFactory):
    class Meta:
        model = CostCenter

    code = factory.Sequence(lambda n: f"CC-{n:04d}")
    name = factory.Sequence(lambda n: f"Cost center {n}")
    department = factory.SubFactory(DepartmentFactory)


class PersonFactory(DjangoModelFactory):
    class Meta:
        model = Person
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"person{n}")
    email = factory.LazyAttribute(lambda p: f"{p.username}@example.com")
    first_name = "Test"
    last_name = factory.Sequence(lambda n: f"Person{n}")
    password = factory.PostGenerationMethodCall("set_password", "correct horse battery staple")

    @factory.post_generation
    def roles(self, create, extracted, **kwargs):
        if create and extracted:
            from django.contrib.auth.models import Group

            self.is_staff = True
            self.save(update_fields=["is_staff", "password"])
            self.groups.add(*Group.objects.filter(name__in=extracted))
        elif create:
            self.save(update_fields=["password"])


class TeamFactory(DjangoModelFactory):
    class Meta:
        model = Team

    name = factory.Sequence(lambda n: f"Team {n}")
    slug = factory.Sequence(lambda n: f"team-{n}")
    department = factory.SubFactory(DepartmentFactory)
    cost_center = factory.SubFactory(CostCenterFactory)
    owner = factory.SubFactory(PersonFactory)


class MembershipFactory(DjangoModelFactory):
    class Meta:
        model = Membership

    person = factory.SubFactory(PersonFactory)
    team = factory.SubFactory(TeamFactory)
    role = Membership.Role.MEMBER
