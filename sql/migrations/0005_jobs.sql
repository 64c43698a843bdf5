-- 0005_jobs.sql: recurring jobs (the task-scheduling service) on the same database.
--
-- A job is a cron schedule in a time zone plus what to run (a host-registered
-- Python function, an HTTP call, a shell command, or "launch campaign").
-- SQL has no cron parser: edm.jobs.next_run_at is computed in Python with the
-- cronsim library and stored (see edm_sched/jobs/schedule.py). Everything that
-- must be consistent across scheduler processes happens here:
--
--   * a due run fires exactly once: edm.job_fire() moves next_run_at on only
--     while it still equals the due time the caller read (compare-and-set), in
--     the same transaction that inserts the execution rows; a unique index on
--     (job_id, scheduled_for) of scheduled executions backs it up;
--   * executions are claimed with SKIP LOCKED, and a per-job slot counter
--     (edm.jobs.running_count) keeps max_concurrent;
--   * completion decides retries from the job's retry policy;
--   * runs whose worker vanished are recovered by edm.job_expire_runs().
--
-- Every write goes through a function of this file, so the host role and the
-- runner role need no table privilege beyond SELECT (see 0006_security).
--
-- Errors use SQLSTATE class ED (mapped by edm_sched/db.py):
--   ED010 job not found, ED011 job already running (max_concurrent reached),
--   ED012 invalid job config, ED013 lock acquisition failed, ED014 job quota
--   exceeded, ED015 execution not found; ED003 invalid transition and ED005
--   invalid argument as in 0002.
--
-- Locking order (why nothing here deadlocks): executions before jobs. A
-- transaction that holds a job row and then touches executions only inserts
-- new ones (fire, trigger, retry) and so never waits on an existing execution.
-- The claim never waits at all (SKIP LOCKED on executions and jobs); the lease
-- sweep locks the jobs it updates in id order. The host operations that wait
-- for a lock (trigger, pause, stop, delete, cancel) turn the session's
-- lock_timeout into ED013; the Python API sets one (5 s by default).
--
-- NOTIFY channels: edm_jobs (something may have become due earlier: a job
-- activated or moved earlier, a manual run, a retry, a freed slot) and
-- edm_jobs_cancel (payload: the execution id whose run must be stopped).

-- ---------------------------------------------------------------------------
-- Settings
-- ---------------------------------------------------------------------------

INSERT INTO edm.config (key, value, default_value, category, value_type, min_value, max_value, unit, description) VALUES
  ('jobs.execution_retention_days', '30', '30', 'jobs', 'integer', 1, 3650, 'days', 'Finished job executions older than this are deleted by edm.job_purge_executions() (runners call it every jobs.maintenance_interval).'),
  ('jobs.shell_enabled', 'false', 'false', 'jobs', 'boolean', NULL, NULL, NULL, 'Whether shell-command jobs may be created or edited. Runners additionally need allow_shell=True from the host to execute them.'),
  ('jobs.max_catchup_runs', '100', '100', 'jobs', 'integer', 1, 10000, 'runs', 'Most missed runs of one job replayed after downtime under the run_all misfire policy (the most recent ones).'),
  ('jobs.lease_margin', '30', '30', 'jobs', 'integer', 5, 3600, 'seconds', 'Time after a run''s timeout before its lease expires and the run counts as lost (its worker crashed).'),
  ('jobs.max_jobs_per_tenant', '1000', '1000', 'jobs', 'integer', 1, 1000000, 'jobs', 'Most jobs one tenant may own; creating more raises QUOTA_EXCEEDED.'),
  ('jobs.maintenance_interval', '300', '300', 'jobs', 'integer', 10, 86400, 'seconds', 'How often runners purge expired execution history (one runner at a time).');

-- ---------------------------------------------------------------------------
-- Helpers for CHECK constraints
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.job_tags_ok(p_tags text[])
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN cardinality(p_tags) <= 50
   AND NOT EXISTS (SELECT 1 FROM unnest(p_tags) t
                   WHERE t IS NULL OR length(t) NOT BETWEEN 1 AND 100 OR t ~ '[[:cntrl:]]');
COMMENT ON FUNCTION edm.job_tags_ok(text[]) IS
  'True when a job''s tags are at most 50 non-empty strings of at most 100 characters without control characters.';

CREATE FUNCTION edm.job_retry_on_ok(p_kinds text[])
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN cardinality(p_kinds) <= 50
   AND NOT EXISTS (
     SELECT 1 FROM unnest(p_kinds) k
     WHERE k IS NULL
        OR NOT (k IN ('timeout', 'connection', 'http_status', 'unexpected_status', 'exception',
                      'exit_status', 'lost')
                OR k ~ '^[A-Z][A-Za-z0-9_]{0,99}$'));
COMMENT ON FUNCTION edm.job_retry_on_ok(text[]) IS
  'True when every entry of a retry_on list is a retryable error kind (timeout, connection, http_status, unexpected_status, exception, exit_status, lost) or a Python exception class name.';

-- ---------------------------------------------------------------------------
-- Jobs
-- ---------------------------------------------------------------------------

CREATE TABLE edm.jobs (
  job_id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  tenant_id         text CHECK (length(tenant_id) BETWEEN 1 AND 128 AND tenant_id !~ '[[:cntrl:]]'),
  name              text NOT NULL CHECK (length(name) BETWEEN 1 AND 200 AND name !~ '[[:cntrl:]]'),
  description       text CHECK (length(description) <= 2000),
  kind              text NOT NULL CHECK (kind IN ('function', 'http', 'shell', 'launch_campaign')),
  target            jsonb NOT NULL CHECK (jsonb_typeof(target) = 'object' AND target ->> 'kind' = kind
                                          AND pg_column_size(target) <= 65536),
  cron_expr         text NOT NULL CHECK (length(cron_expr) BETWEEN 1 AND 200 AND cron_expr !~ '[[:cntrl:]]'),
  timezone          text NOT NULL DEFAULT 'UTC' CHECK (edm.is_valid_timezone(timezone)),
  start_at          timestamptz,
  end_at            timestamptz,
  max_executions    bigint CHECK (max_executions > 0),
  status            text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused', 'inactive')),
  inactive_reason   text CHECK (length(inactive_reason) <= 500),
  priority          integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -100 AND 100),
  max_concurrent    integer NOT NULL DEFAULT 1 CHECK (max_concurrent BETWEEN 1 AND 1000),
  timeout_seconds   integer NOT NULL DEFAULT 300 CHECK (timeout_seconds BETWEEN 1 AND 86400),
  max_retries       integer NOT NULL DEFAULT 0 CHECK (max_retries BETWEEN 0 AND 100),
  retry_delay_seconds double precision NOT NULL DEFAULT 60 CHECK (retry_delay_seconds BETWEEN 0 AND 86400),
  retry_backoff     double precision NOT NULL DEFAULT 2 CHECK (retry_backoff BETWEEN 1 AND 10),
  retry_max_delay_seconds double precision NOT NULL DEFAULT 3600
                    CHECK (retry_max_delay_seconds BETWEEN 0 AND 604800),
  retry_on          text[] NOT NULL
                    DEFAULT '{timeout,connection,http_status,exception,exit_status,lost}'
                    CHECK (edm.job_retry_on_ok(retry_on)),
  misfire_policy    text NOT NULL DEFAULT 'run_once' CHECK (misfire_policy IN ('run_once', 'skip', 'run_all')),
  misfire_grace_seconds integer NOT NULL DEFAULT 60 CHECK (misfire_grace_seconds BETWEEN 0 AND 86400),
  tags              text[] NOT NULL DEFAULT '{}' CHECK (edm.job_tags_ok(tags)),
  next_run_at       timestamptz,
  last_scheduled_for timestamptz,
  last_fired_at     timestamptz,
  last_finished_at  timestamptz,
  last_status       text,
  run_count         bigint NOT NULL DEFAULT 0 CHECK (run_count >= 0),
  running_count     integer NOT NULL DEFAULT 0 CHECK (running_count >= 0),
  success_count     bigint NOT NULL DEFAULT 0 CHECK (success_count >= 0),
  failure_count     bigint NOT NULL DEFAULT 0 CHECK (failure_count >= 0),
  misfire_count     bigint NOT NULL DEFAULT 0 CHECK (misfire_count >= 0),
  created_at        timestamptz NOT NULL DEFAULT now(),
  updated_at        timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT jobs_tenant_name_unique UNIQUE NULLS NOT DISTINCT (tenant_id, name),
  CONSTRAINT jobs_dates_ordered CHECK (end_at IS NULL OR start_at IS NULL OR end_at > start_at),
  CONSTRAINT jobs_active_has_next_run CHECK ((status = 'active') = (next_run_at IS NOT NULL)),
  CONSTRAINT jobs_inactive_has_reason CHECK ((status = 'inactive') = (inactive_reason IS NOT NULL))
);
COMMENT ON TABLE edm.jobs IS
  'Recurring jobs: a cron schedule in a time zone and what to run. next_run_at is computed by edm-sched in Python (cronsim) and stored; an active job always has one. Change jobs through the Python API or CLI so next_run_at is recomputed; see docs/jobs.md.';
COMMENT ON COLUMN edm.jobs.job_id IS 'Surrogate id.';
COMMENT ON COLUMN edm.jobs.tenant_id IS 'Owning tenant (the host''s user id as text), NULL for platform jobs. Limited by jobs.max_jobs_per_tenant.';
COMMENT ON COLUMN edm.jobs.name IS 'Name, unique per tenant.';
COMMENT ON COLUMN edm.jobs.description IS 'Free text for people.';
COMMENT ON COLUMN edm.jobs.kind IS 'function (host-registered Python callable), http, shell or launch_campaign.';
COMMENT ON COLUMN edm.jobs.target IS 'What to run, as JSON with a "kind" equal to the kind column: {"kind":"function","function":name,"args":{}}, an HTTP request, a shell command, or a campaign definition. Never an import path: functions are looked up in the host''s registry.';
COMMENT ON COLUMN edm.jobs.cron_expr IS 'Cron expression: 5 fields (minute hour day month weekday) or 6 with leading seconds; @hourly, @daily, @weekly, @monthly, @yearly are accepted. Validated by cronsim in Python.';
COMMENT ON COLUMN edm.jobs.timezone IS 'Time zone the cron fields are read in (IANA name); DST rules in docs/jobs.md.';
COMMENT ON COLUMN edm.jobs.start_at IS 'No run is scheduled before this instant (NULL: from creation).';
COMMENT ON COLUMN edm.jobs.end_at IS 'No run is scheduled after this instant; the job then becomes inactive.';
COMMENT ON COLUMN edm.jobs.max_executions IS 'Most scheduled occurrences fired (manual runs and retries not counted); the job then becomes inactive.';
COMMENT ON COLUMN edm.jobs.status IS 'active (fires), paused (kept, no scheduled runs, queued retries held) or inactive (stopped, ended or exhausted; see inactive_reason).';
COMMENT ON COLUMN edm.jobs.inactive_reason IS 'Why the job is inactive: stopped, end_at reached, max_executions reached, invalid schedule. NULL unless inactive.';
COMMENT ON COLUMN edm.jobs.priority IS 'Higher first when runners have fewer free slots than due executions (-100..100). Copied to executions when queued.';
COMMENT ON COLUMN edm.jobs.max_concurrent IS 'Most executions of this job running at once; a scheduled run that finds this many pending or running is recorded as skipped (JOB_ALREADY_RUNNING).';
COMMENT ON COLUMN edm.jobs.timeout_seconds IS 'Longest run; a run still going is stopped (process killed, or told to stop) and recorded as timed_out.';
COMMENT ON COLUMN edm.jobs.max_retries IS 'Retries of a failed run (0 = none).';
COMMENT ON COLUMN edm.jobs.retry_delay_seconds IS 'Delay before the first retry.';
COMMENT ON COLUMN edm.jobs.retry_backoff IS 'Multiplier of the delay for each further retry (1 = constant delay, 2 = doubling).';
COMMENT ON COLUMN edm.jobs.retry_max_delay_seconds IS 'Cap on the retry delay.';
COMMENT ON COLUMN edm.jobs.retry_on IS 'Error kinds (and Python exception class names) that are retried; config errors, permanent errors and cancellations never are.';
COMMENT ON COLUMN edm.jobs.misfire_policy IS 'What to do with occurrences missed by more than misfire_grace_seconds (downtime): run_once (one catch-up run), skip, or run_all (each missed time, up to jobs.max_catchup_runs).';
COMMENT ON COLUMN edm.jobs.misfire_grace_seconds IS 'An occurrence fired at most this late is on time, not a misfire.';
COMMENT ON COLUMN edm.jobs.tags IS 'Free labels for filtering.';
COMMENT ON COLUMN edm.jobs.next_run_at IS 'Next scheduled occurrence (UTC instant), computed in Python with cronsim; NULL unless active. Runners fire jobs with next_run_at <= now.';
COMMENT ON COLUMN edm.jobs.last_scheduled_for IS 'Latest occurrence fired.';
COMMENT ON COLUMN edm.jobs.last_fired_at IS 'When a runner last fired this job.';
COMMENT ON COLUMN edm.jobs.last_finished_at IS 'When an execution of this job last finished.';
COMMENT ON COLUMN edm.jobs.last_status IS 'Status of the latest finished execution.';
COMMENT ON COLUMN edm.jobs.run_count IS 'Scheduled occurrences fired so far (run or skipped); compared with max_executions.';
COMMENT ON COLUMN edm.jobs.running_count IS 'Executions running now: the slots of max_concurrent in use. Maintained by claim, finish, cancel and the lease sweep.';
COMMENT ON COLUMN edm.jobs.success_count IS 'Executions that succeeded, all time.';
COMMENT ON COLUMN edm.jobs.failure_count IS 'Executions that failed or timed out, all time.';
COMMENT ON COLUMN edm.jobs.misfire_count IS 'Occurrences not run because of a misfire (skip and run_once policies, run_all beyond its cap).';
COMMENT ON COLUMN edm.jobs.created_at IS 'When the job was created.';
COMMENT ON COLUMN edm.jobs.updated_at IS 'When the job''s settings or status last changed.';

CREATE INDEX jobs_due_idx ON edm.jobs (next_run_at) WHERE status = 'active';
COMMENT ON INDEX edm.jobs_due_idx IS 'Due jobs by next run: the firing scan and the runners'' wake-up time.';
CREATE INDEX jobs_tenant_idx ON edm.jobs (tenant_id, job_id);
COMMENT ON INDEX edm.jobs_tenant_idx IS 'A tenant''s jobs (listing, quota count).';
CREATE INDEX jobs_tags_idx ON edm.jobs USING gin (tags);
COMMENT ON INDEX edm.jobs_tags_idx IS 'Jobs by tag.';

CREATE FUNCTION edm.jobs_check_write()
RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
  v_max integer;
  v_n   bigint;
BEGIN
  IF NEW.kind = 'shell'
     AND (TG_OP = 'INSERT' OR OLD.kind IS DISTINCT FROM NEW.kind OR OLD.target IS DISTINCT FROM NEW.target)
     AND NOT coalesce((SELECT (c.value #>> '{}')::boolean FROM edm.config c
                       WHERE c.key = 'jobs.shell_enabled'), false) THEN
    RAISE EXCEPTION 'shell jobs are disabled: set jobs.shell_enabled to true to allow them'
      USING ERRCODE = 'ED012';
  END IF;
  IF NEW.tenant_id IS NOT NULL AND (TG_OP = 'INSERT' OR OLD.tenant_id IS DISTINCT FROM NEW.tenant_id) THEN
    -- Serialise job creation per tenant, so two concurrent creations cannot
    -- both take the tenant's last slot.
    PERFORM pg_advisory_xact_lock(hashtextextended('edm.jobs.tenant:' || NEW.tenant_id, 0));
    v_max := edm.config_int('jobs.max_jobs_per_tenant');
    SELECT count(*) INTO v_n FROM edm.jobs j WHERE j.tenant_id = NEW.tenant_id;
    IF v_n >= v_max THEN
      RAISE EXCEPTION 'tenant % already has % jobs (jobs.max_jobs_per_tenant = %)',
        NEW.tenant_id, v_n, v_max USING ERRCODE = 'ED014';
    END IF;
  END IF;
  RETURN NEW;
END;
$$;
COMMENT ON FUNCTION edm.jobs_check_write() IS
  'Trigger: refuses shell jobs unless jobs.shell_enabled (ED012), and a tenant''s job beyond jobs.max_jobs_per_tenant (ED014, serialised per tenant by an advisory lock).';

CREATE TRIGGER jobs_check_write BEFORE INSERT OR UPDATE OF kind, target, tenant_id ON edm.jobs
  FOR EACH ROW EXECUTE FUNCTION edm.jobs_check_write();

CREATE FUNCTION edm.jobs_notify()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  -- Only when the earliest due time may have moved earlier: firing moves
  -- next_run_at later and so wakes nobody.
  IF NEW.status = 'active'
     AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'active'
          OR NEW.next_run_at < OLD.next_run_at) THEN
    PERFORM pg_notify('edm_jobs', 'job:' || NEW.job_id);
  END IF;
  RETURN NULL;
END;
$$;
COMMENT ON FUNCTION edm.jobs_notify() IS
  'Trigger: NOTIFY edm_jobs when a job becomes active or its next run moves earlier, so sleeping runners recompute their wake-up time.';

CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE OF status, next_run_at ON edm.jobs
  FOR EACH ROW EXECUTE FUNCTION edm.jobs_notify();

-- ---------------------------------------------------------------------------
-- Executions
-- ---------------------------------------------------------------------------

CREATE TABLE edm.job_executions (
  execution_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  job_id            bigint NOT NULL REFERENCES edm.jobs ON DELETE CASCADE,
  tenant_id         text,
  trigger           text NOT NULL CHECK (trigger IN ('scheduled', 'manual', 'retry')),
  status            text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'timed_out',
                                      'cancelled', 'skipped')),
  priority          integer NOT NULL DEFAULT 0,
  scheduled_for     timestamptz,
  run_after         timestamptz NOT NULL,
  created_at        timestamptz NOT NULL DEFAULT now(),
  started_at        timestamptz,
  finished_at       timestamptz,
  duration_ms       bigint GENERATED ALWAYS AS
                    ((extract(epoch FROM (finished_at - started_at)) * 1000)::bigint) STORED,
  progress          real CHECK (progress BETWEEN 0 AND 100),
  progress_message  text CHECK (length(progress_message) <= 500),
  result            jsonb CHECK (pg_column_size(result) <= 65536),
  error             text CHECK (length(error) <= 4000),
  error_kind        text CHECK (length(error_kind) <= 100),
  error_type        text CHECK (length(error_type) <= 200),
  error_code        text CHECK (length(error_code) <= 100),
  error_stack       text CHECK (length(error_stack) <= 20000),
  retry_count       integer NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
  retry_of          bigint,
  worker_id         text CHECK (length(worker_id) <= 200),
  lease_expires_at  timestamptz,
  cancel_requested_at timestamptz,
  CONSTRAINT job_executions_lease_iff_running CHECK ((status = 'running') = (lease_expires_at IS NOT NULL)),
  CONSTRAINT job_executions_running_has_worker
    CHECK (status <> 'running' OR (worker_id IS NOT NULL AND started_at IS NOT NULL)),
  CONSTRAINT job_executions_finished_iff_done
    CHECK ((status IN ('succeeded', 'failed', 'timed_out', 'cancelled', 'skipped')) = (finished_at IS NOT NULL)),
  CONSTRAINT job_executions_scheduled_has_time CHECK (trigger <> 'scheduled' OR scheduled_for IS NOT NULL)
);
COMMENT ON TABLE edm.job_executions IS
  'Execution history of jobs: one row per scheduled occurrence (run or skipped), manual run and retry. Pending rows are the queue runners claim from; finished rows are kept jobs.execution_retention_days.';
COMMENT ON COLUMN edm.job_executions.execution_id IS 'Surrogate id.';
COMMENT ON COLUMN edm.job_executions.job_id IS 'The job.';
COMMENT ON COLUMN edm.job_executions.tenant_id IS 'Tenant of the job when the execution was created (for per-tenant history and stats).';
COMMENT ON COLUMN edm.job_executions.trigger IS 'scheduled (a cron occurrence), manual (trigger now) or retry (of a failed execution).';
COMMENT ON COLUMN edm.job_executions.status IS 'pending, running, succeeded, failed, timed_out, cancelled or skipped (not run: misfire or max_concurrent; see error_code).';
COMMENT ON COLUMN edm.job_executions.priority IS 'The job''s priority when the execution was queued; the claim takes higher first.';
COMMENT ON COLUMN edm.job_executions.scheduled_for IS 'The cron occurrence this execution stands for (kept by retries); NULL for manual runs. Unique per job among scheduled executions.';
COMMENT ON COLUMN edm.job_executions.run_after IS 'Not claimed before this time: the occurrence, or now + back-off for a retry.';
COMMENT ON COLUMN edm.job_executions.created_at IS 'When the execution was queued (fired).';
COMMENT ON COLUMN edm.job_executions.started_at IS 'When a runner claimed it; started_at - scheduled_for is the firing delay.';
COMMENT ON COLUMN edm.job_executions.finished_at IS 'When it reached a final status.';
COMMENT ON COLUMN edm.job_executions.duration_ms IS 'Generated: finished_at - started_at in milliseconds.';
COMMENT ON COLUMN edm.job_executions.progress IS 'Progress reported by the running function, 0 to 100 (100 on success).';
COMMENT ON COLUMN edm.job_executions.progress_message IS 'Latest progress message.';
COMMENT ON COLUMN edm.job_executions.result IS 'JSON result: the function''s return value, the HTTP status and body head, the exit code and output tails, the created task id.';
COMMENT ON COLUMN edm.job_executions.error IS 'Error message of a failed, timed-out, cancelled or skipped execution.';
COMMENT ON COLUMN edm.job_executions.error_kind IS 'timeout, connection, http_status, unexpected_status, exception, exit_status, lost, config, permanent or cancelled; matched against the job''s retry_on.';
COMMENT ON COLUMN edm.job_executions.error_type IS 'Python exception class name, when an exception was raised.';
COMMENT ON COLUMN edm.job_executions.error_code IS 'Stable code of a skip or failure (JOB_ALREADY_RUNNING, MISFIRE, ...).';
COMMENT ON COLUMN edm.job_executions.error_stack IS 'Stack trace of the exception, if any.';
COMMENT ON COLUMN edm.job_executions.retry_count IS 'Retries before this execution (0 for the first attempt).';
COMMENT ON COLUMN edm.job_executions.retry_of IS 'Execution this one retries. No foreign key: history is purged by age.';
COMMENT ON COLUMN edm.job_executions.worker_id IS 'Runner that claimed (or fired) it.';
COMMENT ON COLUMN edm.job_executions.lease_expires_at IS 'While running: started_at + timeout + jobs.lease_margin; afterwards the lease sweep records the run as lost (timed_out) and retries it per policy.';
COMMENT ON COLUMN edm.job_executions.cancel_requested_at IS 'When a cancel of the running execution was requested.';

CREATE INDEX job_executions_claim_idx ON edm.job_executions (priority DESC, run_after, execution_id)
  WHERE status = 'pending';
COMMENT ON INDEX edm.job_executions_claim_idx IS 'The claim: pending executions, highest priority and earliest first.';
CREATE INDEX job_executions_active_idx ON edm.job_executions (job_id) WHERE status IN ('pending', 'running');
COMMENT ON INDEX edm.job_executions_active_idx IS 'A job''s pending and running executions (max_concurrent checks, stop, cancel).';
CREATE INDEX job_executions_lease_idx ON edm.job_executions (lease_expires_at) WHERE status = 'running';
COMMENT ON INDEX edm.job_executions_lease_idx IS 'The lease sweep: running executions by lease expiry.';
CREATE INDEX job_executions_job_idx ON edm.job_executions (job_id, execution_id DESC);
COMMENT ON INDEX edm.job_executions_job_idx IS 'History of one job, newest first (also serves the cascade on job deletion).';
CREATE INDEX job_executions_finished_idx ON edm.job_executions (finished_at) WHERE finished_at IS NOT NULL;
COMMENT ON INDEX edm.job_executions_finished_idx IS 'Retention purge and stats windows.';
CREATE UNIQUE INDEX job_executions_scheduled_once_idx ON edm.job_executions (job_id, scheduled_for)
  WHERE trigger = 'scheduled';
COMMENT ON INDEX edm.job_executions_scheduled_once_idx IS 'Exactly once: at most one scheduled execution per job and occurrence, whatever the number of runners.';
CREATE UNIQUE INDEX job_executions_retry_once_idx ON edm.job_executions (retry_of) WHERE retry_of IS NOT NULL;
COMMENT ON INDEX edm.job_executions_retry_once_idx IS 'At most one retry per failed execution.';

-- ---------------------------------------------------------------------------
-- Firing: a due occurrence becomes executions, exactly once
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.job_due(p_limit integer DEFAULT 32, p_now timestamptz DEFAULT NULL)
RETURNS TABLE (job_id bigint, cron_expr text, timezone text, next_run_at timestamptz,
               end_at timestamptz, max_executions bigint, run_count bigint, misfire_policy text,
               misfire_grace_seconds integer, fire_now timestamptz)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
BEGIN
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
    RAISE EXCEPTION 'job_due: limit must be between 1 and 1000, got %', p_limit
      USING ERRCODE = 'ED005';
  END IF;
  -- The row locks last until the caller's transaction ends: the caller plans
  -- each job with cronsim and calls edm.job_fire in the same transaction.
  -- SKIP LOCKED: a job another runner is firing (or a host is editing) is
  -- left to them.
  RETURN QUERY
  SELECT j.job_id, j.cron_expr, j.timezone, j.next_run_at, j.end_at, j.max_executions,
         j.run_count, j.misfire_policy, j.misfire_grace_seconds, coalesce(p_now, now())
  FROM edm.jobs j
  WHERE j.status = 'active' AND j.next_run_at <= coalesce(p_now, now())
  ORDER BY j.next_run_at
  LIMIT p_limit
  FOR NO KEY UPDATE OF j SKIP LOCKED;
END;
$$;
COMMENT ON FUNCTION edm.job_due(integer, timestamptz) IS
  'Locks (until the end of the caller''s transaction, SKIP LOCKED) and returns up to p_limit active jobs whose next run has come, earliest first, with what the caller needs to plan the firing with cronsim, and the time it must plan for (fire_now).';

CREATE FUNCTION edm.job_set_next_run(p_job_id bigint, p_due timestamptz, p_next_run_at timestamptz,
                                     p_reason text DEFAULT NULL)
RETURNS boolean
LANGUAGE sql
AS $$
  WITH upd AS (
    UPDATE edm.jobs j
    SET next_run_at = p_next_run_at,
        status = CASE WHEN p_next_run_at IS NULL THEN 'inactive' ELSE 'active' END,
        inactive_reason = CASE WHEN p_next_run_at IS NULL
                               THEN left(coalesce(p_reason, 'deactivated by a runner'), 500) END,
        updated_at = now()
    WHERE j.job_id = p_job_id AND j.status = 'active' AND j.next_run_at = p_due
    RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM upd);
$$;
COMMENT ON FUNCTION edm.job_set_next_run(bigint, timestamptz, timestamptz, text) IS
  'Moves the next run of an active job from p_due to p_next_run_at without firing (compare-and-set, like edm.job_fire); NULL deactivates the job with p_reason. Runners use it for a job whose stored schedule can no longer be computed. Returns whether the job was changed.';

CREATE FUNCTION edm.job_fire(
  p_job_id bigint,
  p_due timestamptz,
  p_run_times timestamptz[],
  p_next timestamptz,
  p_end_reason text DEFAULT NULL,
  p_queue_all boolean DEFAULT false,
  p_missed integer DEFAULT 0,
  p_missed_first timestamptz DEFAULT NULL,
  p_missed_last timestamptz DEFAULT NULL,
  p_worker text DEFAULT NULL,
  p_now timestamptz DEFAULT NULL)
RETURNS TABLE (execution_id bigint, scheduled_for timestamptz, status text)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  v_now     timestamptz := coalesce(p_now, now());
  v_runs    timestamptz[] := coalesce(p_run_times, '{}');
  v_last    timestamptz;
  v_job     record;
  v_active  integer;
  v_pending integer := 0;
  v_t       timestamptz;
BEGIN
  IF p_job_id IS NULL OR p_due IS NULL THEN
    RAISE EXCEPTION 'job_fire: job id and due time are required' USING ERRCODE = 'ED005';
  END IF;
  IF cardinality(v_runs) > 10000
     OR array_position(v_runs, NULL) IS NOT NULL
     OR EXISTS (SELECT 1 FROM unnest(v_runs) WITH ORDINALITY a(t, i)
                JOIN unnest(v_runs) WITH ORDINALITY b(t, i) ON b.i = a.i + 1
                WHERE b.t <= a.t)
     OR (cardinality(v_runs) > 0 AND (v_runs[1] < p_due OR v_runs[cardinality(v_runs)] > v_now)) THEN
    RAISE EXCEPTION 'job_fire: run times must be at most 10000 increasing occurrences between the due time and now'
      USING ERRCODE = 'ED005';
  END IF;
  v_last := v_runs[cardinality(v_runs)];
  IF p_next IS NOT NULL AND p_next <= greatest(v_last, p_due) THEN
    RAISE EXCEPTION 'job_fire: the next run (%) must come after the runs fired', p_next
      USING ERRCODE = 'ED005';
  END IF;
  IF p_next IS NULL AND p_end_reason IS NULL THEN
    RAISE EXCEPTION 'job_fire: a job without a next run needs an end reason' USING ERRCODE = 'ED005';
  END IF;
  IF coalesce(p_missed, 0) < 0 OR (p_missed > 0 AND p_missed_first IS NULL) THEN
    RAISE EXCEPTION 'job_fire: missed runs need a count >= 0 and a first missed time'
      USING ERRCODE = 'ED005';
  END IF;

  -- The compare-and-set that makes firing exactly-once: only the transaction
  -- that still sees next_run_at = the due time it read moves it on. Another
  -- runner that read the same due time waits for our row lock, re-checks the
  -- WHERE on the new row version, matches nothing and returns no rows.
  UPDATE edm.jobs j
  SET next_run_at = p_next,
      status = CASE WHEN p_next IS NULL THEN 'inactive' ELSE j.status END,
      inactive_reason = CASE WHEN p_next IS NULL THEN left(p_end_reason, 500) END,
      run_count = j.run_count + cardinality(v_runs),
      misfire_count = j.misfire_count + coalesce(p_missed, 0),
      last_scheduled_for = coalesce(v_last, j.last_scheduled_for),
      last_fired_at = v_now
  WHERE j.job_id = p_job_id AND j.status = 'active' AND j.next_run_at = p_due
  RETURNING j.job_id, j.tenant_id, j.priority, j.max_concurrent, j.max_executions, j.run_count,
            j.misfire_policy, j.misfire_grace_seconds
  INTO v_job;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF v_job.max_executions IS NOT NULL AND v_job.run_count > v_job.max_executions THEN
    RAISE EXCEPTION 'job_fire: job % would exceed max_executions (%)', p_job_id, v_job.max_executions
      USING ERRCODE = 'ED005';
  END IF;

  IF p_missed > 0 THEN
    RETURN QUERY
    INSERT INTO edm.job_executions AS e (job_id, tenant_id, trigger, status, priority, scheduled_for,
                                         run_after, created_at, finished_at, error, error_code, worker_id)
    VALUES (p_job_id, v_job.tenant_id, 'scheduled', 'skipped', v_job.priority, p_missed_first, v_now,
            v_now, v_now,
            format('%s occurrence(s) from %s to %s missed by more than %s s (misfire policy %s)',
                   p_missed, p_missed_first, coalesce(p_missed_last, p_missed_first),
                   v_job.misfire_grace_seconds, v_job.misfire_policy),
            'MISFIRE', p_worker)
    RETURNING e.execution_id, e.scheduled_for, e.status;
  END IF;

  SELECT count(*) INTO v_active FROM edm.job_executions e
  WHERE e.job_id = p_job_id AND e.status IN ('pending', 'running');

  FOREACH v_t IN ARRAY v_runs LOOP
    IF p_queue_all OR v_active < v_job.max_concurrent THEN
      RETURN QUERY
      INSERT INTO edm.job_executions AS e (job_id, tenant_id, trigger, status, priority, scheduled_for,
                                           run_after, created_at, worker_id)
      VALUES (p_job_id, v_job.tenant_id, 'scheduled', 'pending', v_job.priority, v_t, v_t, v_now, p_worker)
      RETURNING e.execution_id, e.scheduled_for, e.status;
      v_active := v_active + 1;
      v_pending := v_pending + 1;
    ELSE
      RETURN QUERY
      INSERT INTO edm.job_executions AS e (job_id, tenant_id, trigger, status, priority, scheduled_for,
                                           run_after, created_at, finished_at, error, error_code,
                                           worker_id)
      VALUES (p_job_id, v_job.tenant_id, 'scheduled', 'skipped', v_job.priority, v_t, v_t, v_now, v_now,
              format('not run: %s execution(s) already pending or running (max_concurrent %s)',
                     v_active, v_job.max_concurrent),
              'JOB_ALREADY_RUNNING', p_worker)
      RETURNING e.execution_id, e.scheduled_for, e.status;
    END IF;
  END LOOP;
  -- The firing runner claims right away; tell the others only when there is
  -- more than one run to share.
  IF v_pending > 1 THEN
    PERFORM pg_notify('edm_jobs', 'pending:' || p_job_id);
  END IF;
END;
$$;
COMMENT ON FUNCTION edm.job_fire(bigint, timestamptz, timestamptz[], timestamptz, text, boolean, integer, timestamptz, timestamptz, text, timestamptz) IS
  'Fires a due job exactly once: if next_run_at still equals p_due (compare-and-set), moves it to p_next (computed by the caller with cronsim; NULL ends the job with p_end_reason) and queues one pending execution per occurrence in p_run_times, or records it as skipped (JOB_ALREADY_RUNNING) when max_concurrent executions are already pending or running, unless p_queue_all (run_all catch-up). p_missed occurrences not run are recorded as one skipped MISFIRE row. Returns the rows created; none when another runner fired first.';

-- ---------------------------------------------------------------------------
-- Claiming executions
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.job_claim(p_worker text, p_limit integer DEFAULT 1, p_now timestamptz DEFAULT NULL)
RETURNS TABLE (
  execution_id bigint, job_id bigint, tenant_id text, job_name text, kind text, target jsonb,
  trigger text, scheduled_for timestamptz, retry_count integer, timeout_seconds integer,
  started_at timestamptz, lease_expires_at timestamptz)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  v_now    timestamptz := coalesce(p_now, now());
  v_margin interval := make_interval(secs => edm.config_int('jobs.lease_margin'));
  v_c      record;
  v_n      integer := 0;
  v_full   bigint[] := '{}';
BEGIN
  IF p_worker IS NULL OR length(p_worker) NOT BETWEEN 1 AND 200 THEN
    RAISE EXCEPTION 'job_claim: worker id must be 1 to 200 characters' USING ERRCODE = 'ED005';
  END IF;
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
    RAISE EXCEPTION 'job_claim: limit must be between 1 and 1000, got %', p_limit USING ERRCODE = 'ED005';
  END IF;

  -- Pending executions that are due, best first, whose job has a free slot as
  -- far as this snapshot knows. SKIP LOCKED: a row another runner is claiming
  -- is theirs. The LIMIT bounds the rows locked by one call.
  FOR v_c IN
    SELECT e.execution_id, e.job_id, e.trigger
    FROM edm.job_executions e
    JOIN edm.jobs j ON j.job_id = e.job_id
    WHERE e.status = 'pending' AND e.run_after <= v_now
      AND j.running_count < j.max_concurrent
      AND (j.status <> 'paused' OR e.trigger = 'manual')
    ORDER BY e.priority DESC, e.run_after, e.execution_id
    LIMIT p_limit * 4 + 16
    FOR UPDATE OF e SKIP LOCKED
  LOOP
    CONTINUE WHEN v_c.job_id = ANY (v_full);
    -- Take one of the job's max_concurrent slots. The job row is locked with
    -- SKIP LOCKED so the claim never waits (a job being fired or edited right
    -- now is tried again on the next call); holding the lock, the slot check
    -- reads the latest running_count, so two claimers never share a slot.
    PERFORM 1 FROM edm.jobs j WHERE j.job_id = v_c.job_id FOR NO KEY UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
      v_full := v_full || v_c.job_id;
      CONTINUE;
    END IF;
    UPDATE edm.jobs j SET running_count = j.running_count + 1
    WHERE j.job_id = v_c.job_id AND j.running_count < j.max_concurrent
      AND (j.status <> 'paused' OR v_c.trigger = 'manual');
    IF NOT FOUND THEN
      v_full := v_full || v_c.job_id;
      CONTINUE;
    END IF;

    RETURN QUERY
    UPDATE edm.job_executions e
    SET status = 'running', worker_id = p_worker, started_at = v_now,
        lease_expires_at = v_now + make_interval(secs => j.timeout_seconds) + v_margin
    FROM edm.jobs j
    WHERE e.execution_id = v_c.execution_id AND j.job_id = e.job_id
    RETURNING e.execution_id, e.job_id, e.tenant_id, j.name, j.kind, j.target, e.trigger,
              e.scheduled_for, e.retry_count, j.timeout_seconds, e.started_at, e.lease_expires_at;
    v_n := v_n + 1;
    EXIT WHEN v_n >= p_limit;
  END LOOP;
END;
$$;
COMMENT ON FUNCTION edm.job_claim(text, integer, timestamptz) IS
  'Claims up to p_limit due pending executions for runner p_worker, highest priority and earliest first, taking one of their job''s max_concurrent slots each; marks them running with a lease of timeout + jobs.lease_margin. Skips executions of paused jobs (except manual runs). Never waits on a lock.';

-- ---------------------------------------------------------------------------
-- Retries, completion, cancellation, lost runs
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.job_retry_delay(p_delay double precision, p_backoff double precision,
                                    p_max_delay double precision, p_retry_count integer)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN least(p_max_delay, p_delay * power(p_backoff, least(p_retry_count, 1000)));
COMMENT ON FUNCTION edm.job_retry_delay(double precision, double precision, double precision, integer) IS
  'Seconds before retry number p_retry_count + 1: p_delay * p_backoff ^ p_retry_count, capped at p_max_delay.';

CREATE FUNCTION edm.job_schedule_retry(p_execution_id bigint, p_now timestamptz DEFAULT NULL)
RETURNS TABLE (execution_id bigint, run_after timestamptz)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_e   record;
  v_at  timestamptz;
BEGIN
  SELECT e.execution_id, e.job_id, e.tenant_id, e.status, e.retry_count, e.scheduled_for,
         e.error_kind, e.error_type, j.status AS job_status, j.priority, j.max_retries,
         j.retry_delay_seconds, j.retry_backoff, j.retry_max_delay_seconds, j.retry_on
  INTO v_e
  FROM edm.job_executions e JOIN edm.jobs j ON j.job_id = e.job_id
  WHERE e.execution_id = p_execution_id;
  IF NOT FOUND
     OR v_e.status NOT IN ('failed', 'timed_out')
     OR v_e.job_status = 'inactive'
     OR v_e.retry_count >= v_e.max_retries
     OR coalesce(v_e.error_kind, 'exception') IN ('config', 'permanent', 'cancelled')
     OR NOT (coalesce(v_e.error_kind, 'exception') = ANY (v_e.retry_on)
             OR coalesce(v_e.error_type = ANY (v_e.retry_on), false)) THEN
    RETURN;
  END IF;
  v_at := v_now + make_interval(secs => edm.job_retry_delay(
            v_e.retry_delay_seconds, v_e.retry_backoff, v_e.retry_max_delay_seconds, v_e.retry_count));
  RETURN QUERY
  INSERT INTO edm.job_executions AS e (job_id, tenant_id, trigger, status, priority, scheduled_for,
                                       run_after, created_at, retry_count, retry_of)
  VALUES (v_e.job_id, v_e.tenant_id, 'retry', 'pending', v_e.priority, v_e.scheduled_for, v_at, v_now,
          v_e.retry_count + 1, v_e.execution_id)
  ON CONFLICT (retry_of) WHERE retry_of IS NOT NULL DO NOTHING
  RETURNING e.execution_id, e.run_after;
  PERFORM pg_notify('edm_jobs', 'retry:' || v_e.job_id);
END;
$$;
COMMENT ON FUNCTION edm.job_schedule_retry(bigint, timestamptz) IS
  'Queues the retry of a failed or timed-out execution when its job''s policy allows it: retries left, error kind (or exception class) in retry_on, not a config, permanent or cancelled error, job not inactive. The retry runs after edm.job_retry_delay(). At most one retry per execution.';

CREATE FUNCTION edm.job_finish(
  p_execution_id bigint,
  p_worker text,
  p_status text,
  p_result jsonb DEFAULT NULL,
  p_error text DEFAULT NULL,
  p_error_kind text DEFAULT NULL,
  p_error_type text DEFAULT NULL,
  p_error_stack text DEFAULT NULL,
  p_now timestamptz DEFAULT NULL)
RETURNS TABLE (accepted boolean, retry_execution_id bigint, retry_at timestamptz)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  v_now  timestamptz := coalesce(p_now, now());
  v_e    record;
  v_job  record;
  v_retry record;
BEGIN
  IF p_status IS NULL OR p_status NOT IN ('succeeded', 'failed', 'timed_out') THEN
    RAISE EXCEPTION 'job_finish: status must be succeeded, failed or timed_out' USING ERRCODE = 'ED005';
  END IF;
  -- Lock order: the execution, then its job.
  SELECT e.execution_id, e.job_id, e.status, e.worker_id INTO v_e
  FROM edm.job_executions e WHERE e.execution_id = p_execution_id
  FOR NO KEY UPDATE;
  IF NOT FOUND OR v_e.status <> 'running' OR v_e.worker_id IS DISTINCT FROM p_worker THEN
    -- Cancelled, recovered by the lease sweep, or deleted meanwhile: the
    -- outcome is not recorded and nothing is retried.
    RETURN QUERY SELECT false, NULL::bigint, NULL::timestamptz;
    RETURN;
  END IF;

  UPDATE edm.job_executions e
  SET status = p_status, finished_at = v_now, lease_expires_at = NULL,
      result = p_result,
      error = left(p_error, 4000), error_kind = left(p_error_kind, 100),
      error_type = left(p_error_type, 200), error_stack = left(p_error_stack, 20000),
      progress = CASE WHEN p_status = 'succeeded' THEN 100 ELSE e.progress END
  WHERE e.execution_id = p_execution_id;

  UPDATE edm.jobs j
  SET running_count = greatest(j.running_count - 1, 0),
      last_finished_at = v_now, last_status = p_status,
      success_count = j.success_count + (p_status = 'succeeded')::integer,
      failure_count = j.failure_count + (p_status <> 'succeeded')::integer
  WHERE j.job_id = v_e.job_id
  RETURNING j.job_id, j.running_count, j.max_concurrent INTO v_job;

  SELECT r.execution_id, r.run_after INTO v_retry FROM edm.job_schedule_retry(p_execution_id, v_now) r;

  -- A slot was freed on a job whose executions may be waiting for one.
  IF v_job.running_count + 1 >= v_job.max_concurrent
     AND EXISTS (SELECT 1 FROM edm.job_executions e
                 WHERE e.job_id = v_e.job_id AND e.status = 'pending') THEN
    PERFORM pg_notify('edm_jobs', 'slot:' || v_e.job_id);
  END IF;
  RETURN QUERY SELECT true, v_retry.execution_id, v_retry.run_after;
END;
$$;
COMMENT ON FUNCTION edm.job_finish(bigint, text, text, jsonb, text, text, text, text, timestamptz) IS
  'Records the outcome of a running execution held by p_worker (succeeded, failed or timed_out), frees its max_concurrent slot, updates the job''s counters and queues a retry per the job''s policy. Returns accepted = false (and changes nothing) when the execution is no longer this worker''s running one (cancelled, lost, deleted).';

CREATE FUNCTION edm.job_finish(
  p_worker text,
  p_execution_ids bigint[],
  p_statuses text[],
  p_results jsonb DEFAULT NULL,
  p_errors text[] DEFAULT NULL,
  p_error_kinds text[] DEFAULT NULL,
  p_error_types text[] DEFAULT NULL,
  p_error_stacks text[] DEFAULT NULL,
  p_now timestamptz DEFAULT NULL)
RETURNS TABLE (execution_id bigint, accepted boolean, retry_execution_id bigint, retry_at timestamptz)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  v_n integer := coalesce(cardinality(p_execution_ids), 0);
  v_i integer;
BEGIN
  IF v_n = 0 THEN
    RETURN;
  END IF;
  IF v_n > 1000
     OR cardinality(p_statuses) IS DISTINCT FROM v_n
     OR (p_results IS NOT NULL AND (jsonb_typeof(p_results) <> 'array'
                                    OR jsonb_array_length(p_results) <> v_n))
     OR (p_errors IS NOT NULL AND cardinality(p_errors) <> v_n)
     OR (p_error_kinds IS NOT NULL AND cardinality(p_error_kinds) <> v_n)
     OR (p_error_types IS NOT NULL AND cardinality(p_error_types) <> v_n)
     OR (p_error_stacks IS NOT NULL AND cardinality(p_error_stacks) <> v_n)
     OR (SELECT count(DISTINCT i) FROM unnest(p_execution_ids) i) <> v_n THEN
    RAISE EXCEPTION 'job_finish: at most 1000 distinct executions, and one entry per execution in every array'
      USING ERRCODE = 'ED005';
  END IF;
  -- Lock order: every execution (id order), then every job (id order), before
  -- changing anything. Holding all the executions first means no job row is
  -- held while waiting for an execution, so this cannot deadlock with the
  -- lease sweep, a cancel or a stop, which lock executions before jobs.
  PERFORM 1 FROM edm.job_executions e WHERE e.execution_id = ANY (p_execution_ids)
  ORDER BY e.execution_id FOR NO KEY UPDATE;
  PERFORM 1 FROM edm.jobs j
  WHERE j.job_id IN (SELECT e.job_id FROM edm.job_executions e
                     WHERE e.execution_id = ANY (p_execution_ids))
  ORDER BY j.job_id FOR NO KEY UPDATE;
  FOR v_i IN 1..v_n LOOP
    RETURN QUERY
    SELECT p_execution_ids[v_i], f.accepted, f.retry_execution_id, f.retry_at
    FROM edm.job_finish(p_execution_ids[v_i], p_worker, p_statuses[v_i],
                        CASE WHEN p_results IS NULL OR p_results -> (v_i - 1) = 'null'::jsonb
                             THEN NULL ELSE p_results -> (v_i - 1) END,
                        p_errors[v_i], p_error_kinds[v_i], p_error_types[v_i], p_error_stacks[v_i],
                        p_now) f;
  END LOOP;
END;
$$;
COMMENT ON FUNCTION edm.job_finish(text, bigint[], text[], jsonb, text[], text[], text[], text[], timestamptz) IS
  'edm.job_finish for a batch of executions held by one runner, in one transaction (one commit): element i of each array (and of the JSON array p_results) belongs to p_execution_ids[i]. Locks all executions, then all jobs, each in id order, so it cannot deadlock with the lease sweep or host operations.';

CREATE FUNCTION edm.job_progress(p_execution_id bigint, p_worker text, p_progress real,
                                 p_message text DEFAULT NULL)
RETURNS boolean
LANGUAGE sql
AS $$
  WITH upd AS (
    UPDATE edm.job_executions e
    SET progress = greatest(0, least(100, p_progress)),
        progress_message = coalesce(left(p_message, 500), e.progress_message)
    WHERE e.execution_id = p_execution_id AND e.status = 'running' AND e.worker_id = p_worker
    RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM upd);
$$;
COMMENT ON FUNCTION edm.job_progress(bigint, text, real, text) IS
  'Records the progress (0-100) and message of a running execution held by p_worker. Returns false when it is no longer running for that worker (cancelled or lost): the function should stop.';

CREATE FUNCTION edm.job_cancel_execution(p_execution_id bigint, p_tenant_id text DEFAULT NULL,
                                         p_now timestamptz DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_e   record;
BEGIN
  BEGIN
    SELECT e.execution_id, e.job_id, e.status, e.tenant_id INTO v_e
    FROM edm.job_executions e WHERE e.execution_id = p_execution_id
    FOR NO KEY UPDATE;
  EXCEPTION WHEN lock_not_available THEN
    RAISE EXCEPTION 'execution % is locked by another session', p_execution_id USING ERRCODE = 'ED013';
  END;
  IF NOT FOUND OR (p_tenant_id IS NOT NULL AND v_e.tenant_id IS DISTINCT FROM p_tenant_id) THEN
    RAISE EXCEPTION 'execution % not found', p_execution_id USING ERRCODE = 'ED015';
  END IF;
  IF v_e.status NOT IN ('pending', 'running') THEN
    RAISE EXCEPTION 'execution % is already %', p_execution_id, v_e.status USING ERRCODE = 'ED003';
  END IF;
  UPDATE edm.job_executions e
  SET status = 'cancelled', finished_at = v_now, lease_expires_at = NULL,
      cancel_requested_at = v_now, error = 'cancelled', error_kind = 'cancelled',
      error_code = 'CANCELLED'
  WHERE e.execution_id = p_execution_id;
  IF v_e.status = 'running' THEN
    UPDATE edm.jobs j SET running_count = greatest(j.running_count - 1, 0),
                          last_finished_at = v_now, last_status = 'cancelled'
    WHERE j.job_id = v_e.job_id;
    PERFORM pg_notify('edm_jobs_cancel', p_execution_id::text);
    PERFORM pg_notify('edm_jobs', 'slot:' || v_e.job_id);
  END IF;
  RETURN v_e.status;
END;
$$;
COMMENT ON FUNCTION edm.job_cancel_execution(bigint, text, timestamptz) IS
  'Cancels a pending or running execution (of tenant p_tenant_id when given) at once: it is recorded as cancelled, its slot is freed, and the runner holding it is told (NOTIFY edm_jobs_cancel) to kill the process or signal the function. Returns the status it had. ED015 unknown execution, ED003 already finished.';

CREATE FUNCTION edm.job_expire_runs(p_now timestamptz DEFAULT NULL, p_limit integer DEFAULT 1000)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_ids bigint[];
  v_id  bigint;
BEGIN
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 100000 THEN
    RAISE EXCEPTION 'job_expire_runs: limit must be between 1 and 100000' USING ERRCODE = 'ED005';
  END IF;
  -- Executions first (one being finished right now is skipped: its finish
  -- wins), then their jobs in id order.
  SELECT array_agg(x.execution_id) INTO v_ids FROM (
    SELECT e.execution_id FROM edm.job_executions e
    WHERE e.status = 'running' AND e.lease_expires_at <= v_now
    ORDER BY e.execution_id
    LIMIT p_limit
    FOR NO KEY UPDATE SKIP LOCKED) x;
  IF v_ids IS NULL THEN
    RETURN 0;
  END IF;
  PERFORM 1 FROM edm.jobs j
  WHERE j.job_id IN (SELECT e.job_id FROM edm.job_executions e WHERE e.execution_id = ANY (v_ids))
  ORDER BY j.job_id FOR NO KEY UPDATE;

  UPDATE edm.jobs j
  SET running_count = greatest(j.running_count - a.n, 0),
      failure_count = j.failure_count + a.n,
      last_finished_at = v_now, last_status = 'timed_out'
  FROM (SELECT e.job_id, count(*)::integer AS n FROM edm.job_executions e
        WHERE e.execution_id = ANY (v_ids) GROUP BY e.job_id) a
  WHERE j.job_id = a.job_id;

  UPDATE edm.job_executions e
  SET status = 'timed_out', finished_at = v_now,
      error = format('lease expired at %s: worker %s stopped reporting (crashed or hung)',
                     e.lease_expires_at, e.worker_id),
      error_kind = 'lost', error_code = 'LEASE_EXPIRED', lease_expires_at = NULL
  WHERE e.execution_id = ANY (v_ids);

  FOREACH v_id IN ARRAY v_ids LOOP
    PERFORM edm.job_schedule_retry(v_id, v_now);
  END LOOP;
  RETURN cardinality(v_ids);
END;
$$;
COMMENT ON FUNCTION edm.job_expire_runs(timestamptz, integer) IS
  'The lease sweep of jobs: running executions whose lease expired (their runner crashed or hung past timeout + jobs.lease_margin) become timed_out with error kind lost, free their slot and are retried per policy. Returns how many it handled.';

-- ---------------------------------------------------------------------------
-- Host operations that need no schedule computation
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.job_create(p_job jsonb, p_next_run_at timestamptz,
                               p_now timestamptz DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_id  bigint;
BEGIN
  IF p_job IS NULL OR jsonb_typeof(p_job) <> 'object' THEN
    RAISE EXCEPTION 'job_create: the job must be a JSON object' USING ERRCODE = 'ED012';
  END IF;
  -- Every setting comes from p_job (keys named like the columns); the
  -- column defaults apply to the keys left out.
  INSERT INTO edm.jobs (tenant_id, name, description, kind, target, cron_expr, timezone, start_at,
                        end_at, max_executions, status, priority, max_concurrent, timeout_seconds,
                        max_retries, retry_delay_seconds, retry_backoff, retry_max_delay_seconds,
                        retry_on, misfire_policy, misfire_grace_seconds, tags, next_run_at,
                        created_at, updated_at)
  SELECT r.tenant_id, r.name, r.description, r.kind, r.target, r.cron_expr,
         coalesce(r.timezone, 'UTC'), r.start_at, r.end_at, r.max_executions,
         coalesce(r.status, 'active'), coalesce(r.priority, 0), coalesce(r.max_concurrent, 1),
         coalesce(r.timeout_seconds, 300), coalesce(r.max_retries, 0),
         coalesce(r.retry_delay_seconds, 60), coalesce(r.retry_backoff, 2),
         coalesce(r.retry_max_delay_seconds, 3600),
         coalesce(r.retry_on, '{timeout,connection,http_status,exception,exit_status,lost}'),
         coalesce(r.misfire_policy, 'run_once'), coalesce(r.misfire_grace_seconds, 60),
         coalesce(r.tags, '{}'), p_next_run_at, v_now, v_now
  FROM jsonb_populate_record(NULL::edm.jobs, p_job) r
  RETURNING job_id INTO v_id;
  RETURN v_id;
END;
$$;
COMMENT ON FUNCTION edm.job_create(jsonb, timestamptz, timestamptz) IS
  'Creates a job from p_job (a JSON object whose keys are column names of edm.jobs) with its first run p_next_run_at, computed by the caller with cronsim (NULL for a paused job). The CHECK constraints and the jobs_check_write trigger validate it (ED012 shell disabled, ED014 tenant quota). Returns the job id.';

CREATE FUNCTION edm.job_update(p_job_id bigint, p_job jsonb, p_reschedule boolean,
                               p_next_run_at timestamptz, p_expected_updated_at timestamptz,
                               p_tenant_id text DEFAULT NULL, p_now timestamptz DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_job record;
BEGIN
  IF p_job IS NULL OR jsonb_typeof(p_job) <> 'object' THEN
    RAISE EXCEPTION 'job_update: the job must be a JSON object' USING ERRCODE = 'ED012';
  END IF;
  BEGIN
    SELECT j.status, j.updated_at, j.run_count INTO v_job FROM edm.jobs j
    WHERE j.job_id = p_job_id AND (p_tenant_id IS NULL OR j.tenant_id = p_tenant_id)
    FOR NO KEY UPDATE;
  EXCEPTION WHEN lock_not_available THEN
    RAISE EXCEPTION 'job % is locked by another session', p_job_id USING ERRCODE = 'ED013';
  END;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'job % not found', p_job_id USING ERRCODE = 'ED010';
  END IF;
  IF v_job.updated_at IS DISTINCT FROM p_expected_updated_at THEN
    RETURN false;  -- changed since the caller read it: read again and retry
  END IF;
  UPDATE edm.jobs j
  SET name = r.name, description = r.description, kind = r.kind, target = r.target,
      cron_expr = r.cron_expr, timezone = r.timezone, start_at = r.start_at, end_at = r.end_at,
      max_executions = r.max_executions, priority = r.priority,
      max_concurrent = r.max_concurrent, timeout_seconds = r.timeout_seconds,
      max_retries = r.max_retries, retry_delay_seconds = r.retry_delay_seconds,
      retry_backoff = r.retry_backoff, retry_max_delay_seconds = r.retry_max_delay_seconds,
      retry_on = r.retry_on, misfire_policy = r.misfire_policy,
      misfire_grace_seconds = r.misfire_grace_seconds, tags = r.tags,
      status = CASE
        WHEN j.status <> 'active' THEN j.status
        WHEN r.max_executions IS NOT NULL AND j.run_count >= r.max_executions THEN 'inactive'
        WHEN p_reschedule AND p_next_run_at IS NULL THEN 'inactive'
        ELSE 'active' END,
      inactive_reason = CASE
        WHEN j.status <> 'active' THEN j.inactive_reason
        WHEN r.max_executions IS NOT NULL AND j.run_count >= r.max_executions
          THEN 'max_executions reached'
        WHEN p_reschedule AND p_next_run_at IS NULL THEN 'end_at reached'
        END,
      next_run_at = CASE
        WHEN j.status <> 'active' THEN j.next_run_at
        WHEN r.max_executions IS NOT NULL AND j.run_count >= r.max_executions THEN NULL
        WHEN p_reschedule THEN p_next_run_at
        ELSE j.next_run_at END,
      updated_at = greatest(v_now, j.updated_at + interval '1 microsecond')
  FROM jsonb_populate_record(NULL::edm.jobs, p_job) r
  WHERE j.job_id = p_job_id;
  RETURN true;
END;
$$;
COMMENT ON FUNCTION edm.job_update(bigint, jsonb, boolean, timestamptz, timestamptz, text, timestamptz) IS
  'Replaces the settings of a job with those of p_job (JSON keyed by column names; every setting must be given). With p_reschedule, an active job''s next run becomes p_next_run_at (computed by the caller with cronsim; NULL ends it: end_at reached); a job that already fired max_executions times becomes inactive. Optimistic: returns false, changing nothing, when updated_at is no longer p_expected_updated_at (the caller reads again and retries). ED010 unknown job, ED013 lock timeout.';

CREATE FUNCTION edm.job_resume(p_job_id bigint, p_next_run_at timestamptz,
                               p_expected_updated_at timestamptz, p_tenant_id text DEFAULT NULL,
                               p_now timestamptz DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_job record;
BEGIN
  BEGIN
    SELECT j.status, j.updated_at, j.run_count, j.max_executions INTO v_job FROM edm.jobs j
    WHERE j.job_id = p_job_id AND (p_tenant_id IS NULL OR j.tenant_id = p_tenant_id)
    FOR NO KEY UPDATE;
  EXCEPTION WHEN lock_not_available THEN
    RAISE EXCEPTION 'job % is locked by another session', p_job_id USING ERRCODE = 'ED013';
  END;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'job % not found', p_job_id USING ERRCODE = 'ED010';
  END IF;
  IF v_job.status = 'active' THEN
    RETURN true;
  END IF;
  IF v_job.updated_at IS DISTINCT FROM p_expected_updated_at THEN
    RETURN false;
  END IF;
  IF v_job.max_executions IS NOT NULL AND v_job.run_count >= v_job.max_executions THEN
    RAISE EXCEPTION 'job % reached max_executions (%); raise it before resuming',
      p_job_id, v_job.max_executions USING ERRCODE = 'ED003';
  END IF;
  IF p_next_run_at IS NULL THEN
    RAISE EXCEPTION 'job % has no occurrence left before its end_at; change end_at first', p_job_id
      USING ERRCODE = 'ED003';
  END IF;
  UPDATE edm.jobs j
  SET status = 'active', inactive_reason = NULL, next_run_at = p_next_run_at,
      updated_at = greatest(v_now, j.updated_at + interval '1 microsecond')
  WHERE j.job_id = p_job_id;
  RETURN true;
END;
$$;
COMMENT ON FUNCTION edm.job_resume(bigint, timestamptz, timestamptz, text, timestamptz) IS
  'Activates a paused or inactive job with next run p_next_run_at (the first occurrence after now, computed by the caller with cronsim; occurrences during the pause are not caught up). No-op on an active job. Returns false when the job changed since the caller read it (p_expected_updated_at). ED003 when max_executions is reached or no occurrence is left.';

CREATE FUNCTION edm.job_trigger(p_job_id bigint, p_tenant_id text DEFAULT NULL,
                                p_now timestamptz DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
  v_now    timestamptz := coalesce(p_now, now());
  v_job    record;
  v_active integer;
  v_id     bigint;
BEGIN
  BEGIN
    SELECT j.job_id, j.tenant_id, j.priority, j.max_concurrent INTO v_job
    FROM edm.jobs j
    WHERE j.job_id = p_job_id AND (p_tenant_id IS NULL OR j.tenant_id = p_tenant_id)
    FOR NO KEY UPDATE;
  EXCEPTION WHEN lock_not_available THEN
    RAISE EXCEPTION 'job % is locked by another session', p_job_id USING ERRCODE = 'ED013';
  END;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'job % not found', p_job_id USING ERRCODE = 'ED010';
  END IF;
  SELECT count(*) INTO v_active FROM edm.job_executions e
  WHERE e.job_id = p_job_id AND e.status IN ('pending', 'running');
  IF v_active >= v_job.max_concurrent THEN
    RAISE EXCEPTION 'job % already has % pending or running execution(s) (max_concurrent %)',
      p_job_id, v_active, v_job.max_concurrent USING ERRCODE = 'ED011';
  END IF;
  INSERT INTO edm.job_executions (job_id, tenant_id, trigger, status, priority, run_after, created_at)
  VALUES (p_job_id, v_job.tenant_id, 'manual', 'pending', v_job.priority, v_now, v_now)
  RETURNING execution_id INTO v_id;
  PERFORM pg_notify('edm_jobs', 'manual:' || p_job_id);
  RETURN v_id;
END;
$$;
COMMENT ON FUNCTION edm.job_trigger(bigint, text, timestamptz) IS
  'Queues a manual run of a job now, whatever its status or schedule (it does not move next_run_at). ED010 unknown job, ED011 when max_concurrent executions are already pending or running, ED013 when the job stays locked beyond the session''s lock_timeout (the Python API sets one).';

CREATE FUNCTION edm.job_pause(p_job_id bigint, p_tenant_id text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_status text;
BEGIN
  BEGIN
    SELECT j.status INTO v_status FROM edm.jobs j
    WHERE j.job_id = p_job_id AND (p_tenant_id IS NULL OR j.tenant_id = p_tenant_id)
    FOR NO KEY UPDATE;
  EXCEPTION WHEN lock_not_available THEN
    RAISE EXCEPTION 'job % is locked by another session', p_job_id USING ERRCODE = 'ED013';
  END;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'job % not found', p_job_id USING ERRCODE = 'ED010';
  END IF;
  IF v_status = 'inactive' THEN
    RAISE EXCEPTION 'job % is inactive: resume it instead', p_job_id USING ERRCODE = 'ED003';
  END IF;
  UPDATE edm.jobs j SET status = 'paused', next_run_at = NULL, updated_at = now()
  WHERE j.job_id = p_job_id AND j.status = 'active';
  RETURN v_status;
END;
$$;
COMMENT ON FUNCTION edm.job_pause(bigint, text) IS
  'Pauses an active job: no scheduled runs, queued retries held, running executions continue. Idempotent on a paused job; ED003 on an inactive one. Returns the previous status. Resuming needs a new next_run_at, computed by the Python API (JobScheduler.resume_job).';

CREATE FUNCTION edm.job_stop(p_job_id bigint, p_tenant_id text DEFAULT NULL,
                             p_cancel_running boolean DEFAULT false, p_now timestamptz DEFAULT NULL)
RETURNS TABLE (cancelled_pending integer, cancelled_running integer)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  v_now     timestamptz := coalesce(p_now, now());
  v_pending integer;
  v_running bigint[];
BEGIN
  BEGIN
    -- Lock order: executions, then the job.
    PERFORM 1 FROM edm.job_executions e
    WHERE e.job_id = p_job_id AND e.status IN ('pending', 'running')
    ORDER BY e.execution_id FOR NO KEY UPDATE;
    PERFORM 1 FROM edm.jobs j
    WHERE j.job_id = p_job_id AND (p_tenant_id IS NULL OR j.tenant_id = p_tenant_id)
    FOR NO KEY UPDATE;
  EXCEPTION WHEN lock_not_available THEN
    RAISE EXCEPTION 'job % is locked by another session', p_job_id USING ERRCODE = 'ED013';
  END;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'job % not found', p_job_id USING ERRCODE = 'ED010';
  END IF;
  UPDATE edm.jobs j SET status = 'inactive', inactive_reason = 'stopped', next_run_at = NULL,
                        updated_at = now()
  WHERE j.job_id = p_job_id;

  UPDATE edm.job_executions e
  SET status = 'cancelled', finished_at = v_now, error = 'job stopped', error_kind = 'cancelled',
      error_code = 'CANCELLED'
  WHERE e.job_id = p_job_id AND e.status = 'pending';
  GET DIAGNOSTICS v_pending = ROW_COUNT;

  IF p_cancel_running THEN
    WITH c AS (
      UPDATE edm.job_executions e
      SET status = 'cancelled', finished_at = v_now, lease_expires_at = NULL,
          cancel_requested_at = v_now, error = 'job stopped', error_kind = 'cancelled',
          error_code = 'CANCELLED'
      WHERE e.job_id = p_job_id AND e.status = 'running'
      RETURNING e.execution_id)
    SELECT coalesce(array_agg(c.execution_id), '{}') INTO v_running FROM c;
    UPDATE edm.jobs j SET running_count = greatest(j.running_count - cardinality(v_running), 0)
    WHERE j.job_id = p_job_id;
    PERFORM pg_notify('edm_jobs_cancel', x::text) FROM unnest(v_running) x;
  ELSE
    v_running := '{}';
  END IF;
  RETURN QUERY SELECT v_pending, cardinality(v_running);
END;
$$;
COMMENT ON FUNCTION edm.job_stop(bigint, text, boolean, timestamptz) IS
  'Stops a job: inactive (reason stopped), no next run, pending executions cancelled; running ones too when p_cancel_running (their runners are told through NOTIFY edm_jobs_cancel). Returns how many were cancelled.';

CREATE FUNCTION edm.job_delete(p_job_id bigint, p_tenant_id text DEFAULT NULL,
                               p_force boolean DEFAULT false)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
  v_running integer;
  v_ids bigint[];
BEGIN
  BEGIN
    -- Lock order: executions, then the job (the cascade then finds them locked).
    SELECT coalesce(array_agg(x.execution_id), '{}') INTO v_ids FROM (
      SELECT e.execution_id FROM edm.job_executions e
      WHERE e.job_id = p_job_id AND e.status = 'running'
      ORDER BY e.execution_id FOR NO KEY UPDATE) x;
    PERFORM 1 FROM edm.jobs j
    WHERE j.job_id = p_job_id AND (p_tenant_id IS NULL OR j.tenant_id = p_tenant_id)
    FOR UPDATE;
  EXCEPTION WHEN lock_not_available THEN
    RAISE EXCEPTION 'job % is locked by another session', p_job_id USING ERRCODE = 'ED013';
  END;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'job % not found', p_job_id USING ERRCODE = 'ED010';
  END IF;
  v_running := cardinality(v_ids);
  IF v_running > 0 AND NOT p_force THEN
    RAISE EXCEPTION 'job % has % running execution(s): stop or cancel them, or delete with force',
      p_job_id, v_running USING ERRCODE = 'ED011';
  END IF;
  DELETE FROM edm.jobs j WHERE j.job_id = p_job_id;
  PERFORM pg_notify('edm_jobs_cancel', x::text) FROM unnest(v_ids) x;
  RETURN true;
END;
$$;
COMMENT ON FUNCTION edm.job_delete(bigint, text, boolean) IS
  'Deletes a job and its history. ED011 when executions are running, unless p_force (their runners are then told to stop); ED010 unknown job.';

-- ---------------------------------------------------------------------------
-- Wake-up and retention
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.job_next_wakeup(p_now timestamptz DEFAULT NULL)
RETURNS timestamptz
LANGUAGE sql STABLE
RETURN least(
  (SELECT min(j.next_run_at) FROM edm.jobs j WHERE j.status = 'active'),
  (SELECT min(e.run_after) FROM edm.job_executions e JOIN edm.jobs j ON j.job_id = e.job_id
   WHERE e.status = 'pending' AND j.running_count < j.max_concurrent
     AND (j.status <> 'paused' OR e.trigger = 'manual')),
  (SELECT min(e.lease_expires_at) FROM edm.job_executions e WHERE e.status = 'running'));
COMMENT ON FUNCTION edm.job_next_wakeup(timestamptz) IS
  'The earliest time a runner could have work: a job''s next run, a claimable pending execution (manual run, retry, catch-up), or a lease expiring. NULL when nothing is scheduled. Runners sleep until then or a NOTIFY edm_jobs.';

CREATE FUNCTION edm.job_purge_executions(p_now timestamptz DEFAULT NULL, p_limit integer DEFAULT 10000)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_before timestamptz := coalesce(p_now, now())
                          - make_interval(days => edm.config_int('jobs.execution_retention_days'));
  v_n integer;
BEGIN
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000000 THEN
    RAISE EXCEPTION 'job_purge_executions: limit must be between 1 and 1000000' USING ERRCODE = 'ED005';
  END IF;
  -- One purger at a time; the others have nothing to add.
  IF NOT pg_try_advisory_xact_lock(hashtextextended('edm.job_purge_executions', 0)) THEN
    RETURN 0;
  END IF;
  DELETE FROM edm.job_executions e
  WHERE e.execution_id IN (
    SELECT x.execution_id FROM edm.job_executions x
    WHERE x.finished_at < v_before
    ORDER BY x.finished_at
    LIMIT p_limit);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.job_purge_executions(timestamptz, integer) IS
  'Deletes up to p_limit finished executions older than jobs.execution_retention_days (oldest first). One caller at a time (advisory lock); returns how many it deleted.';

-- ---------------------------------------------------------------------------
-- For DBAs
-- ---------------------------------------------------------------------------

CREATE VIEW edm.jobs_overview AS
SELECT j.job_id, j.tenant_id, j.name, j.kind, j.status, j.cron_expr, j.timezone, j.next_run_at,
       j.next_run_at AT TIME ZONE j.timezone AS next_run_local,
       j.last_status, j.last_finished_at, j.running_count, j.max_concurrent,
       (SELECT count(*) FROM edm.job_executions e
        WHERE e.job_id = j.job_id AND e.status = 'pending') AS pending_count,
       j.success_count, j.failure_count, j.misfire_count,
       CASE
         WHEN j.status = 'paused' THEN 'paused'
         WHEN j.status = 'inactive' THEN 'inactive: ' || j.inactive_reason
         WHEN j.next_run_at > now() THEN 'waiting for its next run at ' || j.next_run_at
         ELSE 'due since ' || j.next_run_at || ': no runner has fired it (are runners running?)'
       END AS why_not_running
FROM edm.jobs j;
COMMENT ON VIEW edm.jobs_overview IS
  'One line per job for DBAs: schedule, next run (UTC and local), last outcome, slots in use, queue, counters, and why it is not running right now.';
COMMENT ON COLUMN edm.jobs_overview.job_id IS 'The job.';
COMMENT ON COLUMN edm.jobs_overview.tenant_id IS 'Owning tenant.';
COMMENT ON COLUMN edm.jobs_overview.name IS 'Job name.';
COMMENT ON COLUMN edm.jobs_overview.kind IS 'function, http, shell or launch_campaign.';
COMMENT ON COLUMN edm.jobs_overview.status IS 'active, paused or inactive.';
COMMENT ON COLUMN edm.jobs_overview.cron_expr IS 'Cron expression.';
COMMENT ON COLUMN edm.jobs_overview.timezone IS 'Time zone of the schedule.';
COMMENT ON COLUMN edm.jobs_overview.next_run_at IS 'Next run (instant).';
COMMENT ON COLUMN edm.jobs_overview.next_run_local IS 'Next run as wall-clock time in the job''s time zone.';
COMMENT ON COLUMN edm.jobs_overview.last_status IS 'Status of the latest finished execution.';
COMMENT ON COLUMN edm.jobs_overview.last_finished_at IS 'When it finished.';
COMMENT ON COLUMN edm.jobs_overview.running_count IS 'Executions running now.';
COMMENT ON COLUMN edm.jobs_overview.max_concurrent IS 'Most executions allowed to run at once.';
COMMENT ON COLUMN edm.jobs_overview.pending_count IS 'Executions queued (manual runs, retries, catch-up runs).';
COMMENT ON COLUMN edm.jobs_overview.success_count IS 'Executions that succeeded.';
COMMENT ON COLUMN edm.jobs_overview.failure_count IS 'Executions that failed or timed out.';
COMMENT ON COLUMN edm.jobs_overview.misfire_count IS 'Occurrences not run because of downtime.';
COMMENT ON COLUMN edm.jobs_overview.why_not_running IS 'Why no execution of the job is starting now.';
