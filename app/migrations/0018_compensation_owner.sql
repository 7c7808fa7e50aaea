-- Which instance holds a compensation's claim (its `instance_id`): a claim whose instance no
-- longer holds its instance lock (provisioning.leases) is taken up at once, without waiting
-- out `locked_until`, which must outlast the Stripe SDK's slowest call.
ALTER TABLE stripe_compensations ADD COLUMN locked_by text;
