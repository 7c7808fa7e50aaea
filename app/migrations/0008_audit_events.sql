-- A handled Stripe event is audited once (`app.audit.record_event_audit`): its check finds an
-- earlier row by event id, whatever subject the row names (an event whose subscription was
-- not known on one try and known on the next).
CREATE INDEX audit_log_event ON audit_log ((detail->>'event_id')) WHERE detail ? 'event_id';
