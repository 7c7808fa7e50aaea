-- Provisioning: durable operations (leased by one instance at a time) and the resources
-- they create. Credentials are stored nowhere.

CREATE TABLE resources (
    id              text PRIMARY KEY,                 -- gr_…, repo_…
    resource_type   text NOT NULL,                    -- graph, repository
    user_id         text NOT NULL REFERENCES users (id),
    subject_id      text NOT NULL,                    -- the subscription
    plan            text NOT NULL,
    -- orphaned: a rollback could not remove everything; see the audit log.
    status          text NOT NULL DEFAULT 'provisioning'
                    CHECK (status IN ('provisioning', 'active', 'deprovisioning', 'deleted',
                                      'orphaned')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz
);
CREATE INDEX resources_user ON resources (user_id, resource_type, created_at);
CREATE INDEX resources_subject ON resources (subject_id);

CREATE TABLE operations (
    id                  text PRIMARY KEY,             -- op_…
    kind                text NOT NULL CHECK (kind IN ('provision', 'deprovision')),
    subject_id          text NOT NULL,                -- the subscription
    user_id             text NOT NULL REFERENCES users (id),
    resource_type       text NOT NULL,
    resource_id         text NOT NULL REFERENCES resources (id) DEFERRABLE INITIALLY DEFERRED,
    spec                jsonb NOT NULL,               -- ResourceSpec: plan name and limits
    status              text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'running', 'completed', 'failed',
                                          'cancelled')),
    progress            smallint NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    step                text,                         -- the step under way, or the last one
    completed_steps     text[] NOT NULL DEFAULT '{}',
    error               text,                         -- a sentence for the customer
    result              jsonb,                        -- never a secret
    attempts            integer NOT NULL DEFAULT 0,   -- times an instance took it up
    cancel_requested    boolean NOT NULL DEFAULT false,
    lease_owner         text,
    lease_expires_at    timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,                  -- operation.started was published
    finished_at         timestamptz,                  -- reached a terminal status
    reported_at         timestamptz,                  -- SubscriptionHooks told of the outcome
    announced_at        timestamptz,                  -- the terminal event was published
    finalized_at        timestamptz,                  -- nothing left to do
    -- Starting is idempotent by subject: one subscription never gets two graphs.
    UNIQUE (kind, subject_id)
);
-- What the sweep looks at: operations with work left, by lease expiry.
CREATE INDEX operations_unfinished ON operations (lease_expires_at) WHERE finalized_at IS NULL;
CREATE INDEX operations_user ON operations (user_id, created_at);
CREATE INDEX operations_resource ON operations (resource_id);
