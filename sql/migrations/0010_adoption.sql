-- 0010_adoption.sql: status that tells the truth when adopting edm-sched.
--
-- * edm.live_dispatcher_count(p_now): dispatchers with a recent heartbeat.
-- * edm.task_wait_reason: says "no dispatcher running" when none is live
--   (before blaming services, which is what the reason said until now). The
--   function is 0004's with one block added, between the ">>> 0010_adoption"
--   and "<<< 0010_adoption" markers; a later replacement of the function keeps
--   that block at the same place (after the status checks, before the
--   services are examined).
-- * Quota alerts are resolved when their service's quota day ends (a claim or
--   edm.roll_quota_days moving quota_day forward), at the local midnight that
--   ended the day, rather than waiting for usage to drop below the threshold
--   (which the old day's alert could never see), and
--   edm.resolve_stale_quota_alerts(p_now) does the same for any service.

CREATE FUNCTION edm.live_dispatcher_count(p_now timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE sql STABLE
RETURN (SELECT count(*) FROM edm.dispatchers d
        WHERE d.stopped_at IS NULL
          AND d.heartbeat_at > coalesce(p_now, now()) - interval '30 seconds');
COMMENT ON FUNCTION edm.live_dispatcher_count(timestamptz) IS
  'Dispatchers not stopped whose heartbeat (every 10 s) is less than 30 s old at p_now (default now()): the same rule as edm.system_health.dispatchers_alive. 0 means nothing is sending.';

CREATE OR REPLACE FUNCTION edm.task_wait_reason(p_task_id bigint, p_now timestamptz DEFAULT NULL)
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
  v_bind_service text;
  v_bind_limit text;
  v_bind_at timestamptz;
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

  -- >>> 0010_adoption: no live dispatcher, no sends (whatever the services say).
  IF edm.live_dispatcher_count(v_now) = 0 THEN
    RETURN QUERY SELECT 'no dispatcher running (no heartbeat in the last 30 s): start edm-sched dispatch',
                        NULL::timestamptz;
    RETURN;
  END IF;
  -- <<< 0010_adoption

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
    -- Name the limit that binds (0008): on the granted service that frees first.
    SELECT s.name, b.limit_name, b.free_at INTO v_bind_service, v_bind_limit, v_bind_at
    FROM edm.grants g JOIN edm.services s ON s.service_id = g.service_id
    CROSS JOIN LATERAL edm.service_binding_limit(s, v_now) b
    WHERE g.user_id = t.user_id AND s.enabled
      AND (s.backoff_until IS NULL OR s.backoff_until <= v_now)
    ORDER BY b.free_at, s.service_id
    LIMIT 1;
    IF v_bind_limit IS NULL THEN
      RETURN QUERY SELECT 'all granted services throttled', v_next_interval;
    ELSE
      RETURN QUERY SELECT format('all granted services throttled: first to free is %s, held by its %s limit',
                                 v_bind_service, v_bind_limit), v_bind_at;
    END IF;
  END IF;
END;
$$;
COMMENT ON FUNCTION edm.task_wait_reason(bigint, timestamptz) IS
  'Why task p_task_id is not sending right now, and until when if known: scheduled later, paused, expanding, no dispatcher running (no live heartbeat, see edm.live_dispatcher_count), no granted service, all granted services disabled, throttled until T (naming the service that frees first and its binding limit: interval, daily_quota or an extra limit of edm.service_limits), quotas exhausted until T, backing off until T, retries in back-off until T, user quota exhausted, or in rotation.';

CREATE FUNCTION edm.resolve_stale_quota_alerts(p_now timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_n integer;
BEGIN
  -- An alert raised in an earlier quota day (in the service's quota_tz) than
  -- the one at p_now is over: it ended at that day's local midnight.
  UPDATE edm.alerts a
  SET resolved_at = edm.service_next_quota_day(s.quota_tz, a.raised_at)
  FROM edm.services s
  WHERE a.kind = 'quota' AND a.resolved_at IS NULL AND s.service_id = a.service_id
    AND (a.raised_at AT TIME ZONE s.quota_tz)::date
        < (coalesce(p_now, now()) AT TIME ZONE s.quota_tz)::date;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.resolve_stale_quota_alerts(timestamptz) IS
  'Resolves open quota alerts raised in an earlier quota day (in the service''s quota_tz) than the one at p_now (default now()), dated at the local midnight that ended that day. Returns how many. The trigger services_quota_day_alerts does the same as each service starts a new quota day.';

CREATE FUNCTION edm.trg_quota_day_alerts()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  UPDATE edm.alerts a
  SET resolved_at = edm.service_next_quota_day(NEW.quota_tz, a.raised_at)
  WHERE a.kind = 'quota' AND a.resolved_at IS NULL AND a.service_id = NEW.service_id
    AND (a.raised_at AT TIME ZONE NEW.quota_tz)::date < NEW.quota_day;
  RETURN NULL;
END;
$$;
COMMENT ON FUNCTION edm.trg_quota_day_alerts() IS
  'Trigger: when a service starts a new quota day (quota_day moves forward, by a claim or edm.roll_quota_days), its open quota alerts of earlier days are resolved at the local midnight that ended them.';

CREATE TRIGGER services_quota_day_alerts
AFTER UPDATE OF quota_day ON edm.services
FOR EACH ROW WHEN (NEW.quota_day IS DISTINCT FROM OLD.quota_day)
EXECUTE FUNCTION edm.trg_quota_day_alerts();
COMMENT ON TRIGGER services_quota_day_alerts ON edm.services IS
  'Resolves the quota alerts of a service''s past quota days as it starts a new one (edm.trg_quota_day_alerts).';

-- The monitoring role may ask whether anything is sending.
DO $$
DECLARE
  r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['edm_dispatcher', 'edm_app', 'edm_monitor'] LOOP
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
      EXECUTE format('GRANT EXECUTE ON FUNCTION edm.live_dispatcher_count(timestamptz) TO %I', r);
    END IF;
  END LOOP;
END;
$$;

SELECT edm.harden_functions();
