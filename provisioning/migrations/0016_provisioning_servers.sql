-- Several provisioning servers (issue 16): each resource records the server it lives on, and
-- an operator may drain a server so that it gets no new graphs.

-- The server's name (host:port of its DSN, or its ?lookout_name=). NULL for the resources made
-- before this migration: they live on the first server listed (the only one there was), and
-- each instance names them so at start (provisioning.placement).
ALTER TABLE resources ADD COLUMN server text;
-- true once anything of the resource may exist on `server` (recorded before the first
-- connection that could create something there); until then `server` is only a choice, which
-- placement changes when that server does not answer. Rows made before this migration were
-- placed (on the first server); new ones start unplaced.
ALTER TABLE resources ADD COLUMN placed boolean NOT NULL DEFAULT true;
ALTER TABLE resources ALTER COLUMN placed SET DEFAULT false;
-- Placement counts the live graphs of each server (under a lock, once per new graph).
CREATE INDEX resources_server ON resources (server)
    WHERE resource_type = 'graph' AND status <> 'deleted';

-- What operators decide about a server (`lookout servers drain`), shared by every instance; a
-- server without a row takes new graphs.
CREATE TABLE provisioning_servers (
    name        text PRIMARY KEY,
    drained_at  timestamptz,                      -- set: it gets no new graphs
    updated_at  timestamptz NOT NULL DEFAULT now()
);
