-- 0002_dispatch.sql: readiness, the fair claim, completion, lease expiry.
--
-- Errors raised here use SQLSTATEs of the private class ED, mapped onto typed
-- Python errors by edm_sched/db.py:
--   ED001 not found, ED002 quota exceeded, ED003 invalid transition,
--   ED004 lease lost, ED005 invalid argument, ED006 config value rejected.
--
-- Locking discipline (why the claim cannot deadlock):
--   * the claim never waits: every row it locks (services, users, tasks,
--     subtasks) is taken with SKIP LOCKED;
--   * everything else that locks several rows (completion, sweeps, pause,
--     cancel) locks in one global order: subtasks, then services by id, then
--     tasks by id, then users (through the claimable trigger).
-- A wait-for cycle needs two waiters holding each other's rows; claims never
-- wait, and the other writers all acquire in the same order.

-- ---------------------------------------------------------------------------
-- Config access
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.config_int(p_key text)
RETURNS integer
LANGUAGE sql STABLE
RETURN (SELECT (c.value #>> '{}')::numeric::integer FROM edm.config c WHERE c.key = p_key);
COMMENT ON FUNCTION edm.config_int(text) IS 'Integer value of config key p_key (NULL when absent).';

-- ---------------------------------------------------------------------------
-- Task bookkeeping triggers
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.tasks_track_status()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    NEW.prev_status := NULL;
  ELSE
    NEW.prev_status := OLD.status;
  END IF;
  NEW.updated_at := now();
  IF NEW.status = 'sending' AND NEW.started_at IS NULL THEN
    NEW.started_at := now();
  END IF;
  IF NEW.status IN ('completed', 'cancelled', 'failed') THEN
    NEW.finished_at := coalesce(NEW.finished_at, now());
  END IF;
  RETURN NEW;
END;
$$;
COMMENT ON FUNCTION edm.tasks_track_status() IS
  'Trigger: records prev_status on every status change (so tasks_transition_ok can check the transition) and stamps started_at / finished_at.';

CREATE TRIGGER tasks_track_status_ins BEFORE INSERT ON edm.tasks
  FOR EACH ROW EXECUTE FUNCTION edm.tasks_track_status();
CREATE TRIGGER tasks_track_status_upd BEFORE UPDATE OF status ON edm.tasks
  FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
  EXECUTE FUNCTION edm.tasks_track_status();

CREATE FUNCTION edm.tasks_sync_claimable()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.claimable THEN
    UPDATE edm.users SET claimable_tasks = claimable_tasks - 1 WHERE user_id = OLD.user_id;
  END IF;
  IF TG_OP IN ('UPDATE', 'INSERT') AND NEW.claimable THEN
    UPDATE edm.users SET claimable_tasks = claimable_tasks + 1 WHERE user_id = NEW.user_id;
  END IF;
  IF TG_OP IN ('UPDATE', 'INSERT') AND NEW.claimable THEN
    PERFORM pg_notify('edm_wakeup', NEW.task_id::text);
  END IF;
  RETURN NULL;
END;
$$;
COMMENT ON FUNCTION edm.tasks_sync_claimable() IS
  'Trigger: keeps edm.users.claimable_tasks equal to the user''s tasks with claimable = true, and wakes dispatchers (NOTIFY edm_wakeup) when a task becomes claimable.';

CREATE TRIGGER tasks_sync_claimable_ins AFTER INSERT ON edm.tasks
  FOR EACH ROW WHEN (NEW.claimable) EXECUTE FUNCTION edm.tasks_sync_claimable();
CREATE TRIGGER tasks_sync_claimable_upd AFTER UPDATE OF status, pending_count ON edm.tasks
  FOR EACH ROW WHEN (OLD.claimable IS DISTINCT FROM NEW.claimable)
  EXECUTE FUNCTION edm.tasks_sync_claimable();
CREATE TRIGGER tasks_sync_claimable_del AFTER DELETE ON edm.tasks
  FOR EACH ROW WHEN (OLD.claimable) EXECUTE FUNCTION edm.tasks_sync_claimable();

-- ---------------------------------------------------------------------------
-- Readiness
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.service_sent_today(s edm.services, p_now timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE sql STABLE
RETURN CASE WHEN s.quota_day = (coalesce(p_now, now()) AT TIME ZONE s.quota_tz)::date
            THEN s.sent_today ELSE 0 END;
COMMENT ON FUNCTION edm.service_sent_today(edm.services, timestamptz) IS
  'Sends the service started in its current quota day (0 once its local midnight has passed).';

CREATE FUNCTION edm.service_is_ready(s edm.services, p_now timestamptz DEFAULT NULL)
RETURNS boolean
LANGUAGE sql STABLE
RETURN s.enabled
   AND s.next_available_at <= coalesce(p_now, now())
   AND edm.service_sent_today(s, p_now) < s.daily_quota;
COMMENT ON FUNCTION edm.service_is_ready(edm.services, timestamptz) IS
  'A ready service: enabled, healthy (not backing off), under its daily quota for its current quota day, and its interval elapsed. The same predicate as the claim''s service scan.';

CREATE FUNCTION edm.service_next_quota_day(p_tz text, p_now timestamptz)
RETURNS timestamptz
LANGUAGE sql STABLE
RETURN ((p_now AT TIME ZONE p_tz)::date + 1)::timestamp AT TIME ZONE p_tz;
COMMENT ON FUNCTION edm.service_next_quota_day(text, timestamptz) IS
  'The next local midnight in time zone p_tz after p_now: when a new quota day starts (DST-safe).';

-- ---------------------------------------------------------------------------
-- Scheduled tasks start
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.start_due_tasks(p_now timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_n integer;
BEGIN
  -- SKIP LOCKED: a task being paused or cancelled right now is left alone,
  -- and two dispatchers never wait on each other here.
  UPDATE edm.tasks t SET status = 'sending'
  WHERE t.task_id IN (
    SELECT d.task_id FROM edm.tasks d
    WHERE d.status = 'scheduled' AND d.scheduled_at <= coalesce(p_now, now())
    ORDER BY d.scheduled_at
    LIMIT 1000
    FOR UPDATE SKIP LOCKED);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.start_due_tasks(timestamptz) IS
  'Moves scheduled tasks whose scheduled_at has come to sending. Called at the start of every claim; returns how many started.';

-- ---------------------------------------------------------------------------
-- The claim
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.claim(
  p_owner text,
  p_batch integer DEFAULT 1,
  p_lease_seconds integer DEFAULT NULL,
  p_now timestamptz DEFAULT NULL)
RETURNS TABLE (
  subtask_id bigint, task_id bigint, user_id text, service_id bigint, email text,
  contact_id bigint, template_idx smallint, vars jsonb, attempt smallint,
  leased_at timestamptz, lease_expires_at timestamptz)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  v_now   timestamptz := coalesce(p_now, now());
  v_lease interval;
  v_svc   record;
  v_user  text;
  v_task  bigint;
  v_sub   bigint;
  v_seq   bigint;
  v_local date;
  v_skip  text[] := '{}';
  v_count integer := 0;
BEGIN
  IF p_owner IS NULL OR length(p_owner) NOT BETWEEN 1 AND 200 THEN
    RAISE EXCEPTION 'claim: owner must be 1 to 200 characters' USING ERRCODE = 'ED005';
  END IF;
  IF p_batch IS NULL OR p_batch NOT BETWEEN 1 AND 1000 THEN
    RAISE EXCEPTION 'claim: batch size must be between 1 and 1000, got %', p_batch
      USING ERRCODE = 'ED005';
  END IF;
  IF p_lease_seconds IS NOT NULL AND p_lease_seconds NOT BETWEEN 1 AND 86400 THEN
    RAISE EXCEPTION 'claim: lease must be between 1 and 86400 seconds, got %', p_lease_seconds
      USING ERRCODE = 'ED005';
  END IF;
  v_lease := make_interval(secs => coalesce(p_lease_seconds,
                                            edm.config_int('queue.service_reservation_timeout')));

  PERFORM edm.start_due_tasks(v_now);

  -- Cheap exit when nobody has work: the common idle case costs one probe of
  -- the partial rotation index.
  IF NOT EXISTS (SELECT 1 FROM edm.users u WHERE u.claimable_tasks > 0) THEN
    RETURN;
  END IF;

  -- Ready services, best first by the documented strategy: the lowest used
  -- share of today's quota, then the highest success rate. SKIP LOCKED: a
  -- service another dispatcher is claiming on is simply not ours this round,
  -- and the readiness predicate is re-checked on the latest row version, so
  -- two dispatchers can never both start a send inside one interval (I2).
  FOR v_svc IN
    SELECT s.service_id, s.quota_tz
    FROM edm.services s
    WHERE s.enabled
      AND s.next_available_at <= v_now
      AND edm.service_sent_today(s, v_now) < s.daily_quota
    ORDER BY edm.service_sent_today(s, v_now)::double precision / s.daily_quota,
             s.success_rate DESC, s.service_id
    FOR UPDATE OF s SKIP LOCKED
  LOOP
    v_sub := NULL;
    LOOP
      -- The user served least recently among those with claimable work and a
      -- grant on this service (design.md §6). Users whose higher-priority
      -- granted services are ready use those instead (grant priority tiers).
      -- SKIP LOCKED: a user another dispatcher is serving right now is being
      -- served; the next one in rotation gets this slot.
      SELECT u.user_id INTO v_user
      FROM edm.users u
      WHERE u.claimable_tasks > 0
        AND u.user_id <> ALL (v_skip)
        AND EXISTS (
          SELECT 1 FROM edm.grants g
          WHERE g.service_id = v_svc.service_id AND g.user_id = u.user_id
            AND NOT EXISTS (
              SELECT 1 FROM edm.grants g2
              JOIN edm.services s2 ON s2.service_id = g2.service_id
              WHERE g2.user_id = u.user_id AND g2.priority > g.priority
                AND s2.enabled AND s2.next_available_at <= v_now
                AND edm.service_sent_today(s2, v_now) < s2.daily_quota))
      ORDER BY u.last_served_seq, u.user_id
      LIMIT 1
      FOR UPDATE OF u SKIP LOCKED;
      EXIT WHEN NOT FOUND;

      -- That user's task served least recently (priority first), then the
      -- task's lowest pending subtask that is due. A task locked by a
      -- completion in flight is skipped rather than waited for.
      -- LIMIT: planned as an ordered scan of tasks_rotation_idx (a user's
      -- first few tasks in rotation order), not a sort of all its tasks.
      FOR v_task IN
        SELECT t.task_id FROM edm.tasks t
        WHERE t.user_id = v_user AND t.claimable
        ORDER BY t.priority DESC, t.last_served_seq, t.task_id
        LIMIT 32
        FOR UPDATE OF t SKIP LOCKED
      LOOP
        SELECT st.subtask_id INTO v_sub
        FROM edm.subtasks st
        WHERE st.task_id = v_task AND st.status = 'pending' AND st.not_before <= v_now
        ORDER BY st.not_before, st.subtask_id
        LIMIT 1
        FOR UPDATE OF st SKIP LOCKED;
        EXIT WHEN v_sub IS NOT NULL;
      END LOOP;
      EXIT WHEN v_sub IS NOT NULL;
      -- Nothing due for this user right now (only retries in back-off, or
      -- rows locked by others): leave it out for the rest of this call.
      v_skip := v_skip || v_user;
    END LOOP;
    CONTINUE WHEN v_sub IS NULL;

    v_seq := nextval('edm.serve_seq');
    v_local := (v_now AT TIME ZONE v_svc.quota_tz)::date;

    -- The service: send start recorded (interval counts from here) and one
    -- unit of today's quota consumed; exhausted until local midnight.
    UPDATE edm.services s
    SET last_sent_at = v_now,
        sent_today = CASE WHEN s.quota_day = v_local THEN s.sent_today + 1 ELSE 1 END,
        quota_day = v_local,
        quota_exhausted_until =
          CASE WHEN (CASE WHEN s.quota_day = v_local THEN s.sent_today + 1 ELSE 1 END) >= s.daily_quota
               THEN edm.service_next_quota_day(s.quota_tz, v_now) END
    WHERE s.service_id = v_svc.service_id;

    UPDATE edm.tasks t
    SET pending_count = t.pending_count - 1,
        leased_count = t.leased_count + 1,
        last_served_seq = v_seq,
        last_activity_at = v_now,
        first_claimed_at = coalesce(t.first_claimed_at, v_now),
        stuck_since = NULL
    WHERE t.task_id = v_task;

    UPDATE edm.users u SET last_served_seq = v_seq, last_served_at = v_now
    WHERE u.user_id = v_user;

    RETURN QUERY
    UPDATE edm.subtasks st
    SET status = 'leased', lease_owner = p_owner, leased_at = v_now,
        lease_expires_at = v_now + v_lease, service_id = v_svc.service_id,
        attempts = st.attempts + 1
    WHERE st.subtask_id = v_sub
    RETURNING st.subtask_id, st.task_id, v_user, st.service_id, st.email, st.contact_id,
              st.template_idx, st.vars, st.attempts, st.leased_at, st.lease_expires_at;

    v_count := v_count + 1;
    EXIT WHEN v_count >= p_batch;
  END LOOP;
END;
$$;
COMMENT ON FUNCTION edm.claim(text, integer, integer, timestamptz) IS
  'Claims up to p_batch subtasks, at most one per ready service, in one transaction: for each ready service (lowest quota share, then best success rate) the least recently served user with work and a grant, that user''s least recently served task (priority first), and its lowest due pending subtask. Leases it to p_owner, starts the service''s interval and consumes its quota. Never waits on a lock.';

-- ---------------------------------------------------------------------------
-- Completion
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.smtp_code_suppresses(p_code integer)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN p_code IN (550, 551, 553);
COMMENT ON FUNCTION edm.smtp_code_suppresses(integer) IS
  'True for permanent reply codes that mean the address itself is bad (550 mailbox unavailable, 551 user not local, 553 mailbox name not allowed): the address is suppressed for everyone.';

CREATE FUNCTION edm.complete(
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
             WHERE o IS NULL OR o NOT IN ('sent', 'transient', 'permanent', 'service', 'released')) THEN
    RAISE EXCEPTION 'complete: outcome must be sent, transient, permanent, service or released'
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

  RETURN QUERY
  WITH input AS (
    SELECT i.subtask_id, i.outcome, i.code, left(i.detail, 2000) AS detail, i.response_ms,
           left(i.provider_id, 500) AS provider_id
    FROM unnest(p_subtask_ids, p_outcomes,
                coalesce(p_codes, array_fill(NULL::integer, ARRAY[v_n])),
                coalesce(p_details, array_fill(NULL::text, ARRAY[v_n])),
                coalesce(p_response_ms, array_fill(NULL::integer, ARRAY[v_n])),
                coalesce(p_provider_ids, array_fill(NULL::text, ARRAY[v_n])))
         AS i(subtask_id, outcome, code, detail, response_ms, provider_id)
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
           CASE i.outcome
             WHEN 'sent' THEN 'sent'
             WHEN 'permanent' THEN 'failed'
             WHEN 'transient' THEN CASE WHEN st.attempts >= v_max_attempts THEN 'failed'
                                        WHEN t.status = 'cancelled' THEN 'cancelled'
                                        ELSE 'pending' END
             ELSE CASE WHEN t.status = 'cancelled' THEN 'cancelled' ELSE 'pending' END
           END AS new_status,
           -- service and released outcomes did not send: give the quota back
           -- when the claim counted it on the service's current quota day.
           (i.outcome IN ('service', 'released')
            AND (st.leased_at AT TIME ZONE s.quota_tz)::date = s.quota_day) AS refund_quota
    FROM input i
    LEFT JOIN edm.subtasks st ON st.subtask_id = i.subtask_id
    LEFT JOIN edm.tasks t ON t.task_id = st.task_id
    LEFT JOIN edm.services s ON s.service_id = st.service_id
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
        backoff_until = CASE WHEN a.n_service > 0
          THEN v_now + make_interval(secs => least(v_svc_max::double precision,
                 v_svc_base * power(2, least(s.consecutive_failures + a.n_service - 1, 30))))
          ELSE s.backoff_until END,
        health = CASE WHEN a.n_service > 0 THEN 'backoff'
                      WHEN a.n_sent > 0 AND a.n_failed = 0 THEN 'healthy'
                      WHEN a.n_failed > 0 THEN 'degraded'
                      ELSE s.health END,
        last_error = CASE WHEN a.n_service > 0 THEN a.last_service_error ELSE s.last_error END
    FROM (
      SELECT p.service_id,
             count(*) FILTER (WHERE p.outcome = 'sent') AS n_sent,
             count(*) FILTER (WHERE p.outcome IN ('transient', 'permanent')) AS n_failed,
             count(*) FILTER (WHERE p.outcome = 'service') AS n_service,
             count(*) FILTER (WHERE p.refund_quota) AS n_refund,
             avg(p.response_ms) FILTER (WHERE p.outcome = 'sent') AS avg_ms,
             max(p.detail) FILTER (WHERE p.outcome = 'service') AS last_service_error
      FROM plan p WHERE p.ok GROUP BY p.service_id
    ) a
    WHERE s.service_id = a.service_id
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
        stuck_since = NULL,
        status = CASE WHEN t.status = 'sending' AND t.pending_count + a.n_pending = 0
                           AND t.leased_count - a.n = 0 THEN 'completed'
                      ELSE t.status END
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
        attempts = CASE WHEN p.outcome IN ('service', 'released') THEN greatest(st.attempts - 1, 0)
                        ELSE st.attempts END,
        not_before = CASE
          WHEN p.new_status = 'pending' AND p.outcome = 'transient'
            THEN v_now + make_interval(secs => least(v_retry_max::double precision,
                                                     v_retry_base * power(2, least(st.attempts - 1, 30))))
          -- not sent (service failure, release): back to its place in line
          WHEN p.new_status = 'pending' THEN '-infinity'
          ELSE st.not_before END,
        outcome_code = coalesce(p.code, st.outcome_code),
        outcome_detail = CASE WHEN p.new_status = 'failed' AND p.outcome = 'transient'
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
                WHEN p.outcome = 'sent' THEN 'sent'
                WHEN p.outcome = 'service' THEN 'service_failure'
                WHEN p.outcome = 'released' THEN 'released'
                WHEN p.new_status = 'failed' THEN 'failed'
                WHEN p.new_status = 'cancelled' THEN 'cancelled'
                ELSE 'retry' END,
           p.attempts, p.leased_at, p.code, p.response_ms, p_owner,
           CASE WHEN p.ok THEN p.detail ELSE p.reject_reason || ' (reported ' || p.outcome || ')' END
    FROM plan p
    WHERE p.task_id IS NOT NULL
  ),
  suppress AS (
    INSERT INTO edm.suppressions (user_id, email, reason, source_subtask_id)
    SELECT DISTINCT ON (p.email) NULL::text, p.email, 'hard_bounce', p.subtask_id
    FROM plan p
    WHERE p.ok AND p.outcome = 'permanent' AND edm.smtp_code_suppresses(p.code)
    ORDER BY p.email, p.subtask_id
    ON CONFLICT DO NOTHING
  )
  SELECT p.subtask_id, p.ok, CASE WHEN p.ok THEN p.new_status ELSE p.old_status END, p.reject_reason
  FROM plan p;
END;
$$;
COMMENT ON FUNCTION edm.complete(text, bigint[], text[], integer[], text[], integer[], text[], timestamptz) IS
  'Records the outcomes of claimed subtasks in one transaction, fenced by the lease: only p_owner, before the lease expires, may complete. Outcomes: sent; transient (retry with back-off, failed after queue.max_attempts); permanent (failed; address suppressed for 550/551/553); service (the service backs off, the subtask returns to pending without using an attempt); released (unsent, e.g. shutdown). Task counters, service statistics, send_events and (for subtasks of a cancelled task, which end cancelled) the refund of the owner''s quota change together; rejected completions are returned with a reason and recorded as late_completion.';

-- ---------------------------------------------------------------------------
-- Lease expiry (the recovery sweep of I1 / I7)
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.expire_leases(p_now timestamptz DEFAULT NULL, p_limit integer DEFAULT 10000)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_now timestamptz := coalesce(p_now, now());
  v_ids bigint[];
  v_max_attempts integer := edm.config_int('queue.max_attempts');
  v_n integer;
BEGIN
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000000 THEN
    RAISE EXCEPTION 'expire_leases: limit must be between 1 and 1000000' USING ERRCODE = 'ED005';
  END IF;
  -- Subtasks first (a completion racing us holds its rows: skip them; it will
  -- be rejected or has just succeeded), then tasks in id order.
  SELECT array_agg(x.subtask_id) INTO v_ids FROM (
    SELECT st.subtask_id FROM edm.subtasks st
    WHERE st.status = 'leased' AND st.lease_expires_at <= v_now
    ORDER BY st.subtask_id
    LIMIT p_limit
    FOR NO KEY UPDATE SKIP LOCKED) x;
  IF v_ids IS NULL THEN
    RETURN 0;
  END IF;
  PERFORM 1 FROM edm.tasks t
  WHERE t.task_id IN (SELECT st.task_id FROM edm.subtasks st WHERE st.subtask_id = ANY (v_ids))
  ORDER BY t.task_id FOR NO KEY UPDATE;
  PERFORM 1 FROM edm.users u
  WHERE u.user_id IN (SELECT t.user_id FROM edm.subtasks st JOIN edm.tasks t ON t.task_id = st.task_id
                      WHERE st.subtask_id = ANY (v_ids) AND t.status = 'cancelled')
  ORDER BY u.user_id FOR NO KEY UPDATE;

  WITH plan AS (
    SELECT st.subtask_id, st.task_id, st.service_id, st.attempts, st.leased_at, st.lease_owner,
           t.user_id,
           CASE WHEN t.status = 'cancelled' THEN 'cancelled'
                WHEN st.attempts >= v_max_attempts THEN 'failed'
                ELSE 'pending' END AS new_status
    FROM edm.subtasks st JOIN edm.tasks t ON t.task_id = st.task_id
    WHERE st.subtask_id = ANY (v_ids)
  ),
  upd_tasks AS (
    UPDATE edm.tasks t
    SET leased_count = t.leased_count - a.n,
        pending_count = t.pending_count + a.n_pending,
        failed_count = t.failed_count + a.n_failed,
        cancelled_count = t.cancelled_count + a.n_cancelled,
        quota_reserved = greatest(t.quota_reserved - a.n_failed - a.n_cancelled, 0),
        status = CASE WHEN t.status = 'sending' AND t.pending_count + a.n_pending = 0
                           AND t.leased_count - a.n = 0 THEN 'completed'
                      ELSE t.status END
    FROM (SELECT p.task_id, count(*) AS n,
                 count(*) FILTER (WHERE p.new_status = 'pending') AS n_pending,
                 count(*) FILTER (WHERE p.new_status = 'failed') AS n_failed,
                 count(*) FILTER (WHERE p.new_status = 'cancelled') AS n_cancelled
          FROM plan p GROUP BY p.task_id) a
    WHERE t.task_id = a.task_id
  ),
  upd_subtasks AS (
    UPDATE edm.subtasks st
    SET status = p.new_status, lease_owner = NULL, lease_expires_at = NULL,
        lease_expiries = st.lease_expiries + 1,
        not_before = CASE WHEN p.new_status = 'pending' THEN '-infinity' ELSE st.not_before END,
        outcome_detail = CASE WHEN p.new_status = 'failed'
                              THEN 'lease expired on the last allowed attempt (outcome unknown)'
                              ELSE st.outcome_detail END,
        finished_at = CASE WHEN p.new_status <> 'pending' THEN v_now END
    FROM plan p WHERE st.subtask_id = p.subtask_id
  ),
  -- cancelled, never sent: refund the owner's quota (as in edm.complete)
  refund_users AS (
    UPDATE edm.users u SET quota_used = u.quota_used - a.n
    FROM (SELECT p.user_id, count(*) AS n FROM plan p
          WHERE p.new_status = 'cancelled' GROUP BY p.user_id) a
    WHERE u.user_id = a.user_id
  )
  INSERT INTO edm.send_events (occurred_at, subtask_id, task_id, user_id, service_id, kind,
                               attempt, started_at, dispatcher, detail)
  SELECT v_now, p.subtask_id, p.task_id, p.user_id, p.service_id, 'lease_expired',
         p.attempts, p.leased_at, p.lease_owner,
         'lease expired: the send may or may not have happened; now ' || p.new_status
  FROM plan p;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.expire_leases(timestamptz, integer) IS
  'Returns subtasks whose lease expired to pending (or failed after queue.max_attempts, or cancelled when their task was, refunding the owner''s quota), counting lease_expiries and recording a lease_expired event: the uncertain outcomes of I1. Returns how many it handled.';

-- ---------------------------------------------------------------------------
-- When to wake up
-- ---------------------------------------------------------------------------

CREATE FUNCTION edm.next_wakeup(p_now timestamptz DEFAULT NULL)
RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  v_at timestamptz;
BEGIN
  v_at := least(
    -- Walk services_ready_idx in time order and stop at the first service
    -- some user with work may use (a LIMIT 1 probe each keeps it a nested
    -- loop instead of hashing every user).
    (SELECT s.next_available_at FROM edm.services s
     WHERE s.enabled AND s.daily_quota > 0
       AND EXISTS (SELECT 1 FROM edm.grants g JOIN edm.users u ON u.user_id = g.user_id
                   WHERE g.service_id = s.service_id AND u.claimable_tasks > 0 LIMIT 1)
     ORDER BY s.next_available_at LIMIT 1),
    (SELECT min(t.scheduled_at) FROM edm.tasks t WHERE t.status = 'scheduled'),
    (SELECT min(st.lease_expires_at) FROM edm.subtasks st WHERE st.status = 'leased'));
  IF v_at IS NULL THEN
    RETURN NULL;  -- nothing is waiting
  END IF;
  -- A time already past (including -infinity: a service never used) is "now".
  RETURN greatest(v_at, coalesce(p_now, now()));
END;
$$;
COMMENT ON FUNCTION edm.next_wakeup(timestamptz) IS
  'The earliest time a claim or a lease expiry could next have work: a service with work becoming ready, a scheduled task starting, or a lease expiring. NULL when nothing is waiting. Dispatchers sleep until then (or a NOTIFY).';
