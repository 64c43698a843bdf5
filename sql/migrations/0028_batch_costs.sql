-- 0028_batch_costs: what a claim and a completion cost grows with the batch
-- only as the rows do (issue 14, point 4; docs/performance.md, "S1 after
-- session 10").
--
-- The claim (edm.claim_v2). Both lookups of the next user for a slot (the
-- batched fill and the slot-by-slot loop) walk the rotation head read at the
-- start of the call in its order, leaving out the users this call has served
-- or skipped. Each lookup walked the whole head from its first user and
-- compared every user with all of those served so far: a call of batch b ran
-- b / 16 fills over up to b served users each, O(b^3 / 16) comparisons of user
-- ids, 2.7 ms a fill at batch 400 (more than the rest of the call). The call
-- now keeps where the head's users it has not served or skipped begin, and
-- both lookups start there. Every user before that position is one they
-- leave out anyway (served: r_users; skipped for the call: v_skip_call, part
-- of every slot's v_skip), so which users, tasks and subtasks a call claims,
-- and in what order, does not change.
--
-- The completion (edm.complete). It locked the subtasks, then the services
-- and the tasks of those leased (each a statement reading the subtasks
-- again), then the owners of cancelled tasks (a join of subtasks and tasks),
-- four statements whatever the batch. The subtasks' lock now reads their
-- services and tasks, the tasks' lock reads which are cancelled, and the
-- owners are locked only when one is. The lock order (subtasks, services,
-- tasks, users) is unchanged. The service statistics' UPDATE starts from the
-- services' ids (services_pkey) instead of hashing every service.

SELECT edm.patch_function(
  'edm.claim_v2(text, integer, integer, timestamptz, integer, integer, bigint[])'::regprocedure,
  ARRAY[[
$p$  v_skip_call text[] := '{}';  -- users skipped for the whole call (v_skip adds this slot's)$p$,
$p$  v_skip_call text[] := '{}';  -- users skipped for the whole call (v_skip adds this slot's)
  -- 0028: where the rotation head's users this call has neither served nor
  -- skipped begin (every user before it has been)
  v_from     integer := 1;$p$], [
$p$    <<slots>>
    LOOP
    EXIT slots WHEN v_k >= p_per_service OR cardinality(c_sub) >= p_batch;$p$,
$p$    <<slots>>
    LOOP
    EXIT slots WHEN v_k >= p_per_service OR cardinality(c_sub) >= p_batch;
    -- (0028) the head's leading users this call has served or skipped: both
    -- lookups below leave them out, so they start after them
    WHILE v_from <= cardinality(v_cands)
          AND (v_cands[v_from] = ANY (r_users) OR v_cands[v_from] = ANY (v_skip_call)) LOOP
      v_from := v_from + 1;
    END LOOP;$p$], [
$p$            FROM unnest(coalesce(v_pool, v_cands)) WITH ORDINALITY AS c(user_id, n)$p$,
$p$            FROM unnest(coalesce(v_pool, v_cands[v_from:])) WITH ORDINALITY AS c(user_id, n)$p$], [
$p$      FROM unnest(coalesce(v_pool, v_cands)) WITH ORDINALITY AS c(user_id, n)$p$,
$p$      FROM unnest(coalesce(v_pool, v_cands[v_from:])) WITH ORDINALITY AS c(user_id, n)$p$]],
  '0028_batch_costs');

SELECT edm.patch_function(
  'edm.complete(text, bigint[], text[], integer[], text[], integer[], text[], timestamptz)'::regprocedure,
  ARRAY[[
$p$  v_sites        text[];$p$,
$p$  v_sites        text[];
  -- 0028: the services and tasks of the batch's leased subtasks, and the
  -- owners of those tasks that are cancelled
  v_svc_ids      bigint[];
  v_task_ids     bigint[];
  v_refund_users text[];$p$], [
$p$  PERFORM 1 FROM edm.subtasks st WHERE st.subtask_id = ANY (p_subtask_ids)
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
  ORDER BY u.user_id FOR NO KEY UPDATE;$p$,
$p$  -- (0028: each lock reads, from the rows it locks, which rows the next one
  -- locks; a row locked is read in its latest version)
  SELECT coalesce(array_agg(DISTINCT x.service_id) FILTER (WHERE x.status = 'leased'), '{}'),
         coalesce(array_agg(DISTINCT x.task_id) FILTER (WHERE x.status = 'leased'), '{}')
  INTO v_svc_ids, v_task_ids
  FROM (SELECT st.service_id, st.task_id, st.status FROM edm.subtasks st
        WHERE st.subtask_id = ANY (p_subtask_ids)
        ORDER BY st.subtask_id FOR NO KEY UPDATE) x;
  PERFORM 1 FROM edm.services s WHERE s.service_id = ANY (v_svc_ids)
  ORDER BY s.service_id FOR NO KEY UPDATE;
  -- Owners of cancelled tasks get the quota of subtasks that end cancelled
  -- back (refund_users below): lock them last, in id order.
  SELECT coalesce(array_agg(DISTINCT x.user_id) FILTER (WHERE x.status = 'cancelled'), '{}')
  INTO v_refund_users
  FROM (SELECT t.user_id, t.status FROM edm.tasks t WHERE t.task_id = ANY (v_task_ids)
        ORDER BY t.task_id FOR NO KEY UPDATE) x;
  IF cardinality(v_refund_users) > 0 THEN
    PERFORM 1 FROM edm.users u WHERE u.user_id = ANY (v_refund_users)
    ORDER BY u.user_id FOR NO KEY UPDATE;
  END IF;$p$], [
$p$    WHERE s.service_id = a.service_id
    RETURNING s.service_id, s.backoff_until$p$,
$p$    WHERE s.service_id = a.service_id
      AND s.service_id = ANY (v_svc_ids)  -- redundant: lets the plan start from services_pkey
    RETURNING s.service_id, s.backoff_until$p$]],
  '0028_batch_costs');
