-- 0009_deliverability.sql: nothing unsendable accepted, progress that tells
-- the truth, one-click unsubscribe, feedback intake (bounces, complaints,
-- unsubscribes, deliveries), and the reputation breaker.
--
-- SQLSTATEs added here (mapped in edm_sched/db.py):
--   ED030 missing variables: a strict task's recipients lack variables its
--         templates use.

-- ---------------------------------------------------------------------------
-- Addresses: RFC 5321 / 5322 syntax at the door, SMTPUTF8 end to end
-- ---------------------------------------------------------------------------

-- Internationalised addresses (RFC 6531/6532) are accepted and go out as
-- they are: the message's header block is UTF-8 and the SMTP transport
-- requires SMTPUTF8 from the server (without it the subtask fails
-- permanently, naming the reason). They must be in Unicode normal form C so
-- that one mailbox has one spelling. Quoted local parts ("a b"@x) and
-- address literals (x@[192.0.2.1]) are refused: no campaign needs them and
-- receivers treat them as spam signals.
CREATE OR REPLACE FUNCTION edm.email_problem(p_email text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
  WHEN p_email IS NULL OR btrim(p_email) = '' THEN 'empty address'
  WHEN length(p_email) > 254 THEN 'longer than 254 characters'
  WHEN p_email ~ '[[:cntrl:]]' THEN 'contains control characters (CR, LF, NUL...)'
  -- Non-breaking and zero-width spaces, soft hyphens, bidi controls, BOM:
  -- invisible, not trimmed by normalize_email, so 'a@b.com' followed by a
  -- pasted U+00A0 would be a second recipient for the same mailbox.
  WHEN p_email ~ '[\u00a0\u00ad\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u206f\u3000\ufeff]'
    THEN 'contains invisible or non-breaking space characters'
  WHEN position('@' IN p_email) = 0 THEN 'missing @'
  WHEN NOT edm.is_valid_email(edm.normalize_email(p_email)) THEN 'not a valid address'
  -- RFC 5321 4.5.3.1.1: a local part of at most 64 octets.
  WHEN octet_length(split_part(btrim(p_email), '@', 1)) > 64 THEN 'local part longer than 64 octets'
  -- RFC 5322 dot-atom: no leading, trailing or consecutive dots.
  WHEN split_part(btrim(p_email), '@', 1) ~ '(^\.|\.$|\.\.)'
    THEN 'local part has a leading, trailing or double dot'
  -- Domain: labels of letters (any script), digits and inner hyphens, each
  -- at most 63 characters; the top-level label not all digits (no bare IP).
  WHEN NOT split_part(btrim(p_email), '@', 2)
           ~ '^([A-Za-z0-9\u0080-\U0010ffff]([A-Za-z0-9\u0080-\U0010ffff-]{0,61}[A-Za-z0-9\u0080-\U0010ffff])?\.)+[A-Za-z0-9\u0080-\U0010ffff]([A-Za-z0-9\u0080-\U0010ffff-]{0,61}[A-Za-z0-9\u0080-\U0010ffff])?$'
    THEN 'domain is not a host name (letters, digits and inner hyphens, labels of 1 to 63)'
  WHEN split_part(btrim(p_email), '@', 2) ~ '\.[0-9]+$' THEN 'domain ends in a number (an IP address?)'
  WHEN p_email !~ '^[ -~]*$' AND NOT (btrim(p_email) IS NFC NORMALIZED)
    THEN 'not in Unicode normal form C'
END;
COMMENT ON FUNCTION edm.email_problem(text) IS
  'Why p_email is not acceptable as an address, or NULL when it is: empty, too long, control or invisible characters, no @, specials, a local part over 64 octets or with a leading, trailing or double dot, a domain that is not a host name or ends in a number, or a non-ASCII address not in Unicode NFC. Internationalised addresses are accepted (they are sent with SMTPUTF8). Used for the per-address report of task creation, contact import, suppressions and service senders.';

-- ---------------------------------------------------------------------------
-- Custom header fields of tasks and services
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.headers_problem(p_headers jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
  WHEN p_headers IS NULL OR p_headers = 'null'::jsonb THEN NULL
  WHEN jsonb_typeof(p_headers) <> 'object' THEN 'headers must be a JSON object'
  WHEN (SELECT count(*) FROM jsonb_object_keys(p_headers)) > 50 THEN 'at most 50 header fields'
  WHEN (SELECT count(DISTINCT lower(k)) <> count(*) FROM jsonb_object_keys(p_headers) k)
    THEN 'a header field is given twice'
  ELSE (
    SELECT CASE
      WHEN h.k !~ '^[!-9;-~]{1,76}$'
        THEN format('header name %s is not 1-76 printable ASCII characters without ":"', quote_literal(h.k))
      WHEN lower(h.k) = ANY (ARRAY[
             'from', 'to', 'cc', 'bcc', 'subject', 'reply-to', 'sender', 'message-id', 'date',
             'mime-version', 'content-type', 'content-transfer-encoding', 'content-disposition',
             'content-id', 'list-unsubscribe', 'list-unsubscribe-post', 'return-path', 'received',
             'received-spf', 'authentication-results', 'dkim-signature', 'domainkey-signature',
             'arc-seal', 'arc-message-signature', 'arc-authentication-results', 'delivered-to',
             'x-original-to', 'bounces-to', 'errors-to'])
           OR lower(h.k) ~ '^(resent-|x-edm-)'
        THEN format('header %s is set by edm-sched or by relays and may not be given', h.k)
      WHEN jsonb_typeof(h.v) <> 'string' THEN format('header %s: the value must be a string', h.k)
      WHEN (h.v #>> '{}') ~ '[\x01-\x08\x0a-\x1f\x7f\u0085\u2028\u2029]'
        THEN format('header %s: the value contains a line break or a control character', h.k)
      WHEN length(h.v #>> '{}') > 900 THEN format('header %s: the value is longer than 900 characters', h.k)
    END
    FROM jsonb_each(p_headers) AS h(k, v)
    ORDER BY 1 NULLS LAST LIMIT 1)
END;
COMMENT ON FUNCTION edm.headers_problem(jsonb) IS
  'Why p_headers (custom header fields, {"Name": "value"}) may not be added to messages, or NULL: not an object, more than 50 fields, a name given twice, a name that is not RFC 5322 field-name syntax, a field edm-sched or relays set (From, To, Cc, Bcc, Subject, Reply-To, Sender, Message-ID, Date, MIME and Content-* fields, List-Unsubscribe[-Post], Return-Path, Received*, Authentication-Results, DKIM/ARC signatures, Delivered-To, Resent-*, X-Edm-*), a value that is not a string, holds a line break or control character, or is longer than 900 characters. The Python models apply the same rules (edm_sched.rendering.header_problem).';

ALTER TABLE edm.templates
  ADD COLUMN headers jsonb NOT NULL DEFAULT '{}'::jsonb
    CONSTRAINT templates_headers_ok CHECK (edm.headers_problem(headers) IS NULL),
  ADD COLUMN list_unsubscribe boolean NOT NULL DEFAULT true,
  ADD COLUMN required_variables text[];
COMMENT ON COLUMN edm.templates.headers IS 'Custom header fields of the messages of this template (the task''s and the template''s own), checked by edm.headers_problem.';
COMMENT ON COLUMN edm.templates.list_unsubscribe IS 'True for bulk mail: messages carry one-click List-Unsubscribe headers when the dispatcher is configured with an unsubscribe key and URL. False for transactional mail.';
COMMENT ON COLUMN edm.templates.required_variables IS 'Variables every recipient had to have when the task was created with strict variables; NULL when not strict.';

ALTER TABLE edm.services
  ADD CONSTRAINT services_headers_ok CHECK (edm.headers_problem(settings -> 'headers') IS NULL);

-- ---------------------------------------------------------------------------
-- Task creation: templates with their headers; strict variables
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION edm.new_task(
  p_user_id text, p_name text, p_templates jsonb, p_status text, p_priority integer,
  p_scheduled_at timestamptz, p_rule jsonb)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
  v_task bigint;
  v_n integer := jsonb_array_length(p_templates);
  v_bad text;
  v_required text[];
  v_missing record;
BEGIN
  PERFORM edm.require_user(p_user_id);
  IF v_n IS NULL OR v_n NOT BETWEEN 1 AND 100 THEN
    RAISE EXCEPTION 'a task needs 1 to 100 templates' USING ERRCODE = 'ED005';
  END IF;
  SELECT t.tpl ->> 'reply_to' INTO v_bad FROM jsonb_array_elements(p_templates) t(tpl)
  WHERE edm.email_problem(t.tpl ->> 'reply_to') IS NOT NULL AND t.tpl ->> 'reply_to' IS NOT NULL
  LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'invalid reply-to address %: %', quote_literal(v_bad), edm.email_problem(v_bad)
      USING ERRCODE = 'ED005';
  END IF;

  -- Strict variables: every recipient must have every variable the templates
  -- need (the templates carry the list, computed from their syntax tree).
  v_required := ARRAY(
    SELECT DISTINCT x FROM jsonb_array_elements(p_templates) t(tpl),
           jsonb_array_elements_text(CASE WHEN jsonb_typeof(t.tpl -> 'required_variables') = 'array'
                                          THEN t.tpl -> 'required_variables' ELSE '[]' END) x
    ORDER BY x);
  IF cardinality(v_required) > 0 THEN
    IF p_rule ? 'list' THEN
      SELECT count(*) OVER () AS n, s.email,
             ARRAY(SELECT r FROM unnest(v_required) r
                   WHERE NOT coalesce(s.vars, '{}'::jsonb) ? r) AS missing
      INTO v_missing
      FROM pg_temp.edm_stage_recipients s
      WHERE edm.email_problem(s.email) IS NULL
        AND NOT coalesce(jsonb_typeof(s.vars) = 'object' AND s.vars ?& v_required, false)
      ORDER BY s.ord LIMIT 1;
    ELSE
      SELECT count(*) OVER () AS n, c.email,
             ARRAY(SELECT r FROM unnest(v_required) r WHERE NOT c.attributes ? r) AS missing
      INTO v_missing
      FROM edm.contacts c
      WHERE c.user_id = p_user_id AND NOT c.unsubscribed AND edm.rule_matches(p_rule, c.tags)
        AND NOT c.attributes ?& v_required
      ORDER BY c.contact_id LIMIT 1;
    END IF;
    IF v_missing.email IS NOT NULL THEN
      RAISE EXCEPTION '% recipient(s) lack variables the templates use; first %: missing %',
        v_missing.n, quote_literal(v_missing.email), array_to_string(v_missing.missing, ', ')
        USING ERRCODE = 'ED030',
              DETAIL = format('required=%s', array_to_string(v_required, ','));
    END IF;
  END IF;

  INSERT INTO edm.tasks (user_id, name, status, priority, scheduled_at, recipient_rule, template_count)
  VALUES (p_user_id, p_name, p_status, coalesce(p_priority, 0), coalesce(p_scheduled_at, now()),
          p_rule, v_n)
  RETURNING task_id INTO v_task;
  INSERT INTO edm.templates (task_id, template_idx, subject, body_text, body_html, from_name, reply_to,
                             headers, list_unsubscribe, required_variables)
  SELECT v_task, (t.ord - 1)::smallint, t.tpl ->> 'subject', t.tpl ->> 'body_text',
         t.tpl ->> 'body_html', t.tpl ->> 'from_name', t.tpl ->> 'reply_to',
         coalesce(t.tpl -> 'headers', '{}'::jsonb),
         coalesce((t.tpl ->> 'list_unsubscribe')::boolean, true),
         CASE WHEN jsonb_typeof(t.tpl -> 'required_variables') = 'array'
              THEN ARRAY(SELECT jsonb_array_elements_text(t.tpl -> 'required_variables')) END
  FROM jsonb_array_elements(p_templates) WITH ORDINALITY AS t(tpl, ord);
  RETURN v_task;
END;
$$;
COMMENT ON FUNCTION edm.new_task(text, text, jsonb, text, integer, timestamptz, jsonb) IS
  'Inserts a task row and its templates (a JSON array of {subject, body_text, body_html, from_name, reply_to, headers, list_unsubscribe, required_variables}). Refuses an invalid reply-to (ED005) and, when templates carry required_variables (strict variables), recipients lacking any of them (ED030): the staged list''s vars, or the attributes of the contacts a tag rule matches. Internal to the create_task_* functions.';

-- ---------------------------------------------------------------------------
-- Progress that tells the truth
-- ---------------------------------------------------------------------------

-- progress_pct is the finished share (sent, failed or cancelled): a task
-- whose recipients all failed is 100 % finished and 0 % sent. sent_pct and
-- outcome say which; a cancelled task names its cancelled recipients.
CREATE OR REPLACE VIEW edm.task_progress AS
SELECT t.task_id, t.user_id, t.name, t.status, t.priority, t.scheduled_at,
       t.total_count AS total, t.sent_count AS sent, t.pending_count AS pending,
       t.leased_count AS leased, t.failed_count AS failed, t.cancelled_count AS cancelled,
       CASE WHEN t.total_count = 0 THEN 100.0
            ELSE round(100.0 * (t.sent_count + t.failed_count + t.cancelled_count) / t.total_count, 1)
       END AS progress_pct,
       extract(epoch FROM coalesce(t.first_claimed_at, greatest(now(), t.scheduled_at))
                          - t.scheduled_at)::float8 AS first_send_wait_s,
       CASE WHEN t.sent_count > 0 AND t.last_activity_at > t.first_claimed_at
            THEN t.sent_count / extract(epoch FROM t.last_activity_at - t.first_claimed_at)::float8
       END AS sends_per_s,
       CASE WHEN t.pending_count + t.leased_count = 0 THEN 0.0
            WHEN t.sent_count > 0 AND t.last_activity_at > t.first_claimed_at
            THEN (t.pending_count + t.leased_count)
                 / (t.sent_count / extract(epoch FROM t.last_activity_at - t.first_claimed_at)::float8)
       END AS eta_s,
       t.last_activity_at, t.stuck_since,
       -- floor, not round: 999 of 1000 sent is 99.9 %, never 100 %
       CASE WHEN t.total_count > 0
            THEN trunc(100.0 * t.sent_count / t.total_count, 1) END AS sent_pct,
       CASE
         WHEN t.status = 'cancelled' THEN format('cancelled: %s sent, %s failed, %s cancelled',
                                                t.sent_count, t.failed_count, t.cancelled_count)
         WHEN t.status = 'failed' THEN 'failed: ' || coalesce(t.error, 'see the task''s error')
         WHEN t.status <> 'completed' THEN NULL
         WHEN t.total_count = 0 THEN 'no recipients'
         WHEN t.failed_count = 0 AND t.cancelled_count = 0 THEN 'all sent'
         WHEN t.sent_count = 0 THEN format('none sent: %s failed, %s cancelled',
                                          t.failed_count, t.cancelled_count)
         ELSE format('partly sent: %s sent, %s failed, %s cancelled',
                     t.sent_count, t.failed_count, t.cancelled_count)
       END AS outcome
FROM edm.tasks t;
COMMENT ON VIEW edm.task_progress IS
  'Per task: progress (total, sent, pending, leased, failed, cancelled, finished and sent percent, outcome), first-send wait (so far, if still waiting), average throughput, ETA at that rate, last activity, stuck flag.';
COMMENT ON COLUMN edm.task_progress.progress_pct IS 'Finished share (sent, failed or cancelled), percent: 100 when nothing is left to do, whatever the outcome; see sent_pct and outcome.';
COMMENT ON COLUMN edm.task_progress.sent_pct IS 'Sent share of the recipients, percent, rounded down (never 100 while one failed or was cancelled); NULL without recipients.';
COMMENT ON COLUMN edm.task_progress.outcome IS 'For a finished task: all sent, partly sent, none sent (with the failed and cancelled counts), cancelled (with the sent, failed and cancelled counts), failed (with the error) or no recipients. NULL while the task is live.';

-- ---------------------------------------------------------------------------
-- Suppression takes effect at once; one-click unsubscribe
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.cancel_pending_to(p_email text, p_user_id text DEFAULT NULL,
                                      p_reason text DEFAULT 'suppressed',
                                      p_now timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_ids bigint[];
BEGIN
  -- Lock order as everywhere: subtasks, then tasks by id, then users.
  -- Live tasks first, then one probe of the unique (task_id, email) index
  -- each: subtasks has no index on the address alone (it would cost every
  -- subtask insert), and a scan of it would cost a feedback event seconds.
  SELECT array_agg(x.subtask_id) INTO v_ids FROM (
    SELECT st.subtask_id FROM edm.tasks t
    JOIN edm.subtasks st ON st.task_id = t.task_id AND st.email = edm.normalize_email(p_email)
    WHERE t.status IN ('draft', 'expanding', 'scheduled', 'sending', 'paused')
      AND (p_user_id IS NULL OR t.user_id = p_user_id)
      AND st.status = 'pending'
    ORDER BY st.subtask_id
    FOR NO KEY UPDATE OF st) x;
  IF v_ids IS NULL THEN
    RETURN 0;
  END IF;
  PERFORM 1 FROM edm.tasks t
  WHERE t.task_id IN (SELECT st.task_id FROM edm.subtasks st WHERE st.subtask_id = ANY (v_ids))
  ORDER BY t.task_id FOR NO KEY UPDATE;
  WITH sub AS (
    UPDATE edm.subtasks st
    SET status = 'cancelled', finished_at = v_now,
        outcome_detail = 'not sent: address ' || p_reason
    WHERE st.subtask_id = ANY (v_ids) AND st.status = 'pending'
    RETURNING st.task_id
  ),
  per_task AS (SELECT sub.task_id, count(*) AS n FROM sub GROUP BY sub.task_id),
  upd_tasks AS (
    UPDATE edm.tasks t
    SET pending_count = t.pending_count - pt.n, cancelled_count = t.cancelled_count + pt.n,
        quota_reserved = greatest(t.quota_reserved - pt.n, 0),
        status = CASE WHEN t.status = 'sending' AND t.pending_count - pt.n = 0
                           AND t.leased_count = 0 THEN 'completed' ELSE t.status END
    FROM per_task pt WHERE t.task_id = pt.task_id
    RETURNING t.user_id, pt.n
  )
  -- never sent: the reserved quota goes back to the owner, as cancel_task does
  UPDATE edm.users u SET quota_used = greatest(u.quota_used - r.n, 0)
  FROM (SELECT ut.user_id, sum(ut.n) AS n FROM upd_tasks ut GROUP BY ut.user_id) r
  WHERE u.user_id = r.user_id;
  RETURN cardinality(v_ids);
END;
$$;
COMMENT ON FUNCTION edm.cancel_pending_to(text, text, text, timestamptz) IS
  'Cancels the pending subtasks addressed to p_email (of user p_user_id''s tasks, or of every task when NULL), keeping task counters and refunding the owners'' quota, so that a suppression or an unsubscribe takes effect on tasks already created. Leased subtasks finish. Returns how many were cancelled.';

CREATE FUNCTION edm.unsubscribe(p_user_id text, p_email text, p_subtask_id bigint DEFAULT NULL,
                                p_now timestamptz DEFAULT NULL)
RETURNS TABLE (contact_updated boolean, suppressed boolean, cancelled integer)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  v_email text := edm.normalize_email(p_email);
  v_contact boolean;
  v_suppressed boolean;
  v_cancelled integer;
BEGIN
  IF edm.email_problem(p_email) IS NOT NULL THEN
    RAISE EXCEPTION 'invalid address %: %', quote_literal(p_email), edm.email_problem(p_email)
      USING ERRCODE = 'ED005';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM edm.users u WHERE u.user_id = p_user_id) THEN
    -- the tenant is gone: nothing of it can be sent any more
    RETURN QUERY SELECT false, false, 0;
    RETURN;
  END IF;
  UPDATE edm.contacts c SET unsubscribed = true, updated_at = coalesce(p_now, now())
  WHERE c.user_id = p_user_id AND c.email = v_email AND NOT c.unsubscribed;
  v_contact := FOUND;
  INSERT INTO edm.suppressions (user_id, email, reason, source_subtask_id, created_at)
  VALUES (p_user_id, v_email, 'unsubscribe', p_subtask_id, coalesce(p_now, now()))
  ON CONFLICT (user_id, email) DO NOTHING;
  v_suppressed := FOUND;
  v_cancelled := edm.cancel_pending_to(v_email, p_user_id, 'unsubscribed', p_now);
  RETURN QUERY SELECT v_contact, v_suppressed, v_cancelled;
END;
$$;
COMMENT ON FUNCTION edm.unsubscribe(text, text, bigint, timestamptz) IS
  'Unsubscribes p_email from user p_user_id''s mail, idempotently: marks the contact unsubscribed, suppresses the address for that user (reason unsubscribe; an existing suppression is kept), and cancels its pending subtasks in the user''s tasks. Returns what changed (all false / 0 on a repeated call, or when the user no longer exists). Called by edm_sched.unsubscribe after it verified the signed token.';

-- ---------------------------------------------------------------------------
-- Feedback intake: bounces, complaints, unsubscribes, deliveries
-- ---------------------------------------------------------------------------

CREATE TABLE edm.feedback_events (
  event_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  received_at  timestamptz NOT NULL DEFAULT now(),
  occurred_at  timestamptz,
  kind         text NOT NULL
               CHECK (kind IN ('hard_bounce', 'soft_bounce', 'complaint', 'unsubscribe', 'delivered')),
  source       text NOT NULL CHECK (source ~ '^[a-z][a-z0-9_]{0,31}$'),
  message_id   text CHECK (length(message_id) <= 998),
  recipient    text CHECK (length(recipient) <= 320),
  subtask_id   bigint,
  task_id      bigint,
  user_id      text,
  service_id   bigint,
  event_key    text CHECK (length(event_key) <= 500),
  detail       text CHECK (length(detail) <= 10000),
  suppressed   boolean NOT NULL DEFAULT false,
  raw          text NOT NULL CHECK (length(raw) <= 1000000)
);
COMMENT ON TABLE edm.feedback_events IS
  'What was learned after sending, one row per recipient and event: hard and soft bounces, complaints, unsubscribes, deliveries, from DSNs, ARF reports, ESP webhooks or the host. Found by Message-ID; keeps the raw source. Recorded by edm.record_feedback.';
COMMENT ON COLUMN edm.feedback_events.event_id IS 'Surrogate id.';
COMMENT ON COLUMN edm.feedback_events.received_at IS 'When edm-sched recorded the event; the reputation breaker''s windows count from here.';
COMMENT ON COLUMN edm.feedback_events.occurred_at IS 'When the provider says it happened, if it says.';
COMMENT ON COLUMN edm.feedback_events.kind IS 'hard_bounce, soft_bounce, complaint, unsubscribe or delivered.';
COMMENT ON COLUMN edm.feedback_events.source IS 'Where it came from: dsn, arf, ses, sendgrid, mailgun, postmark, api...';
COMMENT ON COLUMN edm.feedback_events.message_id IS 'Message-ID the event names, as given (edm-sched''s are <edm.TASK.SUBTASK@domain>).';
COMMENT ON COLUMN edm.feedback_events.recipient IS 'Normalised recipient address: the subtask''s when found, else as given.';
COMMENT ON COLUMN edm.feedback_events.subtask_id IS 'Subtask the Message-ID names, NULL when unknown (another sender''s message, or a task already deleted by retention). No foreign key: subtasks are deleted by retention.';
COMMENT ON COLUMN edm.feedback_events.task_id IS 'Task of the subtask.';
COMMENT ON COLUMN edm.feedback_events.user_id IS 'Owner of the task.';
COMMENT ON COLUMN edm.feedback_events.service_id IS 'Service that sent the subtask (its latest attempt).';
COMMENT ON COLUMN edm.feedback_events.event_key IS 'The provider''s id of the event (with the recipient); a repeated delivery of the same webhook is recorded once.';
COMMENT ON COLUMN edm.feedback_events.detail IS 'Status and diagnostic text (e.g. 5.1.1 user unknown, a complaint''s feedback type).';
COMMENT ON COLUMN edm.feedback_events.suppressed IS 'True when this event suppressed the address (hard bounce: for everyone; complaint, unsubscribe: for the user).';
COMMENT ON COLUMN edm.feedback_events.raw IS 'The raw source: the DSN or ARF message, or the webhook''s JSON (at most 1,000,000 characters).';
CREATE UNIQUE INDEX feedback_events_key_idx ON edm.feedback_events (source, event_key)
  WHERE event_key IS NOT NULL;
COMMENT ON INDEX edm.feedback_events_key_idx IS 'A provider event is recorded once however often its webhook is delivered.';
CREATE INDEX feedback_events_subtask_idx ON edm.feedback_events (subtask_id);
COMMENT ON INDEX edm.feedback_events_subtask_idx IS 'The feedback of one subtask.';
CREATE INDEX feedback_events_service_idx ON edm.feedback_events (service_id, received_at)
  WHERE kind IN ('hard_bounce', 'complaint');
COMMENT ON INDEX edm.feedback_events_service_idx IS 'Reputation breaker: a service''s bounces and complaints in a window.';
CREATE INDEX feedback_events_user_idx ON edm.feedback_events (user_id, received_at)
  WHERE kind IN ('hard_bounce', 'complaint');
COMMENT ON INDEX edm.feedback_events_user_idx IS 'Reputation breaker: a user''s bounces and complaints in a window.';

CREATE FUNCTION edm.parse_message_id(p_message_id text)
RETURNS TABLE (task_id bigint, subtask_id bigint)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
  SELECT m[1]::bigint, m[2]::bigint
  FROM regexp_match(p_message_id, '^\s*<?edm\.([0-9]{1,18})\.([0-9]{1,18})@[^<>@\s]+>?\s*$') m;
END;
COMMENT ON FUNCTION edm.parse_message_id(text) IS
  'Task and subtask of an edm-sched Message-ID (<edm.TASK.SUBTASK@domain>, angle brackets optional); no row for any other Message-ID.';

CREATE FUNCTION edm.record_feedback(
  p_kind text, p_message_id text, p_recipient text DEFAULT NULL, p_source text DEFAULT 'api',
  p_raw text DEFAULT NULL, p_detail text DEFAULT NULL, p_event_key text DEFAULT NULL,
  p_occurred_at timestamptz DEFAULT NULL, p_now timestamptz DEFAULT NULL)
RETURNS TABLE (event_id bigint, subtask_id bigint, duplicate boolean, suppressed boolean,
               cancelled integer)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_ref record;
  v_email text;
  v_event bigint;
  v_suppressed boolean := false;
  v_cancelled integer := 0;
BEGIN
  IF p_kind IS NULL OR p_kind NOT IN ('hard_bounce', 'soft_bounce', 'complaint', 'unsubscribe',
                                      'delivered') THEN
    RAISE EXCEPTION 'feedback kind must be hard_bounce, soft_bounce, complaint, unsubscribe or delivered, got %',
      coalesce(quote_literal(p_kind), 'NULL') USING ERRCODE = 'ED005';
  END IF;
  IF p_source IS NULL OR p_source !~ '^[a-z][a-z0-9_]{0,31}$' THEN
    RAISE EXCEPTION 'feedback source must match [a-z][a-z0-9_]{0,31}' USING ERRCODE = 'ED005';
  END IF;
  IF p_recipient IS NOT NULL AND edm.email_problem(p_recipient) IS NOT NULL THEN
    RAISE EXCEPTION 'invalid recipient %: %', quote_literal(p_recipient),
      edm.email_problem(p_recipient) USING ERRCODE = 'ED005';
  END IF;

  SELECT st.subtask_id, st.task_id, t.user_id, st.service_id, st.email INTO v_ref
  FROM edm.parse_message_id(p_message_id) m
  JOIN edm.subtasks st ON st.subtask_id = m.subtask_id AND st.task_id = m.task_id
  JOIN edm.tasks t ON t.task_id = st.task_id;
  IF v_ref.subtask_id IS NULL AND p_recipient IS NULL THEN
    RAISE EXCEPTION 'no message of edm-sched has Message-ID %, and no recipient was given',
      coalesce(quote_literal(p_message_id), 'NULL') USING ERRCODE = 'ED001';
  END IF;
  v_email := coalesce(v_ref.email, edm.normalize_email(p_recipient));

  INSERT INTO edm.feedback_events AS f (received_at, occurred_at, kind, source, message_id,
                                        recipient, subtask_id, task_id, user_id, service_id,
                                        event_key, detail, raw)
  VALUES (v_now, p_occurred_at, p_kind, p_source, left(p_message_id, 998), v_email,
          v_ref.subtask_id, v_ref.task_id, v_ref.user_id, v_ref.service_id,
          left(p_event_key, 500), left(p_detail, 10000), coalesce(p_raw, ''))
  ON CONFLICT (source, event_key) WHERE event_key IS NOT NULL DO NOTHING
  RETURNING f.event_id INTO v_event;
  IF v_event IS NULL THEN  -- the same provider event again: nothing more to do
    RETURN QUERY SELECT f.event_id, f.subtask_id, true, false, 0 FROM edm.feedback_events f
                 WHERE f.source = p_source AND f.event_key = left(p_event_key, 500);
    RETURN;
  END IF;

  IF p_kind = 'hard_bounce' THEN
    -- the mailbox does not exist: nobody sends to it any more
    INSERT INTO edm.suppressions (user_id, email, reason, source_subtask_id, created_at)
    VALUES (NULL, v_email, 'hard_bounce', v_ref.subtask_id, v_now)
    ON CONFLICT (user_id, email) DO NOTHING;
    v_suppressed := FOUND;
    v_cancelled := edm.cancel_pending_to(v_email, NULL, 'hard bounced', v_now);
  ELSIF p_kind = 'complaint' THEN
    -- the recipient called this sender's mail spam: that user stops mailing
    -- it (everyone, when the message is not known)
    IF v_ref.user_id IS NOT NULL THEN
      UPDATE edm.contacts c SET unsubscribed = true, updated_at = v_now
      WHERE c.user_id = v_ref.user_id AND c.email = v_email AND NOT c.unsubscribed;
    END IF;
    INSERT INTO edm.suppressions (user_id, email, reason, source_subtask_id, created_at)
    VALUES (v_ref.user_id, v_email, 'complaint', v_ref.subtask_id, v_now)
    ON CONFLICT (user_id, email) DO NOTHING;
    v_suppressed := FOUND;
    v_cancelled := edm.cancel_pending_to(v_email, v_ref.user_id, 'complained', v_now);
  ELSIF p_kind = 'unsubscribe' AND v_ref.user_id IS NOT NULL THEN
    SELECT u.suppressed, u.cancelled INTO v_suppressed, v_cancelled
    FROM edm.unsubscribe(v_ref.user_id, v_email, v_ref.subtask_id, v_now) u;
  END IF;
  UPDATE edm.feedback_events f SET suppressed = v_suppressed WHERE f.event_id = v_event;
  RETURN QUERY SELECT v_event, v_ref.subtask_id, false, v_suppressed, v_cancelled;
END;
$$;
COMMENT ON FUNCTION edm.record_feedback(text, text, text, text, text, text, text, timestamptz, timestamptz) IS
  'Records one delivery event (hard_bounce, soft_bounce, complaint, unsubscribe, delivered) for the subtask its edm-sched Message-ID names, keeping the raw source. A hard bounce suppresses the address for everyone; a complaint suppresses it for the task''s user and unsubscribes the contact; an unsubscribe runs edm.unsubscribe; each cancels the pending subtasks it concerns. An unknown Message-ID is recorded when a recipient is given (a hard bounce still suppresses), else refused (ED001). A repeated (source, event_key) is recorded once (duplicate = true).';

-- ---------------------------------------------------------------------------
-- The reputation breaker
-- ---------------------------------------------------------------------------

INSERT INTO edm.config (key, value, default_value, category, value_type, min_value, max_value, unit, description) VALUES
  ('reputation.window_hours', '24', '24', 'reputation', 'integer', 1, 720, 'hours',
   'Rolling window of the bounce and complaint rates (whole hours: sends are counted from the hourly roll-up).'),
  ('reputation.min_sends', '1000', '1000', 'reputation', 'integer', 1, 10000000, 'sends',
   'Sends in the window below which no rate is judged: 1 bounce in 3 sends is chance, not a reputation.'),
  ('reputation.complaint_warn_pct', '0.1', '0.1', 'reputation', 'number', 0, 100, 'percent',
   'Complaint rate (complaints / sends) that raises a warning alert (Gmail: stay under 0.1 %).'),
  ('reputation.complaint_pause_pct', '0.3', '0.3', 'reputation', 'number', 0, 100, 'percent',
   'Complaint rate that pauses the user''s bulk tasks or disables the service (Gmail and Yahoo: never reach 0.3 %).'),
  ('reputation.bounce_warn_pct', '2', '2', 'reputation', 'number', 0, 100, 'percent',
   'Hard-bounce rate (hard bounces / sends) that raises a warning alert.'),
  ('reputation.bounce_pause_pct', '5', '5', 'reputation', 'number', 0, 100, 'percent',
   'Hard-bounce rate that pauses the user''s bulk tasks or disables the service.'),
  ('reputation.check_interval', '60', '60', 'reputation', 'integer', 5, 3600, 'seconds',
   'Least time between two runs of the breaker (it runs from the sweeps).'),
  ('reputation.enabled', 'true', 'true', 'reputation', 'boolean', NULL, NULL, NULL,
   'False turns the breaker off (rates are still shown in edm.reputation_status).');

ALTER TABLE edm.services
  ADD COLUMN paused_reason text,
  ADD COLUMN reputation_since timestamptz;
COMMENT ON COLUMN edm.services.paused_reason IS 'Why the reputation breaker disabled the service (enabled = false), NULL otherwise. Cleared by edm.reputation_resume_service.';
COMMENT ON COLUMN edm.services.reputation_since IS 'Start of the service''s reputation window after a resume: events before it no longer count.';
ALTER TABLE edm.users
  ADD COLUMN paused_reason text,
  ADD COLUMN reputation_since timestamptz;
COMMENT ON COLUMN edm.users.paused_reason IS 'Why the reputation breaker paused this user''s bulk tasks, NULL otherwise; while set, the user''s bulk tasks do not start. Cleared by edm.reputation_resume_user.';
COMMENT ON COLUMN edm.users.reputation_since IS 'Start of the user''s reputation window after a resume: events before it no longer count.';
ALTER TABLE edm.tasks ADD COLUMN pause_reason text;
COMMENT ON COLUMN edm.tasks.pause_reason IS 'Why edm-sched paused the task (the reputation breaker), NULL for a pause by the host. Resuming the user resumes exactly these.';

-- Reputation alerts are per user too: the open-alert key gains the user, and
-- raise_alert its conflict target. The kinds allowed so far are kept (read
-- from the constraint), 'reputation' added.
DO $$
DECLARE
  v_con record;
  v_kinds text[] := '{}';
BEGIN
  FOR v_con IN
    SELECT c.conname, pg_get_constraintdef(c.oid) AS def FROM pg_constraint c
    WHERE c.conrelid = 'edm.alerts'::regclass AND c.contype = 'c'
      AND pg_get_constraintdef(c.oid) ~ '\mkind\M'
  LOOP
    v_kinds := v_kinds || ARRAY(SELECT m[1] FROM regexp_matches(v_con.def, $re$'([a-z_]+)'$re$, 'g') m);
    EXECUTE format('ALTER TABLE edm.alerts DROP CONSTRAINT %I', v_con.conname);
  END LOOP;
  v_kinds := ARRAY(SELECT DISTINCT k FROM unnest(v_kinds || ARRAY['wait', 'quota', 'stuck', 'service', 'reputation']) k ORDER BY k);
  EXECUTE format('ALTER TABLE edm.alerts ADD CONSTRAINT alerts_kind_check CHECK (kind = ANY (%L::text[]))', v_kinds);
END;
$$;
COMMENT ON COLUMN edm.alerts.kind IS 'wait, quota, stuck, service or reputation (a bounce or complaint rate over a threshold).';
DROP INDEX edm.alerts_open_idx;
CREATE UNIQUE INDEX alerts_open_idx ON edm.alerts
  (kind, severity, coalesce(task_id, 0), coalesce(service_id, 0), coalesce(user_id, ''))
  WHERE resolved_at IS NULL;
COMMENT ON INDEX edm.alerts_open_idx IS 'At most one open alert per kind, severity and subject (task, service, user).';

CREATE OR REPLACE FUNCTION edm.raise_alert(p_kind text, p_severity text, p_message text,
                                           p_task_id bigint DEFAULT NULL, p_service_id bigint DEFAULT NULL,
                                           p_user_id text DEFAULT NULL, p_now timestamptz DEFAULT NULL)
RETURNS boolean
LANGUAGE sql
BEGIN ATOMIC
  WITH ins AS (
    INSERT INTO edm.alerts (raised_at, kind, severity, task_id, service_id, user_id, message)
    VALUES (coalesce(p_now, now()), p_kind, p_severity, p_task_id, p_service_id, p_user_id, p_message)
    ON CONFLICT (kind, severity, coalesce(task_id, 0), coalesce(service_id, 0), coalesce(user_id, ''))
      WHERE resolved_at IS NULL DO NOTHING
    RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM ins);
END;
COMMENT ON FUNCTION edm.raise_alert(text, text, text, bigint, bigint, text, timestamptz) IS
  'Records an alert unless the same one (kind, severity, subject: task, service, user) is already open; true when recorded.';

CREATE FUNCTION edm.config_num(p_key text)
RETURNS numeric
LANGUAGE sql STABLE
RETURN (SELECT (c.value #>> '{}')::numeric FROM edm.config c WHERE c.key = p_key);
COMMENT ON FUNCTION edm.config_num(text) IS 'Numeric value of config key p_key (NULL when absent).';

CREATE FUNCTION edm.reputation_rates(p_now timestamptz DEFAULT NULL)
RETURNS TABLE (subject text, service_id bigint, user_id text, window_start timestamptz,
               sends bigint, hard_bounces bigint, complaints bigint,
               bounce_pct numeric, complaint_pct numeric, judged boolean, paused_reason text)
LANGUAGE sql STABLE
BEGIN ATOMIC
  -- Set-based: one range scan of the window in edm.metrics_hourly (its primary
  -- key leads with the hour) and in each partial index of feedback_events,
  -- hash-joined to the subjects, rather than a scan per service and user.
  WITH cfg AS (
    SELECT coalesce(p_now, now()) - make_interval(hours => edm.config_int('reputation.window_hours')) AS since,
           edm.config_int('reputation.min_sends') AS min_sends
  ),
  subjects AS (
    SELECT 'service' AS subject, s.service_id, NULL::text AS user_id,
           greatest(cfg.since, s.reputation_since) AS window_start, s.paused_reason
    FROM edm.services s, cfg
    UNION ALL
    -- every column named: a SQL-standard body deparses an unnamed UNION column
    -- differently once reloaded (sql/schema.sql must build the same function)
    SELECT 'user' AS subject, NULL::bigint AS service_id, u.user_id,
           greatest(cfg.since, u.reputation_since) AS window_start, u.paused_reason
    FROM edm.users u, cfg
  ),
  -- sends from the hourly roll-up (kept current by the sweeps): a window
  -- starts at the top of its first hour
  svc_sends AS (
    SELECT x.service_id, sum(m.sent)::bigint AS n
    FROM subjects x JOIN edm.metrics_hourly m ON m.service_id = x.service_id
    WHERE x.subject = 'service'
      AND m.hour >= (SELECT date_trunc('hour', cfg.since AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' FROM cfg)
      AND m.hour >= date_trunc('hour', x.window_start AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    GROUP BY x.service_id
  ),
  usr_sends AS (
    SELECT x.user_id, sum(m.sent)::bigint AS n
    FROM subjects x JOIN edm.metrics_hourly m ON m.user_id = x.user_id
    WHERE x.subject = 'user'
      AND m.hour >= (SELECT date_trunc('hour', cfg.since AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' FROM cfg)
      AND m.hour >= date_trunc('hour', x.window_start AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    GROUP BY x.user_id
  ),
  svc_fb AS (
    SELECT x.service_id, count(*) FILTER (WHERE f.kind = 'hard_bounce') AS hb,
           count(*) FILTER (WHERE f.kind = 'complaint') AS c
    FROM subjects x JOIN edm.feedback_events f ON f.service_id = x.service_id
    WHERE x.subject = 'service' AND f.kind IN ('hard_bounce', 'complaint')
      AND f.received_at >= (SELECT cfg.since FROM cfg) AND f.received_at >= x.window_start
    GROUP BY x.service_id
  ),
  usr_fb AS (
    SELECT x.user_id, count(*) FILTER (WHERE f.kind = 'hard_bounce') AS hb,
           count(*) FILTER (WHERE f.kind = 'complaint') AS c
    FROM subjects x JOIN edm.feedback_events f ON f.user_id = x.user_id
    WHERE x.subject = 'user' AND f.kind IN ('hard_bounce', 'complaint')
      AND f.received_at >= (SELECT cfg.since FROM cfg) AND f.received_at >= x.window_start
    GROUP BY x.user_id
  ),
  counted AS (
    SELECT x.subject, x.service_id, x.user_id, x.window_start, x.paused_reason,
           coalesce(ss.n, us.n, 0) AS sends, coalesce(sf.hb, uf.hb, 0) AS hard_bounces,
           coalesce(sf.c, uf.c, 0) AS complaints
    FROM subjects x
    LEFT JOIN svc_sends ss ON x.subject = 'service' AND ss.service_id = x.service_id
    LEFT JOIN usr_sends us ON x.subject = 'user' AND us.user_id = x.user_id
    LEFT JOIN svc_fb sf ON x.subject = 'service' AND sf.service_id = x.service_id
    LEFT JOIN usr_fb uf ON x.subject = 'user' AND uf.user_id = x.user_id
  )
  SELECT c.subject, c.service_id, c.user_id, c.window_start, c.sends, c.hard_bounces, c.complaints,
         CASE WHEN c.sends > 0 THEN round(100.0 * c.hard_bounces / c.sends, 3) END,
         CASE WHEN c.sends > 0 THEN round(100.0 * c.complaints / c.sends, 3) END,
         c.sends >= cfg.min_sends, c.paused_reason
  FROM counted c, cfg
  WHERE c.sends > 0 OR c.hard_bounces > 0 OR c.complaints > 0 OR c.paused_reason IS NOT NULL;
END;
COMMENT ON FUNCTION edm.reputation_rates(timestamptz) IS
  'Per service and per user with activity: sends (from edm.metrics_hourly, whole hours), hard bounces and complaints (edm.feedback_events) in the reputation window (reputation.window_hours, or since the last resume), their rates in percent, and whether the sample is large enough to judge (reputation.min_sends).';

CREATE VIEW edm.reputation_status AS
SELECT r.subject, r.service_id, r.user_id, r.window_start, r.sends, r.hard_bounces, r.complaints,
       r.bounce_pct, r.complaint_pct, r.judged, r.paused_reason
FROM edm.reputation_rates() r;
COMMENT ON VIEW edm.reputation_status IS
  'The reputation breaker''s view right now: per service and per user, sends, hard bounces and complaints in the window, rates, whether judged, and the pause reason if paused.';
COMMENT ON COLUMN edm.reputation_status.subject IS 'service or user.';
COMMENT ON COLUMN edm.reputation_status.service_id IS 'The service (subject service).';
COMMENT ON COLUMN edm.reputation_status.user_id IS 'The user (subject user).';
COMMENT ON COLUMN edm.reputation_status.window_start IS 'Start of the window: reputation.window_hours ago, or the last resume.';
COMMENT ON COLUMN edm.reputation_status.sends IS 'Messages sent in the window (whole hours).';
COMMENT ON COLUMN edm.reputation_status.hard_bounces IS 'Hard bounces recorded in the window.';
COMMENT ON COLUMN edm.reputation_status.complaints IS 'Complaints recorded in the window.';
COMMENT ON COLUMN edm.reputation_status.bounce_pct IS 'Hard bounces / sends, percent.';
COMMENT ON COLUMN edm.reputation_status.complaint_pct IS 'Complaints / sends, percent.';
COMMENT ON COLUMN edm.reputation_status.judged IS 'True when sends reach reputation.min_sends: only then can the rates raise alerts or pause.';
COMMENT ON COLUMN edm.reputation_status.paused_reason IS 'Why the breaker paused the subject, if it did.';

CREATE FUNCTION edm.is_bulk_task(p_task_id bigint)
RETURNS boolean
LANGUAGE sql STABLE
RETURN EXISTS (SELECT 1 FROM edm.templates tp WHERE tp.task_id = p_task_id AND tp.list_unsubscribe);
COMMENT ON FUNCTION edm.is_bulk_task(bigint) IS
  'True for bulk (marketing) tasks: a template with list_unsubscribe. Transactional tasks (list_unsubscribe = false) are never paused by the reputation breaker.';

CREATE FUNCTION edm.tasks_reputation_hold()
RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
  v_reason text;
BEGIN
  SELECT u.paused_reason INTO v_reason FROM edm.users u WHERE u.user_id = NEW.user_id;
  IF v_reason IS NULL OR NOT edm.is_bulk_task(NEW.task_id) THEN
    RETURN NEW;
  END IF;
  IF OLD.status = 'paused' THEN
    RAISE EXCEPTION 'user % is paused by the reputation breaker (%); resume the user first',
      NEW.user_id, v_reason USING ERRCODE = 'ED003';
  END IF;
  -- a bulk task due to start while its user is held: held with it
  NEW.status := 'paused';
  NEW.pause_reason := v_reason;
  RETURN NEW;
END;
$$;
COMMENT ON FUNCTION edm.tasks_reputation_hold() IS
  'Trigger: while the reputation breaker holds a user (users.paused_reason), the user''s bulk tasks that would start sending are paused instead (with the reason), and resuming one of them by hand is refused (ED003) until the user is resumed.';
CREATE TRIGGER tasks_reputation_hold BEFORE UPDATE OF status ON edm.tasks
  FOR EACH ROW WHEN (NEW.status = 'sending' AND OLD.status IN ('scheduled', 'paused'))
  EXECUTE FUNCTION edm.tasks_reputation_hold();

CREATE FUNCTION edm.check_reputation(p_now timestamptz DEFAULT NULL, p_force boolean DEFAULT false)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_window integer := edm.config_int('reputation.window_hours');
  v_bw numeric := edm.config_num('reputation.bounce_warn_pct');
  v_bp numeric := edm.config_num('reputation.bounce_pause_pct');
  v_cw numeric := edm.config_num('reputation.complaint_warn_pct');
  v_cp numeric := edm.config_num('reputation.complaint_pause_pct');
  v_last timestamptz;
  v_n integer := 0;
  v_reason text;
  r record;
BEGIN
  IF NOT (SELECT (c.value #>> '{}')::boolean FROM edm.config c WHERE c.key = 'reputation.enabled') THEN
    RETURN 0;
  END IF;
  -- At most once per reputation.check_interval (the sweeps run every few seconds).
  SELECT s.watermark INTO v_last FROM edm.sweep_state s WHERE s.name = 'reputation' FOR UPDATE;
  IF NOT coalesce(p_force, false)
     AND v_last > v_now - make_interval(secs => edm.config_int('reputation.check_interval')) THEN
    RETURN 0;
  END IF;
  INSERT INTO edm.sweep_state (name, watermark) VALUES ('reputation', v_now)
  ON CONFLICT (name) DO UPDATE SET watermark = EXCLUDED.watermark, updated_at = now();

  -- A service re-enabled by hand (update_service) counts as resumed.
  UPDATE edm.services s SET paused_reason = NULL, reputation_since = v_now
  WHERE s.paused_reason IS NOT NULL AND s.enabled;

  FOR r IN SELECT x.subject, x.service_id, x.user_id, x.sends, x.hard_bounces, x.complaints,
                  x.bounce_pct, x.complaint_pct, x.paused_reason
           FROM edm.reputation_rates(v_now) x WHERE x.judged
           ORDER BY x.subject, x.service_id, x.user_id LOOP
    v_reason := NULL;
    IF r.complaint_pct >= v_cp OR r.bounce_pct >= v_bp THEN
      v_reason := format('reputation: %s%% hard bounces (%s) and %s%% complaints (%s) in %s sends over the last %s h; pauses at %s%% / %s%%',
                         r.bounce_pct, r.hard_bounces, r.complaint_pct, r.complaints, r.sends,
                         v_window, v_bp, v_cp);
    END IF;
    IF v_reason IS NOT NULL AND r.paused_reason IS NULL THEN
      IF r.subject = 'service' THEN
        UPDATE edm.services s SET enabled = false, paused_reason = v_reason, updated_at = v_now
        WHERE s.service_id = r.service_id;
        PERFORM edm.raise_alert('reputation', 'critical',
          format('service %s disabled: %s', r.service_id, v_reason), NULL, r.service_id, NULL, v_now);
      ELSE
        UPDATE edm.users u SET paused_reason = v_reason WHERE u.user_id = r.user_id;
        UPDATE edm.tasks t SET status = 'paused', pause_reason = v_reason
        WHERE t.task_id IN (SELECT x.task_id FROM edm.tasks x
                            WHERE x.user_id = r.user_id AND x.status IN ('scheduled', 'sending')
                              AND edm.is_bulk_task(x.task_id)
                            ORDER BY x.task_id FOR NO KEY UPDATE);
        PERFORM edm.raise_alert('reputation', 'critical',
          format('user %s: bulk tasks paused: %s', r.user_id, v_reason), NULL, NULL, r.user_id, v_now);
      END IF;
      v_n := v_n + 1;
    ELSIF v_reason IS NULL AND (r.complaint_pct >= v_cw OR r.bounce_pct >= v_bw) THEN
      IF edm.raise_alert('reputation', 'warning',
           format('%s %s: %s%% hard bounces (%s) and %s%% complaints (%s) in %s sends over the last %s h; warns at %s%% / %s%%, pauses at %s%% / %s%%',
                  r.subject, coalesce(r.service_id::text, r.user_id), r.bounce_pct, r.hard_bounces,
                  r.complaint_pct, r.complaints, r.sends, v_window, v_bw, v_cw, v_bp, v_cp),
           NULL, r.service_id, r.user_id, v_now) THEN
        v_n := v_n + 1;
      END IF;
    END IF;
  END LOOP;

  -- Warnings whose rates came back under the thresholds are resolved.
  UPDATE edm.alerts a SET resolved_at = v_now
  WHERE a.kind = 'reputation' AND a.severity = 'warning' AND a.resolved_at IS NULL
    AND NOT EXISTS (SELECT 1 FROM edm.reputation_rates(v_now) x
                    WHERE x.judged AND x.service_id IS NOT DISTINCT FROM a.service_id
                      AND x.user_id IS NOT DISTINCT FROM a.user_id
                      AND (x.complaint_pct >= v_cw OR x.bounce_pct >= v_bw));
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.check_reputation(timestamptz, boolean) IS
  'The reputation breaker, run from the sweeps at most every reputation.check_interval seconds (p_force: now): for each service and user with at least reputation.min_sends sends in the window, a hard-bounce or complaint rate at or above its pause threshold disables the service (enabled = false, paused_reason) or pauses the user''s bulk tasks (users.paused_reason, tasks.pause_reason; new bulk tasks are held too), with a critical alert; at or above its warning threshold raises a warning alert. Returns the number of pauses and warnings raised.';

CREATE FUNCTION edm.reputation_resume_service(p_service_id bigint, p_now timestamptz DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
  v_was text;
BEGIN
  SELECT s.paused_reason INTO v_was FROM edm.services s WHERE s.service_id = p_service_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown service %', p_service_id USING ERRCODE = 'ED001';
  END IF;
  UPDATE edm.services s
  SET enabled = CASE WHEN v_was IS NOT NULL THEN true ELSE s.enabled END,
      paused_reason = NULL, reputation_since = coalesce(p_now, now()),
      updated_at = coalesce(p_now, now())
  WHERE s.service_id = p_service_id;
  UPDATE edm.alerts a SET resolved_at = coalesce(p_now, now())
  WHERE a.kind = 'reputation' AND a.service_id = p_service_id AND a.resolved_at IS NULL;
  PERFORM pg_notify('edm_wakeup', 'service:' || p_service_id);
  RETURN v_was IS NOT NULL;
END;
$$;
COMMENT ON FUNCTION edm.reputation_resume_service(bigint, timestamptz) IS
  'Resumes a service the reputation breaker disabled (enabled again, reason cleared) and restarts its reputation window now, so past bounces and complaints no longer count; resolves its reputation alerts. True when it was paused by the breaker.';

CREATE FUNCTION edm.reputation_resume_user(p_user_id text, p_now timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_task bigint;
  v_n integer := 0;
BEGIN
  PERFORM 1 FROM edm.users u WHERE u.user_id = p_user_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown user %', p_user_id USING ERRCODE = 'ED001';
  END IF;
  UPDATE edm.users u SET paused_reason = NULL, reputation_since = coalesce(p_now, now())
  WHERE u.user_id = p_user_id;
  FOR v_task IN
    SELECT t.task_id FROM edm.tasks t
    WHERE t.user_id = p_user_id AND t.status = 'paused' AND t.pause_reason IS NOT NULL
    ORDER BY t.task_id
  LOOP
    UPDATE edm.tasks t SET pause_reason = NULL WHERE t.task_id = v_task;
    PERFORM edm.resume_task(v_task, p_user_id, p_now);
    v_n := v_n + 1;
  END LOOP;
  UPDATE edm.alerts a SET resolved_at = coalesce(p_now, now())
  WHERE a.kind = 'reputation' AND a.user_id = p_user_id AND a.service_id IS NULL
    AND a.resolved_at IS NULL;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.reputation_resume_user(text, timestamptz) IS
  'Resumes a user the reputation breaker paused: clears the reason, restarts its reputation window now, resumes the tasks the breaker paused (not those the host paused) and resolves its reputation alerts. Returns how many tasks were resumed.';

-- ---------------------------------------------------------------------------
-- Roles: the new functions in the group roles' grants
-- ---------------------------------------------------------------------------

-- edm.install_roles, whichever migration wrote it last, with the names of
-- this migration added to its lists: its definition is read from the catalog
-- and patched, so the grants of the migrations before this one are kept. A
-- list that cannot be found fails the migration instead of losing grants.
DO $$
DECLARE
  v_def text := pg_get_functiondef('edm.install_roles(text, text, text)'::regprocedure);
  v_new text := v_def;
  v_patch text[][] := ARRAY[
    ['v_dispatcher_fns text[] := ARRAY[',
     'v_dispatcher_fns text[] := ARRAY[''check_reputation'', ''reputation_rates'', '],
    ['v_app_fns text[] := ARRAY[',
     'v_app_fns text[] := ARRAY[''headers_problem'', ''unsubscribe'', ''cancel_pending_to'', ''record_feedback'', ''parse_message_id'', ''check_reputation'', ''reputation_rates'', ''reputation_resume_service'', ''reputation_resume_user'', '],
    ['v_monitor_fns text[] := ARRAY[',
     'v_monitor_fns text[] := ARRAY[''reputation_rates'', '],
    ['edm.config, edm.task_progress, ',
     'edm.config, edm.task_progress, edm.reputation_status, edm.feedback_events, ']];
  i integer;
BEGIN
  FOR i IN 1 .. array_length(v_patch, 1) LOOP
    IF position(v_patch[i][1] IN v_new) = 0 THEN
      RAISE EXCEPTION '0009: edm.install_roles has no %; add the deliverability grants by hand', v_patch[i][1];
    END IF;
    v_new := replace(v_new, v_patch[i][1], v_patch[i][2]);
  END LOOP;
  EXECUTE v_new;
END;
$$;

-- Databases whose roles were installed already get the new grants now (the
-- default role names; with other names, call edm.install_roles(...) again).
DO $$
BEGIN
  IF (SELECT count(*) FROM pg_roles r
      WHERE r.rolname IN ('edm_dispatcher', 'edm_app', 'edm_monitor')) = 3 THEN
    PERFORM edm.install_roles();
  END IF;
END;
$$;

SELECT edm.harden_functions();

-- Read-only, but reads tables a role may not: runs with the owner's rights
-- (as 0006 does for task_wait_reason). After harden_functions, which only
-- handles writing functions.
ALTER FUNCTION edm.reputation_rates(timestamptz)
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
