-- 0021_vocabulary: one word for a customer of the host platform — user — in
-- SQL as in Python, the CLI and the docs (issue 18, point 5).
--
-- The recurring-jobs feature (0005, 0011) said "tenant" where everything else
-- says "user": the columns edm.jobs.tenant_id and edm.job_executions.tenant_id,
-- the parameters p_tenant_id of the job_* functions, the settings
-- jobs.max_jobs_per_tenant, jobs.max_running_per_tenant and
-- jobs.shell_tenants, the key "tenants" of jobs.http_allow. They become
-- user_id, p_user_id, jobs.max_jobs_per_user, jobs.max_running_per_user,
-- jobs.shell_users and "users". Rows keep their values: a rename changes no
-- behaviour.
--
-- What keeps working, deprecated, for a release:
--   * the old setting names: edm.config_set and the Python config API accept
--     them (edm.config_renamed maps each to its new name;
--     the settings themselves are renamed in place, their values kept);
--   * a job spec given to edm.job_create with the key "tenant_id";
--   * the key "tenants" of jobs.http_allow (merged with "users");
--   * the column tenant_id of the view edm.jobs_overview (a copy of user_id).
-- What changes for SQL written against the tables: the columns are user_id,
-- and named-notation calls say p_user_id (positional calls are unchanged).

-- ---------------------------------------------------------------------------
-- The migrations' patch helper learns to rename parameters
-- ---------------------------------------------------------------------------
-- CREATE OR REPLACE cannot change a parameter's name or a function's result
-- columns; edm.patch_function then drops the function and creates the patched
-- one, keeping its comment and its grants (a role granted EXECUTE keeps it,
-- whatever its name). A function other objects depend on is not dropped: the
-- migration fails and says so.

CREATE OR REPLACE FUNCTION edm.patch_function(p_fn regprocedure, p_patch text[], p_context text)
RETURNS void
LANGUAGE plpgsql
AS $fn$
DECLARE
  v_def text := pg_get_functiondef(p_fn);
  v_sig text := p_fn::text;
  v_comment text := obj_description(p_fn, 'pg_proc');
  v_acl aclitem[] := (SELECT p.proacl FROM pg_proc p WHERE p.oid = p_fn);
  v_new regprocedure;
  g record;
  i integer;
BEGIN
  FOR i IN 1 .. coalesce(array_length(p_patch, 1), 0) LOOP
    IF position(p_patch[i][1] IN v_def) = 0 THEN
      RAISE EXCEPTION '%: % has no %; patch it by hand', p_context, p_fn, p_patch[i][1];
    END IF;
    v_def := replace(v_def, p_patch[i][1], p_patch[i][2]);
  END LOOP;
  BEGIN
    EXECUTE v_def;
  EXCEPTION WHEN invalid_function_definition THEN
    -- a parameter renamed or the result changed: drop, create, restore
    EXECUTE format('DROP FUNCTION %s', v_sig);
    EXECUTE v_def;
    v_new := to_regprocedure(v_sig);
    IF v_new IS NULL THEN
      RAISE EXCEPTION '%: the patch changed the argument types of %; patch it by hand',
        p_context, v_sig;
    END IF;
    EXECUTE format('COMMENT ON FUNCTION %s IS %L', v_new, v_comment);
    IF v_acl IS NOT NULL THEN
      EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_new);
      FOR g IN SELECT a.grantee, a.is_grantable FROM aclexplode(v_acl) a
               WHERE a.privilege_type = 'EXECUTE'
                 AND a.grantee <> (SELECT p.proowner FROM pg_proc p WHERE p.oid = v_new) LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s%s', v_new,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(g.grantee::regrole::text) END,
                       CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
      END LOOP;
    END IF;
  END;
END;
$fn$;
COMMENT ON FUNCTION edm.patch_function(regprocedure, text[], text) IS
  'For migrations: rewrites function p_fn as the catalog has it now, replacing each p_patch[i][1] by p_patch[i][2], so that what earlier migrations put in it is kept; fails (naming p_context, the migration) when a text to replace is not found. A patch that renames parameters or changes the result drops and recreates the function, keeping its comment and grants.';

-- ---------------------------------------------------------------------------
-- Tables: columns, constraints, indexes
-- ---------------------------------------------------------------------------
-- A column rename carries over to the CHECKs, indexes, trigger conditions
-- (jobs_check_write's UPDATE OF, jobs_audit_upd's WHEN) and views that use
-- it; the names and comments follow here.

ALTER TABLE edm.jobs RENAME COLUMN tenant_id TO user_id;
ALTER TABLE edm.jobs RENAME CONSTRAINT jobs_tenant_id_check TO jobs_user_id_check;
ALTER TABLE edm.job_executions RENAME COLUMN tenant_id TO user_id;
-- An index keeps the old column name in its own catalog rows: rebuilt under its
-- new name, so that a database upgraded and one built from sql/schema.sql are
-- the same. Small: a job per row of edm.jobs, running executions only.
ALTER TABLE edm.jobs DROP CONSTRAINT jobs_tenant_name_unique,
  ADD CONSTRAINT jobs_user_name_unique UNIQUE NULLS NOT DISTINCT (user_id, name);
DROP INDEX edm.jobs_tenant_idx;
CREATE INDEX jobs_user_idx ON edm.jobs (user_id, job_id);
DROP INDEX edm.job_executions_tenant_running_idx;
CREATE INDEX job_executions_user_running_idx ON edm.job_executions (user_id)
  WHERE status = 'running';

COMMENT ON COLUMN edm.jobs.user_id IS
  'Owning user (the host''s user id, as edm.users.user_id), NULL for platform jobs. Limited by jobs.max_jobs_per_user. Called tenant_id before 0021.';
COMMENT ON COLUMN edm.jobs.name IS 'Name, unique per user.';
COMMENT ON COLUMN edm.job_executions.user_id IS
  'User of the job when the execution was created (for per-user history and stats). Called tenant_id before 0021.';
COMMENT ON INDEX edm.jobs_user_idx IS 'A user''s jobs (listing, quota count).';
COMMENT ON INDEX edm.job_executions_user_running_idx IS
  'Running executions of a user (jobs.max_running_per_user, checked by edm.job_claim).';

-- The overview keeps a column tenant_id, a copy of user_id, for a release.
ALTER VIEW edm.jobs_overview RENAME COLUMN tenant_id TO user_id;
CREATE OR REPLACE VIEW edm.jobs_overview AS
SELECT j.job_id, j.user_id, j.name, j.kind, j.status, j.cron_expr, j.timezone, j.next_run_at,
       j.next_run_at AT TIME ZONE j.timezone AS next_run_local,
       j.last_status, j.last_finished_at, j.running_count, j.max_concurrent,
       (SELECT count(*) FROM edm.job_executions e
        WHERE e.job_id = j.job_id AND e.status = 'pending') AS pending_count,
       j.success_count, j.failure_count, j.misfire_count,
       CASE
         WHEN j.status = 'paused' THEN 'paused'
         WHEN j.status = 'inactive' THEN 'inactive: ' || j.inactive_reason
         WHEN j.next_run_at > now() THEN 'waiting for its next run at ' || j.next_run_at
         ELSE 'due since ' || j.next_run_at || ': no runner has fired it (are runners running?)'
       END AS why_not_running,
       j.user_id AS tenant_id
FROM edm.jobs j;
COMMENT ON COLUMN edm.jobs_overview.user_id IS 'Owning user (NULL: a platform job).';
COMMENT ON COLUMN edm.jobs_overview.tenant_id IS
  'Deprecated: the older name of user_id, kept for a release.';

-- ---------------------------------------------------------------------------
-- Settings: renamed in place, the old names still accepted
-- ---------------------------------------------------------------------------

CREATE TABLE edm.config_renamed (
  old_key    text PRIMARY KEY,
  key        text NOT NULL REFERENCES edm.config (key) ON UPDATE CASCADE,
  renamed_in integer NOT NULL
);
COMMENT ON TABLE edm.config_renamed IS
  'Settings renamed by a migration: edm.config_set and the Python config API accept the old name (deprecated) for the new one; edm.config_key maps an old name to the new.';
COMMENT ON COLUMN edm.config_renamed.old_key IS 'The name the setting had.';
COMMENT ON COLUMN edm.config_renamed.key IS 'Its name now (edm.config.key).';
COMMENT ON COLUMN edm.config_renamed.renamed_in IS 'The migration that renamed it.';

CREATE FUNCTION edm.config_key(p_key text)
RETURNS text
LANGUAGE sql STABLE
RETURN coalesce((SELECT r.key FROM edm.config_renamed r WHERE r.old_key = p_key), p_key);
COMMENT ON FUNCTION edm.config_key(text) IS
  'The current name of setting p_key: itself, or the new name of a renamed setting (edm.config_renamed).';

ALTER TABLE edm.config DROP CONSTRAINT config_jobs_security_values;
ALTER FUNCTION edm.job_tenant_list_ok(text) RENAME TO job_user_list_ok;
COMMENT ON FUNCTION edm.job_user_list_ok(text) IS
  'True when p_value is a JSON array of non-empty user ids (the jobs.shell_users setting; "*" stands for every user). Backs a CHECK on edm.config.';

UPDATE edm.config c SET key = x.new_key, description = x.description
FROM (VALUES
  ('jobs.max_jobs_per_tenant', 'jobs.max_jobs_per_user',
   'Most jobs one user may own; creating more raises QUOTA_EXCEEDED.'),
  ('jobs.max_running_per_tenant', 'jobs.max_running_per_user',
   'Most executions of one user''s jobs running at once, all kinds together and across all runners (0: no limit). Executions over it wait, pending.'),
  ('jobs.shell_tenants', 'jobs.shell_users',
   'Users whose jobs may be shell commands, as JSON text ["acme", ...] ("*": every user). A user''s shell job also needs jobs.shell_enabled, and runners allow_shell=True.')
) AS x(old_key, new_key, description)
WHERE c.key = x.old_key;
INSERT INTO edm.config_renamed (old_key, key, renamed_in) VALUES
  ('jobs.max_jobs_per_tenant', 'jobs.max_jobs_per_user', 21),
  ('jobs.max_running_per_tenant', 'jobs.max_running_per_user', 21),
  ('jobs.shell_tenants', 'jobs.shell_users', 21);
UPDATE edm.config SET description = replace(replace(description,
    '"tenants": {"<tenant>": [...]}', '"users": {"<user>": [...]}'),
    'of networks or host names.', 'of networks or host names ("tenants" is the older word for "users").')
WHERE key = 'jobs.http_allow';

ALTER TABLE edm.config ADD CONSTRAINT config_jobs_security_values CHECK (
  CASE key
    WHEN 'jobs.http_allow' THEN edm.job_http_allow_ok(value #>> '{}')
    WHEN 'jobs.shell_users' THEN edm.job_user_list_ok(value #>> '{}')
    ELSE true
  END);
COMMENT ON CONSTRAINT config_jobs_security_values ON edm.config IS
  'jobs.http_allow and jobs.shell_users hold well-formed JSON text (edm.job_http_allow_ok, edm.job_user_list_ok).';

-- Writes by an old name reach the renamed setting. edm.config_int is left as it
-- is: the claim calls it per row, and a fallback lookup in it made each call
-- about 1.5 times dearer, enough for the shaped wire test to see the claim's
-- lateness. SQL that reads a setting by an old name can ask edm.config_key.
SELECT edm.patch_function('edm.config_set(text, jsonb, text)'::regprocedure, ARRAY[
  ['BEGIN
  SELECT * INTO c FROM edm.config WHERE key = p_key FOR UPDATE;',
   'BEGIN
  p_key := edm.config_key(p_key);  -- a renamed setting answers to its old name
  SELECT * INTO c FROM edm.config WHERE key = p_key FOR UPDATE;']], '0021');
COMMENT ON FUNCTION edm.config_set(text, jsonb, text) IS
  'Sets config p_key after checking type and range (ED006 with the allowed range when refused, ED001 for an unknown key) and notifies running dispatchers (NOTIFY edm_config) so they reload. The old name of a renamed setting (edm.config_renamed) sets the new one.';

-- ---------------------------------------------------------------------------
-- Functions: user_id, p_user_id, the new setting names
-- ---------------------------------------------------------------------------
-- Each job function as installed now, with "tenant" read as "user" (columns,
-- parameters, variables, setting names, messages); the ones whose parameters
-- change are dropped and recreated with their grants (edm.patch_function).

DO $rename$
DECLARE
  v_fn text;
BEGIN
  FOREACH v_fn IN ARRAY ARRAY[
      'edm.lock_job(bigint, text)',
      'edm.jobs_check_write()',
      'edm.job_fire(bigint, timestamptz, timestamptz[], timestamptz, text, boolean, integer, timestamptz, timestamptz, text, timestamptz)',
      'edm.job_claim(text, integer, timestamptz)',
      'edm.job_next_wakeup(timestamptz)',
      'edm.job_schedule_retry(bigint, timestamptz)',
      'edm.job_cancel_execution(bigint, text, timestamptz)',
      'edm.job_delete(bigint, text, boolean)',
      'edm.job_pause(bigint, text)',
      'edm.job_resume(bigint, timestamptz, timestamptz, text, timestamptz)',
      'edm.job_stop(bigint, text, boolean, timestamptz)',
      'edm.job_trigger(bigint, text, timestamptz)',
      'edm.job_update(bigint, jsonb, boolean, timestamptz, timestamptz, text, timestamptz)'] LOOP
    PERFORM edm.patch_function(v_fn::regprocedure, ARRAY[['tenant', 'user']], '0021');
  END LOOP;
END;
$rename$;

-- job_create: the spec's key is user_id; "tenant_id" is still read, deprecated.
SELECT edm.patch_function('edm.job_create(jsonb, timestamptz, timestamptz)'::regprocedure, ARRAY[
  ['  -- Every setting comes from p_job',
   '  IF p_job ? ''tenant_id'' AND p_job ? ''user_id''
     AND p_job -> ''tenant_id'' IS DISTINCT FROM p_job -> ''user_id'' THEN
    RAISE EXCEPTION ''job_create: user_id and tenant_id (its older name) name different users''
      USING ERRCODE = ''ED012'';
  END IF;
  -- Every setting comes from p_job'],
  ['INSERT INTO edm.jobs (tenant_id,', 'INSERT INTO edm.jobs (user_id,'],
  ['SELECT r.tenant_id,', 'SELECT coalesce(r.user_id, p_job ->> ''tenant_id''),']], '0021');

-- jobs.http_allow: {"users": {...}}; "tenants" is still read, deprecated.
SELECT edm.patch_function('edm.job_http_allow_ok(text)'::regprocedure, ARRAY[
  [$a$k NOT IN ('all', 'platform', 'tenants'))
     OR (v_doc ? 'tenants' AND jsonb_typeof(v_doc -> 'tenants') <> 'object')$a$,
   $a$k NOT IN ('all', 'platform', 'users', 'tenants'))
     OR (v_doc ? 'users' AND jsonb_typeof(v_doc -> 'users') <> 'object')
     OR (v_doc ? 'tenants' AND jsonb_typeof(v_doc -> 'tenants') <> 'object')$a$],
  [$a$    UNION ALL SELECT t.value FROM jsonb_each(coalesce(v_doc -> 'tenants', '{}')) t$a$,
   $a$    UNION ALL SELECT t.value FROM jsonb_each(coalesce(v_doc -> 'users', '{}')) t
    UNION ALL SELECT t.value FROM jsonb_each(coalesce(v_doc -> 'tenants', '{}')) t$a$]], '0021');

COMMENT ON FUNCTION edm.job_http_allow_ok(text) IS
  'True when p_value is a valid jobs.http_allow setting: a JSON object {"all": [...], "platform": [...], "users": {"<user>": [...]}} whose lists hold networks (10.20.0.0/16, 127.0.0.1, fd00::/8) or host names (crm.intranet.example, *.intranet.example); "tenants", the older word for "users", is read too. Backs a CHECK on edm.config.';
COMMENT ON FUNCTION edm.jobs_check_write() IS
  'Trigger: refuses shell jobs unless jobs.shell_enabled, and a user''s shell job unless the user is in jobs.shell_users (ED012); refuses a user''s job beyond jobs.max_jobs_per_user (ED014, serialised per user by an advisory lock).';
COMMENT ON FUNCTION edm.job_claim(text, integer, timestamptz) IS
  'Claims up to p_limit due pending executions for runner p_worker, highest priority and earliest first, taking one of their job''s max_concurrent slots each and, when jobs.max_running_per_user > 0, staying within the user''s share of running executions; marks them running with a lease of timeout + jobs.lease_margin. Skips executions of paused jobs (except manual runs). Never waits on a lock.';
COMMENT ON FUNCTION edm.job_next_wakeup(timestamptz) IS
  'The earliest time a runner could have work: a job''s next run, a claimable pending execution (manual run, retry, catch-up; not one of a user at jobs.max_running_per_user), or a lease expiring. NULL when nothing is scheduled. Runners sleep until then or a NOTIFY edm_jobs.';
COMMENT ON FUNCTION edm.job_cancel_execution(bigint, text, timestamptz) IS
  'Cancels a pending or running execution (of user p_user_id when given) at once: it is recorded as cancelled, its slot is freed, and the runner holding it is told (NOTIFY edm_jobs_cancel) to kill the process or signal the function. Returns the status it had. ED015 unknown execution, ED003 already finished.';
COMMENT ON FUNCTION edm.job_create(jsonb, timestamptz, timestamptz) IS
  'Creates a job from p_job (a JSON object whose keys are column names of edm.jobs; the older key tenant_id is read as user_id) with its first run p_next_run_at, computed by the caller with cronsim (NULL for a paused job). The CHECK constraints and the jobs_check_write trigger validate it (ED012 shell disabled, ED014 user quota). Returns the job id.';

-- ---------------------------------------------------------------------------
-- One rule, one place: what a completed subtask becomes (issue 18, point 3)
-- ---------------------------------------------------------------------------
-- "A transient failure is retried until queue.max_attempts, then failed" and
-- "a subtask of a cancelled task ends cancelled" were written four times in
-- edm.complete (transient, retry, uncertain, the rest) and once more in
-- edm.expire_leases. edm.subtask_next_status is that rule; both call it. It
-- is an IMMUTABLE SQL function, so the planner inlines it: the statements
-- plan as before. The one difference between the copies is kept and now
-- stated: a lease that ran out on a cancelled task ends cancelled even on
-- its last attempt (the quota is refunded), where a transient, retry or
-- uncertain outcome on the last attempt ends failed.

CREATE FUNCTION edm.subtask_next_status(p_outcome text, p_task_status text, p_attempts integer,
                                        p_max_attempts integer)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
  WHEN p_outcome = 'sent' THEN 'sent'
  WHEN p_outcome IN ('permanent', 'render_error') THEN 'failed'
  -- an attempt spent without success: retried until the last allowed attempt
  WHEN p_outcome IN ('transient', 'retry', 'uncertain') THEN
    CASE WHEN p_attempts >= p_max_attempts THEN 'failed'
         WHEN p_task_status = 'cancelled' THEN 'cancelled'
         ELSE 'pending' END
  -- a lease that ran out (edm.expire_leases): the task's cancellation first
  WHEN p_outcome = 'lease_expired' THEN
    CASE WHEN p_task_status = 'cancelled' THEN 'cancelled'
         WHEN p_attempts >= p_max_attempts THEN 'failed'
         ELSE 'pending' END
  -- nothing spent (service, released, throttled...): back to pending
  ELSE CASE WHEN p_task_status = 'cancelled' THEN 'cancelled' ELSE 'pending' END
END;
COMMENT ON FUNCTION edm.subtask_next_status(text, text, integer, integer) IS
  'The rule of a subtask''s next status, in one place: after outcome p_outcome (an outcome or effective outcome of edm.complete, or lease_expired for edm.expire_leases) of attempt p_attempts of p_max_attempts (queue.max_attempts), in a task of status p_task_status. sent; permanent and render_error fail; transient, retry and uncertain are retried (pending) until the last allowed attempt, then failed, and end cancelled when the task was cancelled; a lease that ran out ends cancelled when the task was, else like transient; anything else returns to pending, or cancelled with its task.';

SELECT edm.patch_function('edm.complete(text, bigint[], text[], integer[], text[], integer[], text[], timestamptz)'::regprocedure, ARRAY[
  [$a$           CASE i.eff
             WHEN 'sent' THEN 'sent'
             WHEN 'permanent' THEN 'failed'
             WHEN 'render_error' THEN 'failed'
             WHEN 'transient' THEN CASE WHEN st.attempts >= v_max_attempts THEN 'failed'
                                        WHEN t.status = 'cancelled' THEN 'cancelled'
                                        ELSE 'pending' END
             WHEN 'retry' THEN CASE WHEN st.attempts >= v_max_attempts THEN 'failed'
                                    WHEN t.status = 'cancelled' THEN 'cancelled'
                                    ELSE 'pending' END
             -- the connection was lost after the final dot: retried like a
             -- transient failure, and recorded as a possible duplicate
             WHEN 'uncertain' THEN CASE WHEN st.attempts >= v_max_attempts THEN 'failed'
                                        WHEN t.status = 'cancelled' THEN 'cancelled'
                                        ELSE 'pending' END
             ELSE CASE WHEN t.status = 'cancelled' THEN 'cancelled' ELSE 'pending' END
           END AS new_status,$a$,
   $a$           edm.subtask_next_status(i.eff, t.status, st.attempts, v_max_attempts) AS new_status,$a$]], '0021');

SELECT edm.patch_function('edm.expire_leases(timestamptz, integer)'::regprocedure, ARRAY[
  [$a$           CASE WHEN t.status = 'cancelled' THEN 'cancelled'
                WHEN st.attempts >= v_max_attempts THEN 'failed'
                ELSE 'pending' END AS new_status$a$,
   $a$           edm.subtask_next_status('lease_expired', t.status, st.attempts, v_max_attempts) AS new_status$a$]], '0021');

-- Roles: whoever reads edm.config may read the renamed names too (the
-- Python config API looks an old name up there).
SELECT edm.extend_roles(ARRAY[['edm.config, ', 'edm.config, edm.config_renamed, ']], '0021');

SELECT edm.harden_functions();
