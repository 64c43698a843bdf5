-- NOT the product: installed by `python -m benchmarks floor` on a copy of a benchmark
-- world, never on a real database. The least a claim and a completion could cost on
-- edm-sched's tables: the claim takes the next 200 pending subtasks (the dispatcher's
-- default batch, queue.central_batch_size; a literal LIMIT, so the plan is the index
-- scan) in index order (FOR UPDATE SKIP LOCKED), leases them to one service (the
-- services in turn, whatever their lanes hold), writing only the subtasks; the
-- completion marks them sent and records their events. No fairness, no limits, no
-- task, user or service counters, no checks. Same signatures and columns as
-- edm.claim_v2 and edm.complete, so run_dispatcher() runs on it unchanged.
CREATE OR REPLACE FUNCTION edm.claim_v2(p_owner text, p_batch integer DEFAULT 1, p_lease_seconds integer DEFAULT NULL::integer, p_now timestamp with time zone DEFAULT NULL::timestamp with time zone, p_per_service integer DEFAULT 1, p_lookahead_ms integer DEFAULT NULL::integer, p_skip_services bigint[] DEFAULT '{}'::bigint[])
 RETURNS TABLE(subtask_id bigint, task_id bigint, user_id text, service_id bigint, email text, contact_id bigint, template_idx smallint, vars jsonb, attempt smallint, send_at timestamp with time zone, lease_expires_at timestamp with time zone)
 LANGUAGE sql SECURITY DEFINER SET search_path TO 'pg_catalog', 'pg_temp'
AS $f$
  WITH svc AS (  -- the services in turn, one per call
    SELECT s.service_id AS sid FROM edm.services s ORDER BY s.service_id
    OFFSET nextval('edm.serve_seq') % (SELECT count(*) FROM edm.services) LIMIT 1),
  c AS (
    SELECT st.subtask_id FROM edm.subtasks st
    WHERE st.status = 'pending'
    ORDER BY st.task_id, st.not_before, st.subtask_id
    LIMIT 200 FOR UPDATE SKIP LOCKED
  ),
  u AS (
    UPDATE edm.subtasks st SET status = 'leased', lease_owner = p_owner, leased_at = now(),
      lease_expires_at = now() + interval '60 seconds', service_id = (SELECT sid FROM svc),
      attempts = st.attempts + 1
    FROM c WHERE st.subtask_id = c.subtask_id
    RETURNING st.subtask_id, st.task_id, st.service_id, st.email, st.contact_id, st.template_idx,
              st.vars, st.attempts, st.lease_expires_at
  )
  SELECT u.subtask_id, u.task_id, t.user_id, u.service_id, u.email, u.contact_id, u.template_idx,
         u.vars, u.attempts, now(), u.lease_expires_at
  FROM u JOIN edm.tasks t ON t.task_id = u.task_id
$f$;
CREATE OR REPLACE FUNCTION edm.complete(p_owner text, p_subtask_ids bigint[], p_outcomes text[], p_codes integer[] DEFAULT NULL::integer[], p_details text[] DEFAULT NULL::text[], p_response_ms integer[] DEFAULT NULL::integer[], p_provider_ids text[] DEFAULT NULL::text[], p_now timestamp with time zone DEFAULT NULL::timestamp with time zone)
 RETURNS TABLE(subtask_id bigint, accepted boolean, status text, reason text)
 LANGUAGE sql SECURITY DEFINER SET search_path TO 'pg_catalog', 'pg_temp'
AS $f$
  WITH u AS (
    UPDATE edm.subtasks st SET status = 'sent', lease_owner = NULL, lease_expires_at = NULL,
      finished_at = now()
    WHERE st.subtask_id = ANY (p_subtask_ids) AND st.lease_owner = p_owner
    RETURNING st.subtask_id, st.task_id, st.service_id, st.attempts, st.leased_at
  ),
  e AS (
    INSERT INTO edm.send_events (occurred_at, subtask_id, task_id, user_id, service_id, kind,
                                 attempt, started_at, dispatcher)
    SELECT now(), u.subtask_id, u.task_id, t.user_id, u.service_id, 'sent', u.attempts,
           u.leased_at, p_owner
    FROM u JOIN edm.tasks t ON t.task_id = u.task_id
  )
  SELECT u.subtask_id, true, 'sent'::text, NULL::text FROM u
$f$;
