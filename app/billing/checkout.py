"""Starting a purchase, and finding out whether it was paid."""

from __future__ import annotations

import logging
import re

import asyncpg

from app.audit import record_audit
from app.billing.customers import ensure_stripe_customer, stripe_customer_id
from app.billing.errors import (
    CardDeclined,
    CheckoutUnavailable,
    NoPaymentMethod,
    PaymentInProgress,
    PlanLimitReached,
    ResourceNameTaken,
)
from app.billing.lifecycle import Lifecycle
from app.billing.plans import Plan, plan_limit_refusal
from app.billing.provider import (
    CheckoutSessionInfo,
    PaymentDeclined,
    PaymentMethodRequired,
    PaymentNeedsAuthentication,
    PaymentProvider,
    PaymentProviderError,
    PaymentProviderUnavailable,
)
from app.billing.subscriptions import (
    SubscriptionRecord,
    delete_unpaid_subscription,
    get_subscription,
    insert_subscription,
    list_subscriptions,
    set_subscription_fields,
)
from app.db import Connection
from app.ids import new_id
from app.users import User

__all__ = ["RESOURCE_NAME", "CheckoutService"]

logger = logging.getLogger(__name__)

RESOURCE_NAME = re.compile(r"[a-z][a-z0-9-]{1,38}[a-z0-9]")
RESOURCE_ID_PREFIX = {"graph": "gr", "repository": "repo"}
# A subscription in one of these holds (or is about to hold) its resource.
HOLDING = ("provisioning", "active", "past_due", "unpaid", "paused")
# Stripe's Checkout Sessions expire after 24 hours unless told otherwise.
CHECKOUT_OPEN_HOURS = 24


class CheckoutService:
    def __init__(
        self,
        pool: asyncpg.Pool,
        provider: PaymentProvider,
        lifecycle: Lifecycle,
        *,
        public_url: str,
    ) -> None:
        self._pool = pool
        self._provider = provider
        self._lifecycle = lifecycle
        self._public_url = public_url

    async def _reserve(
        self, user: User, plan: Plan, resource_name: str, *, customer_id: str | None = None
    ) -> SubscriptionRecord:
        """A new `pending_payment` subscription for `resource_name`, once the name is free and
        the plan's limit allows it (409 otherwise); `customer_id` marks a saved card's."""
        async with self._pool.acquire() as conn, conn.transaction():
            # One checkout of a customer at a time decides: the next one waits here until this
            # one's subscription row is committed, then counts it (two at once over a limit of
            # 1 must not both pass). NO KEY UPDATE: rows that reference the user can still be
            # written meanwhile.
            await conn.execute("SELECT FROM users WHERE id = $1 FOR NO KEY UPDATE", user.id)
            named = await list_subscriptions(conn, user.id, resource_name=resource_name)
            if any(_charging_saved_card(s) for s in named):
                raise PaymentInProgress(
                    f"A payment with your saved card for {resource_name!r} is under way. "
                    "Subscribe with the saved card again to finish it, or choose another name.",
                )
            for orphan in (s for s in named if s.status == "pending_payment"):
                await self._abandon(orphan)
            # After the abandoning: an earlier checkout of this name may turn out to be paid.
            named = await list_subscriptions(conn, user.id, resource_name=resource_name)
            if any(s.status in HOLDING for s in named):
                raise ResourceNameTaken(
                    f"You already have a resource named {resource_name!r}; choose another name.",
                )
            refusal = plan_limit_refusal(plan, await self._held(conn, user, plan, resource_name))
            if refusal is not None:
                raise PlanLimitReached(refusal)
            record = await insert_subscription(
                conn,
                subscription_id=new_id("sub"),
                user_id=user.id,
                plan=plan.name,
                resource_type=plan.resource_type,
                resource_name=resource_name,
                resource_id=new_id(RESOURCE_ID_PREFIX[plan.resource_type]),
            )
            if customer_id is not None:
                record = await set_subscription_fields(
                    conn, record.id, stripe_customer_id=customer_id
                )
        return record

    async def start(
        self, user: User, plan: Plan, resource_name: str
    ) -> tuple[SubscriptionRecord, CheckoutSessionInfo]:
        record = await self._reserve(user, plan, resource_name)
        try:
            # Every purchase of a user names the user's one Customer, so that the Customer
            # Portal shows all of them (Checkout would otherwise make a Customer each time).
            customer_id = await ensure_stripe_customer(self._pool, self._provider, user)
            session = await self._checkout_session(record, plan, customer_id)
        except PaymentProviderError as exc:
            async with self._pool.acquire() as conn:
                await delete_unpaid_subscription(conn, record.id)
            logger.warning("creating a Checkout Session failed: %s", exc)
            raise CheckoutUnavailable(
                "Stripe could not start the checkout just now; nothing was charged. Try again."
            ) from exc
        async with self._pool.acquire() as conn:
            record = await set_subscription_fields(
                conn, record.id, stripe_checkout_session_id=session.id
            )
            await record_audit(
                conn,
                "checkout.created",
                user_id=user.id,
                subject_id=record.id,
                detail={"plan": plan.name, "checkout_session_id": session.id},
            )
        return record, session

    async def _held(self, conn: Connection, user: User, plan: Plan, resource_name: str) -> int:
        """How many of `plan` the customer holds or is paying for: `HOLDING`, and checkouts
        still open (a Checkout Session can be paid for 24 hours), except the one for this
        `resource_name`, which this checkout replaces."""
        held: int = await conn.fetchval(
            "SELECT count(*) FROM subscriptions WHERE user_id = $1 AND plan = $2"
            " AND (status = ANY($3::text[]) OR (status = 'pending_payment'"
            " AND resource_name <> $4 AND created_at > now() - make_interval(hours => $5)))",
            user.id,
            plan.name,
            list(HOLDING),
            resource_name,
            CHECKOUT_OPEN_HOURS,
        )
        return held

    async def _abandon(self, orphan: SubscriptionRecord) -> None:
        """An earlier checkout for the same resource that was never paid: expire it in Stripe,
        unless it turns out to have been paid after all."""
        session_id = orphan.stripe_checkout_session_id
        if session_id is not None:
            try:
                session = await self._provider.expire_checkout_session(session_id)
            except PaymentProviderError as exc:
                logger.warning("could not expire Checkout Session %s: %s", session_id, exc)
                return
            if session.is_paid:
                await self._lifecycle.fulfil(
                    orphan.id,
                    stripe_subscription_id=session.subscription_id,
                    customer_id=session.customer_id,
                    source="checkout.orphan_check",
                )
                return
        await self._lifecycle.set_status(
            orphan.id, "expired", only_from=frozenset({"pending_payment"}), reason="superseded"
        )

    async def confirm(self, record: SubscriptionRecord) -> SubscriptionRecord:
        """The checkout return page asks before the webhook came: ask Stripe itself. This can
        only move the subscription forward."""
        if record.status != "pending_payment" or record.stripe_checkout_session_id is None:
            return record
        try:
            session = await self._provider.retrieve_checkout_session(
                record.stripe_checkout_session_id
            )
        except PaymentProviderError as exc:
            logger.warning("could not ask Stripe about %s: %s", record.id, exc)
            return record
        if session.is_paid:
            return (
                await self._lifecycle.fulfil(
                    record.id,
                    stripe_subscription_id=session.subscription_id,
                    customer_id=session.customer_id,
                    source="checkout.return",
                )
                or record
            )
        if session.status == "expired":
            return (
                await self._lifecycle.set_status(
                    record.id, "expired", only_from=frozenset({"pending_payment"}), reason="expired"
                )
                or record
            )
        async with self._pool.acquire() as conn:
            return await get_subscription(conn, record.id) or record

    # -- subscribing with a saved payment method (issue 13) -------------------------------------
    async def subscribe(
        self, user: User, plan: Plan, resource_name: str
    ) -> tuple[SubscriptionRecord, CheckoutSessionInfo | None]:
        """Subscribes with the default payment method of the user's Stripe Customer, without
        Checkout. The payment is made in Stripe at once; provisioning follows on its
        `invoice.paid`, as after Checkout. Answers a Checkout Session too when the bank asks the
        customer to authenticate (SCA): they finish the payment there."""
        customer_id = await stripe_customer_id(self._pool, user.id)
        try:
            payment_method = (
                await self._provider.default_payment_method(customer_id) if customer_id else None
            )
        except PaymentProviderError as exc:
            raise _stripe_unavailable("look up your saved card") from exc
        if customer_id is None or payment_method is None:
            raise _payment_method_required()
        async with self._pool.acquire() as conn:
            named = await list_subscriptions(conn, user.id, resource_name=resource_name)
        # A retry (a double click, an answer lost) finishes the same subscription: the same
        # idempotency key gets Stripe's first answer, or a 409 while that one is under way.
        pending = [s for s in named if _charging_saved_card(s) and s.plan == plan.name]
        record = (
            pending[0]
            if pending
            else await self._reserve(user, plan, resource_name, customer_id=customer_id)
        )
        try:
            info = await self._provider.create_subscription(
                plan=plan, customer_id=customer_id, lookout_subscription_id=record.id
            )
        except PaymentNeedsAuthentication:
            return await self._authenticate_in_checkout(record, plan, customer_id)
        except PaymentProviderUnavailable as exc:
            # Kept: Stripe may have made the subscription before the answer was lost; its
            # events find this row by its id in the metadata.
            raise _stripe_unavailable("charge your saved card") from exc
        except (PaymentDeclined, PaymentMethodRequired, PaymentProviderError) as exc:
            async with self._pool.acquire() as conn:  # nothing was created in Stripe
                await delete_unpaid_subscription(conn, record.id)
            if isinstance(exc, PaymentDeclined):
                raise CardDeclined(
                    "Your saved card was declined and nothing was charged. Subscribe with "
                    "another card through Checkout (POST /v1/checkout).",
                ) from exc
            if isinstance(exc, PaymentMethodRequired):
                raise _payment_method_required() from exc
            raise
        async with self._pool.acquire() as conn, conn.transaction():
            record = await set_subscription_fields(conn, record.id, stripe_subscription_id=info.id)
            await record_audit(
                conn,
                "subscription.created_with_saved_card",
                user_id=user.id,
                subject_id=record.id,
                detail={"plan": plan.name, "stripe_subscription_id": info.id},
            )
        return record, None

    async def _checkout_session(
        self, record: SubscriptionRecord, plan: Plan, customer_id: str
    ) -> CheckoutSessionInfo:
        """A Checkout Session for `record`, as the user's Customer, returning to the dashboard.
        Raises `PaymentProviderError`."""
        return await self._provider.create_checkout_session(
            plan=plan,
            lookout_subscription_id=record.id,
            success_url=f"{self._public_url}/checkout/return?session_id={{CHECKOUT_SESSION_ID}}",
            cancel_url=f"{self._public_url}/?checkout=cancelled",
            customer_id=customer_id,
        )

    async def _authenticate_in_checkout(
        self, record: SubscriptionRecord, plan: Plan, customer_id: str
    ) -> tuple[SubscriptionRecord, CheckoutSessionInfo | None]:
        try:
            session = await self._checkout_session(record, plan, customer_id)
        except PaymentProviderError as exc:
            async with self._pool.acquire() as conn:
                await delete_unpaid_subscription(conn, record.id)
            raise _stripe_unavailable("start the checkout") from exc
        async with self._pool.acquire() as conn:
            record = await set_subscription_fields(
                conn, record.id, stripe_checkout_session_id=session.id
            )
        return record, session


def _charging_saved_card(record: SubscriptionRecord) -> bool:
    """Unpaid, no Checkout, a Customer named: a saved card is being charged (its outcome is
    Stripe's). A Checkout's row has no Customer before it is paid."""
    return (
        record.status == "pending_payment"
        and record.stripe_checkout_session_id is None
        and record.stripe_customer_id is not None
    )


def _payment_method_required() -> NoPaymentMethod:
    return NoPaymentMethod(
        "You have no saved card to charge. Subscribe through Checkout (POST /v1/checkout), "
        "which can save one.",
    )


def _stripe_unavailable(doing: str) -> CheckoutUnavailable:
    return CheckoutUnavailable(
        f"Stripe did not answer when we tried to {doing}. Try again in a moment."
    )
