-- 0019_house: one rule in one place — a drained task is completed (issue 18, point 3).
--
-- "A sending task with nothing pending and nothing leased is completed" was
-- written out in seven functions (the empty staged task, the empty tag-rule
-- expansion, resume, completion, lease expiry, the cancellation of an
-- address's pending subtasks, and the sweep's finish_tasks), each with its own
-- arithmetic on the counters before the update. A path that forgot it (a
-- scheduled task with no recipients left, say) left the task sending until
-- the next sweep.
--
-- Now the rule has one place:
--   * edm.task_drained(status, pending, leased) says what drained means;
--   * trigger tasks_when_drained, BEFORE UPDATE of any column of a task,
--     turns a drained task into completed in the very row being written,
--     whatever statement wrote it. It fires after tasks_reputation_hold and
--     tasks_track_status_upd (triggers fire in name order), so it sees the
--     status they settled on; it records prev_status 'sending' (the task
--     passed through sending, even when this statement started it) so the
--     status machine of edm.task_transition_ok is unchanged.
--
-- The inline copies are removed by patching the functions' current bodies
-- (the pattern of 0009 and 0015), so that a function replaced meanwhile by
-- another migration keeps that migration's changes; a patch that no longer
-- finds its text stops this migration rather than guessing. edm.complete
-- keeps its own copy until it is next replaced (it sets 'completed' itself,
-- which the trigger then has nothing to add to).

CREATE FUNCTION edm.task_drained(p_status text, p_pending integer, p_leased integer)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN p_status = 'sending' AND p_pending = 0 AND p_leased = 0;
COMMENT ON FUNCTION edm.task_drained(text, integer, integer) IS
  'The rule of task completion, in one place: a task that is sending with nothing pending and nothing leased is drained, and trigger tasks_when_drained makes it completed.';

CREATE FUNCTION edm.tasks_complete_drained()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  NEW.status := 'completed';
  NEW.prev_status := 'sending';  -- it passed through sending, if only within this statement
  NEW.started_at := coalesce(NEW.started_at, now());
  NEW.finished_at := coalesce(NEW.finished_at, now());
  NEW.updated_at := now();
  RETURN NEW;
END;
$$;
COMMENT ON FUNCTION edm.tasks_complete_drained() IS
  'Trigger: completes a drained task (edm.task_drained) in the row being written: status completed after sending, started_at and finished_at stamped (a finished_at given by the statement is kept).';

-- Name order matters: after tasks_reputation_hold and tasks_track_status_upd.
CREATE TRIGGER tasks_when_drained BEFORE UPDATE ON edm.tasks
  FOR EACH ROW WHEN (edm.task_drained(NEW.status, NEW.pending_count, NEW.leased_count))
  EXECUTE FUNCTION edm.tasks_complete_drained();
COMMENT ON TRIGGER tasks_when_drained ON edm.tasks IS
  'One place for "a drained task is completed": every update that leaves a task sending with nothing pending or leased completes it.';

-- The sweep's safety net now only touches drained tasks (a database upgraded
-- with some left sending); the trigger completes them, at p_now.
CREATE OR REPLACE FUNCTION edm.finish_tasks(p_now timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_n integer;
BEGIN
  UPDATE edm.tasks t SET finished_at = coalesce(p_now, now())
  WHERE t.task_id IN (
    SELECT x.task_id FROM edm.tasks x
    WHERE edm.task_drained(x.status, x.pending_count, x.leased_count)
    FOR NO KEY UPDATE SKIP LOCKED);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END;
$$;
COMMENT ON FUNCTION edm.finish_tasks(timestamptz) IS
  'Safety net: touches drained tasks left sending (e.g. by a database upgraded from before 0019) so that trigger tasks_when_drained completes them, finished at p_now. Every other path completes a task in the statement that drains it.';

-- Remove the inline copies.
DO $patch$
DECLARE
  v_patches text[][] := ARRAY[
    ['edm.create_task_from_staged(text, text, jsonb, integer, timestamptz, boolean)',
     $a$    UPDATE edm.tasks t SET status = 'sending' WHERE t.task_id = v_task;
    UPDATE edm.tasks t SET status = 'completed' WHERE t.task_id = v_task;$a$,
     $a$    -- nothing to send: started, and completed at once by trigger tasks_when_drained
    UPDATE edm.tasks t SET status = 'sending' WHERE t.task_id = v_task;$a$],
    ['edm.expand_task(bigint, integer)',
     $a$    UPDATE edm.tasks tk SET status = 'sending' WHERE tk.task_id = p_task_id;
    UPDATE edm.tasks tk SET status = 'completed' WHERE tk.task_id = p_task_id;$a$,
     $a$    -- nothing to send: started, and completed at once by trigger tasks_when_drained
    UPDATE edm.tasks tk SET status = 'sending' WHERE tk.task_id = p_task_id;$a$],
    ['edm.resume_task(bigint, text, timestamptz)',
     $a$  UPDATE edm.tasks tk SET status = v_status WHERE tk.task_id = p_task_id;
  IF v_status = 'sending' AND t.pending_count = 0 AND t.leased_count = 0 THEN
    UPDATE edm.tasks tk SET status = 'completed' WHERE tk.task_id = p_task_id;
    v_status := 'completed';
  END IF;$a$,
     $a$  -- a drained task resumed to sending comes back completed (trigger tasks_when_drained)
  UPDATE edm.tasks tk SET status = v_status WHERE tk.task_id = p_task_id
  RETURNING tk.status INTO v_status;$a$],
    ['edm.expire_leases(timestamptz, integer)',
     $a$        quota_reserved = greatest(t.quota_reserved - a.n_failed - a.n_cancelled, 0),
        status = CASE WHEN t.status = 'sending' AND t.pending_count + a.n_pending = 0
                           AND t.leased_count - a.n = 0 THEN 'completed'
                      ELSE t.status END$a$,
     $a$        quota_reserved = greatest(t.quota_reserved - a.n_failed - a.n_cancelled, 0)
        -- a task this drains is completed by trigger tasks_when_drained$a$],
    ['edm.cancel_pending_to(text, text, text, timestamptz)',
     $a$        quota_reserved = greatest(t.quota_reserved - pt.n, 0),
        status = CASE WHEN t.status = 'sending' AND t.pending_count - pt.n = 0
                           AND t.leased_count = 0 THEN 'completed' ELSE t.status END$a$,
     $a$        quota_reserved = greatest(t.quota_reserved - pt.n, 0)
        -- a task this drains is completed by trigger tasks_when_drained$a$]];
  v_def text;
  i integer;
BEGIN
  FOR i IN 1 .. array_length(v_patches, 1) LOOP
    v_def := pg_get_functiondef(v_patches[i][1]::regprocedure);
    IF position(v_patches[i][2] IN v_def) = 0 THEN
      RAISE EXCEPTION '0019: % no longer holds its copy of the completion rule as 0019 knows it; remove it by hand', v_patches[i][1];
    END IF;
    EXECUTE replace(v_def, v_patches[i][2], v_patches[i][3]);
  END LOOP;
END;
$patch$;


-- ---------------------------------------------------------------------------
-- One place for "lock a job of this user, or say why not" (issue 18, point 3)
-- ---------------------------------------------------------------------------
-- job_update, job_resume, job_trigger, job_pause and job_stop each wrote the
-- same locking block (ED013 when the job stays locked beyond lock_timeout,
-- ED010 when it is unknown or another user's). edm.lock_job is that block,
-- as edm.lock_task is for tasks; the functions are patched to call it.
-- (job_delete takes a stronger lock, FOR UPDATE, for its cascade: left as is.)

CREATE FUNCTION edm.lock_job(p_job_id bigint, p_user_id text)
RETURNS edm.jobs
LANGUAGE plpgsql
AS $$
DECLARE
  j edm.jobs;
BEGIN
  BEGIN
    SELECT * INTO j FROM edm.jobs x
    WHERE x.job_id = p_job_id AND (p_user_id IS NULL OR x.tenant_id = p_user_id)
    FOR NO KEY UPDATE;
  EXCEPTION WHEN lock_not_available THEN
    RAISE EXCEPTION 'job % is locked by another session', p_job_id USING ERRCODE = 'ED013';
  END;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'job % not found', p_job_id USING ERRCODE = 'ED010';
  END IF;
  RETURN j;
END;
$$;
COMMENT ON FUNCTION edm.lock_job(bigint, text) IS
  'Locks (FOR NO KEY UPDATE) and returns job p_job_id, scoped to p_user_id when given (another user''s job is unknown, ED010); ED013 when it stays locked beyond the session''s lock_timeout. Internal to the job_* functions.';

DO $patch$
DECLARE
  v_block text := $a$  BEGIN
    SELECT [^;]*? INTO (v_\w+)\s+FROM edm\.jobs j
    WHERE j\.job_id = p_job_id AND \(p_tenant_id IS NULL OR j\.tenant_id = p_tenant_id\)
    FOR NO KEY UPDATE;
  EXCEPTION WHEN lock_not_available THEN
    RAISE EXCEPTION 'job % is locked by another session', p_job_id USING ERRCODE = 'ED013';
  END;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'job % not found', p_job_id USING ERRCODE = 'ED010';
  END IF;$a$;
  v_stop text := $a$    PERFORM 1 FROM edm.jobs j
    WHERE j.job_id = p_job_id AND (p_tenant_id IS NULL OR j.tenant_id = p_tenant_id)
    FOR NO KEY UPDATE;
  EXCEPTION WHEN lock_not_available THEN
    RAISE EXCEPTION 'job % is locked by another session', p_job_id USING ERRCODE = 'ED013';
  END;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'job % not found', p_job_id USING ERRCODE = 'ED010';
  END IF;$a$;
  v_fn text;
  v_def text;
  v_new text;
BEGIN
  FOREACH v_fn IN ARRAY ARRAY[
      'edm.job_update(bigint, jsonb, boolean, timestamptz, timestamptz, text, timestamptz)',
      'edm.job_resume(bigint, timestamptz, timestamptz, text, timestamptz)',
      'edm.job_trigger(bigint, text, timestamptz)'] LOOP
    v_def := pg_get_functiondef(v_fn::regprocedure);
    v_new := regexp_replace(v_def, v_block, '  \1 := edm.lock_job(p_job_id, p_tenant_id);');
    IF v_new = v_def THEN
      RAISE EXCEPTION '0019: % no longer holds the job-locking block 0019 knows; call edm.lock_job by hand', v_fn;
    END IF;
    EXECUTE v_new;
  END LOOP;

  v_fn := 'edm.job_pause(bigint, text)';
  v_def := pg_get_functiondef(v_fn::regprocedure);
  v_new := regexp_replace(v_def, v_block, '  \1 := (edm.lock_job(p_job_id, p_tenant_id)).status;');
  IF v_new = v_def THEN
    RAISE EXCEPTION '0019: % no longer holds the job-locking block 0019 knows; call edm.lock_job by hand', v_fn;
  END IF;
  EXECUTE v_new;

  -- job_stop locks the job's executions first (lock order), then the job.
  v_fn := 'edm.job_stop(bigint, text, boolean, timestamptz)';
  v_def := pg_get_functiondef(v_fn::regprocedure);
  IF position(v_stop IN v_def) = 0 THEN
    RAISE EXCEPTION '0019: % no longer holds the job-locking block 0019 knows; call edm.lock_job by hand', v_fn;
  END IF;
  EXECUTE replace(v_def, v_stop, $a$  EXCEPTION WHEN lock_not_available THEN
    RAISE EXCEPTION 'job % is locked by another session', p_job_id USING ERRCODE = 'ED013';
  END;
  PERFORM edm.lock_job(p_job_id, p_tenant_id);$a$);
END;
$patch$;

-- ---------------------------------------------------------------------------
-- One verb (issue 18, point 5): a runner *completes* an execution it holds,
-- as a dispatcher completes a subtask (edm.complete); *finish* is what a whole
-- task or job does. edm.job_complete takes the body of edm.job_finish (both
-- overloads: one execution, a batch); job_finish stays, for a release, as a
-- wrapper of it. The jobs feature's functions keep their job_ prefix (its
-- namespace, as the glossary says); their verbs are the house verbs.
-- ---------------------------------------------------------------------------

DO $rename$
DECLARE
  f record;
BEGIN
  FOR f IN SELECT p.oid, p.oid::regprocedure::text AS sig, pg_get_function_arguments(p.oid) AS args,
                  pg_get_function_result(p.oid) AS result, p.pronargs AS n,
                  obj_description(p.oid, 'pg_proc') AS comment
           FROM pg_proc p
           WHERE p.pronamespace = 'edm'::regnamespace AND p.proname = 'job_finish'
           ORDER BY p.oid LOOP
    -- the same function under its new name (the batch form calls the new single one)
    EXECUTE replace(replace(pg_get_functiondef(f.oid), 'edm.job_finish(', 'edm.job_complete('),
                    'job_finish:', 'job_complete:');
    EXECUTE format('COMMENT ON FUNCTION %s IS %L',
                   replace(f.sig, 'edm.job_finish(', 'edm.job_complete('),
                   replace(f.comment, 'edm.job_finish', 'edm.job_complete'));
    -- the old name: a wrapper
    EXECUTE format('CREATE OR REPLACE FUNCTION edm.job_finish(%s) RETURNS %s LANGUAGE sql AS %L',
                   f.args, f.result,
                   format('SELECT * FROM edm.job_complete(%s)',
                          (SELECT string_agg('$' || i, ', ') FROM generate_series(1, f.n) i)));
    EXECUTE format('COMMENT ON FUNCTION %s IS %L', f.sig,
                   'Deprecated: the older name of edm.job_complete (same arguments, same result), kept for a release.');
  END LOOP;
END;
$rename$;

-- Roles: whoever may run job_finish may run job_complete (the pattern of 0015).
DO $roles$
DECLARE
  v_def text := pg_get_functiondef('edm.install_roles(text, text, text)'::regprocedure);
BEGIN
  IF position($q$'job_finish', $q$ IN v_def) = 0 THEN
    RAISE EXCEPTION '0019: edm.install_roles does not grant job_finish; grant job_complete by hand';
  END IF;
  EXECUTE replace(v_def, $q$'job_finish', $q$, $q$'job_finish', 'job_complete', $q$);
  IF (SELECT count(*) FROM pg_roles r
      WHERE r.rolname IN ('edm_dispatcher', 'edm_app', 'edm_monitor')) = 3 THEN
    PERFORM edm.install_roles();
  END IF;
END;
$roles$;

SELECT edm.harden_functions();
