-- Subscribing with a saved payment method (issue 13) needs the user's Stripe Customer. This is
-- the same table as `0012_refunds_and_customers.sql` of the one-Customer-per-user change (which
-- fills it at every checkout): whichever migration comes first creates it.
CREATE TABLE IF NOT EXISTS stripe_customers (
    user_id      text PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    customer_id  text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now()
);
