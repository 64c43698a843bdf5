-- 0004_operations.sql: config changes, recovery sweeps, alerts, metric
-- roll-ups, partition maintenance, and the monitoring views a DBA reads.

-- ---------------------------------------------------------------------------
-- Config
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.config_set(p_key text, p_value jsonb, p_actor text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
  c edm.config;
BEGIN
  SELECT * INTO c FROM edm.config WHERE key = p_key FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown config key %', quote_literal(p_key) USING ERRCODE = 'ED001';
  END IF;
  IF p_value IS NULL OR NOT edm.config_value_ok(c.value_type, p_value, c.min_value, c.max_value,
                                                c.allowed_values) THEN
    RAISE EXCEPTION 'config % refused: % is not %', p_key, coalesce(p_value::text, 'NULL'),
      CASE c.value_type
        WHEN 'integer' THEN 'an integer'
        WHEN 'number' THEN 'a number'
        WHEN 'boolean' THEN 'true or false'
        ELSE 'a string' END
      || CASE WHEN c.min_value IS NOT NULL OR c.max_value IS NOT NULL
              THEN format(' between %s and %s', coalesce(c.min_value::text, '-inf'),
                          coalesce(c.max_value::text, '+inf'))
              ELSE '' END
      || CASE WHEN c.allowed_values IS NOT NULL
              THEN ' among ' || array_to_string(c.allowed_values, ', ') ELSE '' END
      USING ERRCODE = 'ED006';
  END IF;
  IF p_actor IS NOT NULL THEN  -- the audit log's actor for this transaction
    PERFORM set_config('edm.actor', p_actor, true);
  END IF;
  UPDATE edm.config SET value = p_value, updated_at = now(), updated_by = p_actor
  WHERE key = p_key;
  PERFORM pg_notify('edm_config', p_key);
  RETURN p_value;
END;
$$;
COMMENT ON FUNCTION edm.config_set(text, jsonb, text) IS
  'Sets config p_key after checking type and range (ED006 with the allowed range when refused, ED001 for an unknown key) and notifies running dispatchers (NOTIFY edm_config) so they reload.';

INSERT INTO edm.config (key, value, default_value, category, value_type, min_value, max_value, unit, description) VALUES
  ('retention.finished_task_days', '30', '30', 'retention', 'integer', 1, 3650, 'days',
   'Completed, cancelled and failed tasks (with their subtasks) are deleted this long after they finished.'),
  ('retention.finished_tasks_per_sweep', '20', '20', 'retention', 'integer', 1, 10000, 'tasks',
   'Most finished tasks one sweep deletes, so a sweep stays short.');

-- ---------------------------------------------------------------------------
-- Wake dispatchers when a task is scheduled
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.tasks_notify_scheduled()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  PERFORM pg_notify('edm_wakeup', 'task:' || NEW.task_id);
  RETURN NULL;
END;
$$;
COMMENT ON FUNCTION edm.tasks_notify_scheduled() IS
  'Trigger: NOTIFY edm_wakeup when a task becomes scheduled, so idle dispatchers re-compute their wake-up time (and start it at once when it is due).';
CREATE TRIGGER tasks_notify_scheduled AFTER INSERT OR UPDATE OF status ON edm.tasks
  FOR EACH ROW WHEN (NEW.status = 'scheduled') EXECUTE FUNCTION edm.tasks_notify_scheduled();

-- ---------------------------------------------------------------------------
-- Sweep state, metric roll-ups
-- ---------------------------------------------------------------------------

CREATE TABLE edm.sweep_state (
  name       text PRIMARY KEY,
  watermark  timestamptz NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE edm.sweep_state IS 'Progress markers of incremental sweeps (e.g. how far send_events were rolled up).';
COMMENT ON COLUMN edm.sweep_state.name IS 'Sweep name.';
COMMENT ON COLUMN edm.sweep_state.watermark IS 'Everything before this time has been processed.';
COMMENT ON COLUMN edm.sweep_state.updated_at IS 'Last run.';

CREATE TABLE edm.metrics_hourly (
  hour              timestamptz NOT NULL,
  service_id        bigint NOT NULL,
  user_id           text NOT NULL,
  sent              bigint NOT NULL DEFAULT 0,
  failed            bigint NOT NULL DEFAULT 0,
  retried           bigint NOT NULL DEFAULT 0,
  service_failures  bigint NOT NULL DEFAULT 0,
  lease_expired     bigint NOT NULL DEFAULT 0,
  response_ms_sum   bigint NOT NULL DEFAULT 0,
  response_count    bigint NOT NULL DEFAULT 0,
  PRIMARY KEY (hour, service_id, user_id)
);
COMMENT ON TABLE edm.metrics_hourly IS 'Hourly roll-up of send_events per service and user, kept for monitoring.metrics_retention_days.';
COMMENT ON COLUMN edm.metrics_hourly.hour IS 'Start of the hour (UTC).';
COMMENT ON COLUMN edm.metrics_hourly.service_id IS 'Service.';
COMMENT ON COLUMN edm.metrics_hourly.user_id IS 'User.';
COMMENT ON COLUMN edm.metrics_hourly.sent IS 'Messages accepted by the provider.';
COMMENT ON COLUMN edm.metrics_hourly.failed IS 'Permanent failures.';
COMMENT ON COLUMN edm.metrics_hourly.retried IS 'Transient failures scheduled for retry.';
COMMENT ON COLUMN edm.metrics_hourly.service_failures IS 'Service-level failures.';
COMMENT ON COLUMN edm.metrics_hourly.lease_expired IS 'Expired leases (uncertain outcomes).';
COMMENT ON COLUMN edm.metrics_hourly.response_ms_sum IS 'Sum of provider response times (ms), for averages.';
COMMENT ON COLUMN edm.metrics_hourly.response_count IS 'Number of response times summed.';

-- ---------------------------------------------------------------------------
-- The sweeps
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.raise_alert(p_kind text, p_severity text, p_message text,
                                p_task_id bigint DEFAULT NULL, p_service_id bigint DEFAULT NULL,
                                p_user_id text DEFAULT NULL, p_now timestamptz DEFAULT NULL)
RETURNS boolean
LANGUAGE sql
BEGIN ATOMIC
  WITH ins AS (
    INSERT INTO edm.alerts (raised_at, kind, severity, task_id, service_id, user_id, message)
    VALUES (coalesce(p_now, now()), p_kind, p_severity, p_task_id, p_service_id, p_user_id, p_message)
    ON CONFLICT (kind, severity, coalesce(task_id, 0), coalesce(service_id, 0))
      WHERE resolved_at IS NULL DO NOTHING
    RETURNING 1)
  SELECT EXISTS (SELECT 1 FROM ins);
END;
COMMENT ON FUNCTION edm.raise_alert(text, text, text, bigint, bigint, text, timestamptz) IS
  'Records an alert unless the same one (kind, severity, subject) is already open; true when recorded.';

CREATE FUNCTION edm.sweep_alerts(p_now timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_warn integer := edm.config_int('monitoring.wait_warning');
  v_crit integer := edm.config_int('monitoring.wait_critical');
  v_emer integer := edm.config_int('monitoring.wait_emergency');
  v_quota integer := edm.config_int('monitoring.quota_alert_percent');
  v_stuck integer := edm.config_int('monitoring.stuck_task_threshold');
  v_n integer := 0;
  r record;
BEGIN
  -- First-send waits: tasks due, with work, and nothing claimed yet.
  FOR r IN
    SELECT t.task_id, t.user_id, t.name, extract(epoch FROM v_now - t.scheduled_at) AS wait
    FROM edm.tasks t
    WHERE t.status IN ('scheduled', 'sending') AND t.first_claimed_at IS NULL
      AND t.pending_count > 0 AND t.scheduled_at <= v_now - make_interval(secs => v_warn)
  LOOP
    IF edm.raise_alert('wait',
         CASE WHEN r.wait >= v_emer THEN 'emergency' WHEN r.wait >= v_crit THEN 'critical'
              ELSE 'warning' END,
         format('task %s (%s) of user %s has waited %s s for its first send',
                r.task_id, r.name, r.user_id, round(r.wait)),
         r.task_id, NULL, r.user_id, v_now) THEN
      v_n := v_n + 1;
    END IF;
  END LOOP;
  UPDATE edm.alerts a SET resolved_at = v_now
  FROM edm.tasks t
  WHERE a.kind = 'wait' AND a.resolved_at IS NULL AND t.task_id = a.task_id
    AND (t.first_claimed_at IS NOT NULL OR t.status NOT IN ('scheduled', 'sending'));

  -- Stuck tasks: sending, with work left, no claim or completion for too long.
  FOR r IN
    UPDATE edm.tasks t SET stuck_since = v_now
    WHERE t.status = 'sending' AND t.stuck_since IS NULL
      AND t.pending_count + t.leased_count > 0
      AND coalesce(t.last_activity_at, t.started_at, t.scheduled_at)
          <= v_now - make_interval(secs => v_stuck)
    RETURNING t.task_id, t.user_id, t.name
  LOOP
    IF edm.raise_alert('stuck', 'critical',
         format('task %s (%s) of user %s made no progress for %s s; see edm.task_wait_reasons',
                r.task_id, r.name, r.user_id, v_stuck),
         r.task_id, NULL, r.user_id, v_now) THEN
      v_n := v_n + 1;
    END IF;
  END LOOP;
  UPDATE edm.alerts a SET resolved_at = v_now
  FROM edm.tasks t
  WHERE a.kind = 'stuck' AND a.resolved_at IS NULL AND t.task_id = a.task_id
    AND t.stuck_since IS NULL;

  -- Services past the quota alert share of today's quota.
  FOR r IN
    SELECT s.service_id, s.name, edm.service_sent_today(s, v_now) AS used, s.daily_quota
    FROM edm.services s
    WHERE s.enabled AND s.daily_quota > 0
      AND edm.service_sent_today(s, v_now)::bigint * 100 >= v_quota::bigint * s.daily_quota
  LOOP
    IF edm.raise_alert('quota', 'warning',
         format('service %s (%s) used %s of its daily quota of %s', r.service_id, r.name,
                r.used, r.daily_quota),
         NULL, r.service_id, NULL, v_now) THEN
      v_n := v_n + 1;
    END IF;
  END LOOP;
  UPDATE edm.alerts a SET resolved_at = v_now
  FROM edm.services s
  WHERE a.kind = 'quota' AND a.resolved_at IS NULL AND s.service_id = a.service_id
    AND edm.service_sent_today(s, v_now)::bigint * 100 < v_quota::bigint * s.daily_quota;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.sweep_alerts(timestamptz) IS
  'Raises (and resolves) alerts: first-send waits past monitoring.wait_warning / _critical / _emergency, tasks without progress past monitoring.stuck_task_threshold (flagged in tasks.stuck_since), services past monitoring.quota_alert_percent of their daily quota. Returns how many alerts were raised.';

CREATE FUNCTION edm.roll_quota_days(p_now timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_n integer;
BEGIN
  -- Claims roll a service's quota day lazily; this makes views and alerts
  -- right for idle services too. SKIP LOCKED: never wait on a claim.
  UPDATE edm.services s
  SET sent_today = 0, quota_day = (coalesce(p_now, now()) AT TIME ZONE s.quota_tz)::date,
      quota_exhausted_until = NULL
  WHERE s.service_id IN (
    SELECT x.service_id FROM edm.services x
    WHERE x.quota_day < (coalesce(p_now, now()) AT TIME ZONE x.quota_tz)::date
    FOR NO KEY UPDATE SKIP LOCKED);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.roll_quota_days(timestamptz) IS
  'Starts a new quota day for every service whose local midnight (in its quota_tz) has passed: sent_today back to 0. Returns how many services rolled over.';

CREATE FUNCTION edm.finish_tasks(p_now timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_n integer;
BEGIN
  UPDATE edm.tasks t SET status = 'completed', finished_at = coalesce(p_now, now())
  WHERE t.task_id IN (
    SELECT x.task_id FROM edm.tasks x
    WHERE x.status = 'sending' AND x.pending_count = 0 AND x.leased_count = 0
    FOR NO KEY UPDATE SKIP LOCKED);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.finish_tasks(timestamptz) IS
  'Safety net: completes sending tasks with nothing pending or leased (completion normally does this in its own transaction).';

CREATE FUNCTION edm.roll_up_metrics(p_now timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_from timestamptz;
  v_to timestamptz := coalesce(p_now, now()) - interval '5 seconds';
  v_n integer;
BEGIN
  SELECT s.watermark INTO v_from FROM edm.sweep_state s WHERE s.name = 'metrics_hourly' FOR UPDATE;
  IF NOT FOUND THEN
    v_from := '-infinity';
    INSERT INTO edm.sweep_state (name, watermark) VALUES ('metrics_hourly', v_to);
  END IF;
  IF v_from >= v_to THEN
    RETURN 0;
  END IF;
  INSERT INTO edm.metrics_hourly AS m (hour, service_id, user_id, sent, failed, retried,
                                       service_failures, lease_expired, response_ms_sum,
                                       response_count)
  SELECT date_trunc('hour', e.occurred_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
         coalesce(e.service_id, 0), e.user_id,
         count(*) FILTER (WHERE e.kind = 'sent'),
         count(*) FILTER (WHERE e.kind = 'failed'),
         count(*) FILTER (WHERE e.kind = 'retry'),
         count(*) FILTER (WHERE e.kind = 'service_failure'),
         count(*) FILTER (WHERE e.kind = 'lease_expired'),
         coalesce(sum(e.response_ms) FILTER (WHERE e.kind = 'sent'), 0),
         count(e.response_ms) FILTER (WHERE e.kind = 'sent')
  FROM edm.send_events e
  WHERE e.occurred_at >= v_from AND e.occurred_at < v_to
  GROUP BY 1, 2, 3
  ON CONFLICT (hour, service_id, user_id) DO UPDATE SET
    sent = m.sent + EXCLUDED.sent, failed = m.failed + EXCLUDED.failed,
    retried = m.retried + EXCLUDED.retried,
    service_failures = m.service_failures + EXCLUDED.service_failures,
    lease_expired = m.lease_expired + EXCLUDED.lease_expired,
    response_ms_sum = m.response_ms_sum + EXCLUDED.response_ms_sum,
    response_count = m.response_count + EXCLUDED.response_count;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  UPDATE edm.sweep_state SET watermark = v_to, updated_at = now() WHERE name = 'metrics_hourly';
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.roll_up_metrics(timestamptz) IS
  'Adds send_events recorded since the last roll-up (up to 5 s ago: completions commit late) into edm.metrics_hourly. Incremental; returns the number of hourly rows touched.';

CREATE FUNCTION edm.ensure_partitions(p_now timestamptz DEFAULT NULL, p_days_ahead integer DEFAULT 3)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_day date;
  v_name text;
  v_n integer := 0;
BEGIN
  -- Partitions are made for days that have not started yet, so the default
  -- partition never holds rows of a day that later gets its own partition.
  FOR v_day IN
    SELECT d::date FROM generate_series((coalesce(p_now, now()) AT TIME ZONE 'UTC')::date + 1,
                                        (coalesce(p_now, now()) AT TIME ZONE 'UTC')::date + p_days_ahead,
                                        interval '1 day') d
  LOOP
    v_name := 'send_events_' || to_char(v_day, 'YYYYMMDD');
    CONTINUE WHEN to_regclass('edm.' || v_name) IS NOT NULL;
    BEGIN
      EXECUTE format('CREATE TABLE edm.%I PARTITION OF edm.send_events FOR VALUES FROM (%L) TO (%L)',
                     v_name, (v_day::timestamp AT TIME ZONE 'UTC'),
                     ((v_day + 1)::timestamp AT TIME ZONE 'UTC'));
      EXECUTE format('COMMENT ON TABLE edm.%I IS %L', v_name,
                     'send_events of ' || v_day || ' (UTC); dropped after monitoring.metrics_retention_days');
      v_n := v_n + 1;
    EXCEPTION WHEN check_violation THEN
      -- rows of that day already sit in the default partition (clock skew): keep them there
      NULL;
    END;
  END LOOP;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.ensure_partitions(timestamptz, integer) IS
  'Creates the daily partitions of edm.send_events for the next p_days_ahead days (UTC), each with a comment. Returns how many were created.';

CREATE FUNCTION edm.apply_retention(p_now timestamptz DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
  v_days integer := edm.config_int('monitoring.metrics_retention_days');
  v_cut timestamptz := coalesce(p_now, now()) - make_interval(days => v_days);
  v_part record;
  v_n bigint := 0;
  v_m bigint;
BEGIN
  -- Whole daily partitions older than the cut are dropped (no dead tuples).
  FOR v_part IN
    SELECT c.relname FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE i.inhparent = 'edm.send_events'::regclass AND n.nspname = 'edm'
      AND c.relname ~ '^send_events_[0-9]{8}$'
      AND to_date(substr(c.relname, 13), 'YYYYMMDD') + 1 <= (v_cut AT TIME ZONE 'UTC')::date
  LOOP
    EXECUTE format('DROP TABLE edm.%I', v_part.relname);
    v_n := v_n + 1;
  END LOOP;
  DELETE FROM edm.send_events_default e WHERE e.occurred_at < v_cut;
  GET DIAGNOSTICS v_m = ROW_COUNT;
  v_n := v_n + v_m;
  DELETE FROM edm.metrics_hourly m WHERE m.hour < v_cut;
  DELETE FROM edm.alerts a WHERE a.resolved_at < v_cut;
  -- Finished tasks leave the hot tables (subtasks and templates cascade),
  -- a few per sweep so that one sweep stays short.
  DELETE FROM edm.tasks t
  WHERE t.task_id IN (
    SELECT x.task_id FROM edm.tasks x
    WHERE x.status IN ('completed', 'cancelled', 'failed')
      AND x.finished_at < coalesce(p_now, now())
                          - make_interval(days => edm.config_int('retention.finished_task_days'))
    ORDER BY x.finished_at
    LIMIT edm.config_int('retention.finished_tasks_per_sweep')
    FOR UPDATE SKIP LOCKED);
  GET DIAGNOSTICS v_m = ROW_COUNT;
  v_n := v_n + v_m;
  DELETE FROM edm.dispatchers d WHERE d.heartbeat_at < coalesce(p_now, now()) - interval '1 day';
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.apply_retention(timestamptz) IS
  'Drops send_events partitions and deletes events, roll-ups and resolved alerts older than monitoring.metrics_retention_days; deletes up to retention.finished_tasks_per_sweep tasks finished more than retention.finished_task_days ago (their subtasks cascade) and dispatcher rows silent for a day. Returns partitions dropped plus rows deleted (events of the default partition, tasks).';

CREATE FUNCTION edm.run_sweeps(p_now timestamptz DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
  v_report jsonb;
  v_step text;
  v_value bigint;
BEGIN
  -- Recovery first, and outside the guarded steps below: nothing that goes
  -- wrong in maintenance may keep expired leases from coming back (I7).
  v_report := jsonb_build_object('leases_expired', edm.expire_leases(p_now));
  -- Each maintenance step runs in its own subtransaction: a failing step is
  -- reported (and logged by the dispatcher) without undoing the others.
  FOREACH v_step IN ARRAY ARRAY['quota_days_rolled', 'tasks_started', 'tasks_completed',
                                'alerts_raised', 'metrics_rows', 'partitions_created',
                                'retention_removed'] LOOP
    BEGIN
      v_value := CASE v_step
        WHEN 'quota_days_rolled' THEN edm.roll_quota_days(p_now)
        WHEN 'tasks_started' THEN edm.start_due_tasks(p_now)
        WHEN 'tasks_completed' THEN edm.finish_tasks(p_now)
        WHEN 'alerts_raised' THEN edm.sweep_alerts(p_now)
        WHEN 'metrics_rows' THEN edm.roll_up_metrics(p_now)
        WHEN 'partitions_created' THEN edm.ensure_partitions(p_now)
        WHEN 'retention_removed' THEN edm.apply_retention(p_now)
      END;
      v_report := v_report || jsonb_build_object(v_step, v_value);
    EXCEPTION WHEN OTHERS THEN
      v_report := v_report || jsonb_build_object(v_step, NULL)
                  || jsonb_build_object('errors', coalesce(v_report -> 'errors', '[]'::jsonb)
                                                  || to_jsonb(v_step || ': ' || SQLERRM));
    END;
  END LOOP;
  RETURN v_report;
END;
$$;
COMMENT ON FUNCTION edm.run_sweeps(timestamptz) IS
  'One round of every sweep: expired leases first, then quota-day rollover, due tasks, task completion, alerts (waits, stuck tasks, quotas), metric roll-ups, partitions and retention, each in its own subtransaction so that a failing step is reported under "errors" without undoing the others. Run by the elected dispatcher every sweep.interval seconds, or by edm-sched sweep. Returns a report.';

CREATE FUNCTION edm.take_alerts(p_limit integer DEFAULT 100)
RETURNS TABLE (alert_id bigint, raised_at timestamptz, kind text, severity text, task_id bigint,
               service_id bigint, user_id text, message text)
LANGUAGE sql
BEGIN ATOMIC
  UPDATE edm.alerts a SET notified_at = now()
  WHERE a.alert_id IN (SELECT x.alert_id FROM edm.alerts x WHERE x.notified_at IS NULL
                       ORDER BY x.alert_id LIMIT p_limit FOR UPDATE SKIP LOCKED)
  RETURNING a.alert_id, a.raised_at, a.kind, a.severity, a.task_id, a.service_id, a.user_id,
            a.message;
END;
COMMENT ON FUNCTION edm.take_alerts(integer) IS
  'Marks up to p_limit not-yet-notified alerts as notified and returns them, for the host''s alert callback (each alert is handed over once).';

-- ---------------------------------------------------------------------------
-- Monitoring views
-- ---------------------------------------------------------------------------

CREATE VIEW edm.task_progress AS
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
       t.last_activity_at, t.stuck_since
FROM edm.tasks t;
COMMENT ON VIEW edm.task_progress IS
  'Per task: progress (total, sent, pending, leased, failed, cancelled, percent), first-send wait (so far, if still waiting), average throughput, ETA at that rate, last activity, stuck flag.';
COMMENT ON COLUMN edm.task_progress.task_id IS 'Task.';
COMMENT ON COLUMN edm.task_progress.user_id IS 'Owner.';
COMMENT ON COLUMN edm.task_progress.name IS 'Campaign name.';
COMMENT ON COLUMN edm.task_progress.status IS 'Task status.';
COMMENT ON COLUMN edm.task_progress.priority IS 'Task priority.';
COMMENT ON COLUMN edm.task_progress.scheduled_at IS 'Start time.';
COMMENT ON COLUMN edm.task_progress.total IS 'Recipients.';
COMMENT ON COLUMN edm.task_progress.sent IS 'Sent.';
COMMENT ON COLUMN edm.task_progress.pending IS 'Waiting to be claimed.';
COMMENT ON COLUMN edm.task_progress.leased IS 'Being sent.';
COMMENT ON COLUMN edm.task_progress.failed IS 'Failed permanently.';
COMMENT ON COLUMN edm.task_progress.cancelled IS 'Cancelled.';
COMMENT ON COLUMN edm.task_progress.progress_pct IS 'Finished share (sent, failed or cancelled), percent.';
COMMENT ON COLUMN edm.task_progress.first_send_wait_s IS 'Seconds from scheduled_at to the first claim (or to now while waiting).';
COMMENT ON COLUMN edm.task_progress.sends_per_s IS 'Average sends per second since the first claim.';
COMMENT ON COLUMN edm.task_progress.eta_s IS 'Seconds left at the average rate (NULL before any send).';
COMMENT ON COLUMN edm.task_progress.last_activity_at IS 'Latest claim or completion.';
COMMENT ON COLUMN edm.task_progress.stuck_since IS 'When the sweep flagged the task as stuck.';

CREATE VIEW edm.service_status AS
SELECT s.service_id, s.name, s.transport, s.enabled,
       CASE WHEN NOT s.enabled THEN 'disabled'
            WHEN s.daily_quota = 0 OR edm.service_sent_today(s) >= s.daily_quota
                 OR s.quota_exhausted_until > now() THEN 'exhausted'
            WHEN s.backoff_until > now() THEN 'unhealthy'
            WHEN s.next_available_at > now() THEN 'throttled'
            ELSE 'ready' END AS state,
       nullif(s.next_available_at, '-infinity') AS next_available_at, s.interval_ms,
       s.daily_quota, edm.service_sent_today(s) AS sent_today,
       CASE WHEN s.daily_quota = 0 THEN 100.0
            ELSE round(100.0 * edm.service_sent_today(s) / s.daily_quota, 1) END AS quota_used_pct,
       (SELECT count(*) FROM edm.send_events e
        WHERE e.service_id = s.service_id AND e.kind = 'sent'
          AND e.occurred_at >= now() - interval '1 hour') AS sent_last_hour,
       s.success_rate, s.avg_response_ms, s.health, s.consecutive_failures, s.backoff_until,
       s.last_error, s.total_sent, s.total_failed
FROM edm.services s;
COMMENT ON VIEW edm.service_status IS
  'Per service: ready, throttled (interval), exhausted (daily quota), unhealthy (backing off) or disabled; sends in the last hour, quota used, success rate, average response time, last error.';
COMMENT ON COLUMN edm.service_status.service_id IS 'Service.';
COMMENT ON COLUMN edm.service_status.name IS 'Service name.';
COMMENT ON COLUMN edm.service_status.transport IS 'Transport kind.';
COMMENT ON COLUMN edm.service_status.enabled IS 'Enabled flag.';
COMMENT ON COLUMN edm.service_status.state IS 'ready, throttled, exhausted, unhealthy or disabled.';
COMMENT ON COLUMN edm.service_status.next_available_at IS 'Earliest next send start; NULL when nothing holds the service back.';
COMMENT ON COLUMN edm.service_status.interval_ms IS 'Interval between send starts (ms).';
COMMENT ON COLUMN edm.service_status.daily_quota IS 'Daily quota.';
COMMENT ON COLUMN edm.service_status.sent_today IS 'Send starts in the current quota day.';
COMMENT ON COLUMN edm.service_status.quota_used_pct IS 'Share of the daily quota used, percent.';
COMMENT ON COLUMN edm.service_status.sent_last_hour IS 'Messages sent in the last hour.';
COMMENT ON COLUMN edm.service_status.success_rate IS 'All-time success rate.';
COMMENT ON COLUMN edm.service_status.avg_response_ms IS 'Weighted mean response time (ms).';
COMMENT ON COLUMN edm.service_status.health IS 'healthy, degraded or backoff.';
COMMENT ON COLUMN edm.service_status.consecutive_failures IS 'Service-level failures in a row.';
COMMENT ON COLUMN edm.service_status.backoff_until IS 'Backing off until then.';
COMMENT ON COLUMN edm.service_status.last_error IS 'Last service-level error.';
COMMENT ON COLUMN edm.service_status.total_sent IS 'Sent, all time.';
COMMENT ON COLUMN edm.service_status.total_failed IS 'Failed attempts, all time.';

CREATE VIEW edm.system_health AS
SELECT (SELECT count(*) FROM edm.services) AS services_total,
       (SELECT count(*) FROM edm.services s WHERE s.enabled) AS services_enabled,
       (SELECT count(*) FROM edm.services s WHERE edm.service_is_ready(s)) AS services_available,
       (SELECT count(DISTINCT e.service_id) FROM edm.send_events e
        WHERE e.occurred_at >= now() - interval '1 minute' AND e.kind = 'sent') AS services_active_last_minute,
       (SELECT coalesce(sum(t.pending_count), 0) FROM edm.tasks t
        WHERE t.status IN ('scheduled', 'sending', 'paused')) AS pending_subtasks,
       (SELECT coalesce(sum(t.leased_count), 0) FROM edm.tasks t) AS leased_subtasks,
       (SELECT count(*) FROM edm.tasks t WHERE t.status IN ('scheduled', 'sending')) AS active_tasks,
       (SELECT count(*) FROM edm.send_events e
        WHERE e.occurred_at >= now() - interval '1 minute' AND e.kind = 'sent') AS sent_last_minute,
       (SELECT CASE WHEN count(*) = 0 THEN 0.0
                    ELSE round(count(*) FILTER (WHERE e.kind IN ('failed', 'retry', 'service_failure'))
                               * 1.0 / count(*), 4) END
        FROM edm.send_events e
        WHERE e.occurred_at >= now() - interval '1 hour'
          AND e.kind IN ('sent', 'failed', 'retry', 'service_failure')) AS error_rate_last_hour,
       (SELECT count(*) FROM edm.alerts a WHERE a.resolved_at IS NULL) AS open_alerts,
       (SELECT count(*) FROM edm.dispatchers d
        WHERE d.stopped_at IS NULL AND d.heartbeat_at > now() - interval '30 seconds') AS dispatchers_alive;
COMMENT ON VIEW edm.system_health IS
  'One row: services total / enabled / available now / active in the last minute (utilisation), queue sizes, active tasks, throughput and error rate, open alerts, live dispatchers.';
COMMENT ON COLUMN edm.system_health.services_total IS 'Services.';
COMMENT ON COLUMN edm.system_health.services_enabled IS 'Enabled services.';
COMMENT ON COLUMN edm.system_health.services_available IS 'Services ready to send right now.';
COMMENT ON COLUMN edm.system_health.services_active_last_minute IS 'Services that sent in the last minute.';
COMMENT ON COLUMN edm.system_health.pending_subtasks IS 'Subtasks waiting (in scheduled, sending or paused tasks).';
COMMENT ON COLUMN edm.system_health.leased_subtasks IS 'Subtasks being sent.';
COMMENT ON COLUMN edm.system_health.active_tasks IS 'Tasks scheduled or sending.';
COMMENT ON COLUMN edm.system_health.sent_last_minute IS 'Messages sent in the last minute.';
COMMENT ON COLUMN edm.system_health.error_rate_last_hour IS 'Failed, retried or service-failed attempts over all attempts in the last hour.';
COMMENT ON COLUMN edm.system_health.open_alerts IS 'Alerts not resolved.';
COMMENT ON COLUMN edm.system_health.dispatchers_alive IS 'Dispatchers with a heartbeat in the last 30 s.';

CREATE FUNCTION edm.task_wait_reason(p_task_id bigint, p_now timestamptz DEFAULT NULL)
RETURNS TABLE (reason text, until timestamptz)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  t edm.tasks;
  u edm.users;
  v_granted integer;
  v_enabled integer;
  v_ready integer;
  v_exhausted integer;
  v_backoff integer;
  v_next_interval timestamptz;
  v_next_quota timestamptz;
  v_next_backoff timestamptz;
  v_next_retry timestamptz;
BEGIN
  SELECT * INTO t FROM edm.tasks WHERE task_id = p_task_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown task %', p_task_id USING ERRCODE = 'ED001';
  END IF;
  SELECT * INTO u FROM edm.users WHERE user_id = t.user_id;
  IF t.status IN ('completed', 'cancelled', 'failed') THEN
    RETURN QUERY SELECT 'finished (' || t.status || ')', t.finished_at; RETURN;
  ELSIF t.status = 'draft' THEN
    IF u.quota_limit IS NOT NULL AND u.quota_used >= u.quota_limit THEN
      RETURN QUERY SELECT 'user quota exhausted', NULL::timestamptz; RETURN;
    END IF;
    RETURN QUERY SELECT 'draft: not submitted', NULL::timestamptz; RETURN;
  ELSIF t.status = 'expanding' THEN
    RETURN QUERY SELECT format('expanding recipients (%s so far)', t.total_count), NULL::timestamptz; RETURN;
  ELSIF t.status = 'paused' THEN
    RETURN QUERY SELECT 'paused', NULL::timestamptz; RETURN;
  ELSIF t.scheduled_at > v_now THEN
    RETURN QUERY SELECT 'scheduled later', t.scheduled_at; RETURN;
  ELSIF t.pending_count = 0 THEN
    RETURN QUERY SELECT 'sending: waiting for in-flight sends to complete', NULL::timestamptz; RETURN;
  END IF;

  SELECT count(*), count(*) FILTER (WHERE s.enabled),
         count(*) FILTER (WHERE edm.service_is_ready(s, v_now)),
         count(*) FILTER (WHERE s.enabled AND (s.daily_quota = 0
                            OR edm.service_sent_today(s, v_now) >= s.daily_quota)),
         count(*) FILTER (WHERE s.enabled AND s.backoff_until > v_now),
         min(edm.ts_add_ms(s.last_sent_at, s.interval_ms)) FILTER (WHERE s.enabled),
         min(coalesce(s.quota_exhausted_until, edm.service_next_quota_day(s.quota_tz, v_now)))
           FILTER (WHERE s.enabled AND s.daily_quota > 0
                   AND edm.service_sent_today(s, v_now) >= s.daily_quota),
         min(s.backoff_until) FILTER (WHERE s.enabled AND s.backoff_until > v_now)
  INTO v_granted, v_enabled, v_ready, v_exhausted, v_backoff, v_next_interval, v_next_quota,
       v_next_backoff
  FROM edm.grants g JOIN edm.services s ON s.service_id = g.service_id
  WHERE g.user_id = t.user_id;

  SELECT min(st.not_before) INTO v_next_retry FROM edm.subtasks st
  WHERE st.task_id = t.task_id AND st.status = 'pending';

  IF v_granted = 0 THEN
    RETURN QUERY SELECT 'no granted service', NULL::timestamptz;
  ELSIF v_enabled = 0 THEN
    RETURN QUERY SELECT 'all granted services disabled', NULL::timestamptz;
  ELSIF v_next_retry > v_now THEN
    RETURN QUERY SELECT 'retries waiting for their back-off', v_next_retry;
  ELSIF v_ready > 0 THEN
    RETURN QUERY SELECT 'in rotation: a granted service is ready; waiting for its turn among users',
                        NULL::timestamptz;
  ELSIF v_exhausted = v_enabled THEN
    RETURN QUERY SELECT 'service quotas exhausted', v_next_quota;
  ELSIF v_backoff + v_exhausted = v_enabled THEN
    RETURN QUERY SELECT 'granted services unhealthy (backing off)', least(v_next_backoff, v_next_quota);
  ELSE
    RETURN QUERY SELECT 'all granted services throttled', v_next_interval;
  END IF;
END;
$$;
COMMENT ON FUNCTION edm.task_wait_reason(bigint, timestamptz) IS
  'Why task p_task_id is not sending right now, and until when if known: scheduled later, paused, expanding, no granted service, all granted services disabled, throttled until T, quotas exhausted until T, backing off until T, retries in back-off until T, user quota exhausted, or in rotation.';

CREATE VIEW edm.task_wait_reasons AS
SELECT t.task_id, t.user_id, t.name, t.status, r.reason, r.until
FROM edm.tasks t
CROSS JOIN LATERAL edm.task_wait_reason(t.task_id) r
WHERE t.status IN ('draft', 'expanding', 'scheduled', 'sending', 'paused')
  AND (t.pending_count > 0 OR t.status IN ('draft', 'expanding'));
COMMENT ON VIEW edm.task_wait_reasons IS
  'For each task with work waiting: why it is not being sent right now and until when (see edm.task_wait_reason).';
COMMENT ON COLUMN edm.task_wait_reasons.task_id IS 'Task.';
COMMENT ON COLUMN edm.task_wait_reasons.user_id IS 'Owner.';
COMMENT ON COLUMN edm.task_wait_reasons.name IS 'Campaign name.';
COMMENT ON COLUMN edm.task_wait_reasons.status IS 'Task status.';
COMMENT ON COLUMN edm.task_wait_reasons.reason IS 'Why it waits.';
COMMENT ON COLUMN edm.task_wait_reasons.until IS 'When the reason ends, if known.';
