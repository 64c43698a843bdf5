-- 0030_small_pools: the slots of a small pool's services, once its users
-- were served in the call (issue 14, point 4; docs/performance.md, "S2 and S3
-- after session 11").
--
-- The batched fill (0014) gives each user of a service's small pool at most
-- one slot a call: a user served once in the call is left to the
-- slot-by-slot loop, whose rotation then wraps around to the users served in
-- the call. Measured with pg_stat_statements on S2 and S3 x 0.3 (one
-- dispatcher), that loop was most of what the claim cost per send:
--
-- * On a service with a single grantee with work (the dedicated account of
--   S2, the most common shape of a sending account), every slot after the
--   first went through it: for each slot, the lookup of the next user, the
--   wrap to the users served in the call, the user's task not served in the
--   call, the tasks served in the call, its due retry, its fresh recipient:
--   about 89 us of the claim's 313 us per send.
-- * The wrap probed the grant (and grant tier) of every user served in the
--   call, up to the batch (200), to find the first with a grant on the
--   service: 114 us of S3's 389 us per send.
--
-- 1. The single-user pass. When the service's pool (its grantees with
--    claimable work) is one user, already served in the call and not skipped
--    for it, and no shaping layer, extra limit, transactional work or
--    suspended site applies to the service, the claim locks the user's tasks
--    in the loop's order (priority first; then those not served in the call,
--    least recently served first; then those served in the call, in serve
--    order), takes from each up to ceil(want / tasks) recipients (its due
--    retries first, then its lowest fresh ones), and deals them out in the
--    loop's order: each priority level in rounds, one recipient of each task
--    a round. Where a task may hold more recipients than it was asked for,
--    the slots from its next round on are left to the loop: what the pass
--    takes is always the first slots the loop would have given, in its
--    order. The user's and its tasks' rotation within the call end as the
--    loop leaves them.
-- 2. The wrap walks the users served in the call in serve order and stops
--    at the first with a grant on the service (and no ready higher tier):
--    the grants of those after it are no longer probed. On a small pool it
--    looks at the pool's users only: a user served in the call holds
--    claimable work until the call ends (its row is locked by the call, and
--    counters change at its end), so those served in the call with a grant
--    on the service are exactly the pool's users among them.
--
-- 3. The loop's first lookup, on a small pool, walks the pool's users not
--    served in the call (read once a service, each then taken out as the
--    loop serves it) instead of comparing every user of the pool with every
--    user served in the call at each slot (44 us of S3's claim per send).
--
-- tests/sql/test_claim_batched.py checks all three against the slot-by-slot claim
-- of 0008 on generated worlds, and the pass on worlds built to make it stop
-- early.

SELECT edm.patch_function(
  'edm.claim_v2(text, integer, integer, timestamptz, integer, integer, bigint[])'::regprocedure,
  ARRAY[[
$p$  v_empty    bigint[];$p$,
$p$  v_empty    bigint[];
  -- 0030: the single-user pass (once per service), and what it found: the
  -- user's tasks in the loop's order with their priority levels (1 the
  -- highest), the recipients taken from each (w_sub, task by task: w_n of them
  -- from w_off + 1), the most asked of one task, and the first (level, round,
  -- task) not known
  v_one      boolean;
  w_task     bigint[];
  w_lvl      integer[];
  w_sub      bigint[];
  w_n        integer[];
  w_off      integer[];
  w_got      bigint[];
  v_l        integer;
  v_cut      integer[];
  -- 0030: the small pool's users not served in the call, in pool order (the
  -- slots loop's first lookup walks these, not the whole pool)
  v_left     text[];$p$], [
$p$    v_fill := NOT v_svc.has_limits AND NOT v_tx_here;$p$,
$p$    v_fill := NOT v_svc.has_limits AND NOT v_tx_here;
    v_one := true;
    v_left := NULL;$p$], [
$p$      CONTINUE slots;
    END IF;
    v_sub := NULL;$p$,
$p$      CONTINUE slots;
    END IF;
    -- 0030: the pool's one user with work, served already in this call: the
    -- loop below would give it every slot left, one at a time, its tasks in
    -- turn. One pass takes the first of those slots in the loop's order.
    IF v_one AND v_pool IS NOT NULL AND cardinality(v_pool) = 1
       AND v_pool[1] = ANY (r_users) AND v_pool[1] <> ALL (v_skip_call)
       AND NOT v_shaped AND NOT v_svc.has_limits AND NOT v_tx_here
       AND cardinality(v_sdom) = 0 THEN
      v_one := false;
      v_user := v_pool[1];
      v_want := least(p_per_service - v_k, p_batch - cardinality(c_sub),
                      v_svc.daily_quota - v_svc.sent_today - v_k,
                      CASE WHEN v_svc.interval_ms > 0
                           THEN floor(extract(epoch FROM v_horizon - v_slot) * 1000
                                      / v_svc.interval_ms)::integer + 1
                           ELSE p_per_service END);
      -- (its grant here, and no ready service of a higher tier: as the loop
      -- checks at each slot; the slots taken here change neither)
      IF v_want > 1 AND (
          SELECT true FROM edm.grants g
          WHERE g.service_id = v_svc.service_id AND g.user_id = v_user
            AND NOT EXISTS (
              SELECT 1 FROM edm.grants g2
              WHERE g2.user_id = v_user AND g2.priority > g.priority
                AND (SELECT edm.service_free_for_tier(s2, v_horizon, v_now, c_svc)
                     FROM edm.services s2 WHERE s2.service_id = g2.service_id))
          LIMIT 1) THEN
        -- The user's tasks in the loop's order, locked (those served in the
        -- call are locked already); no more than could take a slot each.
        -- (each with its level: the rank of its priority, highest first)
        SELECT coalesce(array_agg(t.task_id ORDER BY t.n), '{}'),
               coalesce(array_agg(t.lvl ORDER BY t.n), '{}')
        INTO w_task, w_lvl
        FROM (SELECT t1.task_id,
                     row_number() OVER (ORDER BY t1.priority DESC, t1.served, t1.pos,
                                        t1.last_served_seq, t1.task_id) AS n,
                     dense_rank() OVER (ORDER BY t1.priority DESC)::integer AS lvl
              FROM (SELECT t0.task_id, t0.priority, t0.last_served_seq,
                           t0.task_id = ANY (r_tasks) AS served,
                           array_position(r_tasks, t0.task_id) AS pos
                    FROM edm.tasks t0
                    WHERE t0.user_id = v_user AND t0.claimable
                      AND t0.task_id <> ALL (v_empty)
                    ORDER BY t0.priority DESC, t0.task_id = ANY (r_tasks),
                             array_position(r_tasks, t0.task_id), t0.last_served_seq,
                             t0.task_id
                    LIMIT v_want
                    FOR UPDATE OF t0 SKIP LOCKED) t1) t;
        v_l := (v_want + cardinality(w_task) - 1) / greatest(cardinality(w_task), 1);
        -- Up to v_l recipients of each task: its due retries, then its lowest
        -- fresh ones (the loop's lookups, v_l at a time).
        w_sub := '{}';
        w_n := '{}';
        w_off := '{}';
        -- the first (level, round, task) past what is known: a task given all
        -- it was asked may hold more (its next round). (Tasks not locked
        -- above may hold some too, but only when the limit gave one round,
        -- v_l = 1: each comes after every task locked, in the last level.)
        v_cut := NULL;
        FOR j IN 1 .. cardinality(w_task) LOOP
          w_got := ARRAY(
            SELECT st.subtask_id FROM edm.subtasks st
            WHERE st.task_id = w_task[j] AND st.status = 'pending'
              AND st.not_before > '-infinity' AND st.not_before <= v_now
              AND st.subtask_id <> ALL (c_sub)
            ORDER BY st.not_before, st.subtask_id
            LIMIT v_l
            FOR UPDATE OF st SKIP LOCKED);
          IF cardinality(w_got) < v_l THEN
            w_got := w_got || ARRAY(
              SELECT st.subtask_id FROM edm.subtasks st
              WHERE st.task_id = w_task[j] AND st.status = 'pending'
                AND st.not_before = '-infinity'
                AND st.subtask_id <> ALL (c_sub)
              ORDER BY st.not_before, st.subtask_id
              LIMIT v_l - cardinality(w_got)
              FOR UPDATE OF st SKIP LOCKED);
          END IF;
          w_off := w_off || cardinality(w_sub);
          w_n := w_n || cardinality(w_got);
          w_sub := w_sub || w_got;
          IF cardinality(w_got) = v_l
             AND (v_cut IS NULL OR ARRAY[w_lvl[j], v_l + 1, j] < v_cut) THEN
            v_cut := ARRAY[w_lvl[j], v_l + 1, j];
          END IF;
        END LOOP;
        -- Dealt in the loop's order: level by level, a round at a time, one
        -- recipient of each task with one left; up to the first slot not known.
        i := 0;
        <<deal>>
        FOR v_lvl_i IN 1 .. coalesce(w_lvl[cardinality(w_lvl)], 0) LOOP
          FOR v_rn IN 1 .. v_l LOOP
            FOR j IN 1 .. cardinality(w_task) LOOP
              CONTINUE WHEN w_lvl[j] <> v_lvl_i OR w_n[j] < v_rn;
              EXIT deal WHEN v_cut IS NOT NULL AND ARRAY[v_lvl_i, v_rn, j] >= v_cut;
              EXIT deal WHEN i >= v_want;
              i := i + 1;
              c_svc := c_svc || v_svc.service_id;
              c_sub := c_sub || w_sub[w_off[j] + v_rn];
              c_task := c_task || w_task[j];
              c_user := c_user || v_user;
              c_slot := c_slot || v_slot;
              r_users := array_remove(r_users, v_user) || v_user;
              r_tasks := array_remove(r_tasks, w_task[j]) || w_task[j];
              v_k := v_k + 1;
              v_slot := v_slot + v_svc.interval_ms * interval '1 millisecond';
            END LOOP;
          END LOOP;
        END LOOP deal;
      END IF;
      CONTINUE slots;
    END IF;
    v_sub := NULL;$p$], [
$p$      IF v_user IS NULL AND cardinality(r_users) > 0 THEN
        SELECT u.user_id INTO v_user
        FROM edm.users u
        WHERE u.user_id = ANY (r_users) AND u.user_id <> ALL (v_skip)
          AND EXISTS (
            SELECT 1 FROM edm.grants g
            WHERE g.service_id = v_svc.service_id AND g.user_id = u.user_id
              AND NOT EXISTS (
                SELECT 1 FROM edm.grants g2
                WHERE g2.user_id = u.user_id AND g2.priority > g.priority
                  AND (SELECT edm.service_free_for_tier(s2, v_horizon, v_now, c_svc)
                       FROM edm.services s2 WHERE s2.service_id = g2.service_id)))
        ORDER BY array_position(r_users, u.user_id)
        LIMIT 1;$p$,
$p$      IF v_user IS NULL AND cardinality(r_users) > 0 THEN
        -- (0030: walked in serve order up to the first that fits, a grant
        -- probed only for it and those before it; of a small pool, only
        -- its users)
        SELECT c.user_id INTO v_user
        FROM unnest(r_users) WITH ORDINALITY AS c(user_id, n)
        WHERE (v_pool IS NULL OR c.user_id = ANY (v_pool)) AND c.user_id <> ALL (v_skip)
          AND EXISTS (
            SELECT 1 FROM edm.grants g
            WHERE g.service_id = v_svc.service_id AND g.user_id = c.user_id
              AND NOT EXISTS (
                SELECT 1 FROM edm.grants g2
                WHERE g2.user_id = c.user_id AND g2.priority > g.priority
                  AND (SELECT edm.service_free_for_tier(s2, v_horizon, v_now, c_svc)
                       FROM edm.services s2 WHERE s2.service_id = g2.service_id)))
        ORDER BY c.n
        LIMIT 1;$p$], [
$p$      SELECT c.user_id INTO v_user
      FROM unnest(coalesce(v_pool, v_cands[v_from:])) WITH ORDINALITY AS c(user_id, n)$p$,
$p$      -- (0030: of a small pool, its users not served in the call: read once
      -- a service, each served in the loop then taken out)
      IF v_pool IS NOT NULL AND v_left IS NULL THEN
        v_left := ARRAY(SELECT x.user_id FROM unnest(v_pool) WITH ORDINALITY AS x(user_id, n)
                        WHERE x.user_id <> ALL (r_users) ORDER BY x.n);
      END IF;
      SELECT c.user_id INTO v_user
      FROM unnest(coalesce(v_left, v_cands[v_from:])) WITH ORDINALITY AS c(user_id, n)$p$], [
$p$    r_users := array_remove(r_users, v_user) || v_user;
    r_tasks := array_remove(r_tasks, v_task) || v_task;$p$,
$p$    r_users := array_remove(r_users, v_user) || v_user;
    r_tasks := array_remove(r_tasks, v_task) || v_task;
    v_left := array_remove(v_left, v_user);$p$]],
  '0030_small_pools');
