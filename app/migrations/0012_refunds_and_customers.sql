-- Billing as real Stripe behaves (issue 13): one Stripe Customer per user, and the refund of a
-- failed provisioning's payment.

-- Every Checkout of a user names this Customer, so that the Customer Portal shows all of the
-- user's subscriptions and invoices. Written once (the first writer wins).
CREATE TABLE stripe_customers (
    user_id      text PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    customer_id  text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now()
);
-- Users who bought before: the Customer of their latest purchase (each purchase used to make
-- one of its own).
INSERT INTO stripe_customers (user_id, customer_id)
    SELECT DISTINCT ON (user_id) user_id, stripe_customer_id
      FROM subscriptions
     WHERE stripe_customer_id IS NOT NULL
     ORDER BY user_id, created_at DESC
    ON CONFLICT DO NOTHING;

-- What the customer got back when provisioning failed (null: nothing refunded).
ALTER TABLE subscriptions
    ADD COLUMN refund_amount    integer,
    ADD COLUMN refund_currency  text,
    ADD COLUMN refund_status    text;
