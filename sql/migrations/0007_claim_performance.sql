-- 0007_claim_performance: the claim and the wake-up probe, rewritten after
-- the measurements of the performance suite (docs/performance.md, findings
-- 1, 2, 4, 6, 9 and 10). Same decisions as the row-by-row edm.claim of 0002 (checked
-- call by call against it on random worlds: tests/test_claim_equivalence.py),
-- fewer statements:
--   * the head of the user rotation (2 x batch users with work) is read and
--     locked once per call; each ready service takes the first of them it may
--     serve and walks users_rotation_idx itself only when none fits (dedicated
--     services) or all were served in this call (fewer users than services).
--     0002 walked the index once per claimed subtask, past the dead and locked
--     entries the walk itself had left: O(batch^2) per call;
--   * the writes (services, tasks, users, subtasks) are four set-based
--     statements at the end of the call instead of four per claimed subtask:
--     every UPDATE executed from PL/pgSQL starts an executor and re-prepares
--     the table's CHECK expressions (50-100 us on edm.tasks) whatever it
--     changes. Lock order is unchanged: every row is locked by the lookups,
--     in the documented order, before any write;
--   * rotation inside a call is tracked in arrays (served users and tasks,
--     least recently served first), so the choices match the row-by-row
--     version's, which saw its own writes;
--   * a service granted to few users (a dedicated account, a group's pool)
--     reads its grantees with work by primary key, in rotation order, and
--     takes the first that fits as a large pool does from the rotation head:
--     its users are rarely in the head, and walking the rotation for one
--     user is O(users);
--   * every statement runs its generic plan (SET plan_cache_mode): custom
--     re-planning on every execution cost more than the statements;
--   * the user's next task is a LIMIT 1 query in a loop: an ordered scan of
--     tasks_rotation_idx instead of tasks_user_idx + Sort of all its tasks.
-- edm.next_wakeup probes each service with a scalar LIMIT 1 subquery: an
-- EXISTS (... LIMIT 1) is flattened into a semi-join that hashed every user
-- with work (6.6 ms at 10,000 users; 0.17 ms as a nested loop).

-- Which lookup a service uses (see edm.claim below).
INSERT INTO edm.config (key, value, default_value, category, value_type, min_value, max_value, unit, description) VALUES
  ('queue.small_pool_grantees', '100', '100', 'queue', 'integer', 0, 10000, 'users', 'A service granted to at most this many users finds its next user from its own grants; a larger one from the head of the user rotation. Changes speed only, never which user is chosen.');

CREATE OR REPLACE FUNCTION edm.claim(
  p_owner text,
  p_batch integer DEFAULT 1,
  p_lease_seconds integer DEFAULT NULL,
  p_now timestamptz DEFAULT NULL)
RETURNS TABLE (
  subtask_id bigint, task_id bigint, user_id text, service_id bigint, email text,
  contact_id bigint, template_idx smallint, vars jsonb, attempt smallint,
  leased_at timestamptz, lease_expires_at timestamptz)
LANGUAGE plpgsql
-- Generic plans for every statement, from the first call. PL/pgSQL otherwise
-- re-plans a statement with its parameter values ("custom plans") while the
-- generic plan's estimate looks worse, which with array parameters it always
-- does: the small-pool lookup paid 0.5 ms of planning per execution (30 ms of
-- a 50 ms S2 claim), S1's claim 13-25 ms instead of 7. Every statement's
-- generic plan is checked by tests/test_plan_regression.py.
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
                AND (SELECT s2.enabled AND s2.next_available_at <= v_now
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
                  AND (SELECT s2.enabled AND s2.next_available_at <= v_now
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
                  AND (SELECT s2.enabled AND s2.next_available_at <= v_now
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
        SELECT st.subtask_id INTO v_sub
        FROM edm.subtasks st
        WHERE st.task_id = v_task AND st.status = 'pending' AND st.not_before <= v_now
          AND st.subtask_id <> ALL (c_sub)
        ORDER BY st.not_before, st.subtask_id
        LIMIT 1
        FOR UPDATE OF st SKIP LOCKED;
        EXIT WHEN v_sub IS NOT NULL;
        v_tried := v_tried || v_task;
      END LOOP;
      EXIT WHEN v_sub IS NOT NULL;
      v_skip := v_skip || v_user;
    END LOOP;
    CONTINUE WHEN v_sub IS NULL;

    c_svc := c_svc || v_svc.service_id;
    c_sub := c_sub || v_sub;
    c_task := c_task || v_task;
    c_user := c_user || v_user;
    r_users := array_remove(r_users, v_user) || v_user;
    r_tasks := array_remove(r_tasks, v_task) || v_task;
    EXIT WHEN cardinality(c_sub) >= p_batch;
  END LOOP;

  IF cardinality(c_sub) = 0 THEN
    RETURN;
  END IF;

  -- One statement per table for the whole batch (each row is already locked).
  SELECT array_agg(nextval('edm.serve_seq') ORDER BY i) INTO v_seqs
  FROM generate_series(1, cardinality(c_sub)) i;

  UPDATE edm.services s
  SET last_sent_at = v_now,
      sent_today = CASE WHEN s.quota_day = (v_now AT TIME ZONE s.quota_tz)::date
                        THEN s.sent_today + 1 ELSE 1 END,
      quota_day = (v_now AT TIME ZONE s.quota_tz)::date,
      quota_exhausted_until =
        CASE WHEN (CASE WHEN s.quota_day = (v_now AT TIME ZONE s.quota_tz)::date
                        THEN s.sent_today + 1 ELSE 1 END) >= s.daily_quota
             THEN edm.service_next_quota_day(s.quota_tz, v_now) END
  WHERE s.service_id = ANY (c_svc);

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
    SET status = 'leased', lease_owner = p_owner, leased_at = v_now,
        lease_expires_at = v_now + v_lease, service_id = x.service_id,
        attempts = st.attempts + 1
    FROM unnest(c_sub, c_svc, c_user) AS x(subtask_id, service_id, user_id)
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
COMMENT ON FUNCTION edm.claim(text, integer, integer, timestamptz) IS
  'Claims up to p_batch subtasks, at most one per ready service, in one transaction: for each ready service (lowest quota share, then best success rate) the least recently served user with work and a grant, that user''s least recently served task (priority first), and its lowest due pending subtask. Leases it to p_owner, starts the service''s interval and consumes its quota. Never waits on a lock. Reads the head of the user rotation once per call and writes each table once per call.';

CREATE OR REPLACE FUNCTION edm.next_wakeup(p_now timestamptz DEFAULT NULL)
RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  v_at timestamptz;
BEGIN
  v_at := least(
    -- Walk services_ready_idx in time order and stop at the first service
    -- some user with work may use. The probe is a scalar subquery, not
    -- EXISTS: PostgreSQL flattens EXISTS into a semi-join (dropping its
    -- LIMIT) and hashes every user with work on each call.
    (SELECT s.next_available_at FROM edm.services s
     WHERE s.enabled AND s.daily_quota > 0
       AND (SELECT true FROM edm.grants g JOIN edm.users u ON u.user_id = g.user_id
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

-- CREATE OR REPLACE resets SECURITY DEFINER and the pinned search_path that
-- 0006 gave these functions (their privileges and comments are kept).
SELECT edm.harden_functions();
