"""The plan catalog: what a customer can buy, what it costs, and what it allows."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "PLANS",
    "Plan",
    "PlanLimits",
    "PlanPrice",
    "UnknownPlan",
    "get_plan",
    "plan_by_lookup_key",
    "plan_limit_refusal",
    "price_lookup_key",
    "stripe_product_name",
]

ResourceType = Literal["graph", "repository"]
Interval = Literal["day", "week", "month", "year"]


class UnknownPlan(LookupError):
    def __init__(self, name: str) -> None:
        known = ", ".join(PLANS)
        super().__init__(f"there is no plan {name!r}; choose one of: {known}")
        self.name = name


@dataclass(frozen=True)
class PlanPrice:
    amount: int  # minor units (cents)
    currency: str  # ISO 4217, lower case as Stripe writes it
    interval: Interval

    def as_json(self) -> dict[str, Any]:
        return {"amount": self.amount, "currency": self.currency, "interval": self.interval}


@dataclass(frozen=True)
class PlanLimits:
    """What a plan allows. Every number under ``limits`` in `GET /v1/plans` is enforced;
    a number under ``soft_limits`` is measured and shown, never enforced.

    - ``max_per_user``: resources of this plan one user may hold at once (checkout and
      provisioning refuse one more).
    - ``max_connections``: the login role's ``CONNECTION LIMIT`` (and the graph database's),
      which PostgreSQL enforces and the customer's role cannot change.
    - ``storage_mb`` (graphs): storage included. PostgreSQL has no per-database quota, so it is
      soft: the size of each graph's database is measured (dashboard, ``/metrics``
      ``lookout_graph_database_bytes``) and a graph past it keeps working.
    """

    max_per_user: int
    max_connections: int
    storage_mb: int | None = None

    def as_json(self) -> dict[str, Any]:
        """The enforced limits."""
        return {"max_per_user": self.max_per_user, "max_connections": self.max_connections}

    def soft_json(self) -> dict[str, Any]:
        """The measured, unenforced allowances."""
        return {} if self.storage_mb is None else {"storage_mb": self.storage_mb}


@dataclass(frozen=True)
class Plan:
    name: str
    display_name: str
    resource_type: ResourceType
    price: PlanPrice
    limits: PlanLimits
    description: str

    def as_json(self) -> dict[str, Any]:
        """What `GET /v1/plans` lists."""
        return {
            "name": self.name,
            "display_name": self.display_name,
            "resource_type": self.resource_type,
            "description": self.description,
            "price": self.price.as_json(),
            "limits": self.limits.as_json(),
            "soft_limits": self.limits.soft_json(),
        }


def _catalog(*plans: Plan) -> MappingProxyType[str, Plan]:
    return MappingProxyType({plan.name: plan for plan in plans})


# Each description says only what the limits enforce, or names an allowance as measured.
PLANS: MappingProxyType[str, Plan] = _catalog(
    Plan(
        "graph-standard",
        "Graph Standard",
        "graph",
        PlanPrice(2900, "usd", "month"),
        PlanLimits(max_per_user=3, max_connections=5, storage_mb=1024),
        "A dedicated graph database for a project: 5 connections at once, 1 GB included.",
    ),
    Plan(
        "graph-large",
        "Graph Large",
        "graph",
        PlanPrice(7900, "usd", "month"),
        PlanLimits(max_per_user=3, max_connections=20, storage_mb=10_240),
        "A dedicated graph database for a team: 20 connections at once, 10 GB included.",
    ),
    Plan(
        "graph-xlarge",
        "Graph XLarge",
        "graph",
        PlanPrice(19_900, "usd", "month"),
        PlanLimits(max_per_user=1, max_connections=50, storage_mb=51_200),
        "A dedicated graph database for production: 50 connections at once, 50 GB included.",
    ),
    Plan(
        "repository-reader",
        "Repository Reader",
        "repository",
        PlanPrice(900, "usd", "month"),
        PlanLimits(max_per_user=5, max_connections=2),
        "Read access to the shared repository for one person: 2 connections at once.",
    ),
    Plan(
        "repository-team",
        "Repository Team",
        "repository",
        PlanPrice(4900, "usd", "month"),
        PlanLimits(max_per_user=2, max_connections=25),
        "Read access to the shared repository for a team's tools: 25 connections at once.",
    ),
)


def plan_limit_refusal(plan: Plan, held: int) -> str | None:
    """The one plan-limit rule: a customer holds at most `max_per_user` resources of each plan
    at once, counted per plan (3 Graph Standard do not stop a first Graph XLarge). `held` is
    how many of this plan they hold or are buying. None when one more fits, else the sentence
    that says why not.

    Checkout enforces it, under a lock on the customer, before anything is charged;
    provisioning checks it again with the same number (`ResourceSpec.limits["max_resources"]`,
    see `fulfilment.resource_spec`) counting the resources of the plan created before."""
    limit = plan.limits.max_per_user
    if held < limit:
        return None
    return (
        f"The {plan.display_name} plan allows {limit} per customer and you already have {held};"
        " cancel one first or choose another plan."
    )


def get_plan(name: str) -> Plan:
    try:
        return PLANS[name]
    except KeyError:
        raise UnknownPlan(name) from None


def _environment(environment: str) -> str:
    env = environment.strip().lower()
    if not env:
        raise ValueError("the environment name is empty; set LOOKOUT_ENVIRONMENT")
    return env


def stripe_product_name(plan: Plan, environment: str) -> str:
    """ "Graph Standard" in production, "Graph Standard (staging)" elsewhere."""
    env = _environment(environment)
    return plan.display_name if env == "production" else f"{plan.display_name} ({env})"


def price_lookup_key(plan: Plan, environment: str) -> str:
    """The Stripe `lookup_key` of a plan's price: one per plan and environment, stable across
    price changes (a new amount moves the key to a new Price with `transfer_lookup_key`)."""
    return f"lookout_{_environment(environment)}_{plan.name}"


def plan_by_lookup_key(lookup_key: str | None) -> Plan | None:
    """The plan a Stripe price's `lookup_key` (`price_lookup_key`: `lookout_<env>_<plan>`)
    names, whatever the environment; None for a price Lookout did not make."""
    if not lookup_key or not lookup_key.startswith("lookout_"):
        return None
    for plan in PLANS.values():
        if lookup_key.endswith(f"_{plan.name}"):
            return plan
    return None
