-- 0017_reply_rules: reply-driven back-off (issue 15, point 2).
--
-- A provider says how it wants to be treated in its replies: Gmail's
-- "421 4.7.28 ... unusual rate", Microsoft's "451 4.7.650 ... temporarily rate
-- limited", Yahoo's "421 4.7.0 [TSS04]", an ESP API's HTTP 429. Before this
-- migration such a reply counted as a service failure (the whole account
-- backed off) or a recipient retry (spending one of its attempts), and the
-- service went on sending to the site that had asked it to stop.
--
--   * edm.reply_rules: rules on the reply (SMTP code, enhanced status code
--     exact or by class prefix, case-insensitive text pattern, a transport's
--     error code such as http:429), optionally for one site, tried in
--     priority order; the first enabled rule that matches decides:
--       suspend_site    the (service, site) pair pauses for the rule's
--                       duration, escalating on repeats (duration *
--                       factor^(level-1), at most max_duration_s; the level
--                       falls back to 1 once the pair was calm for
--                       reset_after_s after its last suspension ended); the
--                       subtask goes back to pending, spending no attempt
--                       and no quota unit, and counts as no failure
--       suspend_service the service backs off for the rule's duration; the
--                       subtask goes back to pending like a 'service' outcome
--       bounce          the subtask fails for good (a permanent failure)
--       retry           the recipient is retried after the rule's duration
--                       (spending the attempt, failed after
--                       queue.max_attempts like any retry)
--     Shipped defaults (source 'shipped') cover the large providers'
--     documented throttling and block replies; they can be edited, disabled
--     or deleted (edm.set_reply_rule, edm.enable_reply_rule,
--     edm.delete_reply_rule).
--   * edm.complete applies the rules (same signature and result). Rules are
--     matched once per distinct (code, reply, site) of a batch, and only when
--     the batch holds a failure with a reply: a batch of sends costs what it
--     cost before.
--   * edm.shaping_actions logs every application with the reply that caused
--     it; edm.site_suspension_status shows each pair's suspension with its
--     rule and reply.
--
-- A recipient whose domain maps to no site (edm.site_of is NULL) has no pair
-- to suspend: under a suspend_site rule it is retried after the rule's base
-- duration, spending no attempt (the throttle is not its fault). Suspending
-- the whole service would stop every site for one unknown domain; map the
-- domain (edm.set_site_domains or a resolver hook) to shape it per site.
--
-- Lock order is unchanged: complete locks subtasks, services, tasks, users,
-- then writes edm.site_suspensions rows of services it holds locked (so two
-- completions never race on a pair) and appends to edm.shaping_actions.

-- ---------------------------------------------------------------------------
-- Reading a reply
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.reply_enhanced_code(p_detail text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN substring(p_detail FROM '(?:^|[^0-9.])([245]\.[0-9]{1,3}\.[0-9]{1,3})(?:[^0-9.]|\.(?![0-9])|$)');
COMMENT ON FUNCTION edm.reply_enhanced_code(text) IS
  'The first RFC 3463 enhanced status code (class.subject.detail, e.g. 4.7.28) standing alone in a reply text, or NULL. The SMTP transport reports replies as "<command>: <code> <enhanced code> <text>".';

CREATE FUNCTION edm.reply_transport_code(p_detail text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN lower(substring(p_detail FROM '^\[([A-Za-z0-9_-]{1,20}:[A-Za-z0-9_.-]{1,80})\]'));
COMMENT ON FUNCTION edm.reply_transport_code(text) IS
  'A non-SMTP transport''s error code at the start of a reply text, in brackets ("[http:429] Too Many Requests", "[ses:Throttling] Maximum sending rate exceeded"), lower case; NULL when there is none.';

CREATE FUNCTION edm.reply_pattern_ok(p_pattern text)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
  IF p_pattern IS NULL THEN
    RETURN true;
  END IF;
  PERFORM '' ~* p_pattern;
  RETURN true;
EXCEPTION WHEN invalid_regular_expression THEN
  RETURN false;
END;
$$;
COMMENT ON FUNCTION edm.reply_pattern_ok(text) IS
  'True when p_pattern (or NULL) is a valid PostgreSQL regular expression: a rule with a broken pattern would make every completion fail.';

-- ---------------------------------------------------------------------------
-- Rules
-- ---------------------------------------------------------------------------

CREATE TABLE edm.reply_rules (
  rule_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  name              text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9_.:-]{0,99}$'),
  priority          integer NOT NULL DEFAULT 100 CHECK (priority BETWEEN 0 AND 1000000),
  enabled           boolean NOT NULL DEFAULT true,
  source            text NOT NULL DEFAULT 'admin' CHECK (source IN ('shipped', 'admin')),
  site              text REFERENCES edm.sites ON UPDATE CASCADE ON DELETE CASCADE,
  smtp_code         integer CHECK (smtp_code BETWEEN 200 AND 599),
  enhanced_code     text CHECK (enhanced_code ~ '^[245]\.([0-9]{1,3}\.([0-9]{1,3})?)?$'),
  pattern           text CHECK (length(pattern) BETWEEN 1 AND 500 AND edm.reply_pattern_ok(pattern)),
  transport_code    text CHECK (transport_code ~ '^[a-z0-9_-]{1,20}:[a-z0-9_.-]{1,80}$'),
  action            text NOT NULL CHECK (action IN ('suspend_site', 'suspend_service', 'bounce', 'retry')),
  duration_s        integer CHECK (duration_s BETWEEN 1 AND 2592000),
  escalation_factor double precision NOT NULL DEFAULT 1 CHECK (escalation_factor BETWEEN 1 AND 100),
  max_duration_s    integer CHECK (max_duration_s BETWEEN 1 AND 2592000),
  reset_after_s     integer NOT NULL DEFAULT 3600 CHECK (reset_after_s BETWEEN 0 AND 2592000),
  description       text NOT NULL DEFAULT '' CHECK (length(description) <= 500),
  updated_at        timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT reply_rules_matches_something
    CHECK (smtp_code IS NOT NULL OR enhanced_code IS NOT NULL OR pattern IS NOT NULL
           OR transport_code IS NOT NULL),
  CONSTRAINT reply_rules_duration
    CHECK ((action = 'bounce') = (duration_s IS NULL)),
  CONSTRAINT reply_rules_max_duration
    CHECK (max_duration_s IS NULL OR (duration_s IS NOT NULL AND max_duration_s >= duration_s))
);
CREATE INDEX reply_rules_order_idx ON edm.reply_rules (priority, rule_id) WHERE enabled;
COMMENT ON INDEX edm.reply_rules_order_idx IS 'Enabled rules in the order they are tried.';
COMMENT ON TABLE edm.reply_rules IS
  'Rules on a provider''s reply to a failed send, tried by edm.complete in (priority, rule_id) order; the first enabled rule whose every given criterion matches decides what the failure means: suspend the (service, site) pair, back the service off, bounce, or retry the recipient later. shipped rows are defaults of edm-sched for the large providers (edit, disable or delete them freely). See docs/explanation/traffic-shaping.md.';
COMMENT ON COLUMN edm.reply_rules.rule_id IS 'Identity of the rule.';
COMMENT ON COLUMN edm.reply_rules.name IS 'Unique name (a-z 0-9 _ . : -), the key of edm.set_reply_rule.';
COMMENT ON COLUMN edm.reply_rules.priority IS 'Lower is tried first (ties: lower rule_id).';
COMMENT ON COLUMN edm.reply_rules.enabled IS 'Disabled rules are kept but never match.';
COMMENT ON COLUMN edm.reply_rules.source IS 'shipped (a default of edm-sched, as shipped) or admin (written or edited by the host or a DBA).';
COMMENT ON COLUMN edm.reply_rules.site IS 'Only for recipients of this site (NULL: any recipient).';
COMMENT ON COLUMN edm.reply_rules.smtp_code IS 'The SMTP reply code must be this (NULL: any).';
COMMENT ON COLUMN edm.reply_rules.enhanced_code IS 'The enhanced status code in the reply must be this (4.7.28), or start with it when it ends with a dot (4.7. matches 4.7.0 and 4.7.650; 4. matches every persistent transient code). NULL: any.';
COMMENT ON COLUMN edm.reply_rules.pattern IS 'Case-insensitive regular expression the reply text must match (NULL: any). The text is what the transport reported, e.g. "RCPT TO: 421 4.7.28 ..." for SMTP.';
COMMENT ON COLUMN edm.reply_rules.transport_code IS 'A non-SMTP transport''s error code the reply must carry, kind:code in lower case (http:429, ses:throttling); NULL: any.';
COMMENT ON COLUMN edm.reply_rules.action IS 'suspend_site (pause the service for the recipient''s site, escalating), suspend_service (back the service off), bounce (fail the subtask for good) or retry (retry the recipient after duration_s).';
COMMENT ON COLUMN edm.reply_rules.duration_s IS 'Seconds of the suspension, back-off or retry delay (the first one for suspend_site); NULL for bounce.';
COMMENT ON COLUMN edm.reply_rules.escalation_factor IS 'suspend_site: each repeat within reset_after_s of the previous suspension''s end lasts this many times longer (1: no escalation).';
COMMENT ON COLUMN edm.reply_rules.max_duration_s IS 'suspend_site: longest escalated suspension in seconds (NULL: duration_s, no escalation).';
COMMENT ON COLUMN edm.reply_rules.reset_after_s IS 'suspend_site: a pair calm for this many seconds after its last suspension ended starts again at level 1.';
COMMENT ON COLUMN edm.reply_rules.description IS 'Free text: which reply of which provider this is, and where it is documented.';
COMMENT ON COLUMN edm.reply_rules.updated_at IS 'When the rule was last written.';

CREATE TABLE edm.shaping_actions (
  action_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  at          timestamptz NOT NULL,
  rule_id     bigint REFERENCES edm.reply_rules ON DELETE SET NULL,
  rule_name   text NOT NULL,
  service_id  bigint NOT NULL REFERENCES edm.services ON DELETE CASCADE,
  site        text,
  subtask_id  bigint,
  action      text NOT NULL CHECK (action IN ('suspend_site', 'suspend_service', 'bounce', 'retry')),
  until       timestamptz,
  level       integer,
  code        integer,
  reply       text CHECK (length(reply) <= 2000)
);
CREATE INDEX shaping_actions_pair_idx ON edm.shaping_actions (service_id, site, at DESC);
CREATE INDEX shaping_actions_at_idx ON edm.shaping_actions (at);
COMMENT ON INDEX edm.shaping_actions_pair_idx IS 'Latest actions of a (service, site) pair (edm.site_suspension_status).';
COMMENT ON INDEX edm.shaping_actions_at_idx IS 'Trimming old rows (edm.trim_shaping_actions).';
COMMENT ON TABLE edm.shaping_actions IS
  'Log of every reply rule applied by edm.complete: one row per completed subtask a rule matched, with the reply that caused it and what it set until when. Suspensions and back-offs end by themselves at until; rows are trimmed by edm.trim_shaping_actions after monitoring.metrics_retention_days.';
COMMENT ON COLUMN edm.shaping_actions.action_id IS 'Identity of the log row.';
COMMENT ON COLUMN edm.shaping_actions.at IS 'When the completion applied the rule (its p_now).';
COMMENT ON COLUMN edm.shaping_actions.rule_id IS 'Rule applied (NULL once the rule was deleted).';
COMMENT ON COLUMN edm.shaping_actions.rule_name IS 'Name of the rule when it was applied.';
COMMENT ON COLUMN edm.shaping_actions.service_id IS 'Service that received the reply.';
COMMENT ON COLUMN edm.shaping_actions.site IS 'Site of the recipient (NULL: its domain is not mapped).';
COMMENT ON COLUMN edm.shaping_actions.subtask_id IS 'Subtask whose send got the reply.';
COMMENT ON COLUMN edm.shaping_actions.action IS 'Action of the rule: suspend_site, suspend_service, bounce or retry.';
COMMENT ON COLUMN edm.shaping_actions.until IS 'End of what the action set: the pair''s suspension, the service''s back-off, or the recipient''s retry (NULL for bounce).';
COMMENT ON COLUMN edm.shaping_actions.level IS 'suspend_site: escalation level of the pair''s suspension.';
COMMENT ON COLUMN edm.shaping_actions.code IS 'SMTP reply code reported with the reply (NULL for other transports).';
COMMENT ON COLUMN edm.shaping_actions.reply IS 'The reply text as reported by the transport.';

-- ---------------------------------------------------------------------------
-- Writing rules
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.set_reply_rule(
  p_name text,
  p_action text,
  p_smtp_code integer DEFAULT NULL,
  p_enhanced_code text DEFAULT NULL,
  p_pattern text DEFAULT NULL,
  p_transport_code text DEFAULT NULL,
  p_site text DEFAULT NULL,
  p_priority integer DEFAULT 100,
  p_duration_s integer DEFAULT NULL,
  p_escalation_factor double precision DEFAULT 1,
  p_max_duration_s integer DEFAULT NULL,
  p_reset_after_s integer DEFAULT 3600,
  p_enabled boolean DEFAULT true,
  p_description text DEFAULT '')
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
  v_id bigint;
  v_tcode text := lower(p_transport_code);
BEGIN
  IF p_name IS NULL OR p_name !~ '^[a-z0-9][a-z0-9_.:-]{0,99}$' THEN
    RAISE EXCEPTION 'reply rule name must be 1 to 100 of a-z 0-9 _ . : - (starting with a letter or digit), got %',
      p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_action IS NULL OR p_action NOT IN ('suspend_site', 'suspend_service', 'bounce', 'retry') THEN
    RAISE EXCEPTION 'reply rule action must be suspend_site, suspend_service, bounce or retry, got %',
      p_action USING ERRCODE = 'ED005';
  END IF;
  IF p_smtp_code IS NULL AND p_enhanced_code IS NULL AND p_pattern IS NULL AND p_transport_code IS NULL THEN
    RAISE EXCEPTION 'reply rule %: give at least one of smtp_code, enhanced_code, pattern, transport_code',
      p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_smtp_code IS NOT NULL AND p_smtp_code NOT BETWEEN 200 AND 599 THEN
    RAISE EXCEPTION 'reply rule %: smtp_code must be a reply code 200 to 599', p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_enhanced_code IS NOT NULL AND p_enhanced_code !~ '^[245]\.([0-9]{1,3}\.([0-9]{1,3})?)?$' THEN
    RAISE EXCEPTION 'reply rule %: enhanced_code must be like 4.7.28, or a class prefix ending with a dot like 4.7.',
      p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_pattern IS NOT NULL AND (length(p_pattern) NOT BETWEEN 1 AND 500 OR NOT edm.reply_pattern_ok(p_pattern)) THEN
    RAISE EXCEPTION 'reply rule %: pattern must be a valid regular expression of 1 to 500 characters',
      p_name USING ERRCODE = 'ED005';
  END IF;
  IF v_tcode IS NOT NULL AND v_tcode !~ '^[a-z0-9_-]{1,20}:[a-z0-9_.-]{1,80}$' THEN
    RAISE EXCEPTION 'reply rule %: transport_code must be kind:code, e.g. http:429 or ses:throttling',
      p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_site IS NOT NULL AND NOT EXISTS (SELECT 1 FROM edm.sites s WHERE s.site = p_site) THEN
    RAISE EXCEPTION 'unknown site %', p_site USING ERRCODE = 'ED001';
  END IF;
  IF p_priority IS NULL OR p_priority NOT BETWEEN 0 AND 1000000 THEN
    RAISE EXCEPTION 'reply rule %: priority must be 0 to 1000000', p_name USING ERRCODE = 'ED005';
  END IF;
  IF (p_action = 'bounce') <> (p_duration_s IS NULL) THEN
    RAISE EXCEPTION 'reply rule %: % needs %', p_name, p_action,
      CASE WHEN p_action = 'bounce' THEN 'no duration' ELSE 'a duration in seconds' END
      USING ERRCODE = 'ED005';
  END IF;
  IF p_duration_s IS NOT NULL AND p_duration_s NOT BETWEEN 1 AND 2592000 THEN
    RAISE EXCEPTION 'reply rule %: duration must be 1 s to 30 days', p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_escalation_factor IS NULL OR NOT (p_escalation_factor BETWEEN 1 AND 100) THEN
    RAISE EXCEPTION 'reply rule %: escalation factor must be 1 to 100', p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_max_duration_s IS NOT NULL AND (p_duration_s IS NULL OR p_max_duration_s NOT BETWEEN p_duration_s AND 2592000) THEN
    RAISE EXCEPTION 'reply rule %: max duration must be at least the duration and at most 30 days',
      p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_reset_after_s IS NULL OR p_reset_after_s NOT BETWEEN 0 AND 2592000 THEN
    RAISE EXCEPTION 'reply rule %: reset_after must be 0 s to 30 days', p_name USING ERRCODE = 'ED005';
  END IF;
  IF p_enabled IS NULL OR p_description IS NULL OR length(p_description) > 500 THEN
    RAISE EXCEPTION 'reply rule %: enabled and a description of at most 500 characters are required',
      p_name USING ERRCODE = 'ED005';
  END IF;
  INSERT INTO edm.reply_rules AS r
    (name, priority, enabled, source, site, smtp_code, enhanced_code, pattern, transport_code,
     action, duration_s, escalation_factor, max_duration_s, reset_after_s, description, updated_at)
  VALUES (p_name, p_priority, p_enabled, 'admin', p_site, p_smtp_code, p_enhanced_code, p_pattern,
          v_tcode, p_action, p_duration_s, p_escalation_factor, p_max_duration_s, p_reset_after_s,
          p_description, now())
  ON CONFLICT (name) DO UPDATE
    SET priority = EXCLUDED.priority, enabled = EXCLUDED.enabled, source = 'admin',
        site = EXCLUDED.site, smtp_code = EXCLUDED.smtp_code,
        enhanced_code = EXCLUDED.enhanced_code, pattern = EXCLUDED.pattern,
        transport_code = EXCLUDED.transport_code, action = EXCLUDED.action,
        duration_s = EXCLUDED.duration_s, escalation_factor = EXCLUDED.escalation_factor,
        max_duration_s = EXCLUDED.max_duration_s, reset_after_s = EXCLUDED.reset_after_s,
        description = EXCLUDED.description, updated_at = EXCLUDED.updated_at
  RETURNING r.rule_id INTO v_id;
  RETURN v_id;
END;
$$;
COMMENT ON FUNCTION edm.set_reply_rule(text, text, integer, text, text, text, text, integer, integer, double precision, integer, integer, boolean, text) IS
  'Creates or replaces (by name) a reply rule; an edited shipped rule becomes source admin. Returns its rule_id. Raises ED005 for a bad name, action, code, pattern (an invalid regular expression), duration or escalation, and ED001 for an unknown site; nothing is written then.';

CREATE FUNCTION edm.enable_reply_rule(p_name text, p_enabled boolean DEFAULT true)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
  IF p_enabled IS NULL THEN
    RAISE EXCEPTION 'enable_reply_rule: enabled must be true or false' USING ERRCODE = 'ED005';
  END IF;
  UPDATE edm.reply_rules r SET enabled = p_enabled, updated_at = now() WHERE r.name = p_name;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown reply rule %', p_name USING ERRCODE = 'ED001';
  END IF;
END;
$$;
COMMENT ON FUNCTION edm.enable_reply_rule(text, boolean) IS
  'Enables (p_enabled true) or disables a reply rule by name; its source is kept. Raises ED001 for an unknown name.';

CREATE FUNCTION edm.delete_reply_rule(p_name text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
  DELETE FROM edm.reply_rules r WHERE r.name = p_name;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown reply rule %', p_name USING ERRCODE = 'ED001';
  END IF;
END;
$$;
COMMENT ON FUNCTION edm.delete_reply_rule(text) IS
  'Deletes a reply rule by name (its log rows keep its name). Raises ED001 for an unknown name.';

CREATE FUNCTION edm.match_reply_rule(p_code integer, p_detail text, p_site text DEFAULT NULL,
                                     p_any_site boolean DEFAULT false)
RETURNS bigint
LANGUAGE sql STABLE
BEGIN ATOMIC
  SELECT r.rule_id
  FROM edm.reply_rules r
  CROSS JOIN LATERAL (SELECT edm.reply_enhanced_code(p_detail) AS enh,
                             edm.reply_transport_code(p_detail) AS tcode) x
  WHERE r.enabled
    AND (r.site IS NULL OR r.site = p_site OR p_any_site)
    AND (r.smtp_code IS NULL OR r.smtp_code = p_code)
    AND (r.enhanced_code IS NULL
         OR CASE WHEN right(r.enhanced_code, 1) = '.' THEN starts_with(x.enh, r.enhanced_code)
                 ELSE x.enh = r.enhanced_code END)
    AND (r.transport_code IS NULL OR x.tcode = r.transport_code)
    AND (r.pattern IS NULL OR p_detail ~* r.pattern)
  ORDER BY r.priority, r.rule_id
  LIMIT 1;
END;
COMMENT ON FUNCTION edm.match_reply_rule(integer, text, text, boolean) IS
  'The first enabled reply rule (by priority, then rule_id) matching a reply: SMTP code p_code, reply text p_detail (its enhanced code and transport code are read from it), for a recipient of site p_site (p_any_site: whatever the rule''s site); NULL when none does. What edm.complete applies, callable to test a rule.';

CREATE FUNCTION edm.trim_shaping_actions(p_now timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_n integer;
BEGIN
  DELETE FROM edm.shaping_actions a
  WHERE a.at < coalesce(p_now, now())
               - make_interval(days => edm.config_int('monitoring.metrics_retention_days'))
    AND (a.until IS NULL OR a.until < coalesce(p_now, now()));
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.trim_shaping_actions(timestamptz) IS
  'Deletes reply-rule log rows older than monitoring.metrics_retention_days whose action has ended; returns how many.';

CREATE FUNCTION edm.lift_site_suspension(p_service_id bigint, p_site text, p_now timestamptz DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_in_force boolean;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM edm.services s WHERE s.service_id = p_service_id) THEN
    RAISE EXCEPTION 'unknown service %', p_service_id USING ERRCODE = 'ED001';
  END IF;
  -- The row goes, and with it the escalation level: the next throttle starts
  -- from the rule's base duration (the action log keeps the history).
  DELETE FROM edm.site_suspensions x
  WHERE x.service_id = p_service_id AND x.site = p_site
  RETURNING x.until > v_now INTO v_in_force;
  IF NOT coalesce(v_in_force, false) THEN
    RETURN false;
  END IF;
  PERFORM pg_notify('edm_wakeup', 'service:' || p_service_id);
  RETURN true;
END;
$$;
COMMENT ON FUNCTION edm.lift_site_suspension(bigint, text, timestamptz) IS
  'Ends the suspension of (service, site) now and forgets its escalation level (the row is deleted; edm.shaping_actions keeps the history); true when one was in force. Raises ED001 for an unknown service.';

-- ---------------------------------------------------------------------------
-- Views
-- ---------------------------------------------------------------------------

CREATE VIEW edm.site_suspension_status AS
SELECT x.service_id, s.name AS service_name, x.site, x.until, x.level,
       (x.until > now()) AS in_force,
       greatest(x.until - now(), interval '0') AS remaining,
       x.created_at, x.reason,
       a.rule_id, a.rule_name, a.at AS last_reply_at, a.code AS last_code, a.reply AS last_reply
FROM edm.site_suspensions x
JOIN edm.services s ON s.service_id = x.service_id
LEFT JOIN LATERAL (
  SELECT sa.rule_id, sa.rule_name, sa.at, sa.code, sa.reply
  FROM edm.shaping_actions sa
  WHERE sa.service_id = x.service_id AND sa.site = x.site AND sa.action = 'suspend_site'
  ORDER BY sa.at DESC, sa.action_id DESC
  LIMIT 1) a ON true;
COMMENT ON VIEW edm.site_suspension_status IS
  'Every (service, site) suspension, in force or expired (kept for escalation), with the rule and the latest reply that set it: what a DBA reads to see why a service does not send to a site.';
COMMENT ON COLUMN edm.site_suspension_status.service_id IS 'Suspended service.';
COMMENT ON COLUMN edm.site_suspension_status.service_name IS 'Its name.';
COMMENT ON COLUMN edm.site_suspension_status.site IS 'Site it must not send to.';
COMMENT ON COLUMN edm.site_suspension_status.until IS 'End of the suspension.';
COMMENT ON COLUMN edm.site_suspension_status.level IS 'Escalation level (1: first suspension after a calm period).';
COMMENT ON COLUMN edm.site_suspension_status.in_force IS 'True while the suspension applies.';
COMMENT ON COLUMN edm.site_suspension_status.remaining IS 'Time left (0 once expired).';
COMMENT ON COLUMN edm.site_suspension_status.created_at IS 'When the current suspension started.';
COMMENT ON COLUMN edm.site_suspension_status.reason IS 'Why: the rule and the reply, or the text given by hand.';
COMMENT ON COLUMN edm.site_suspension_status.rule_id IS 'Reply rule of the latest suspend_site action on the pair (NULL: set by hand or the rule was deleted).';
COMMENT ON COLUMN edm.site_suspension_status.rule_name IS 'Its name.';
COMMENT ON COLUMN edm.site_suspension_status.last_reply_at IS 'When that reply was completed.';
COMMENT ON COLUMN edm.site_suspension_status.last_code IS 'Its SMTP code.';
COMMENT ON COLUMN edm.site_suspension_status.last_reply IS 'Its text.';

-- ---------------------------------------------------------------------------
-- Event kind: a send the provider throttled
-- ---------------------------------------------------------------------------

ALTER TABLE edm.send_events DROP CONSTRAINT send_events_kind_check;
ALTER TABLE edm.send_events ADD CONSTRAINT send_events_kind_check
  CHECK (kind IN ('sent', 'retry', 'failed', 'service_failure', 'released', 'lease_expired',
                  'late_completion', 'cancelled', 'uncertain', 'render_error', 'throttled'));
COMMENT ON COLUMN edm.send_events.kind IS 'sent, retry, failed, service_failure, released, lease_expired, late_completion, cancelled, uncertain (connection lost after the final dot), render_error (the message could not be built; nothing was spent) or throttled (a reply rule suspended the (service, site) pair or the service; the subtask went back to pending, spending nothing).';

-- ---------------------------------------------------------------------------
-- Completion with reply rules
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION edm.complete(
  p_owner text,
  p_subtask_ids bigint[],
  p_outcomes text[],
  p_codes integer[] DEFAULT NULL,
  p_details text[] DEFAULT NULL,
  p_response_ms integer[] DEFAULT NULL,
  p_provider_ids text[] DEFAULT NULL,
  p_now timestamptz DEFAULT NULL)
RETURNS TABLE (subtask_id bigint, accepted boolean, status text, reason text)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  v_now  timestamptz := coalesce(p_now, now());
  v_n    integer := cardinality(p_subtask_ids);
  v_max_attempts integer := edm.config_int('queue.max_attempts');
  v_retry_base   integer := edm.config_int('queue.pending_retry_interval');
  v_retry_max    integer := edm.config_int('queue.retry_backoff_max');
  v_svc_base     integer := edm.config_int('service.backoff_base');
  v_svc_max      integer := edm.config_int('service.backoff_max');
  v_rule_ids     bigint[];
  v_sites        text[];
BEGIN
  IF p_owner IS NULL OR length(p_owner) NOT BETWEEN 1 AND 200 THEN
    RAISE EXCEPTION 'complete: owner must be 1 to 200 characters' USING ERRCODE = 'ED005';
  END IF;
  IF v_n IS NULL OR v_n = 0 THEN
    RETURN;
  END IF;
  IF v_n > 10000
     OR cardinality(p_outcomes) IS DISTINCT FROM v_n
     OR (p_codes IS NOT NULL AND cardinality(p_codes) <> v_n)
     OR (p_details IS NOT NULL AND cardinality(p_details) <> v_n)
     OR (p_response_ms IS NOT NULL AND cardinality(p_response_ms) <> v_n)
     OR (p_provider_ids IS NOT NULL AND cardinality(p_provider_ids) <> v_n) THEN
    RAISE EXCEPTION 'complete: argument arrays must all have the same length (at most 10000)'
      USING ERRCODE = 'ED005';
  END IF;
  IF EXISTS (SELECT 1 FROM unnest(p_outcomes) o
             WHERE o IS NULL OR o NOT IN ('sent', 'transient', 'permanent', 'service', 'released',
                                          'uncertain', 'render_error')) THEN
    RAISE EXCEPTION 'complete: outcome must be sent, transient, permanent, service, released, uncertain or render_error'
      USING ERRCODE = 'ED005';
  END IF;
  IF (SELECT count(DISTINCT i) FROM unnest(p_subtask_ids) i) <> v_n
     OR array_position(p_subtask_ids, NULL) IS NOT NULL THEN
    RAISE EXCEPTION 'complete: subtask ids must be distinct and not null' USING ERRCODE = 'ED005';
  END IF;

  -- Lock in the global order: subtasks, services, tasks (see the header).
  PERFORM 1 FROM edm.subtasks st WHERE st.subtask_id = ANY (p_subtask_ids)
  ORDER BY st.subtask_id FOR NO KEY UPDATE;
  PERFORM 1 FROM edm.services s
  WHERE s.service_id IN (SELECT st.service_id FROM edm.subtasks st
                         WHERE st.subtask_id = ANY (p_subtask_ids) AND st.status = 'leased')
  ORDER BY s.service_id FOR NO KEY UPDATE;
  PERFORM 1 FROM edm.tasks t
  WHERE t.task_id IN (SELECT st.task_id FROM edm.subtasks st
                      WHERE st.subtask_id = ANY (p_subtask_ids) AND st.status = 'leased')
  ORDER BY t.task_id FOR NO KEY UPDATE;
  -- Owners of cancelled tasks get the quota of subtasks that end cancelled
  -- back (refund_users below): lock them last, in id order.
  PERFORM 1 FROM edm.users u
  WHERE u.user_id IN (SELECT t.user_id FROM edm.subtasks st JOIN edm.tasks t ON t.task_id = st.task_id
                      WHERE st.subtask_id = ANY (p_subtask_ids) AND st.status = 'leased'
                        AND t.status = 'cancelled')
  ORDER BY u.user_id FOR NO KEY UPDATE;

  -- Reply rules (0017): only a failure that carries a reply can match, and a
  -- rule is looked up once per distinct (code, reply, site) of the batch. A
  -- batch without such a failure (the common case: sends) skips this.
  IF EXISTS (SELECT 1 FROM unnest(p_outcomes, coalesce(p_codes, array_fill(NULL::integer, ARRAY[v_n])),
                                  coalesce(p_details, array_fill(NULL::text, ARRAY[v_n]))) x(o, c, d)
             WHERE x.o IN ('transient', 'permanent', 'service') AND (x.c IS NOT NULL OR x.d IS NOT NULL))
     -- a rule could match one of the batch's distinct replies, whatever the
     -- recipient's site: only then are sites looked up
     -- (OFFSET 0 keeps the match above the DISTINCT: once per reply, not per row)
     AND EXISTS (SELECT 1
                 FROM (SELECT DISTINCT x.c, left(x.d, 2000) AS d
                       FROM unnest(p_outcomes, coalesce(p_codes, array_fill(NULL::integer, ARRAY[v_n])),
                                   coalesce(p_details, array_fill(NULL::text, ARRAY[v_n]))) x(o, c, d)
                       WHERE x.o IN ('transient', 'permanent', 'service')
                         AND (x.c IS NOT NULL OR x.d IS NOT NULL)
                       OFFSET 0) r
                 WHERE edm.match_reply_rule(r.c, r.d, NULL, true) IS NOT NULL) THEN
    WITH inp AS (
      SELECT x.n, x.outcome, x.code, left(x.detail, 2000) AS detail, st.email
      FROM unnest(p_subtask_ids, p_outcomes,
                  coalesce(p_codes, array_fill(NULL::integer, ARRAY[v_n])),
                  coalesce(p_details, array_fill(NULL::text, ARRAY[v_n])))
           WITH ORDINALITY AS x(subtask_id, outcome, code, detail, n)
      LEFT JOIN edm.subtasks st ON st.subtask_id = x.subtask_id
    ),
    elig AS (
      SELECT i.n, i.code, i.detail, edm.site_of(i.email) AS site
      FROM inp i
      WHERE i.outcome IN ('transient', 'permanent', 'service') AND i.email IS NOT NULL
        AND (i.code IS NOT NULL OR i.detail IS NOT NULL)
    ),
    matched AS (
      SELECT d.code, d.detail, d.site, edm.match_reply_rule(d.code, d.detail, d.site) AS rule_id
      FROM (SELECT DISTINCT e.code, e.detail, e.site FROM elig e) d
    )
    SELECT CASE WHEN count(m.rule_id) > 0 THEN array_agg(m.rule_id ORDER BY i.n) END,
           array_agg(e.site ORDER BY i.n)
    INTO v_rule_ids, v_sites
    FROM inp i
    LEFT JOIN elig e ON e.n = i.n
    LEFT JOIN matched m ON m.code IS NOT DISTINCT FROM e.code AND m.detail IS NOT DISTINCT FROM e.detail
                       AND m.site IS NOT DISTINCT FROM e.site;
  END IF;

  RETURN QUERY
  WITH input AS (
    SELECT i.subtask_id, i.outcome, i.code, left(i.detail, 2000) AS detail, i.response_ms,
           left(i.provider_id, 500) AS provider_id, i.rule_id, i.site
    FROM unnest(p_subtask_ids, p_outcomes,
                coalesce(p_codes, array_fill(NULL::integer, ARRAY[v_n])),
                coalesce(p_details, array_fill(NULL::text, ARRAY[v_n])),
                coalesce(p_response_ms, array_fill(NULL::integer, ARRAY[v_n])),
                coalesce(p_provider_ids, array_fill(NULL::text, ARRAY[v_n])),
                coalesce(v_rule_ids, array_fill(NULL::bigint, ARRAY[v_n])),
                coalesce(v_sites, array_fill(NULL::text, ARRAY[v_n])))
         AS i(subtask_id, outcome, code, detail, response_ms, provider_id, rule_id, site)
  ),
  -- What a matched rule turns the outcome into (eff): throttled (the
  -- (service, site) pair is suspended; for a recipient without a site, it is
  -- retried after the rule's duration), throttled_service (the service backs
  -- off for the rule's duration), permanent (bounce) or retry (after the
  -- rule's duration, spending the attempt). Without a rule: the outcome.
  ruled AS (
    SELECT i.*, r.name AS rule_name, r.action AS rule_action, r.duration_s, r.escalation_factor,
           r.max_duration_s, r.reset_after_s, r.priority AS rule_priority,
           CASE r.action WHEN 'suspend_site' THEN 'throttled'
                         WHEN 'suspend_service' THEN 'throttled_service'
                         WHEN 'bounce' THEN 'permanent'
                         WHEN 'retry' THEN 'retry'
                         ELSE i.outcome END AS eff
    FROM input i
    LEFT JOIN edm.reply_rules r ON r.rule_id = i.rule_id
  ),
  -- What each completion does. Only the lease holder, before expiry, may
  -- complete; anything else is rejected (and recorded when the subtask exists).
  plan AS (
    SELECT i.*, st.task_id, st.service_id, st.attempts, st.email, st.leased_at,
           st.status AS old_status, t.user_id, t.status AS task_status,
           (st.subtask_id IS NOT NULL AND st.status = 'leased' AND st.lease_owner = p_owner
            AND st.lease_expires_at > v_now) AS ok,
           CASE
             WHEN st.subtask_id IS NULL THEN 'unknown subtask'
             WHEN st.status <> 'leased' THEN 'subtask is ' || st.status || ', not leased'
             WHEN st.lease_owner <> p_owner THEN 'leased by another dispatcher'
             WHEN st.lease_expires_at <= v_now THEN 'lease expired at ' || st.lease_expires_at
           END AS reject_reason,
           CASE i.eff
             WHEN 'sent' THEN 'sent'
             WHEN 'permanent' THEN 'failed'
             WHEN 'render_error' THEN 'failed'
             WHEN 'transient' THEN CASE WHEN st.attempts >= v_max_attempts THEN 'failed'
                                        WHEN t.status = 'cancelled' THEN 'cancelled'
                                        ELSE 'pending' END
             WHEN 'retry' THEN CASE WHEN st.attempts >= v_max_attempts THEN 'failed'
                                    WHEN t.status = 'cancelled' THEN 'cancelled'
                                    ELSE 'pending' END
             -- the connection was lost after the final dot: retried like a
             -- transient failure, and recorded as a possible duplicate
             WHEN 'uncertain' THEN CASE WHEN st.attempts >= v_max_attempts THEN 'failed'
                                        WHEN t.status = 'cancelled' THEN 'cancelled'
                                        ELSE 'pending' END
             ELSE CASE WHEN t.status = 'cancelled' THEN 'cancelled' ELSE 'pending' END
           END AS new_status,
           -- service, released, render_error and throttled outcomes did not send: give the
           -- quota back when the claim counted it on the service's current quota day.
           (i.eff IN ('service', 'released', 'render_error', 'throttled', 'throttled_service')
            AND (st.leased_at AT TIME ZONE s.quota_tz)::date = s.quota_day) AS refund_quota
    FROM ruled i
    LEFT JOIN edm.subtasks st ON st.subtask_id = i.subtask_id
    LEFT JOIN edm.tasks t ON t.task_id = st.task_id
    LEFT JOIN edm.services s ON s.service_id = st.service_id
  ),
  -- The (service, site) pairs a suspend_site rule suspends: one per pair and
  -- batch (the rule tried first wins), escalated from the pair's last
  -- suspension. A pair still suspended keeps its suspension: the replies to
  -- sends already under way when it began are not repeats.
  pairs AS (
    SELECT q.service_id, q.site, q.rule_id, q.rule_name, q.code, q.detail,
           CASE WHEN x.until > v_now THEN x.level
                WHEN x.until + make_interval(secs => q.reset_after_s) > v_now
                  THEN least(x.level + 1, 1000)
                ELSE 1 END AS level,
           x.until AS old_until, x.level AS old_level, q.duration_s, q.escalation_factor,
           q.max_duration_s
    FROM (SELECT DISTINCT ON (p.service_id, p.site) p.*
          FROM plan p
          WHERE v_rule_ids IS NOT NULL AND p.ok AND p.eff = 'throttled' AND p.site IS NOT NULL
          ORDER BY p.service_id, p.site, p.rule_priority, p.rule_id, p.subtask_id) q
    LEFT JOIN edm.site_suspensions x ON x.service_id = q.service_id AND x.site = q.site
  ),
  new_pairs AS (
    SELECT pr.*,
           CASE WHEN pr.old_until > v_now THEN pr.old_until
                ELSE v_now + make_interval(secs => least(
                       coalesce(pr.max_duration_s, pr.duration_s)::double precision,
                       pr.duration_s * power(pr.escalation_factor, least(pr.level - 1, 60))))
           END AS until
    FROM pairs pr
  ),
  suspend AS (
    INSERT INTO edm.site_suspensions AS x (service_id, site, until, level, reason, created_at)
    SELECT np.service_id, np.site, np.until, np.level,
           left('reply rule ' || np.rule_name || ' (level ' || np.level || '): '
                || coalesce(np.detail, np.code::text, ''), 2000),
           v_now
    FROM new_pairs np
    WHERE np.old_until IS NULL OR np.old_until <= v_now
    ORDER BY np.service_id, np.site
    ON CONFLICT (service_id, site) DO UPDATE
      SET until = EXCLUDED.until, level = EXCLUDED.level, reason = EXCLUDED.reason,
          created_at = EXCLUDED.created_at
  ),
  upd_services AS (
    UPDATE edm.services s
    SET total_sent = s.total_sent + a.n_sent,
        total_failed = s.total_failed + a.n_failed,
        avg_response_ms = CASE WHEN a.avg_ms IS NULL THEN s.avg_response_ms
                               WHEN s.avg_response_ms IS NULL THEN a.avg_ms
                               ELSE s.avg_response_ms * 0.8 + a.avg_ms * 0.2 END,
        sent_today = greatest(s.sent_today - a.n_refund, 0),
        quota_exhausted_until = CASE WHEN a.n_refund > 0 THEN NULL ELSE s.quota_exhausted_until END,
        consecutive_failures = CASE WHEN a.n_service > 0 THEN s.consecutive_failures + a.n_service
                                    WHEN a.n_sent > 0 THEN 0 ELSE s.consecutive_failures END,
        backoff_until = greatest(
          CASE WHEN a.n_service > 0
            THEN v_now + make_interval(secs => least(v_svc_max::double precision,
                   v_svc_base * power(2, least(s.consecutive_failures + a.n_service - 1, 30))))
            ELSE s.backoff_until END,
          a.rule_backoff_until),
        health = CASE WHEN a.n_service > 0 OR a.rule_backoff_until > v_now THEN 'backoff'
                      WHEN a.n_sent > 0 AND a.n_failed = 0 THEN 'healthy'
                      WHEN a.n_failed > 0 THEN 'degraded'
                      ELSE s.health END,
        last_error = CASE WHEN a.n_service > 0 THEN a.last_service_error
                          WHEN a.rule_backoff_until IS NOT NULL THEN a.last_rule_error
                          ELSE s.last_error END
    FROM (
      SELECT p.service_id,
             count(*) FILTER (WHERE p.eff = 'sent') AS n_sent,
             count(*) FILTER (WHERE p.eff IN ('transient', 'permanent', 'uncertain')) AS n_failed,
             count(*) FILTER (WHERE p.eff = 'service') AS n_service,
             count(*) FILTER (WHERE p.refund_quota) AS n_refund,
             avg(p.response_ms) FILTER (WHERE p.eff = 'sent') AS avg_ms,
             max(p.detail) FILTER (WHERE p.eff = 'service') AS last_service_error,
             max(v_now + make_interval(secs => p.duration_s))
               FILTER (WHERE p.eff = 'throttled_service') AS rule_backoff_until,
             max(left('reply rule ' || p.rule_name || ': ' || coalesce(p.detail, p.code::text, ''),
                      2000))
               FILTER (WHERE p.eff = 'throttled_service') AS last_rule_error
      FROM plan p WHERE p.ok GROUP BY p.service_id
    ) a
    WHERE s.service_id = a.service_id
    RETURNING s.service_id, s.backoff_until
  ),
  upd_tasks AS (
    UPDATE edm.tasks t
    SET leased_count = t.leased_count - a.n,
        sent_count = t.sent_count + a.n_sent,
        failed_count = t.failed_count + a.n_failed,
        pending_count = t.pending_count + a.n_pending,
        cancelled_count = t.cancelled_count + a.n_cancelled,
        quota_reserved = greatest(t.quota_reserved - a.n_sent - a.n_failed - a.n_cancelled, 0),
        last_activity_at = v_now,
        stuck_since = NULL
        -- a task this drains is completed by trigger tasks_when_drained (0019)
    FROM (
      SELECT p.task_id, count(*) AS n,
             count(*) FILTER (WHERE p.new_status = 'sent') AS n_sent,
             count(*) FILTER (WHERE p.new_status = 'failed') AS n_failed,
             count(*) FILTER (WHERE p.new_status = 'pending') AS n_pending,
             count(*) FILTER (WHERE p.new_status = 'cancelled') AS n_cancelled
      FROM plan p WHERE p.ok GROUP BY p.task_id
    ) a
    WHERE t.task_id = a.task_id
  ),
  -- A subtask that ends cancelled (its task was cancelled while it was
  -- leased) was never sent: its quota goes back to the user, as cancel_task
  -- does for the pending ones.
  refund_users AS (
    UPDATE edm.users u SET quota_used = u.quota_used - a.n
    FROM (SELECT p.user_id, count(*) AS n FROM plan p
          WHERE p.ok AND p.new_status = 'cancelled' GROUP BY p.user_id) a
    WHERE u.user_id = a.user_id
  ),
  upd_subtasks AS (
    UPDATE edm.subtasks st
    SET status = p.new_status,
        lease_owner = NULL,
        lease_expires_at = NULL,
        attempts = CASE WHEN p.eff IN ('service', 'released', 'render_error', 'throttled',
                                       'throttled_service')
                        THEN greatest(st.attempts - 1, 0) ELSE st.attempts END,
        uncertain_sends = st.uncertain_sends + CASE WHEN p.outcome = 'uncertain' THEN 1 ELSE 0 END,
        not_before = CASE
          WHEN p.new_status = 'pending' AND p.eff IN ('transient', 'uncertain')
            THEN v_now + make_interval(secs => least(v_retry_max::double precision,
                                                     v_retry_base * power(2, least(st.attempts - 1, 30))))
          -- a rule's retry, or a throttle for a recipient without a site
          WHEN p.new_status = 'pending' AND (p.eff = 'retry' OR (p.eff = 'throttled' AND p.site IS NULL))
            THEN v_now + make_interval(secs => p.duration_s)
          -- not sent (service failure, release, throttled pair): back to its
          -- place in line (the claim skips a suspended pair)
          WHEN p.new_status = 'pending' THEN '-infinity'
          ELSE st.not_before END,
        outcome_code = coalesce(p.code, st.outcome_code),
        outcome_detail = CASE WHEN p.new_status = 'failed' AND p.eff IN ('transient', 'uncertain', 'retry')
                              THEN 'gave up after ' || st.attempts || ' attempts: ' || coalesce(p.detail, '')
                              ELSE coalesce(p.detail, st.outcome_detail) END,
        provider_message_id = coalesce(p.provider_id, st.provider_message_id),
        finished_at = CASE WHEN p.new_status IN ('sent', 'failed', 'cancelled') THEN v_now END
    FROM plan p
    WHERE st.subtask_id = p.subtask_id AND p.ok
  ),
  events AS (
    INSERT INTO edm.send_events (occurred_at, subtask_id, task_id, user_id, service_id, kind,
                                 attempt, started_at, code, response_ms, dispatcher, detail)
    SELECT v_now, p.subtask_id, p.task_id, p.user_id, p.service_id,
           CASE WHEN NOT p.ok THEN 'late_completion'
                WHEN p.eff = 'sent' THEN 'sent'
                WHEN p.eff = 'service' THEN 'service_failure'
                WHEN p.eff IN ('throttled', 'throttled_service') THEN 'throttled'
                WHEN p.eff = 'released' THEN 'released'
                WHEN p.eff = 'uncertain' THEN 'uncertain'
                WHEN p.eff = 'render_error' THEN 'render_error'
                WHEN p.new_status = 'failed' THEN 'failed'
                WHEN p.new_status = 'cancelled' THEN 'cancelled'
                ELSE 'retry' END,
           p.attempts, p.leased_at, p.code, p.response_ms, p_owner,
           CASE WHEN NOT p.ok THEN p.reject_reason || ' (reported ' || p.outcome || ')'
                WHEN p.rule_id IS NOT NULL
                  THEN left('reply rule ' || p.rule_name || ' (' || p.rule_action || '): '
                            || coalesce(p.detail, ''), 2000)
                ELSE p.detail END
    FROM plan p
    WHERE p.task_id IS NOT NULL
  ),
  actions AS (
    INSERT INTO edm.shaping_actions (at, rule_id, rule_name, service_id, site, subtask_id, action,
                                     until, level, code, reply)
    SELECT v_now, p.rule_id, p.rule_name, p.service_id, p.site, p.subtask_id, p.rule_action,
           CASE p.eff
             WHEN 'throttled' THEN coalesce(np.until, v_now + make_interval(secs => p.duration_s))
             WHEN 'throttled_service' THEN us.backoff_until
             WHEN 'retry' THEN CASE WHEN p.new_status = 'pending'
                                    THEN v_now + make_interval(secs => p.duration_s) END
           END,
           np.level, p.code, p.detail
    FROM plan p
    LEFT JOIN new_pairs np ON np.service_id = p.service_id AND np.site = p.site
                          AND p.eff = 'throttled'
    LEFT JOIN upd_services us ON us.service_id = p.service_id AND p.eff = 'throttled_service'
    WHERE v_rule_ids IS NOT NULL AND p.ok AND p.rule_id IS NOT NULL
  ),
  suppress AS (
    INSERT INTO edm.suppressions (user_id, email, reason, source_subtask_id)
    SELECT DISTINCT ON (p.email) NULL::text, p.email, 'hard_bounce', p.subtask_id
    FROM plan p
    WHERE p.ok AND p.eff = 'permanent' AND edm.smtp_code_suppresses(p.code)
    ORDER BY p.email, p.subtask_id
    ON CONFLICT DO NOTHING
  )
  SELECT p.subtask_id, p.ok, CASE WHEN p.ok THEN p.new_status ELSE p.old_status END,
         CASE WHEN NOT p.ok THEN p.reject_reason
              WHEN p.rule_id IS NOT NULL
                THEN 'reply rule ' || p.rule_name || ': ' || p.rule_action
                     || CASE WHEN p.eff = 'throttled' AND p.site IS NOT NULL THEN ' ' || p.site
                             WHEN p.eff = 'throttled' THEN ' (no site: recipient retried)'
                             ELSE '' END
         END
  FROM plan p;
END;
$$;
COMMENT ON FUNCTION edm.complete(text, bigint[], text[], integer[], text[], integer[], text[], timestamptz) IS
  'Records the outcomes of claimed subtasks in one transaction, fenced by the lease: only p_owner, before the lease expires, may complete. Outcomes: sent; transient (retry with back-off, failed after queue.max_attempts); uncertain (the connection was lost or timed out after the final dot: retried like transient, counted in uncertain_sends and recorded as an uncertain event, so a resend is a counted possible duplicate); permanent (failed; address suppressed for 550/551/553); render_error (the message could not be built: failed, no attempt and no quota unit spent); service (the service backs off, the subtask returns to pending without using an attempt); released (unsent, e.g. its lease would end before its send could start, or shutdown). A transient, permanent or service outcome with a reply (p_codes, p_details) is first matched against edm.reply_rules (edm.match_reply_rule, once per distinct reply): suspend_site suspends the (service, recipient''s site) pair with escalation and returns the subtask to pending spending nothing and counting no failure (no site: retried after the rule''s duration); suspend_service backs the service off for the rule''s duration (subtask as for service); bounce fails it; retry retries it after the rule''s duration. Each application is logged in edm.shaping_actions and named in the result''s reason (''reply rule <name>: <action> [site]''). Task counters, service statistics, send_events and (for subtasks of a cancelled task, which end cancelled) the refund of the owner''s quota change together; rejected completions are returned with a reason and recorded as late_completion.';

-- ---------------------------------------------------------------------------
-- Shipped rules: the large providers' documented throttling and block replies
-- ---------------------------------------------------------------------------
-- Durations are starting points (a suspension escalates on repeats); tune
-- them per platform. Text-specific rules have no site: the text names the
-- provider, and the pair suspended is always the recipient's own site.

INSERT INTO edm.reply_rules (name, priority, source, site, smtp_code, enhanced_code, pattern,
                             transport_code, action, duration_s, escalation_factor,
                             max_duration_s, reset_after_s, description)
VALUES
  ('gmail-4.7.28-rate', 10, 'shipped', NULL, NULL, '4.7.28', NULL, NULL,
   'suspend_site', 900, 2, 14400, 21600,
   'Gmail 421 4.7.28: unusual rate of unsolicited mail from the sending IP or domain; slow down.'),
  ('gmail-5.7.28-rate', 11, 'shipped', NULL, NULL, '5.7.28', NULL, NULL,
   'suspend_site', 3600, 2, 86400, 86400,
   'Gmail 550 5.7.28: unusual rate of unsolicited mail, refused; a send-side block, not a bad address (no suppression).'),
  ('gmail-4.7.0-rate', 20, 'shipped', NULL, NULL, '4.7.0', '(rate[- ]?limit|unusual rate|too many|temporarily (deferred|rate))', NULL,
   'suspend_site', 600, 2, 14400, 21600,
   '421/451 4.7.0 replies that say the sender goes too fast (Gmail and others).'),
  ('gmail-4.7.0-reputation', 21, 'shipped', NULL, NULL, '4.7.0', 'low reputation', NULL,
   'suspend_site', 3600, 2, 43200, 86400,
   'Gmail 421 4.7.0: suspicious due to the very low reputation of the sending IP or domain.'),
  ('gmail-4.2.1-recipient-rate', 30, 'shipped', NULL, NULL, '4.2.1', 'receiving mail (too quickly|at a rate)', NULL,
   'retry', 1800, 1, NULL, 3600,
   'Gmail 450 4.2.1: this one recipient receives mail too fast; retry it later, the site is fine.'),
  ('microsoft-4.7.650-rate', 10, 'shipped', NULL, NULL, '4.7.650', NULL, NULL,
   'suspend_site', 1800, 2, 28800, 43200,
   'Microsoft 451 4.7.650: the mail server has been temporarily rate limited due to IP reputation.'),
  ('microsoft-4.7.651-rate', 10, 'shipped', NULL, NULL, '4.7.651', NULL, NULL,
   'suspend_site', 1800, 2, 28800, 43200,
   'Microsoft 451 4.7.651: temporarily rate limited due to IP reputation.'),
  ('microsoft-4.7.500-busy', 12, 'shipped', NULL, NULL, '4.7.500', NULL, NULL,
   'suspend_site', 300, 2, 3600, 7200,
   'Microsoft 451 4.7.500: server busy, please try again later.'),
  ('microsoft-rp-rate', 13, 'shipped', NULL, 421, NULL, '\mRP-00[1-3]\M', NULL,
   'suspend_site', 900, 2, 14400, 21600,
   'Microsoft 421 RP-001/002/003: the sending IP exceeded a rate or connection limit tied to its reputation.'),
  ('microsoft-5.7.6xx-banned-ip', 5, 'shipped', NULL, 550, NULL, '\m5\.7\.6(0[6-9]|[1-4][0-9])\M', NULL,
   'suspend_service', 21600, 1, NULL, 3600,
   'Microsoft 550 5.7.606-649: access denied, banned sending IP; the account must stop until delisted (no recipient is suppressed).'),
  ('yahoo-tss-deferred', 10, 'shipped', NULL, NULL, NULL, '\[(TSS0[1-9]|TS0[1-3])\]', NULL,
   'suspend_site', 3600, 2, 28800, 43200,
   'Yahoo/AOL 421 4.7.0 [TSS04], [TSS09], [TS01]...: temporarily deferred due to unexpected volume or user complaints (Yahoo suggests retrying hours later).'),
  ('aol-dyn-rly-deferred', 14, 'shipped', NULL, 421, NULL, '\((DYN|RLY):T[12]\)', NULL,
   'suspend_site', 3600, 2, 28800, 43200,
   'AOL 421 (DYN:T1) / (RLY:T1): the sending IP is temporarily deferred.'),
  ('apple-excessive-volume', 10, 'shipped', NULL, NULL, NULL, 'deferred due to excessive volume', NULL,
   'suspend_site', 900, 2, 14400, 21600,
   'Apple iCloud 421 4.7.1: messages deferred due to excessive volume; try again later.'),
  ('apple-service-unavailable', 15, 'shipped', 'apple', 451, '4.7.1', 'service unavailable', NULL,
   'suspend_site', 300, 2, 3600, 7200,
   'Apple iCloud 451 4.7.1: service unavailable, try again later (busy hours).'),
  ('comcast-throttled', 15, 'shipped', 'comcast', 421, NULL, '(throttl|rate limit|too many)', NULL,
   'suspend_site', 900, 2, 14400, 21600,
   'Comcast 421 throttling replies (rate or connection limits of the sending IP).'),
  ('ses-daily-quota', 5, 'shipped', NULL, NULL, NULL, 'daily message quota exceeded', NULL,
   'suspend_service', 3600, 1, NULL, 3600,
   'Amazon SES "Daily message quota exceeded": the account''s 24-hour quota is used up.'),
  ('ses-max-send-rate', 6, 'shipped', NULL, NULL, NULL, 'maximum sending rate exceeded', NULL,
   'suspend_service', 10, 1, NULL, 3600,
   'Amazon SES "Throttling: Maximum sending rate exceeded": pause the account briefly.'),
  ('ses-throttling', 50, 'shipped', NULL, NULL, NULL, NULL, 'ses:throttling',
   'suspend_service', 10, 1, NULL, 3600,
   'Any other Amazon SES Throttling error: pause the account briefly.'),
  ('http-429', 50, 'shipped', NULL, NULL, NULL, NULL, 'http:429',
   'suspend_service', 60, 1, NULL, 3600,
   'An ESP HTTP API answered 429 Too Many Requests: pause the account briefly.');

-- ---------------------------------------------------------------------------
-- Roles: the new names in the group roles' grants (the pattern of 0015)
-- ---------------------------------------------------------------------------

SELECT edm.extend_roles(ARRAY[
    ['v_app_fns text[] := ARRAY[',
     'v_app_fns text[] := ARRAY[''set_reply_rule'', ''enable_reply_rule'', ''delete_reply_rule'', ''match_reply_rule'', ''lift_site_suspension'', ''reply_enhanced_code'', ''reply_transport_code'', '],
    ['v_monitor_fns text[] := ARRAY[',
     'v_monitor_fns text[] := ARRAY[''match_reply_rule'', ''reply_enhanced_code'', ''reply_transport_code'', '],
    ['edm.config, edm.task_progress, ',
     'edm.config, edm.task_progress, edm.reply_rules, edm.shaping_actions, edm.site_suspension_status, ']], '0017');

SELECT edm.harden_functions();
