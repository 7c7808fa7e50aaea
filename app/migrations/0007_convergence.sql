-- State that converges (issue 11).

-- Compensations: what Stripe must be told because provisioning failed, one row per
-- (subscription, action), claimed by one instance at a time (`locked_until`, as the webhook
-- inbox does) so that exactly one call is in flight and one outcome is audited. `action` is
-- 'cancel' today; a refund is a second action on the same claim.
CREATE TABLE stripe_compensations (
    subscription_id   text NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    action            text NOT NULL,
    -- The Stripe object the action is about (the subscription to cancel, the payment...).
    target_id         text NOT NULL,
    attempts          integer NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    locked_until      timestamptz,
    last_error        text,
    done_at           timestamptz,
    PRIMARY KEY (subscription_id, action)
);
CREATE INDEX stripe_compensations_due ON stripe_compensations (next_attempt_at)
    WHERE done_at IS NULL;
INSERT INTO stripe_compensations (subscription_id, action, target_id, attempts,
                                  next_attempt_at, last_error, done_at)
    SELECT subscription_id, 'cancel', stripe_subscription_id, attempts, next_attempt_at,
           last_error, done_at
      FROM stripe_cancellations;
DROP TABLE stripe_cancellations;

-- A subject may get a further operation of a kind once the previous one finished: a
-- provision that completed after its subscription was canceled (and after the deprovision
-- had run) leaves a resource that a second deprovision must remove. Generation 0 is what
-- the webhook paths create, so their starts stay idempotent by (kind, subject).
ALTER TABLE operations ADD COLUMN generation integer NOT NULL DEFAULT 0;
ALTER TABLE operations DROP CONSTRAINT operations_kind_subject_id_key;
ALTER TABLE operations ADD CONSTRAINT operations_kind_subject_generation
    UNIQUE (kind, subject_id, generation);
-- The reconciler looks up each subscription's operations and latest resource.
CREATE INDEX operations_subject ON operations (subject_id, kind, generation);
