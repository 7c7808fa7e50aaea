-- When a key was last used (to the minute: see app.users), so that its owner can tell which
-- keys are idle before revoking them; and a user's keys listed without a scan.
ALTER TABLE api_keys ADD COLUMN last_used_at timestamptz;
CREATE INDEX api_keys_user ON api_keys (user_id, created_at);
