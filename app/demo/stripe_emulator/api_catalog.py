"""`/v1/customers`, `/v1/products` (with search) and `/v1/prices` (with `lookup_keys[]`)."""

from __future__ import annotations

import re

from app.demo.stripe_emulator import objects
from app.demo.stripe_emulator.api import ApiContext
from app.demo.stripe_emulator.errors import StripeError
from app.demo.stripe_emulator.forms import (
    as_bool,
    as_dict,
    as_int,
    as_list,
    as_str,
    as_str_dict,
    reject_unknown,
    required_str,
)
from app.demo.stripe_emulator.state import Obj, paginate

_INTERVALS = ("day", "week", "month", "year")
_CLAUSE = re.compile(r"\s*(metadata\['([^']+)'\]|[a-z_]+)\s*(:|~)\s*'([^']*)'\s*")


def create_customer(ctx: ApiContext) -> Obj:
    p = ctx.params
    reject_unknown(p, ("email", "name", "description", "metadata", "phone"))
    cust = objects.customer(
        objects.stripe_id("cus", 14), ctx.state.now(), as_str(p.get("email"), "email"),
        as_str(p.get("name"), "name"), as_str_dict(p.get("metadata"), "metadata"),
    )  # fmt: skip
    cust["description"] = as_str(p.get("description"), "description")
    cust["phone"] = as_str(p.get("phone"), "phone")
    ctx.state.put(cust)
    ctx.emit("customer.created", cust)
    return cust


def retrieve_customer(ctx: ApiContext) -> Obj:
    return ctx.state.get("customer", ctx.path_params["id"], param="customer")


def _new_product(ctx: ApiContext, p: Obj, param: str = "") -> Obj:
    name = required_str(p, "name") if not param else as_str(p.get("name"), f"{param}[name]")
    if name is None:
        raise StripeError.missing(f"{param}[name]")
    pid = as_str(p.get("id"), "id") or objects.stripe_id("prod", 14)
    if pid in ctx.state.objects:
        raise StripeError.invalid(
            "Product already exists.", param="id", code="resource_already_exists"
        )
    prod = objects.product(
        pid, ctx.state.now(), name, as_bool(p.get("active"), "active", True),
        as_str(p.get("description"), "description"), as_str_dict(p.get("metadata"), "metadata"),
    )  # fmt: skip
    ctx.state.put(prod)
    ctx.emit("product.created", prod)
    return prod


def create_product(ctx: ApiContext) -> Obj:
    reject_unknown(ctx.params, ("id", "name", "active", "description", "metadata"))
    return _new_product(ctx, ctx.params)


def retrieve_product(ctx: ApiContext) -> Obj:
    return ctx.state.get("product", ctx.path_params["id"])


def list_products(ctx: ApiContext) -> Obj:
    p = ctx.params
    reject_unknown(p, ("active", "ids", "limit", "starting_after", "ending_before"))
    items = ctx.state.all("product")
    if p.get("active") not in (None, ""):
        active = as_bool(p["active"], "active")
        items = [o for o in items if o["active"] == active]
    ids = as_list(p.get("ids"), "ids")
    if ids:
        items = [o for o in items if o["id"] in ids]
    return paginate(items, p, "/v1/products")


def _matches(obj: Obj, clause: re.Match[str]) -> bool:
    field, meta_key, op, value = clause.group(1), clause.group(2), clause.group(3), clause.group(4)
    actual = obj["metadata"].get(meta_key) if meta_key else obj.get(field)
    if isinstance(actual, bool):
        actual = "true" if actual else "false"
    if actual is None:
        return False
    return value.lower() in str(actual).lower() if op == "~" else str(actual) == value


def search_products(ctx: ApiContext) -> Obj:
    """Stripe's search language, the part one uses for products: `a:'x' AND metadata['k']:'v'`."""
    p = ctx.params
    reject_unknown(p, ("query", "limit", "page"))
    query = required_str(p, "query")
    joiner = " OR " if " OR " in query else " AND "
    clauses = []
    for part in query.split(joiner):
        clause = _CLAUSE.fullmatch(part)
        if clause is None:
            raise StripeError.invalid(
                f"We could not parse your search query: {part!r}", param="query"
            )
        clauses.append(clause)
    test = any if joiner == " OR " else all
    found = [o for o in ctx.state.all("product") if test(_matches(o, c) for c in clauses)]
    limit = as_int(p.get("limit"), "limit", 10) or 10
    return {
        "object": "search_result", "data": found[:limit], "has_more": len(found) > limit,
        "next_page": None, "url": "/v1/products/search",
    }  # fmt: skip


def create_price(ctx: ApiContext) -> Obj:
    p, state = ctx.params, ctx.state
    reject_unknown(p, (
        "currency", "unit_amount", "recurring", "product", "product_data", "lookup_key",
        "transfer_lookup_key", "nickname", "metadata", "active",
    ))  # fmt: skip
    currency = required_str(p, "currency").lower()
    unit_amount = as_int(p.get("unit_amount"), "unit_amount")
    if unit_amount is None or unit_amount < 0:
        raise StripeError.missing("unit_amount")
    recurring_in = as_dict(p.get("recurring"), "recurring")
    recurring: Obj | None = None
    if recurring_in:
        interval = recurring_in.get("interval")
        if interval not in _INTERVALS:
            raise StripeError.invalid(
                f"Invalid recurring[interval]: must be one of {', '.join(_INTERVALS)}",
                param="recurring[interval]",
            )
        count = as_int(recurring_in.get("interval_count"), "recurring[interval_count]", 1)
        recurring = {
            "interval": interval,
            "interval_count": count,
            "meter": None, "trial_period_days": None, "usage_type": "licensed",
        }  # fmt: skip
    product_id = as_str(p.get("product"), "product")
    product_data = as_dict(p.get("product_data"), "product_data")
    if (product_id is None) == (not product_data):
        raise StripeError.invalid(
            "You must specify either `product` or `product_data` when creating a price."
        )
    lookup_key = as_str(p.get("lookup_key"), "lookup_key")
    holder = next(
        (o for o in state.all("price") if lookup_key and o["lookup_key"] == lookup_key), None
    )
    transfer = as_bool(p.get("transfer_lookup_key"), "transfer_lookup_key")
    if holder is not None and not transfer:
        raise StripeError.invalid(
            f"A price (`{holder['id']}`) already uses that lookup key.", param="lookup_key"
        )
    if product_id is not None:
        state.get("product", product_id, param="product")
    else:
        product_id = _new_product(ctx, product_data, "product_data")["id"]
    if holder is not None:
        holder["lookup_key"] = None
        ctx.emit("price.updated", holder, {"lookup_key": lookup_key})
    price = objects.price(
        objects.stripe_id("price"), state.now(), product_id=product_id, currency=currency,
        unit_amount=unit_amount, recurring=recurring, lookup_key=lookup_key,
        nickname=as_str(p.get("nickname"), "nickname"),
        meta=as_str_dict(p.get("metadata"), "metadata"),
        active=as_bool(p.get("active"), "active", True),
    )  # fmt: skip
    state.put(price)
    ctx.emit("price.created", price)
    return price


def retrieve_price(ctx: ApiContext) -> Obj:
    return ctx.state.get("price", ctx.path_params["id"])


def list_prices(ctx: ApiContext) -> Obj:
    p = ctx.params
    reject_unknown(p, (
        "active", "currency", "product", "type", "lookup_keys", "recurring", "limit",
        "starting_after", "ending_before",
    ))  # fmt: skip
    items = ctx.state.all("price")
    keys = as_list(p.get("lookup_keys"), "lookup_keys")
    if keys:
        items = [o for o in items if o["lookup_key"] in keys]
    if p.get("active") not in (None, ""):
        active = as_bool(p["active"], "active")
        items = [o for o in items if o["active"] == active]
    for field in ("currency", "product", "type"):
        if p.get(field):
            items = [o for o in items if o[field] == p[field]]
    interval = as_dict(p.get("recurring"), "recurring").get("interval")
    if interval:
        items = [o for o in items if (o["recurring"] or {}).get("interval") == interval]
    return paginate(items, p, "/v1/prices")
