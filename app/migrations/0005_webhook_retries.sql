-- Why the inbox worker retries an event: `transient`, a dependency was down (Stripe,
-- PostgreSQL, Redis), retried for as long as Stripe would redeliver it (3 days); `permanent`,
-- anything else (a bug, an impossible payload), failed after a few tries. NULL: no error.
ALTER TABLE webhook_events
    ADD COLUMN last_error_kind text CHECK (last_error_kind IN ('transient', 'permanent')),
    ADD COLUMN permanent_errors integer NOT NULL DEFAULT 0;

-- The events not processed, which /metrics counts and `lookout webhooks list` shows, without
-- reading the processed ones (nearly all of the table).
CREATE INDEX webhook_events_unsettled ON webhook_events (status, last_error_kind, received_at)
    WHERE status <> 'processed';
