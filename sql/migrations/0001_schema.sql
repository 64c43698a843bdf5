-- 0001_schema.sql: the data model of edm-sched.
--
-- Everything lives in schema `edm`. Tables only; the rules that act on them
-- (readiness, claim, completion, sweeps) are functions in later migrations.
-- Every table and column carries a COMMENT ON: a DBA reads the schema in psql
-- with \d+ and finds the meaning of every field there.

-- ---------------------------------------------------------------------------
-- Helpers that generated columns and CHECK constraints need
-- ---------------------------------------------------------------------------

-- `timestamptz + interval` is only STABLE because an interval with days or
-- months depends on the session time zone. An interval made of milliseconds
-- alone does not, so adding whole milliseconds is immutable; this wrapper lets
-- a generated column compute "last send + interval".
CREATE FUNCTION edm.ts_add_ms(p_ts timestamptz, p_ms bigint)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN p_ts + p_ms * interval '1 millisecond';
COMMENT ON FUNCTION edm.ts_add_ms(timestamptz, bigint) IS
  'p_ts + p_ms milliseconds. Immutable because a pure-time interval does not depend on the session time zone; used by generated columns.';

-- A time zone name is valid if PostgreSQL can convert to it. Declared
-- IMMUTABLE so CHECK constraints may use it; the tz database only changes on
-- server upgrades, which never remove names in use.
CREATE FUNCTION edm.is_valid_timezone(p_tz text)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
  IF p_tz IS NULL OR length(p_tz) > 64 OR p_tz ~ '[[:cntrl:]]' THEN
    RETURN false;
  END IF;
  PERFORM timestamptz '2000-01-01 00:00:00+00' AT TIME ZONE p_tz;
  RETURN true;
EXCEPTION WHEN invalid_parameter_value OR data_exception THEN
  RETURN false;
END;
$$;
COMMENT ON FUNCTION edm.is_valid_timezone(text) IS
  'True when p_tz is a time zone name PostgreSQL knows (e.g. Europe/Paris). Used by CHECK constraints on quota and job time zones.';

-- Address syntax check used by CHECK constraints and by expansion. Deliberately
-- conservative: one @, no whitespace or control characters (so no CR/LF header
-- injection), a dotted domain, at most 254 characters.
CREATE FUNCTION edm.is_valid_email(p_email text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
RETURN length(p_email) <= 254
   AND p_email ~ '^[^@[:space:][:cntrl:]<>(),;:"\[\]\\]+@[^@[:space:][:cntrl:]<>(),;:"\[\]\\]+\.[^@[:space:][:cntrl:]<>(),;:"\[\]\\.]+$';
COMMENT ON FUNCTION edm.is_valid_email(text) IS
  'Conservative syntax check of an address: one @, a dotted domain, no spaces, control characters (CR/LF) or RFC 5322 specials, at most 254 characters.';

-- Normalised form used for deduplication and suppression lookups.
CREATE FUNCTION edm.normalize_email(p_email text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
RETURN lower(btrim(p_email));
COMMENT ON FUNCTION edm.normalize_email(text) IS
  'Normalised address: trimmed and lower-cased. Subtasks, contacts and suppressions store addresses in this form.';

-- ---------------------------------------------------------------------------
-- Typed configuration
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.config_value_ok(
  p_type text, p_value jsonb, p_min numeric, p_max numeric, p_allowed text[])
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE p_type
  WHEN 'integer' THEN jsonb_typeof(p_value) = 'number'
       AND (p_value #>> '{}')::numeric = trunc((p_value #>> '{}')::numeric)
       AND (p_min IS NULL OR (p_value #>> '{}')::numeric >= p_min)
       AND (p_max IS NULL OR (p_value #>> '{}')::numeric <= p_max)
  WHEN 'number' THEN jsonb_typeof(p_value) = 'number'
       AND (p_min IS NULL OR (p_value #>> '{}')::numeric >= p_min)
       AND (p_max IS NULL OR (p_value #>> '{}')::numeric <= p_max)
  WHEN 'boolean' THEN jsonb_typeof(p_value) = 'boolean'
  WHEN 'text' THEN jsonb_typeof(p_value) = 'string'
       AND (p_allowed IS NULL OR (p_value #>> '{}') = ANY (p_allowed))
  ELSE false
END;
COMMENT ON FUNCTION edm.config_value_ok(text, jsonb, numeric, numeric, text[]) IS
  'True when a config value has the declared type and lies within its bounds or allowed values. Backs the CHECK on edm.config.';

CREATE TABLE edm.config (
  key          text PRIMARY KEY CHECK (key ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$'),
  value        jsonb NOT NULL,
  default_value jsonb NOT NULL,
  category     text NOT NULL,
  value_type   text NOT NULL CHECK (value_type IN ('integer', 'number', 'boolean', 'text')),
  min_value    numeric,
  max_value    numeric,
  allowed_values text[],
  unit         text,
  description  text NOT NULL,
  updated_at   timestamptz NOT NULL DEFAULT now(),
  updated_by   text,
  CONSTRAINT config_value_in_range
    CHECK (edm.config_value_ok(value_type, value, min_value, max_value, allowed_values)),
  CONSTRAINT config_default_in_range
    CHECK (edm.config_value_ok(value_type, default_value, min_value, max_value, allowed_values))
);
COMMENT ON TABLE edm.config IS
  'Typed, constrained settings read by SQL functions and dispatchers. Change with edm.config_set(); running dispatchers reload on NOTIFY edm_config.';
COMMENT ON COLUMN edm.config.key IS 'Dotted setting name, e.g. queue.central_batch_size.';
COMMENT ON COLUMN edm.config.value IS 'Current value as JSON (number, boolean or string).';
COMMENT ON COLUMN edm.config.default_value IS 'Value shipped with edm-sched.';
COMMENT ON COLUMN edm.config.category IS 'Group of the setting: queue, service, monitoring, retention, jobs.';
COMMENT ON COLUMN edm.config.value_type IS 'integer, number, boolean or text.';
COMMENT ON COLUMN edm.config.min_value IS 'Inclusive lower bound for numbers, NULL when unbounded.';
COMMENT ON COLUMN edm.config.max_value IS 'Inclusive upper bound for numbers, NULL when unbounded.';
COMMENT ON COLUMN edm.config.allowed_values IS 'Allowed strings for text settings, NULL when free.';
COMMENT ON COLUMN edm.config.unit IS 'Unit of the value (seconds, percent, rows), for display.';
COMMENT ON COLUMN edm.config.description IS 'What the setting controls.';
COMMENT ON COLUMN edm.config.updated_at IS 'When the value last changed.';
COMMENT ON COLUMN edm.config.updated_by IS 'Actor of the last change, as given to edm.config_set().';

INSERT INTO edm.config (key, value, default_value, category, value_type, min_value, max_value, unit, description) VALUES
  ('queue.central_batch_size', '50', '50', 'queue', 'integer', 10, 200, 'subtasks', 'Largest batch one claim call takes (at most one subtask per ready service).'),
  ('queue.concurrent_workers', '10', '10', 'queue', 'integer', 1, 50, 'sends', 'Sends a dispatcher runs in parallel when run_dispatcher() gets no concurrency argument.'),
  ('queue.pending_retry_interval', '60', '60', 'queue', 'integer', 30, 300, 'seconds', 'Base delay before a transient failure is retried; doubles with each attempt.'),
  ('queue.retry_backoff_max', '3600', '3600', 'queue', 'integer', 60, 86400, 'seconds', 'Cap on the retry delay of a transient failure.'),
  ('queue.max_attempts', '5', '5', 'queue', 'integer', 1, 20, 'attempts', 'Attempts after which a transient failure becomes permanent.'),
  ('queue.service_reservation_timeout', '30', '30', 'queue', 'integer', 10, 120, 'seconds', 'Lease length of a claimed subtask; an expired lease is returned to pending by the sweep.'),
  ('service.backoff_base', '30', '30', 'service', 'integer', 1, 600, 'seconds', 'First back-off of a service after a service-level failure; doubles with each consecutive one.'),
  ('service.backoff_max', '1800', '1800', 'service', 'integer', 60, 86400, 'seconds', 'Cap on the back-off of a failing service.'),
  ('monitoring.stuck_task_threshold', '600', '600', 'monitoring', 'integer', 300, 1800, 'seconds', 'A sending task without progress for this long is flagged stuck.'),
  ('monitoring.metrics_retention_days', '30', '30', 'monitoring', 'integer', 7, 90, 'days', 'Days of send events and metric roll-ups kept.'),
  ('monitoring.wait_warning', '300', '300', 'monitoring', 'integer', 60, 3600, 'seconds', 'First-send wait of a task that raises a warning alert.'),
  ('monitoring.wait_critical', '600', '600', 'monitoring', 'integer', 60, 7200, 'seconds', 'First-send wait of a task that raises a critical alert.'),
  ('monitoring.wait_emergency', '1800', '1800', 'monitoring', 'integer', 60, 86400, 'seconds', 'First-send wait of a task that raises an emergency alert.'),
  ('monitoring.quota_alert_percent', '90', '90', 'monitoring', 'integer', 50, 100, 'percent', 'Share of a service''s daily quota that raises an alert.'),
  ('sweep.interval', '5', '5', 'sweep', 'integer', 1, 300, 'seconds', 'How often the elected dispatcher runs the sweeps.');

-- ---------------------------------------------------------------------------
-- Users, services, grants
-- ---------------------------------------------------------------------------

CREATE TABLE edm.users (
  user_id          text PRIMARY KEY
                   CHECK (length(user_id) BETWEEN 1 AND 128 AND user_id !~ '[[:cntrl:]]'),
  display_name     text CHECK (length(display_name) <= 200),
  quota_limit      bigint CHECK (quota_limit >= 0),
  quota_used       bigint NOT NULL DEFAULT 0 CHECK (quota_used >= 0),
  claimable_tasks  integer NOT NULL DEFAULT 0 CHECK (claimable_tasks >= 0),
  last_served_seq  bigint NOT NULL DEFAULT 0,
  last_served_at   timestamptz,
  created_at       timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT users_quota_respected CHECK (quota_limit IS NULL OR quota_used <= quota_limit)
);
COMMENT ON TABLE edm.users IS
  'Tenants of the host platform. user_id is the host''s own id as text (an integer or UUID maps to its canonical string), so no id translation table is needed.';
COMMENT ON COLUMN edm.users.user_id IS 'The host backend''s tenant id, as text (1–128 characters, no control characters).';
COMMENT ON COLUMN edm.users.display_name IS 'Optional human-readable name for views and the CLI.';
COMMENT ON COLUMN edm.users.quota_limit IS 'Most recipients this user may ever have reserved; NULL is unlimited.';
COMMENT ON COLUMN edm.users.quota_used IS 'Recipients reserved by this user''s tasks (refunded when unsent work is cancelled). The CHECK keeps it within quota_limit (I3).';
COMMENT ON COLUMN edm.users.claimable_tasks IS 'Number of this user''s tasks with claimable work; maintained by a trigger on edm.tasks.claimable. Users with 0 are left out of the rotation index.';
COMMENT ON COLUMN edm.users.last_served_seq IS 'Value of edm.serve_seq at this user''s latest claim; fair rotation serves the lowest first (0 = never served).';
COMMENT ON COLUMN edm.users.last_served_at IS 'Time of this user''s latest claim.';
COMMENT ON COLUMN edm.users.created_at IS 'When the user was first seen.';

CREATE INDEX users_rotation_idx ON edm.users (last_served_seq, user_id) WHERE claimable_tasks > 0;
COMMENT ON INDEX edm.users_rotation_idx IS 'Fair rotation: users with claimable work, least recently served first.';

CREATE SEQUENCE edm.serve_seq;
COMMENT ON SEQUENCE edm.serve_seq IS 'Strictly increasing stamp of claims; orders users and tasks by how recently they were served.';

CREATE TABLE edm.services (
  service_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  name              text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200 AND name !~ '[[:cntrl:]]'),
  transport         text NOT NULL DEFAULT 'smtp' CHECK (transport ~ '^[a-z][a-z0-9_]{0,31}$'),
  settings          jsonb NOT NULL DEFAULT '{}'::jsonb
                    CHECK (jsonb_typeof(settings) = 'object'
                           AND NOT settings ?| ARRAY['password', 'secret', 'api_key', 'token', 'passwd']),
  credential_ref    text CHECK (length(credential_ref) <= 500),
  from_addresses    text[] NOT NULL CHECK (cardinality(from_addresses) BETWEEN 1 AND 100),
  interval_ms       bigint NOT NULL CHECK (interval_ms BETWEEN 0 AND 86400000),
  daily_quota       integer NOT NULL CHECK (daily_quota >= 0),
  quota_tz          text NOT NULL DEFAULT 'UTC' CHECK (edm.is_valid_timezone(quota_tz)),
  enabled           boolean NOT NULL DEFAULT true,
  health            text NOT NULL DEFAULT 'healthy' CHECK (health IN ('healthy', 'degraded', 'backoff')),
  consecutive_failures integer NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
  backoff_until     timestamptz,
  last_error        text,
  last_sent_at      timestamptz,
  quota_day         date,
  sent_today        integer NOT NULL DEFAULT 0 CHECK (sent_today >= 0),
  quota_exhausted_until timestamptz,
  next_available_at timestamptz NOT NULL GENERATED ALWAYS AS (
                      coalesce(greatest(edm.ts_add_ms(last_sent_at, interval_ms),
                                        backoff_until, quota_exhausted_until),
                               '-infinity'::timestamptz)) STORED,
  total_sent        bigint NOT NULL DEFAULT 0,
  total_failed      bigint NOT NULL DEFAULT 0,
  success_rate      double precision NOT NULL GENERATED ALWAYS AS (
                      CASE WHEN total_sent + total_failed = 0 THEN 1.0
                           ELSE total_sent::double precision / (total_sent + total_failed) END) STORED,
  avg_response_ms   double precision,
  created_at        timestamptz NOT NULL DEFAULT now(),
  updated_at        timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE edm.services IS
  'Sending accounts (SMTP logins or ESP API keys). Readiness = enabled AND next_available_at <= now; see edm.service_is_ready().';
COMMENT ON COLUMN edm.services.service_id IS 'Surrogate id.';
COMMENT ON COLUMN edm.services.name IS 'Unique human name of the account.';
COMMENT ON COLUMN edm.services.transport IS 'Transport kind the dispatcher uses: smtp, null, or a host-registered name.';
COMMENT ON COLUMN edm.services.settings IS 'Transport settings (host, port, security, username...). Never secrets: keys such as password are refused by a CHECK.';
COMMENT ON COLUMN edm.services.credential_ref IS 'Reference handed to the host''s credential resolver (an env var name, a vault path); the secret itself is never stored here.';
COMMENT ON COLUMN edm.services.from_addresses IS 'Sender addresses this account may use; the first is the default.';
COMMENT ON COLUMN edm.services.interval_ms IS 'Least time between two send starts on this account, in milliseconds (I2).';
COMMENT ON COLUMN edm.services.daily_quota IS 'Most sends per quota day (I3).';
COMMENT ON COLUMN edm.services.quota_tz IS 'Time zone whose midnight starts a new quota day for this account.';
COMMENT ON COLUMN edm.services.enabled IS 'False takes the account out of rotation at once.';
COMMENT ON COLUMN edm.services.health IS 'healthy; degraded (recent failures); backoff (service-level failure, waiting until backoff_until).';
COMMENT ON COLUMN edm.services.consecutive_failures IS 'Service-level failures in a row; drives the growing back-off.';
COMMENT ON COLUMN edm.services.backoff_until IS 'No claims on this account before this time after a service-level failure.';
COMMENT ON COLUMN edm.services.last_error IS 'Last service-level error text (never contains credentials).';
COMMENT ON COLUMN edm.services.last_sent_at IS 'Start of the latest send (claim time); the interval is counted from here.';
COMMENT ON COLUMN edm.services.quota_day IS 'Local date (in quota_tz) that sent_today counts.';
COMMENT ON COLUMN edm.services.sent_today IS 'Sends started on quota_day.';
COMMENT ON COLUMN edm.services.quota_exhausted_until IS 'Next local midnight once the daily quota is used up; NULL otherwise.';
COMMENT ON COLUMN edm.services.next_available_at IS 'Generated: the earliest time this account may start a send = greatest(last_sent_at + interval, backoff_until, quota_exhausted_until); -infinity when nothing holds it back.';
COMMENT ON COLUMN edm.services.total_sent IS 'Sends accepted by the provider, all time.';
COMMENT ON COLUMN edm.services.total_failed IS 'Send attempts that failed (transient or permanent), all time.';
COMMENT ON COLUMN edm.services.success_rate IS 'Generated: total_sent / (total_sent + total_failed), 1.0 before any attempt.';
COMMENT ON COLUMN edm.services.avg_response_ms IS 'Exponentially weighted mean of the provider response time, in milliseconds.';
COMMENT ON COLUMN edm.services.created_at IS 'When the account was added.';
COMMENT ON COLUMN edm.services.updated_at IS 'When the account''s settings last changed.';

CREATE INDEX services_ready_idx ON edm.services (next_available_at) WHERE enabled;
COMMENT ON INDEX edm.services_ready_idx IS 'Ready services: enabled ones by the time they become available.';

CREATE TABLE edm.grants (
  service_id  bigint NOT NULL REFERENCES edm.services ON DELETE CASCADE,
  user_id     text NOT NULL REFERENCES edm.users ON DELETE CASCADE,
  priority    integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -1000 AND 1000),
  created_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (service_id, user_id)
);
COMMENT ON TABLE edm.grants IS
  'Which user may send through which service. A user''s lower-priority grants are overflow: used only while none of its higher-priority granted services is ready.';
COMMENT ON COLUMN edm.grants.service_id IS 'The service granted.';
COMMENT ON COLUMN edm.grants.user_id IS 'The user who may use it.';
COMMENT ON COLUMN edm.grants.priority IS 'Higher first: a user sends through its highest-priority ready services.';
COMMENT ON COLUMN edm.grants.created_at IS 'When the grant was made.';
CREATE INDEX grants_user_idx ON edm.grants (user_id, priority DESC, service_id);
COMMENT ON INDEX edm.grants_user_idx IS 'A user''s grants by priority; used by the priority-tier check of the claim.';

-- ---------------------------------------------------------------------------
-- Contacts, tags, suppressions
-- ---------------------------------------------------------------------------

CREATE TABLE edm.contacts (
  contact_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  user_id      text NOT NULL REFERENCES edm.users ON DELETE CASCADE,
  email        text NOT NULL CHECK (edm.is_valid_email(email) AND email = edm.normalize_email(email)),
  attributes   jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(attributes) = 'object'),
  tags         text[] NOT NULL DEFAULT '{}',
  unsubscribed boolean NOT NULL DEFAULT false,
  created_at   timestamptz NOT NULL DEFAULT now(),
  updated_at   timestamptz NOT NULL DEFAULT now(),
  UNIQUE (user_id, email)
);
COMMENT ON TABLE edm.contacts IS
  'A user''s address book. Tag membership lives only here, in contacts.tags.';
COMMENT ON COLUMN edm.contacts.contact_id IS 'Surrogate id.';
COMMENT ON COLUMN edm.contacts.user_id IS 'Owner of the contact.';
COMMENT ON COLUMN edm.contacts.email IS 'Normalised address (see edm.normalize_email).';
COMMENT ON COLUMN edm.contacts.attributes IS 'Free-form variables for template rendering (first_name, plan...).';
COMMENT ON COLUMN edm.contacts.tags IS 'Tags of the contact: the one place tag membership is stored.';
COMMENT ON COLUMN edm.contacts.unsubscribed IS 'True when the contact opted out; never included in a task.';
COMMENT ON COLUMN edm.contacts.created_at IS 'When the contact was added.';
COMMENT ON COLUMN edm.contacts.updated_at IS 'When the contact last changed.';
CREATE INDEX contacts_tags_idx ON edm.contacts USING gin (tags);
COMMENT ON INDEX edm.contacts_tags_idx IS 'Tag rules of task expansion.';
CREATE INDEX contacts_user_idx ON edm.contacts (user_id, contact_id);
COMMENT ON INDEX edm.contacts_user_idx IS 'Chunked expansion walks one user''s contacts in contact_id order without passing over other tenants'' rows.';

CREATE TABLE edm.tags (
  user_id     text NOT NULL REFERENCES edm.users ON DELETE CASCADE,
  tag         text NOT NULL CHECK (length(tag) BETWEEN 1 AND 100 AND tag !~ '[[:cntrl:]]'),
  description text,
  created_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (user_id, tag)
);
COMMENT ON TABLE edm.tags IS 'Tag catalogue of a user (names and descriptions); membership is in edm.contacts.tags.';
COMMENT ON COLUMN edm.tags.user_id IS 'Owner of the tag.';
COMMENT ON COLUMN edm.tags.tag IS 'Tag name.';
COMMENT ON COLUMN edm.tags.description IS 'What the tag means.';
COMMENT ON COLUMN edm.tags.created_at IS 'When the tag was created.';

CREATE TABLE edm.suppressions (
  suppression_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  user_id     text REFERENCES edm.users ON DELETE CASCADE,
  email       text NOT NULL CHECK (email = edm.normalize_email(email) AND length(email) <= 320),
  reason      text NOT NULL CHECK (reason IN ('hard_bounce', 'complaint', 'unsubscribe', 'manual')),
  source_subtask_id bigint,
  created_at  timestamptz NOT NULL DEFAULT now(),
  UNIQUE NULLS NOT DISTINCT (user_id, email)
);
COMMENT ON TABLE edm.suppressions IS 'Addresses never sent to: per user, or for everyone when user_id is NULL.';
COMMENT ON COLUMN edm.suppressions.suppression_id IS 'Surrogate id.';
COMMENT ON COLUMN edm.suppressions.user_id IS 'User the suppression applies to; NULL = all users (e.g. a hard bounce).';
COMMENT ON COLUMN edm.suppressions.email IS 'Normalised address.';
COMMENT ON COLUMN edm.suppressions.reason IS 'hard_bounce, complaint, unsubscribe or manual.';
COMMENT ON COLUMN edm.suppressions.source_subtask_id IS 'Subtask whose permanent failure suppressed the address, if any.';
COMMENT ON COLUMN edm.suppressions.created_at IS 'When the address was suppressed.';
CREATE INDEX suppressions_email_idx ON edm.suppressions (email);
COMMENT ON INDEX edm.suppressions_email_idx IS 'Suppression lookups by address during expansion.';

-- ---------------------------------------------------------------------------
-- Tasks and subtasks
-- ---------------------------------------------------------------------------

-- The task status machine. A CHECK on (prev_status, status) enforces it; a
-- trigger records prev_status whenever status changes.
CREATE FUNCTION edm.task_transition_ok(p_from text, p_to text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN p_from IS NULL AND p_to IN ('draft', 'expanding', 'scheduled')
    OR (p_from, p_to) IN (
      ('draft', 'expanding'), ('draft', 'scheduled'), ('draft', 'cancelled'),
      ('expanding', 'scheduled'), ('expanding', 'failed'), ('expanding', 'cancelled'),
      ('scheduled', 'sending'), ('scheduled', 'paused'), ('scheduled', 'cancelled'),
      ('sending', 'completed'), ('sending', 'paused'), ('sending', 'cancelled'), ('sending', 'failed'),
      ('paused', 'scheduled'), ('paused', 'sending'), ('paused', 'cancelled'));
COMMENT ON FUNCTION edm.task_transition_ok(text, text) IS
  'The task status machine: draft → expanding → scheduled → sending → completed; scheduled/sending ↔ paused; cancelled from any live state; failed from expanding or sending.';

CREATE TABLE edm.tasks (
  task_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  user_id          text NOT NULL REFERENCES edm.users,
  name             text NOT NULL CHECK (length(name) BETWEEN 1 AND 300 AND name !~ '[[:cntrl:]]'),
  status           text NOT NULL DEFAULT 'draft'
                   CHECK (status IN ('draft', 'expanding', 'scheduled', 'sending', 'paused',
                                     'completed', 'cancelled', 'failed')),
  prev_status      text,
  priority         integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -100 AND 100),
  scheduled_at     timestamptz NOT NULL DEFAULT now(),
  recipient_rule   jsonb,
  total_count      integer NOT NULL DEFAULT 0 CHECK (total_count >= 0),
  pending_count    integer NOT NULL DEFAULT 0 CHECK (pending_count >= 0),
  leased_count     integer NOT NULL DEFAULT 0 CHECK (leased_count >= 0),
  sent_count       integer NOT NULL DEFAULT 0 CHECK (sent_count >= 0),
  failed_count     integer NOT NULL DEFAULT 0 CHECK (failed_count >= 0),
  cancelled_count  integer NOT NULL DEFAULT 0 CHECK (cancelled_count >= 0),
  quota_reserved   bigint NOT NULL DEFAULT 0 CHECK (quota_reserved >= 0),
  template_count   smallint NOT NULL DEFAULT 1 CHECK (template_count BETWEEN 1 AND 100),
  expansion_cursor bigint,
  last_served_seq  bigint NOT NULL DEFAULT 0,
  claimable        boolean NOT NULL GENERATED ALWAYS AS (status = 'sending' AND pending_count > 0) STORED,
  first_claimed_at timestamptz,
  last_activity_at timestamptz,
  started_at       timestamptz,
  finished_at      timestamptz,
  stuck_since      timestamptz,
  error            text,
  created_at       timestamptz NOT NULL DEFAULT now(),
  updated_at       timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT tasks_transition_ok CHECK (edm.task_transition_ok(prev_status, status)),
  CONSTRAINT tasks_counters_add_up
    CHECK (total_count = pending_count + leased_count + sent_count + failed_count + cancelled_count)
);
COMMENT ON TABLE edm.tasks IS
  'Campaign sends. Counters are kept in the same transaction as every subtask change (I4); claimable is generated from status and pending_count.';
COMMENT ON COLUMN edm.tasks.task_id IS 'Surrogate id.';
COMMENT ON COLUMN edm.tasks.user_id IS 'Owner (tenant).';
COMMENT ON COLUMN edm.tasks.name IS 'Campaign name.';
COMMENT ON COLUMN edm.tasks.status IS 'draft, expanding, scheduled, sending, paused, completed, cancelled or failed; transitions checked by tasks_transition_ok.';
COMMENT ON COLUMN edm.tasks.prev_status IS 'Status before the latest transition (set by trigger), so a CHECK can enforce the status machine.';
COMMENT ON COLUMN edm.tasks.priority IS 'Higher first among the same user''s tasks (-100..100); never lets a user overtake another user.';
COMMENT ON COLUMN edm.tasks.scheduled_at IS 'Claims start at this time.';
COMMENT ON COLUMN edm.tasks.recipient_rule IS 'How recipients were chosen: {"list": n} or a tag rule {"include_any":[],"include_all":[],"exclude":[]}.';
COMMENT ON COLUMN edm.tasks.total_count IS 'Subtasks of this task (= sum of the state counters).';
COMMENT ON COLUMN edm.tasks.pending_count IS 'Subtasks waiting to be claimed (including retries waiting for their back-off).';
COMMENT ON COLUMN edm.tasks.leased_count IS 'Subtasks claimed and not yet completed.';
COMMENT ON COLUMN edm.tasks.sent_count IS 'Subtasks sent.';
COMMENT ON COLUMN edm.tasks.failed_count IS 'Subtasks failed permanently.';
COMMENT ON COLUMN edm.tasks.cancelled_count IS 'Subtasks cancelled before being sent.';
COMMENT ON COLUMN edm.tasks.quota_reserved IS 'User quota reserved by this task and not yet refunded.';
COMMENT ON COLUMN edm.tasks.template_count IS 'Number of templates of the task; recipients are assigned templates in rotation.';
COMMENT ON COLUMN edm.tasks.expansion_cursor IS 'While expanding a tag rule: the last contact_id expanded (expansion runs in chunks, each its own transaction). NULL otherwise.';
COMMENT ON COLUMN edm.tasks.last_served_seq IS 'edm.serve_seq at this task''s latest claim; rotation among a user''s tasks serves the lowest first.';
COMMENT ON COLUMN edm.tasks.claimable IS 'Generated: status = sending and pending_count > 0. A trigger keeps edm.users.claimable_tasks in step.';
COMMENT ON COLUMN edm.tasks.first_claimed_at IS 'When the first subtask was claimed (first-send wait = this - scheduled_at).';
COMMENT ON COLUMN edm.tasks.last_activity_at IS 'Latest claim or completion; the stuck-task sweep reads it.';
COMMENT ON COLUMN edm.tasks.started_at IS 'When the task entered sending.';
COMMENT ON COLUMN edm.tasks.finished_at IS 'When the task reached completed, cancelled or failed.';
COMMENT ON COLUMN edm.tasks.stuck_since IS 'Set by the sweep when the task made no progress beyond monitoring.stuck_task_threshold.';
COMMENT ON COLUMN edm.tasks.error IS 'Why the task failed, when it did.';
COMMENT ON COLUMN edm.tasks.created_at IS 'When the task was created.';
COMMENT ON COLUMN edm.tasks.updated_at IS 'When the task''s status or settings last changed.';

CREATE INDEX tasks_rotation_idx ON edm.tasks (user_id, priority DESC, last_served_seq, task_id) WHERE claimable;
COMMENT ON INDEX edm.tasks_rotation_idx IS 'Rotation among one user''s claimable tasks: priority, then least recently served.';
CREATE INDEX tasks_due_idx ON edm.tasks (scheduled_at) WHERE status = 'scheduled';
COMMENT ON INDEX edm.tasks_due_idx IS 'Scheduled tasks by start time (promotion to sending, wake-up time).';
CREATE INDEX tasks_user_idx ON edm.tasks (user_id, task_id);
COMMENT ON INDEX edm.tasks_user_idx IS 'A user''s tasks (host API listing).';

CREATE TABLE edm.templates (
  task_id      bigint NOT NULL REFERENCES edm.tasks ON DELETE CASCADE,
  template_idx smallint NOT NULL CHECK (template_idx >= 0),
  subject      text NOT NULL CHECK (length(subject) <= 998),
  body_text    text,
  body_html    text,
  from_name    text CHECK (from_name !~ '[\r\n]'),
  reply_to     text CHECK (reply_to IS NULL OR edm.is_valid_email(reply_to)),
  PRIMARY KEY (task_id, template_idx),
  CHECK (body_text IS NOT NULL OR body_html IS NOT NULL)
);
COMMENT ON TABLE edm.templates IS 'Content of a task; several templates are assigned to recipients in rotation.';
COMMENT ON COLUMN edm.templates.task_id IS 'Task the template belongs to.';
COMMENT ON COLUMN edm.templates.template_idx IS 'Position of the template in the task (0-based).';
COMMENT ON COLUMN edm.templates.subject IS 'Subject template.';
COMMENT ON COLUMN edm.templates.body_text IS 'Plain-text body template.';
COMMENT ON COLUMN edm.templates.body_html IS 'HTML body template.';
COMMENT ON COLUMN edm.templates.from_name IS 'Display name of the sender (no CR/LF).';
COMMENT ON COLUMN edm.templates.reply_to IS 'Reply-To address, if any.';

CREATE TABLE edm.subtasks (
  subtask_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  task_id           bigint NOT NULL REFERENCES edm.tasks ON DELETE CASCADE,
  email             text NOT NULL CHECK (length(email) <= 254),
  contact_id        bigint,
  template_idx      smallint NOT NULL DEFAULT 0,
  vars              jsonb,
  status            text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'leased', 'sent', 'failed', 'cancelled')),
  attempts          smallint NOT NULL DEFAULT 0 CHECK (attempts >= 0),
  not_before        timestamptz NOT NULL DEFAULT '-infinity',
  lease_owner       text,
  leased_at         timestamptz,
  lease_expires_at  timestamptz,
  service_id        bigint,
  lease_expiries    smallint NOT NULL DEFAULT 0 CHECK (lease_expiries >= 0),
  outcome_code      integer,
  outcome_detail    text,
  provider_message_id text,
  finished_at       timestamptz,
  CONSTRAINT subtasks_lease_matches_status
    CHECK ((status = 'leased') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
  CONSTRAINT subtasks_finished_matches_status
    CHECK ((status IN ('sent', 'failed', 'cancelled')) = (finished_at IS NOT NULL))
)
-- Vacuumed every ~20,000 dead rows per million instead of the default 20 %:
-- the partial claim index otherwise carries up to 200,000 dead entries per
-- million rows (docs/performance.md, dead tuples).
WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 10000);
COMMENT ON TABLE edm.subtasks IS
  'One recipient of one task: the unit claimed, sent and retried. Hot table: claims go through the partial index subtasks_claim_idx.';
COMMENT ON COLUMN edm.subtasks.subtask_id IS 'Surrogate id; also the "lowest pending" order within a task.';
COMMENT ON COLUMN edm.subtasks.task_id IS 'Task of the recipient.';
COMMENT ON COLUMN edm.subtasks.email IS 'Normalised recipient address (unique within the task).';
COMMENT ON COLUMN edm.subtasks.contact_id IS 'Contact the recipient came from (tag rules), NULL for explicit lists. No foreign key: contacts may be deleted after expansion.';
COMMENT ON COLUMN edm.subtasks.template_idx IS 'Template of the task used for this recipient.';
COMMENT ON COLUMN edm.subtasks.vars IS 'Per-recipient rendering variables (explicit lists), merged over contact attributes.';
COMMENT ON COLUMN edm.subtasks.status IS 'pending, leased, sent, failed or cancelled.';
COMMENT ON COLUMN edm.subtasks.attempts IS 'Send attempts started (claims), less those returned by service-level failures.';
COMMENT ON COLUMN edm.subtasks.not_before IS 'Not claimable before this time (retry back-off of a transient failure); -infinity for fresh recipients and for those returned unsent (released, service failure, expired lease), which keep their place in line.';
COMMENT ON COLUMN edm.subtasks.lease_owner IS 'Dispatcher holding the lease while status = leased.';
COMMENT ON COLUMN edm.subtasks.leased_at IS 'Start of the current or latest lease (the send start).';
COMMENT ON COLUMN edm.subtasks.lease_expires_at IS 'Lease expiry; afterwards the sweep returns the subtask to pending and records an uncertain outcome.';
COMMENT ON COLUMN edm.subtasks.service_id IS 'Service of the current or latest attempt.';
COMMENT ON COLUMN edm.subtasks.lease_expiries IS 'Leases of this subtask that expired (uncertain outcomes: a resend may be a duplicate, I1).';
COMMENT ON COLUMN edm.subtasks.outcome_code IS 'Last reply code from the provider (SMTP code or HTTP status).';
COMMENT ON COLUMN edm.subtasks.outcome_detail IS 'Last outcome text (error message, reason of failure).';
COMMENT ON COLUMN edm.subtasks.provider_message_id IS 'Id the provider gave the accepted message.';
COMMENT ON COLUMN edm.subtasks.finished_at IS 'When the subtask reached sent, failed or cancelled.';

CREATE INDEX subtasks_claim_idx ON edm.subtasks (task_id, not_before, subtask_id) WHERE status = 'pending';
COMMENT ON INDEX edm.subtasks_claim_idx IS 'The claim: a task''s next pending subtask (fresh ones by id, then due retries).';
CREATE INDEX subtasks_lease_idx ON edm.subtasks (lease_expires_at) WHERE status = 'leased';
COMMENT ON INDEX edm.subtasks_lease_idx IS 'The lease sweep: leases by expiry.';
CREATE UNIQUE INDEX subtasks_task_email_idx ON edm.subtasks (task_id, email);
COMMENT ON INDEX edm.subtasks_task_email_idx IS 'One subtask per address per task: deduplication cannot be bypassed.';

-- ---------------------------------------------------------------------------
-- History, alerts, dispatchers
-- ---------------------------------------------------------------------------

CREATE TABLE edm.send_events (
  occurred_at   timestamptz NOT NULL,
  subtask_id    bigint NOT NULL,
  task_id       bigint NOT NULL,
  user_id       text NOT NULL,
  service_id    bigint,
  kind          text NOT NULL CHECK (kind IN ('sent', 'retry', 'failed', 'service_failure', 'released',
                                              'lease_expired', 'late_completion', 'cancelled')),
  attempt       smallint,
  started_at    timestamptz,
  code          integer,
  response_ms   integer,
  dispatcher    text,
  detail        text
) PARTITION BY RANGE (occurred_at);
COMMENT ON TABLE edm.send_events IS
  'Append-only history of attempt outcomes, partitioned by day. lease_expired rows are the recorded uncertain outcomes of I1.';
COMMENT ON COLUMN edm.send_events.occurred_at IS 'When the outcome was recorded (partition key).';
COMMENT ON COLUMN edm.send_events.subtask_id IS 'Subtask concerned.';
COMMENT ON COLUMN edm.send_events.task_id IS 'Task of the subtask.';
COMMENT ON COLUMN edm.send_events.user_id IS 'Owner of the task.';
COMMENT ON COLUMN edm.send_events.service_id IS 'Service of the attempt.';
COMMENT ON COLUMN edm.send_events.kind IS 'sent, retry, failed, service_failure, released, lease_expired, late_completion or cancelled.';
COMMENT ON COLUMN edm.send_events.attempt IS 'Attempt number of the subtask.';
COMMENT ON COLUMN edm.send_events.started_at IS 'When the attempt was claimed (send start).';
COMMENT ON COLUMN edm.send_events.code IS 'Provider reply code.';
COMMENT ON COLUMN edm.send_events.response_ms IS 'Provider response time in milliseconds.';
COMMENT ON COLUMN edm.send_events.dispatcher IS 'Dispatcher that reported the outcome (or held the expired lease).';
COMMENT ON COLUMN edm.send_events.detail IS 'Error text or reason.';
CREATE TABLE edm.send_events_default PARTITION OF edm.send_events DEFAULT;
COMMENT ON TABLE edm.send_events_default IS 'Catch-all partition of send_events for days without their own partition.';
CREATE INDEX send_events_subtask_idx ON edm.send_events (subtask_id);
COMMENT ON INDEX edm.send_events_subtask_idx IS 'History of one subtask (duplicate and lease-expiry audits).';
CREATE INDEX send_events_time_idx ON edm.send_events (occurred_at, service_id);
COMMENT ON INDEX edm.send_events_time_idx IS 'Windows of history per service (monitoring views, roll-ups).';

CREATE TABLE edm.alerts (
  alert_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  raised_at   timestamptz NOT NULL DEFAULT now(),
  kind        text NOT NULL CHECK (kind IN ('wait', 'quota', 'stuck', 'service')),
  severity    text NOT NULL CHECK (severity IN ('info', 'warning', 'critical', 'emergency')),
  task_id     bigint,
  service_id  bigint,
  user_id     text,
  message     text NOT NULL,
  notified_at timestamptz,
  resolved_at timestamptz
);
COMMENT ON TABLE edm.alerts IS 'Alerts raised by the sweeps (waits, quotas, stuck tasks), handed to the host callback once (notified_at).';
COMMENT ON COLUMN edm.alerts.alert_id IS 'Surrogate id.';
COMMENT ON COLUMN edm.alerts.raised_at IS 'When the alert was raised.';
COMMENT ON COLUMN edm.alerts.kind IS 'wait, quota, stuck or service.';
COMMENT ON COLUMN edm.alerts.severity IS 'info, warning, critical or emergency.';
COMMENT ON COLUMN edm.alerts.task_id IS 'Task concerned, if any.';
COMMENT ON COLUMN edm.alerts.service_id IS 'Service concerned, if any.';
COMMENT ON COLUMN edm.alerts.user_id IS 'User concerned, if any.';
COMMENT ON COLUMN edm.alerts.message IS 'Human-readable description.';
COMMENT ON COLUMN edm.alerts.notified_at IS 'When the host callback received the alert.';
COMMENT ON COLUMN edm.alerts.resolved_at IS 'When the condition cleared.';
CREATE UNIQUE INDEX alerts_open_idx ON edm.alerts (kind, severity, coalesce(task_id, 0), coalesce(service_id, 0))
  WHERE resolved_at IS NULL;
COMMENT ON INDEX edm.alerts_open_idx IS 'At most one open alert per kind, severity and subject.';

CREATE TABLE edm.dispatchers (
  dispatcher_id text PRIMARY KEY CHECK (length(dispatcher_id) BETWEEN 1 AND 200),
  hostname      text,
  pid           integer,
  started_at    timestamptz NOT NULL DEFAULT now(),
  heartbeat_at  timestamptz NOT NULL DEFAULT now(),
  stopped_at    timestamptz
);
COMMENT ON TABLE edm.dispatchers IS 'Dispatcher processes seen, with their heartbeats.';
COMMENT ON COLUMN edm.dispatchers.dispatcher_id IS 'Unique id of the process (host:pid:random); the lease owner of its claims.';
COMMENT ON COLUMN edm.dispatchers.hostname IS 'Host it runs on.';
COMMENT ON COLUMN edm.dispatchers.pid IS 'Process id on that host.';
COMMENT ON COLUMN edm.dispatchers.started_at IS 'When it started.';
COMMENT ON COLUMN edm.dispatchers.heartbeat_at IS 'Its latest sign of life.';
COMMENT ON COLUMN edm.dispatchers.stopped_at IS 'When it stopped cleanly, NULL while running or after a crash.';
