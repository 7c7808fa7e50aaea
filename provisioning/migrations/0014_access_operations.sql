-- Operations that change a live resource (issue 13): `resize` (a plan change), `suspend`
-- (payment stopped: the login is shut out) and `resume` (payment came back). A subject may
-- have many of each, one generation after another; a suspended resource still exists.
ALTER TABLE operations DROP CONSTRAINT operations_kind_check;
ALTER TABLE operations ADD CONSTRAINT operations_kind_check
    CHECK (kind IN ('provision', 'deprovision', 'resize', 'suspend', 'resume'));
ALTER TABLE resources DROP CONSTRAINT resources_status_check;
ALTER TABLE resources ADD CONSTRAINT resources_status_check
    CHECK (status IN ('provisioning', 'active', 'suspended', 'deprovisioning', 'deleted',
                      'orphaned'));
