-- 0012_bounds.sql: one bound for an e-mail address everywhere.
--
-- edm.suppressions accepted addresses of up to 320 characters while every
-- other place (edm.is_valid_email, edm.email_problem, subtasks, the Python
-- models) stops at 254, the longest address SMTP can carry (RFC 5321: a path
-- of 256 octets including the angle brackets). A longer suppression could
-- never match an address edm-sched sends to, so such rows (only insertable by
-- hand: edm.add_suppression always refused them) are dropped.
-- tests/api/test_bounds.py keeps the Python bounds and these CHECKs equal.

DELETE FROM edm.suppressions WHERE length(email) > 254;
ALTER TABLE edm.suppressions DROP CONSTRAINT suppressions_email_check;
ALTER TABLE edm.suppressions ADD CONSTRAINT suppressions_email_check
  CHECK (email = edm.normalize_email(email) AND length(email) <= 254);
