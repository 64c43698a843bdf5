-- 0014_claim_batched: batched claims (issue 14, point 4).
--
-- edm.claim_v2 keeps its signature and every rule of 0008 (slots, extra
-- limits, holds, the horizon, due retries first, grant tiers, lock order;
-- never waits). What changes is how a service's slots are filled: where a
-- service may take several slots now (no interval, or several slots of its
-- interval within the lookahead) and has no extra limit, ONE statement takes
-- them all: the next users of the rotation head (or of the service's small
-- pool) who may use the service, in the fair order, and for each (LATERAL)
-- its best task and that task's due retry or else its lowest pending
-- subtask, all locked with SKIP LOCKED. It keeps the longest prefix of users
-- that each got a subtask (what the row-by-row lookups would have chosen) and
-- leaves the rest to the row-by-row loop of 0008, unchanged: a user whose
-- best task had nothing claimable, the walk past the rotation head, the
-- wrap-around to users already served in this call, and services with extra
-- limits (edm.limits_next / limits_take per slot).
-- See docs/explanation/fairness.md, "Batched claims".

CREATE OR REPLACE FUNCTION edm.claim_v2(
  p_owner text,
  p_batch integer DEFAULT 1,
  p_lease_seconds integer DEFAULT NULL,
  p_now timestamptz DEFAULT NULL,
  p_per_service integer DEFAULT 1,
  p_lookahead_ms integer DEFAULT NULL,
  p_skip_services bigint[] DEFAULT '{}')
RETURNS TABLE (
  subtask_id bigint, task_id bigint, user_id text, service_id bigint, email text,
  contact_id bigint, template_idx smallint, vars jsonb, attempt smallint,
  send_at timestamptz, lease_expires_at timestamptz)
LANGUAGE plpgsql
-- Generic plans for every statement, from the first call. PL/pgSQL otherwise
-- re-plans a statement with its parameter values ("custom plans") while the
-- generic plan's estimate looks worse, which with array parameters it always
-- does: the small-pool lookup paid 0.5 ms of planning per execution (30 ms of
-- a 50 ms S2 claim), S1's claim 13-25 ms instead of 7. Every statement's
-- generic plan is checked by tests/sql/test_plan_regression.py.
SET plan_cache_mode = force_generic_plan
-- No JIT: the statements are sub-millisecond lookups, and a generic plan
-- whose estimate passes jit_above_cost would compile on every execution.
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
  v_now   timestamptz := coalesce(p_now, now());
  v_lease interval;
  v_svc   record;
  v_user  text;
  v_task  bigint;
  v_sub   bigint;
  v_prio  integer;
  v_task2 bigint;
  v_skip  text[] := '{}';
  v_tried bigint[];
  -- what this call claimed, one entry per subtask, in claim order
  c_svc   bigint[] := '{}';
  c_sub   bigint[] := '{}';
  c_task  bigint[] := '{}';
  c_user  text[] := '{}';
  -- rotation state of this call: served users / tasks, least recently served first
  r_users text[] := '{}';
  r_tasks bigint[] := '{}';
  v_seqs  bigint[];
  v_cands text[];
  v_pool  text[];
  v_small integer := edm.config_int('queue.small_pool_grantees');
  -- slots of this call: one per claimed subtask, in claim order
  c_slot  timestamptz[] := '{}';
  -- services found blocked by an extra limit before any slot, and until when
  b_svc   bigint[] := '{}';
  b_until timestamptz[] := '{}';
  v_horizon timestamptz;
  v_lead_at timestamptz;
  v_slot  timestamptz;
  v_k     integer;
  v_hold  interval := make_interval(secs => edm.config_int('queue.service_hold_seconds'));
  -- a batched fill (0014): how many slots to take at once, and what it found
  v_want  integer;
  b_user  text[];
  b_task  bigint[];
  b_sub   bigint[];
  i       integer;
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
  IF p_per_service IS NULL OR p_per_service NOT BETWEEN 1 AND 1000 THEN
    RAISE EXCEPTION 'claim: per-service batch must be between 1 and 1000, got %', p_per_service
      USING ERRCODE = 'ED005';
  END IF;
  IF p_lookahead_ms IS NOT NULL AND p_lookahead_ms NOT BETWEEN 0 AND 60000 THEN
    RAISE EXCEPTION 'claim: lookahead must be between 0 and 60000 ms, got %', p_lookahead_ms
      USING ERRCODE = 'ED005';
  END IF;
  v_lease := make_interval(secs => coalesce(p_lease_seconds,
                                            edm.config_int('queue.service_reservation_timeout')));
  -- A service whose next slot comes within the lookahead may be claimed now:
  -- the dispatcher prepares the message and the connection, then starts the
  -- send at the slot.
  v_horizon := v_now + coalesce(p_lookahead_ms, edm.config_int('queue.slot_lookahead_ms'))
                       * interval '1 millisecond';
  -- The lead is counted from the server's clock as the claim runs (its own
  -- statements take time), or from p_now when the caller sets the clock.
  v_lead_at := CASE WHEN p_now IS NULL THEN clock_timestamp() ELSE v_now END
               + least(coalesce(p_lookahead_ms, edm.config_int('queue.slot_lookahead_ms')),
                       edm.config_int('queue.slot_lead_ms')) * interval '1 millisecond';
  PERFORM edm.start_due_tasks(v_now);
  IF NOT EXISTS (SELECT 1 FROM edm.users u WHERE u.claimable_tasks > 0) THEN
    RETURN;
  END IF;

  -- The head of the rotation, read once per call: the next users in line
  -- (least recently served first) with claimable work, locked for this call.
  -- Each service below takes the first of them it may serve; only when none
  -- fits (dedicated services, or all of them served already) does it fall
  -- back to walking the rotation index itself.
  v_cands := ARRAY(
    SELECT u.user_id FROM edm.users u
    WHERE u.claimable_tasks > 0
    ORDER BY u.last_served_seq, u.user_id
    LIMIT 2 * p_batch
    FOR UPDATE OF u SKIP LOCKED);

  -- Ready services (next slot within the horizon, under the daily quota,
  -- not held by another dispatcher, not one the caller has no room for),
  -- least used quota first.
  FOR v_svc IN
    SELECT s.service_id, s.quota_tz, s.interval_ms, s.daily_quota, s.has_limits,
           s.next_available_at, edm.service_sent_today(s, v_now) AS sent_today
    FROM edm.services s
    WHERE s.enabled
      AND s.next_available_at <= v_horizon
      AND edm.service_sent_today(s, v_now) < s.daily_quota
      AND (s.held_until IS NULL OR s.held_until <= v_now OR s.held_by = p_owner)
      AND s.service_id <> ALL (p_skip_services)
    ORDER BY edm.service_sent_today(s, v_now)::double precision / s.daily_quota,
             s.success_rate DESC, s.service_id
    FOR UPDATE OF s SKIP LOCKED
  LOOP
    v_sub := NULL;
    -- The service's first slot: now, or its next available instant.
    v_slot := greatest(v_now, v_svc.next_available_at);
    -- ...no earlier than the lead for a paced service that was idle (see
    -- queue.slot_lead_ms): the dispatcher cannot start it sooner.
    IF (v_svc.interval_ms > 0 OR v_svc.has_limits) AND v_slot < v_lead_at THEN
      v_slot := v_lead_at;
    END IF;
    v_k := 0;
    -- A small pool (a dedicated service, a group's few accounts) is looked up
    -- from its own grants; a large one from the head of the global rotation,
    -- where nearly every user has a grant. Both find the same user. A pool is
    -- small when it has no grant past the first queue.small_pool_grantees (an
    -- index-only probe of a leaf page or two): a test that cannot go stale,
    -- unlike a count kept by triggers (bulk loads and replicas run without).
    -- Every lookup leaves out users with a ready service on a higher-priority
    -- grant (grant tiers; a service claimed earlier in this call is busy
    -- unless it has no interval). That check reads the user's few
    -- higher-priority grants and each one's service by primary key, in a
    -- scalar subquery: as a join, a generic plan may instead walk every ready
    -- service per candidate (2 ms a lookup on a freshly loaded 1,000-service
    -- world, found by python -m benchmarks claimprofile).
    v_pool := NULL;
    IF NOT EXISTS (SELECT 1 FROM edm.grants g WHERE g.service_id = v_svc.service_id
                   OFFSET v_small) THEN
      -- The pool's users with work, in rotation order. Read by primary key
      -- (= ANY): walking users_rotation_idx for the few users of a pool, what
      -- a planner may pick for an ORDER BY on it, costs O(users).
      v_pool := ARRAY(SELECT g.user_id FROM edm.grants g WHERE g.service_id = v_svc.service_id);
      v_pool := ARRAY(SELECT u.user_id FROM edm.users u
                      WHERE u.user_id = ANY (v_pool) AND u.claimable_tasks > 0
                      ORDER BY u.last_served_seq, u.user_id);
    END IF;
    -- Batched fill (0014): a service without extra limits whose next slots
    -- within the horizon are known in advance (all at v_slot when it has no
    -- interval, one interval apart otherwise) takes them in ONE statement:
    -- the next v_want users of the list below (the pool in rotation order,
    -- or the locked rotation head) who may use it, in that order, each with
    -- its best task and that task's due retry or else its lowest pending
    -- subtask. These are the lookups of the loop below, made for several
    -- users at once; the longest prefix of users who each got a subtask is
    -- exactly what the loop would have chosen slot by slot. What is left (a
    -- user whose best task had nothing claimable, the walk past the head,
    -- the wrap-around to users served in this call) is the loop's.
    IF NOT v_svc.has_limits THEN
      v_want := least(p_per_service, p_batch - cardinality(c_sub),
                      v_svc.daily_quota - v_svc.sent_today,
                      CASE WHEN v_svc.interval_ms > 0
                           THEN floor(extract(epoch FROM v_horizon - v_slot) * 1000
                                      / v_svc.interval_ms)::integer + 1
                           ELSE p_per_service END);
      IF v_want > 0 THEN
        SELECT array_agg(b.user_id ORDER BY b.n), array_agg(b.task_id ORDER BY b.n),
               array_agg(b.sub_id ORDER BY b.n)
        INTO b_user, b_task, b_sub
        FROM (
          SELECT bc.n, bc.user_id, bt.task_id, coalesce(br.sub_id, bf.sub_id) AS sub_id
          FROM (
            SELECT c.user_id, c.n
            FROM unnest(coalesce(v_pool, v_cands)) WITH ORDINALITY AS c(user_id, n)
            WHERE c.user_id <> ALL (v_skip) AND c.user_id <> ALL (r_users)
              -- CASE keeps the loop's order: a user is locked only once it fits
              AND CASE WHEN (
                SELECT true FROM edm.grants g
                WHERE g.service_id = v_svc.service_id AND g.user_id = c.user_id
                  AND NOT EXISTS (
                    SELECT 1 FROM edm.grants g2
                    WHERE g2.user_id = c.user_id AND g2.priority > g.priority
                      AND (SELECT s2.enabled AND s2.next_available_at <= v_horizon
                                   AND edm.service_sent_today(s2, v_now) < s2.daily_quota
                                   AND (s2.service_id <> ALL (c_svc)
                                        OR (s2.interval_ms = 0
                                            AND edm.service_sent_today(s2, v_now) + 1 < s2.daily_quota))
                           FROM edm.services s2 WHERE s2.service_id = g2.service_id))
                LIMIT 1)
              -- a pool's users are not locked yet: one locked by another
              -- claim is being served, leave it out
              THEN v_pool IS NULL
                   OR coalesce((SELECT true FROM edm.users pu
                                WHERE pu.user_id = c.user_id AND pu.claimable_tasks > 0
                                FOR UPDATE OF pu SKIP LOCKED), false)
              ELSE false END
            ORDER BY c.n
            LIMIT v_want) bc
          LEFT JOIN LATERAL (
            SELECT bt0.task_id FROM edm.tasks bt0
            WHERE bt0.user_id = bc.user_id AND bt0.claimable
            ORDER BY bt0.priority DESC, bt0.last_served_seq, bt0.task_id
            LIMIT 1
            FOR UPDATE OF bt0 SKIP LOCKED) bt ON true
          LEFT JOIN LATERAL (
            SELECT bs0.subtask_id AS sub_id FROM edm.subtasks bs0
            WHERE bs0.task_id = bt.task_id AND bs0.status = 'pending'
              AND bs0.not_before > '-infinity' AND bs0.not_before <= v_now
              AND bs0.subtask_id <> ALL (c_sub)
            ORDER BY bs0.not_before, bs0.subtask_id
            LIMIT 1
            FOR UPDATE OF bs0 SKIP LOCKED) br ON true
          -- the fresh lookup runs only for a task without a due retry
          LEFT JOIN LATERAL (
            SELECT bs1.subtask_id AS sub_id FROM edm.subtasks bs1
            WHERE br.sub_id IS NULL
              AND bs1.task_id = bt.task_id AND bs1.status = 'pending'
              AND bs1.not_before = '-infinity'
              AND bs1.subtask_id <> ALL (c_sub)
            ORDER BY bs1.not_before, bs1.subtask_id
            LIMIT 1
            FOR UPDATE OF bs1 SKIP LOCKED) bf ON true) b;
        FOR i IN 1 .. coalesce(cardinality(b_user), 0) LOOP
          EXIT WHEN b_sub[i] IS NULL;
          c_svc := c_svc || v_svc.service_id;
          c_sub := c_sub || b_sub[i];
          c_task := c_task || b_task[i];
          c_user := c_user || b_user[i];
          c_slot := c_slot || v_slot;
          r_users := r_users || b_user[i];  -- not served before in this call
          r_tasks := r_tasks || b_task[i];
          v_k := v_k + 1;
          v_slot := v_slot + v_svc.interval_ms * interval '1 millisecond';
        END LOOP;
      END IF;
    END IF;
    -- One iteration per slot: a service whose limits allow several sends
    -- within the horizon (a burst, or no interval) takes up to p_per_service,
    -- each to the next user in the fair order (r_users rotates).
    <<slots>>
    LOOP
    EXIT slots WHEN v_k >= p_per_service OR cardinality(c_sub) >= p_batch;
    v_sub := NULL;
    IF v_svc.has_limits THEN
      v_slot := edm.limits_next(v_svc.service_id, v_slot, v_svc.quota_tz);
    END IF;
    IF v_slot > v_horizon THEN
      IF v_k = 0 THEN  -- an extra limit blocks the service beyond the horizon
        b_svc := b_svc || v_svc.service_id;
        b_until := b_until || v_slot;
      END IF;
      EXIT slots;
    END IF;
    EXIT slots WHEN v_svc.sent_today + v_k >= v_svc.daily_quota;
    LOOP
      v_user := NULL;
      -- The first user of the list (the small pool in rotation order, or the
      -- rotation head, already locked) who has a grant here and no ready
      -- higher-tier service, each probed by a scalar subquery: as an EXISTS
      -- it would become a semi-join, which a planner may hash over all the
      -- service's grants instead of stopping at the first that fits.
      SELECT c.user_id INTO v_user
      FROM unnest(coalesce(v_pool, v_cands)) WITH ORDINALITY AS c(user_id, n)
      WHERE c.user_id <> ALL (v_skip) AND c.user_id <> ALL (r_users)
        AND (
          SELECT true FROM edm.grants g
          WHERE g.service_id = v_svc.service_id AND g.user_id = c.user_id
            AND NOT EXISTS (
              SELECT 1 FROM edm.grants g2
              WHERE g2.user_id = c.user_id AND g2.priority > g.priority
                AND (SELECT s2.enabled AND s2.next_available_at <= v_horizon
                             AND edm.service_sent_today(s2, v_now) < s2.daily_quota
                             AND (s2.service_id <> ALL (c_svc)
                                  OR (s2.interval_ms = 0
                                      AND edm.service_sent_today(s2, v_now) + 1 < s2.daily_quota))
                     FROM edm.services s2 WHERE s2.service_id = g2.service_id))
          LIMIT 1)
      ORDER BY c.n
      LIMIT 1;
      IF v_user IS NOT NULL AND v_pool IS NOT NULL THEN
        -- A pool's users are not locked yet; one locked by another claim is
        -- being served: leave it out and look again.
        PERFORM 1 FROM edm.users u
        WHERE u.user_id = v_user AND u.claimable_tasks > 0
        FOR UPDATE OF u SKIP LOCKED;
        IF NOT FOUND THEN
          v_skip := v_skip || v_user;
          CONTINUE;
        END IF;
      END IF;
      -- Large pool and nobody in the head fits: walk the rotation further.
      IF v_user IS NULL AND v_pool IS NULL THEN
        SELECT u.user_id INTO v_user
        FROM edm.users u
        WHERE u.claimable_tasks > 0
          AND u.user_id <> ALL (v_cands)
          AND u.user_id <> ALL (v_skip)
          AND u.user_id <> ALL (r_users)
          AND EXISTS (
            SELECT 1 FROM edm.grants g
            WHERE g.service_id = v_svc.service_id AND g.user_id = u.user_id
              AND NOT EXISTS (
                SELECT 1 FROM edm.grants g2
                WHERE g2.user_id = u.user_id AND g2.priority > g.priority
                  AND (SELECT s2.enabled AND s2.next_available_at <= v_horizon
                               AND edm.service_sent_today(s2, v_now) < s2.daily_quota
                               AND (s2.service_id <> ALL (c_svc)
                                    OR (s2.interval_ms = 0
                                        AND edm.service_sent_today(s2, v_now) + 1 < s2.daily_quota))
                       FROM edm.services s2 WHERE s2.service_id = g2.service_id)))
        ORDER BY u.last_served_seq, u.user_id
        LIMIT 1
        FOR UPDATE OF u SKIP LOCKED;
      END IF;
      -- ...then (the rotation wraps around) those served in this call, in serve order.
      IF v_user IS NULL AND cardinality(r_users) > 0 THEN
        SELECT u.user_id INTO v_user
        FROM edm.users u
        WHERE u.user_id = ANY (r_users) AND u.user_id <> ALL (v_skip)
          AND EXISTS (
            SELECT 1 FROM edm.grants g
            WHERE g.service_id = v_svc.service_id AND g.user_id = u.user_id
              AND NOT EXISTS (
                SELECT 1 FROM edm.grants g2
                WHERE g2.user_id = u.user_id AND g2.priority > g.priority
                  AND (SELECT s2.enabled AND s2.next_available_at <= v_horizon
                               AND edm.service_sent_today(s2, v_now) < s2.daily_quota
                               AND (s2.service_id <> ALL (c_svc)
                                    OR (s2.interval_ms = 0
                                        AND edm.service_sent_today(s2, v_now) + 1 < s2.daily_quota))
                       FROM edm.services s2 WHERE s2.service_id = g2.service_id)))
        ORDER BY array_position(r_users, u.user_id)
        LIMIT 1;
      END IF;
      EXIT WHEN v_user IS NULL;

      v_tried := '{}';
      LOOP
        -- The user's best task not served in this call (priority, then rotation)...
        v_task := NULL;
        SELECT t.task_id, t.priority INTO v_task, v_prio FROM edm.tasks t
        WHERE t.user_id = v_user AND t.claimable
          AND t.task_id <> ALL (v_tried) AND t.task_id <> ALL (r_tasks)
        ORDER BY t.priority DESC, t.last_served_seq, t.task_id
        LIMIT 1
        FOR UPDATE OF t SKIP LOCKED;
        -- ...unless a task served in this call has a higher priority (or there is no other).
        IF c_user @> ARRAY[v_user] THEN
          SELECT t.task_id INTO v_task2 FROM edm.tasks t
          WHERE t.task_id = ANY (r_tasks) AND t.user_id = v_user AND t.claimable
            AND t.task_id <> ALL (v_tried)
            AND (v_task IS NULL OR t.priority > v_prio)
          ORDER BY t.priority DESC, array_position(r_tasks, t.task_id)
          LIMIT 1;
          v_task := coalesce(v_task2, v_task);
        END IF;
        EXIT WHEN v_task IS NULL;
        -- Due retries first (I9: a retry goes at its due time, not behind
        -- its task's fresh recipients), then the lowest fresh or returned
        -- recipient (not_before = -infinity). Both walk subtasks_claim_idx.
        SELECT st.subtask_id INTO v_sub
        FROM edm.subtasks st
        WHERE st.task_id = v_task AND st.status = 'pending'
          AND st.not_before > '-infinity' AND st.not_before <= v_now
          AND st.subtask_id <> ALL (c_sub)
        ORDER BY st.not_before, st.subtask_id
        LIMIT 1
        FOR UPDATE OF st SKIP LOCKED;
        IF v_sub IS NULL THEN
          SELECT st.subtask_id INTO v_sub
          FROM edm.subtasks st
          WHERE st.task_id = v_task AND st.status = 'pending' AND st.not_before = '-infinity'
            AND st.subtask_id <> ALL (c_sub)
          ORDER BY st.not_before, st.subtask_id
          LIMIT 1
          FOR UPDATE OF st SKIP LOCKED;
        END IF;
        EXIT WHEN v_sub IS NOT NULL;
        v_tried := v_tried || v_task;
      END LOOP;
      EXIT WHEN v_sub IS NOT NULL;
      v_skip := v_skip || v_user;
    END LOOP;
    EXIT slots WHEN v_sub IS NULL;

    c_svc := c_svc || v_svc.service_id;
    c_sub := c_sub || v_sub;
    c_task := c_task || v_task;
    c_user := c_user || v_user;
    c_slot := c_slot || v_slot;
    r_users := array_remove(r_users, v_user) || v_user;
    r_tasks := array_remove(r_tasks, v_task) || v_task;
    IF v_svc.has_limits THEN
      PERFORM edm.limits_take(v_svc.service_id, v_slot, v_svc.quota_tz);
    END IF;
    v_k := v_k + 1;
    EXIT slots WHEN v_k >= p_per_service OR cardinality(c_sub) >= p_batch;
    v_slot := v_slot + v_svc.interval_ms * interval '1 millisecond';
    END LOOP slots;
    EXIT WHEN cardinality(c_sub) >= p_batch;
  END LOOP;

  -- Services an extra limit blocks: out of the ready set until it frees.
  IF cardinality(b_svc) > 0 THEN
    UPDATE edm.services s SET quota_exhausted_until = b.until
    FROM unnest(b_svc, b_until) AS b(service_id, until)
    WHERE s.service_id = b.service_id AND s.service_id = ANY (b_svc);
  END IF;

  IF cardinality(c_sub) = 0 THEN
    RETURN;
  END IF;

  -- One statement per table for the whole batch (each row is already locked).
  SELECT array_agg(nextval('edm.serve_seq') ORDER BY i) INTO v_seqs
  FROM generate_series(1, cardinality(c_sub)) i;

  -- Each claimed service: its latest slot starts the interval, its slots
  -- count against the daily quota, the claimer holds it, and the time an
  -- exhausted quota or extra limit next admits a send keeps it out of the
  -- ready set until then.
  UPDATE edm.services s
  SET last_sent_at = a.last_slot,
      sent_today = CASE WHEN s.quota_day = (v_now AT TIME ZONE s.quota_tz)::date
                        THEN s.sent_today + a.n ELSE a.n END,
      quota_day = (v_now AT TIME ZONE s.quota_tz)::date,
      quota_exhausted_until =
        CASE WHEN (CASE WHEN s.quota_day = (v_now AT TIME ZONE s.quota_tz)::date
                        THEN s.sent_today + a.n ELSE a.n END) >= s.daily_quota
               THEN edm.service_next_quota_day(s.quota_tz, v_now)
             WHEN s.has_limits
               THEN nullif(edm.limits_next(s.service_id, a.last_slot, s.quota_tz), a.last_slot) END,
      -- a service with nothing to pace (no interval, no extra limit) is not held
      held_by = CASE WHEN s.interval_ms > 0 OR s.has_limits THEN p_owner END,
      held_until = CASE WHEN s.interval_ms > 0 OR s.has_limits THEN a.last_slot + v_hold END
  FROM (SELECT x.service_id, count(*)::integer AS n, max(x.slot) AS last_slot
        FROM unnest(c_svc, c_slot) AS x(service_id, slot) GROUP BY x.service_id) a
  WHERE s.service_id = a.service_id
    AND s.service_id = ANY (c_svc);  -- redundant: lets every plan start from services_pkey

  UPDATE edm.tasks t
  SET pending_count = t.pending_count - a.n,
      leased_count = t.leased_count + a.n,
      last_served_seq = a.seq,
      last_activity_at = v_now,
      first_claimed_at = coalesce(t.first_claimed_at, v_now),
      stuck_since = NULL
  FROM (SELECT x.task_id, count(*) AS n, max(x.seq) AS seq
        FROM unnest(c_task, v_seqs) AS x(task_id, seq) GROUP BY x.task_id) a
  WHERE t.task_id = a.task_id
    AND t.task_id = ANY (c_task);  -- redundant: lets every plan start from tasks_pkey

  UPDATE edm.users u SET last_served_seq = a.seq, last_served_at = v_now
  FROM (SELECT x.user_id, max(x.seq) AS seq
        FROM unnest(c_user, v_seqs) AS x(user_id, seq) GROUP BY x.user_id) a
  WHERE u.user_id = a.user_id
    AND u.user_id = ANY (c_user);  -- redundant: lets every plan start from users_pkey

  -- Rows in claim order (the order of the services), as the row-by-row version returned them.
  RETURN QUERY
  WITH leased AS (
    UPDATE edm.subtasks st
    SET status = 'leased', lease_owner = p_owner, leased_at = x.slot,
        lease_expires_at = x.slot + v_lease, service_id = x.service_id,
        attempts = st.attempts + 1
    FROM unnest(c_sub, c_svc, c_user, c_slot) AS x(subtask_id, service_id, user_id, slot)
    WHERE st.subtask_id = x.subtask_id
    RETURNING st.subtask_id, st.task_id, x.user_id, st.service_id, st.email, st.contact_id,
              st.template_idx, st.vars, st.attempts, st.leased_at, st.lease_expires_at
  )
  SELECT l.subtask_id, l.task_id, l.user_id, l.service_id, l.email, l.contact_id,
         l.template_idx, l.vars, l.attempts, l.leased_at, l.lease_expires_at
  FROM leased l JOIN unnest(c_sub) WITH ORDINALITY AS o(id, n) ON o.id = l.subtask_id
  ORDER BY o.n;
END;
$$;
COMMENT ON FUNCTION edm.claim_v2(text, integer, integer, timestamptz, integer, integer, bigint[]) IS
  'Claims up to p_batch subtasks in one transaction and hands each its slot (send_at: the instant its send may start). For each ready service (next slot within p_lookahead_ms, default queue.slot_lookahead_ms; under its daily quota and every extra limit; not held by another dispatcher; not in p_skip_services), lowest quota share first: up to p_per_service slots, one interval apart and within every limit, each to the least recently served user with work and a grant, that user''s least recently served task (priority first), and its due retry or else its lowest pending subtask. Leases each from its slot for p_lease_seconds, counts the slots against the limits and holds the service for the claimer. Never waits on a lock.';


SELECT edm.harden_functions();
