-- Named statements issued by edm_sched.jobs (recurring jobs). Each block starts
-- with "-- name --" and a one-line description; edm_sched/jobs/sql.py loads
-- them. The rules that must hold across runners (firing once, claiming,
-- max_concurrent, retries, lease recovery) are the SQL functions of
-- sql/migrations/0005_jobs.sql. Every write goes through one of those
-- functions (so the restricted roles of 0006_security need no table rights
-- beyond SELECT); the statements here call them or read.

-- jobs_lock_timeout --
-- Bound how long the rest of this transaction waits for a row lock (text such as '5000ms').
SELECT set_config('lock_timeout', %(timeout)s, true)

-- jobs_db_now --
-- The time the caller's decisions use: the injected clock, else the transaction time.
SELECT coalesce(%(now)s::timestamptz, now())

-- job_create --
-- Create a job from its settings as JSON (edm.job_create); next_run_at computed by the caller with cronsim.
SELECT edm.job_create(%(job)s, %(next_run_at)s, %(now)s)

-- job_get --
-- One job, optionally only if it belongs to the given user.
SELECT job_id, user_id, name, description, kind, target, cron_expr, timezone, start_at, end_at,
       max_executions, status, inactive_reason, priority, max_concurrent, timeout_seconds,
       max_retries, retry_delay_seconds, retry_backoff, retry_max_delay_seconds, retry_on,
       misfire_policy, misfire_grace_seconds, tags, next_run_at, last_scheduled_for,
       last_fired_at, last_finished_at, last_status, run_count, running_count, success_count,
       failure_count, misfire_count, created_at, updated_at
FROM edm.jobs
WHERE job_id = %(job_id)s AND (%(user_id)s::text IS NULL OR user_id = %(user_id)s)

-- job_update --
-- Replace a job's settings if it did not change since it was read (edm.job_update); false: read again.
SELECT edm.job_update(%(job_id)s, %(job)s, %(reschedule)s, %(next_run_at)s, %(expected_updated_at)s,
                      %(user_id)s, %(now)s)

-- job_resume --
-- Activate a paused or inactive job from its next occurrence (edm.job_resume); false: read again.
SELECT edm.job_resume(%(job_id)s, %(next_run_at)s, %(expected_updated_at)s, %(user_id)s, %(now)s)

-- jobs_list --
-- Jobs by id, filtered by user, status and tag, one page after after_id.
SELECT job_id, user_id, name, description, kind, target, cron_expr, timezone, start_at, end_at,
       max_executions, status, inactive_reason, priority, max_concurrent, timeout_seconds,
       max_retries, retry_delay_seconds, retry_backoff, retry_max_delay_seconds, retry_on,
       misfire_policy, misfire_grace_seconds, tags, next_run_at, last_scheduled_for,
       last_fired_at, last_finished_at, last_status, run_count, running_count, success_count,
       failure_count, misfire_count, created_at, updated_at
FROM edm.jobs
WHERE (%(user_id)s::text IS NULL OR user_id = %(user_id)s)
  AND (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(tag)s::text IS NULL OR tags @> ARRAY[%(tag)s::text])
  AND job_id > %(after_id)s
ORDER BY job_id
LIMIT %(limit)s

-- job_pause --
-- Pause a job (edm.job_pause); returns its previous status.
SELECT edm.job_pause(%(job_id)s, %(user_id)s)

-- job_stop --
-- Stop a job (edm.job_stop); returns how many executions were cancelled.
SELECT cancelled_pending, cancelled_running
FROM edm.job_stop(%(job_id)s, %(user_id)s, %(cancel_running)s, %(now)s)

-- job_delete --
-- Delete a job and its history (edm.job_delete).
SELECT edm.job_delete(%(job_id)s, %(user_id)s, %(force)s)

-- job_trigger --
-- Queue a manual run now (edm.job_trigger); returns the execution id.
SELECT edm.job_trigger(%(job_id)s, %(user_id)s, %(now)s)

-- job_cancel_execution --
-- Cancel a pending or running execution (edm.job_cancel_execution); returns its former status.
SELECT edm.job_cancel_execution(%(execution_id)s, %(user_id)s, %(now)s)

-- execution_get --
-- One execution, optionally only if it belongs to the given user.
SELECT execution_id, job_id, user_id, trigger, status, scheduled_for, run_after, created_at,
       started_at, finished_at, duration_ms, progress, progress_message, result, error, error_kind,
       error_type, error_code, error_stack, retry_count, retry_of, worker_id, lease_expires_at,
       cancel_requested_at
FROM edm.job_executions
WHERE execution_id = %(execution_id)s AND (%(user_id)s::text IS NULL OR user_id = %(user_id)s)

-- executions_list --
-- Executions newest first, filtered by job, user and status, one page before before_id.
SELECT execution_id, job_id, user_id, trigger, status, scheduled_for, run_after, created_at,
       started_at, finished_at, duration_ms, progress, progress_message, result, error, error_kind,
       error_type, error_code, error_stack, retry_count, retry_of, worker_id, lease_expires_at,
       cancel_requested_at
FROM edm.job_executions
WHERE (%(job_id)s::bigint IS NULL OR job_id = %(job_id)s)
  AND (%(user_id)s::text IS NULL OR user_id = %(user_id)s)
  AND (%(status)s::text IS NULL OR status = %(status)s)
  AND execution_id < %(before_id)s
ORDER BY execution_id DESC
LIMIT %(limit)s

-- jobs_stats_jobs --
-- Jobs by status, with the executions running and pending now.
SELECT j.status, count(*)::bigint, coalesce(sum(j.running_count), 0)::bigint,
       (SELECT count(*) FROM edm.job_executions e
        WHERE e.status = 'pending' AND (%(user_id)s::text IS NULL OR e.user_id = %(user_id)s))
FROM edm.jobs j
WHERE %(user_id)s::text IS NULL OR j.user_id = %(user_id)s
GROUP BY j.status

-- jobs_stats_executions --
-- Executions finished since a time: counts by status and trigger, durations, firing delays.
SELECT e.status, e.trigger, count(*)::bigint,
       avg(e.duration_ms)::double precision,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY e.duration_ms),
       percentile_cont(0.5) WITHIN GROUP (
         ORDER BY extract(epoch FROM e.started_at - e.scheduled_for) * 1000)
         FILTER (WHERE e.trigger = 'scheduled'),
       percentile_cont(0.99) WITHIN GROUP (
         ORDER BY extract(epoch FROM e.started_at - e.scheduled_for) * 1000)
         FILTER (WHERE e.trigger = 'scheduled'),
       coalesce(sum(CASE WHEN e.error_code = 'MISFIRE'
                         THEN coalesce(substring(e.error FROM '^([0-9]+) ')::bigint, 1)
                         ELSE 0 END), 0)::bigint
FROM edm.job_executions e
WHERE e.finished_at >= %(since)s
  AND (%(user_id)s::text IS NULL OR e.user_id = %(user_id)s)
GROUP BY GROUPING SETS ((e.status, e.trigger), ())

-- jobs_config --
-- The jobs.* settings runners read.
SELECT key, value #>> '{}' FROM edm.config WHERE left(key, 5) = 'jobs.'

-- jobs_listen --
-- Subscribe the listener connection to job changes and cancellations.
LISTEN edm_jobs;
LISTEN edm_jobs_cancel

-- jobs_notify_pending --
-- Tell other runners that claimable executions are waiting.
SELECT pg_notify('edm_jobs', 'pending')

-- jobs_due --
-- Lock up to limit due active jobs for firing (edm.job_due, SKIP LOCKED) until this transaction ends.
SELECT job_id, cron_expr, timezone, next_run_at, end_at, max_executions, run_count,
       misfire_policy, misfire_grace_seconds, fire_now
FROM edm.job_due(%(limit)s, %(now)s)

-- job_fire --
-- Fire one due job exactly once (edm.job_fire); no rows when another runner fired it first.
SELECT execution_id, scheduled_for, status
FROM edm.job_fire(%(job_id)s, %(due)s, %(run_times)s::timestamptz[], %(next_run_at)s,
                  %(end_reason)s, %(queue_all)s, %(missed)s, %(missed_first)s, %(missed_last)s,
                  %(worker)s, %(now)s)

-- job_mark_invalid --
-- Deactivate a due job whose stored schedule can no longer be computed (edm.job_set_next_run).
SELECT edm.job_set_next_run(%(job_id)s, %(due)s, NULL, %(reason)s)

-- job_claim --
-- Claim due pending executions for this runner (edm.job_claim).
SELECT execution_id, job_id, user_id, job_name, kind, target, trigger, scheduled_for,
       retry_count, timeout_seconds, started_at, lease_expires_at
FROM edm.job_claim(%(worker)s, %(limit)s, %(now)s)

-- job_finish --
-- Record the outcome of a run held by this runner (edm.job_complete).
SELECT accepted, retry_execution_id, retry_at
FROM edm.job_complete(%(execution_id)s, %(worker)s, %(status)s, %(result)s, %(error)s,
                      %(error_kind)s, %(error_type)s, %(error_stack)s, %(now)s)

-- job_finish_many --
-- Record the outcomes of several runs held by this runner in one transaction (batch edm.job_complete).
SELECT execution_id, accepted, retry_execution_id, retry_at
FROM edm.job_complete(%(worker)s::text, %(execution_ids)s::bigint[], %(statuses)s::text[],
                      %(results)s::jsonb, %(errors)s::text[], %(error_kinds)s::text[],
                      %(error_types)s::text[], %(error_stacks)s::text[], %(now)s)

-- job_progress --
-- Record progress of a running execution; false when it is no longer running for this runner.
SELECT edm.job_progress(%(execution_id)s, %(worker)s, %(progress)s::real, %(message)s)

-- job_expire_runs --
-- Recover runs whose lease expired (edm.job_expire_runs).
SELECT edm.job_expire_runs(%(now)s)

-- job_purge --
-- Delete execution history past its retention (edm.job_purge_executions).
SELECT edm.job_purge_executions(%(now)s)

-- job_wakeup --
-- The database clock, the next job due, the earliest time anything may be claimable, and whether a lease expired.
-- statement_timestamp() rather than clock_timestamp(): a stable value lets the lease test use its index.
SELECT coalesce(%(now)s::timestamptz, statement_timestamp()),
       (SELECT min(j.next_run_at) FROM edm.jobs j WHERE j.status = 'active'),
       edm.job_next_wakeup(%(now)s),
       EXISTS (SELECT 1 FROM edm.job_executions e
               WHERE e.status = 'running'
                 AND e.lease_expires_at <= coalesce(%(now)s::timestamptz, statement_timestamp()))

-- jobs_security_config --
-- The outbound guard's allowlist and the users allowed shell jobs (jobs.http_allow, jobs.shell_users), as text; read when HTTP or shell runs start.
SELECT key, value #>> '{}' AS value FROM edm.config WHERE key IN ('jobs.http_allow', 'jobs.shell_users')
