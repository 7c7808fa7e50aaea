-- The warm pool (issue 15): graph databases made ahead of demand on each provisioning server
-- (a copy of the graph template with its roles and grants, its login role NOLOGIN), taken by
-- a provision in one statement and renamed to the customer's graph. Each row names one
-- database and its two roles on the server: `<prefix><id>` and `<prefix><id>_owner`.
CREATE TABLE warm_pool (
    id          text PRIMARY KEY,                 -- wp_<24 hex digits>
    server      text NOT NULL,                    -- the provisioning server that holds it
    template    text NOT NULL,                    -- copied from (named after the schema)
    -- creating: being made (a crash leaves it half-made: the sweep drops it);
    -- ready: can be taken; claimed: taken by the graph `claimed_by` (kept a while, then
    -- forgotten); dropping: being removed (half-made, surplus, or its database is gone).
    state       text NOT NULL DEFAULT 'creating'
                CHECK (state IN ('creating', 'ready', 'claimed', 'dropping')),
    created_by  text NOT NULL,                    -- the instance working on it now
    created_at  timestamptz NOT NULL DEFAULT now(),
    ready_at    timestamptz,
    claimed_by  text UNIQUE,                      -- the graph's resource id
    claimed_at  timestamptz,
    CHECK ((claimed_by IS NOT NULL) = (state = 'claimed'))
);
-- What a provision claims: the oldest ready database of its server.
CREATE INDEX warm_pool_ready ON warm_pool (server, template, ready_at) WHERE state = 'ready';
