-- When a subscription turned `past_due` (NULL otherwise): it keeps its resource for
-- LOOKOUT_PAST_DUE_GRACE_DAYS after this, then the access sweep suspends it.
ALTER TABLE subscriptions ADD COLUMN past_due_since timestamptz;
CREATE INDEX subscriptions_past_due ON subscriptions (past_due_since)
    WHERE past_due_since IS NOT NULL;
