CREATE TABLE subscriptions (
    id                          text PRIMARY KEY,
    user_id                     text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    plan                        text NOT NULL,
    resource_type               text NOT NULL CHECK (resource_type IN ('graph', 'repository')),
    resource_name               text NOT NULL,
    -- Known from the start, so that the graph and its subscription can be found either way.
    resource_id                 text NOT NULL UNIQUE,
    status                      text NOT NULL CHECK (status IN (
                                    'pending_payment', 'provisioning', 'active', 'past_due',
                                    'unpaid', 'paused', 'canceled', 'failed', 'expired')),
    stripe_checkout_session_id  text UNIQUE,
    stripe_subscription_id      text UNIQUE,
    stripe_customer_id          text,
    cancel_at_period_end        boolean NOT NULL DEFAULT false,
    current_period_end          timestamptz,
    has_payment_method          boolean NOT NULL DEFAULT false,
    -- `created` of the newest Stripe object state applied: an older event never overwrites it.
    stripe_state_at             timestamptz,
    -- Counts cancel/reactivate requests: each one gets its own Stripe idempotency key.
    billing_changes             integer NOT NULL DEFAULT 0,
    operation_id                text,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_user ON subscriptions (user_id, created_at DESC);
CREATE INDEX subscriptions_customer ON subscriptions (stripe_customer_id);

-- The webhook inbox: a verified event is stored here and acknowledged, then processed.
CREATE TABLE webhook_events (
    id               text PRIMARY KEY,
    type             text NOT NULL,
    stripe_created   timestamptz NOT NULL,
    payload          jsonb NOT NULL,
    received_at      timestamptz NOT NULL DEFAULT now(),
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN (
                         'pending', 'processing', 'retrying', 'processed', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    locked_until     timestamptz,
    last_error       text,
    processed_at     timestamptz
);
CREATE INDEX webhook_events_due ON webhook_events (next_attempt_at)
    WHERE status IN ('pending', 'processing', 'retrying');

-- Stripe subscriptions to cancel at once because provisioning failed; kept until Stripe agrees.
CREATE TABLE stripe_cancellations (
    subscription_id         text PRIMARY KEY REFERENCES subscriptions (id) ON DELETE CASCADE,
    stripe_subscription_id  text NOT NULL,
    attempts                integer NOT NULL DEFAULT 0,
    next_attempt_at         timestamptz NOT NULL DEFAULT now(),
    last_error              text,
    done_at                 timestamptz
);
