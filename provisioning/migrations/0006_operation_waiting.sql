-- An operation whose provisioning server does not answer waits (`waiting`) instead of failing;
-- it fails only once it has waited LOOKOUT_PROVISIONER_RETRY_SECONDS since `waiting_since`,
-- which survives a takeover by another instance.
ALTER TABLE operations DROP CONSTRAINT operations_status_check;
ALTER TABLE operations ADD CONSTRAINT operations_status_check
    CHECK (status IN ('pending', 'running', 'waiting', 'completed', 'failed', 'cancelled'));
ALTER TABLE operations ADD COLUMN waiting_since timestamptz;  -- the outage began (NULL: none)
ALTER TABLE operations ADD COLUMN retry_at timestamptz;       -- the next attempt while waiting
