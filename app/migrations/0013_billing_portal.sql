-- When Stripe will end the subscription, however it was scheduled: by `cancel_at_period_end`
-- (Stripe shows that date in `cancel_at` too) or by `cancel_at` alone, as the Customer Portal
-- does in flexible billing mode. NULL: no cancellation is scheduled.
ALTER TABLE subscriptions ADD COLUMN cancel_at timestamptz;
