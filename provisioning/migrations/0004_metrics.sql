-- /metrics reads the durations of the operations finished in the last hour: a range of this
-- index rather than a scan of every operation ever run.
CREATE INDEX operations_finished ON operations (finished_at) WHERE finished_at IS NOT NULL;
